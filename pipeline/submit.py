"""``make submit``: turn ``runs/<source>/test.csv`` into a validated submission file.

    python -m pipeline.submit --source ensemble [--upload] -- competition=demo

The file has exactly the columns, ids and id order of ``sample_submission.csv``, with values of the
kind the competition's ``submission`` key asks for: ``label`` (the class name of the argmax, or 0/1
at 0.5 for binary), ``probs`` (one probability column per class or label) or ``value`` (P(1) for
binary; the regression value clipped to ``target_range``, rounded to whole grades for ``qwk``).
:func:`validate_submission` checks it before anything is written; an invalid one is never written.

It goes to ``submissions/<competition>-<source>-cv<cv>.csv``. Where the competition's answers are at
hand (the demo's ``data/_private/demo/solution.csv``), the leaderboard score is printed the way Kaggle
would compute it. Every submission is logged in ``submissions/history.csv`` (time, competition,
source, file, cv, lb, uploaded), which ``make leaderboard`` reads. ``--upload`` sends the file with
the official kaggle client, with the source and CV in the message.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.competition import Competition, load_competition
from pipeline.config import (
    RUNS_DIR,
    SUBMISSIONS_DIR,
    PipelineError,
    atomic_write_csv,
    load_config,
    run,
)
from pipeline.demo import solution_path
from pipeline.metrics import get_metric

HISTORY = SUBMISSIONS_DIR / "history.csv"
HISTORY_COLUMNS = ["time", "competition", "source", "file", "cv", "lb", "uploaded", "message"]


class SubmissionError(PipelineError):
    """A submission that does not fit sample_submission.csv; the message names the problem."""


# -- building ------------------------------------------------------------------------------------
def value_columns(comp: Competition, sample: pd.DataFrame) -> dict[str, str]:
    """Submission column -> prediction column of test.csv, for every non-id column of the sample."""
    cols = [c for c in sample.columns if c != comp.id_column]
    sample_path = comp.path(comp.sample_submission)
    if comp.submission == "probs" or all(c in comp.pred_columns for c in cols):
        missing = [c for c in cols if c not in comp.pred_columns]
        if missing:
            raise SubmissionError(f"{sample_path} has columns {missing} that are not prediction "
                                  f"columns {comp.pred_columns}")
        return {c: c for c in cols}
    if len(cols) == 1 and (comp.submission == "label" or len(comp.pred_columns) == 1):
        return {cols[0]: ""}  # one answer column, named as the sample names it
    raise SubmissionError(f"{sample_path}: cannot tell which of the columns {cols} takes the "
                          f"{comp.submission} predictions {comp.pred_columns}")


def read_test_predictions(path: Path, comp: Competition, ids: pd.Series) -> pd.DataFrame:
    """``path`` (a run's test.csv) indexed by id in the order of ``ids``; errors name the problem."""
    if not path.exists():
        raise SubmissionError(f"{path} not found: train or blend it first")
    df = pd.read_csv(path, dtype={comp.id_column: str})
    missing = [c for c in [comp.id_column, *comp.pred_columns] if c not in df.columns]
    if missing:
        raise SubmissionError(f"{path} lacks the columns {missing}")
    got = df[comp.id_column]
    lacking, extra = [i for i in ids if i not in set(got)], sorted(set(got) - set(ids))
    if lacking or extra or got.duplicated().any():
        raise SubmissionError(f"{path} does not list every test id once: missing {lacking[:3]}, "
                              f"unknown {extra[:3]}, repeated {got[got.duplicated()].tolist()[:3]}")
    pred = df.set_index(comp.id_column).loc[list(ids), comp.pred_columns]
    bad = ~np.isfinite(pred.to_numpy(dtype=np.float64)).all(1)
    if bad.any():
        raise SubmissionError(f"{path} holds NaN or infinite predictions (id {pred.index[bad][0]})")
    return pred


def build_submission(comp: Competition, pred: pd.DataFrame, sample: pd.DataFrame) -> pd.DataFrame:
    """The submission table: the sample's ids and columns, values of kind ``comp.submission``."""
    p = pred.loc[sample[comp.id_column]].to_numpy(dtype=np.float64)
    sub = pd.DataFrame({comp.id_column: sample[comp.id_column].to_numpy()})
    for col, src in value_columns(comp, sample).items():
        if comp.submission == "label":
            if comp.task == "multiclass":
                sub[col] = np.asarray(comp.classes, dtype=object)[p.argmax(1)]
                if all(isinstance(c, int | np.integer) for c in comp.classes):
                    sub[col] = sub[col].astype(np.int64)
            else:
                sub[col] = (p[:, 0] >= 0.5).astype(np.int64)
        elif comp.submission == "value" and comp.task == "regression":
            v = p[:, comp.pred_columns.index(src) if src else 0]
            lo, hi = grade_range(comp)
            sub[col] = np.clip(np.rint(v), lo, hi).astype(np.int64) if comp.metric == "qwk" \
                else np.clip(v, lo, hi)
        else:  # probs, or binary value: the probability itself
            sub[col] = p[:, comp.pred_columns.index(src) if src else 0]
    return sub


def grade_range(comp: Competition) -> tuple[float, float]:
    """The range of a regression submission: target_range, in whole grades for qwk."""
    lo, hi = comp.target_range or (-np.inf, np.inf)
    return (float(np.rint(lo)), float(np.rint(hi))) if comp.metric == "qwk" else (lo, hi)


def validate_submission(comp: Competition, df: pd.DataFrame) -> None:
    """Raise SubmissionError unless ``df`` has the sample's columns, ids and order and valid values."""
    sample = comp.read_csv(comp.sample_submission, [comp.id_column])
    if list(df.columns) != list(sample.columns):
        missing = [c for c in sample.columns if c not in df.columns]
        extra = [c for c in df.columns if c not in sample.columns]
        raise SubmissionError(f"submission columns {list(df.columns)} differ from "
                              f"{comp.sample_submission} {list(sample.columns)}: missing {missing}, "
                              f"unexpected {extra}{'' if missing or extra else ', order differs'}")
    if len(df) != len(sample):
        raise SubmissionError(f"submission has {len(df)} rows, {comp.sample_submission} has "
                              f"{len(sample)}")
    ids, want = df[comp.id_column].astype(str), sample[comp.id_column]
    if set(ids) != set(want):
        missing, extra = sorted(set(want) - set(ids)), sorted(set(ids) - set(want))
        raise SubmissionError(f"submission ids differ from {comp.sample_submission}: missing "
                              f"{missing[:3]}, unexpected {extra[:3]}")
    if not (ids.to_numpy() == want.to_numpy()).all():
        i = int(np.argmax(ids.to_numpy() != want.to_numpy()))
        raise SubmissionError(f"submission ids are not in the order of {comp.sample_submission}: "
                              f"row {i} is {ids.iloc[i]}, expected {want.iloc[i]}")
    for col in df.columns.drop(comp.id_column):
        _check_values(comp, df, col)


def _show(v) -> str:
    return repr(v.item() if hasattr(v, "item") else v)


def _check_values(comp: Competition, df: pd.DataFrame, col: str) -> None:
    values = df[col]
    where = f"submission column '{col}'"
    if values.isna().any():
        raise SubmissionError(f"{where} is empty (NaN) for id {df.loc[values.isna(), comp.id_column].iloc[0]}")
    if comp.submission == "label" and comp.task == "multiclass":
        allowed = set(comp.classes) | {str(c) for c in comp.classes}
        bad = ~values.isin(allowed)
        if bad.any():
            raise SubmissionError(f"{where}: {_show(values[bad].iloc[0])} (id "
                                  f"{df.loc[bad, comp.id_column].iloc[0]}) is not a class")
        return
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(v).all():
        i = int(np.argmax(~np.isfinite(v)))
        raise SubmissionError(f"{where}: {_show(values.iloc[i])} (id {df[comp.id_column].iloc[i]}) is "
                              f"not a finite number")
    if comp.submission == "label":
        lo, hi, what = 0, 1, "a 0/1 label"
        bad = ~np.isin(v, [0, 1])
    elif comp.task == "regression":
        lo, hi = grade_range(comp)
        what = f"within target_range [{lo}, {hi}]"
        bad = (v < lo) | (v > hi)
        if comp.metric == "qwk":
            bad |= v != np.rint(v)
            what += " and a whole grade"
    else:
        what = "a probability in [0, 1]"
        bad = (v < 0) | (v > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise SubmissionError(f"{where}: {_show(values.iloc[i])} (id {df[comp.id_column].iloc[i]}) is "
                              f"not {what}")


# -- scoring and the log ---------------------------------------------------------------------------
def local_leaderboard(comp: Competition, sub: pd.DataFrame) -> float | None:
    """The metric of ``sub`` against the private answers (demo), or None when there are none."""
    path = solution_path(comp.name)
    if not path.exists():
        return None
    sol = pd.read_csv(path, dtype={comp.id_column: str}).set_index(comp.id_column)
    missing = [c for c in comp.target_columns if c not in sol.columns]
    if missing or set(sol.index) != set(sub[comp.id_column]):
        raise PipelineError(f"{path} does not fit the submission (columns {missing} missing or "
                            f"other ids)")
    y = comp.targets(sol.loc[sub[comp.id_column]].reset_index())
    return get_metric(comp.metric)(y, submission_matrix(comp, sub), comp.task)


def submission_matrix(comp: Competition, sub: pd.DataFrame) -> np.ndarray:
    """The submission as the prediction matrix the metric takes (a label becomes one-hot)."""
    values = sub.drop(columns=comp.id_column)
    if comp.submission == "label" and comp.task == "multiclass":
        lookup = {str(c): i for i, c in enumerate(comp.classes)}
        return np.eye(len(comp.classes))[values.iloc[:, 0].astype(str).map(lookup).to_numpy()]
    cols = [c for c in comp.pred_columns if c in values.columns] or list(values.columns)
    return values[cols].to_numpy(dtype=np.float64)


def read_history() -> pd.DataFrame:
    if not HISTORY.exists():
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    return pd.read_csv(HISTORY, dtype={"file": str, "source": str, "competition": str,
                                       "uploaded": str, "message": str})


def log_submission(**row) -> None:
    """Append one row to submissions/history.csv (rewritten atomically)."""
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}
    new = pd.DataFrame([{c: row.get(c, "") for c in HISTORY_COLUMNS}])
    hist = read_history()
    atomic_write_csv(HISTORY, pd.concat([hist, new], ignore_index=True) if len(hist) else new)


# -- the entry point -----------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="pipeline.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="ensemble", help="run folder under runs/ (default ensemble)")
    parser.add_argument("--upload", action="store_true", help="upload with the kaggle client")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def read_source(run_dir: Path, competition: str, comp: Competition) -> dict:
    """The source run's scores, after checking it is a finished run of this competition."""
    for name in ("scores.json", "test.csv"):
        if not (run_dir / name).exists():
            raise SubmissionError(f"{run_dir / name} not found: `make train` or `make ensemble` first")
    if (run_dir / "config.yaml").exists():
        owner = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("competition")
        if owner not in (competition, comp.name):
            raise SubmissionError(f"{run_dir} belongs to competition '{owner}', not '{comp.name}'")
    return json.loads((run_dir / "scores.json").read_text())


def upload(comp: Competition, path: Path, source: str, cv: float, metric: str) -> str:
    message = f"{source} | CV {metric} {cv:.5f} | {path.name}"
    if solution_path(comp.name).exists():
        print(f"submit: '{comp.name}' is scored locally, not on Kaggle: nothing to upload")
        return ""
    from pipeline import kaggle_io  # lazily: only uploads need the kaggle client

    reply = kaggle_io.submit(comp.name, path, message)
    print(f"submit: uploaded {path} to '{comp.name}' ({reply.get('status', '')}): {message}")
    return str(reply.get("ref", "yes"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(None, args.overrides)
    comp = load_competition(cfg.competition)
    run_dir = RUNS_DIR / args.source
    scores = read_source(run_dir, cfg.competition, comp)
    cv, metric = float(scores["cv"]), get_metric(comp.metric)
    path = SUBMISSIONS_DIR / f"{comp.name}-{args.source}-cv{cv:.5f}.csv"
    hist = read_history()
    mine = hist[hist["file"] == str(path)]
    to_upload = args.upload and not solution_path(comp.name).exists()
    if path.exists() and path.stat().st_mtime >= (run_dir / "test.csv").stat().st_mtime \
            and len(mine) and (not to_upload or mine["uploaded"].fillna("").astype(bool).any()):
        lb = mine["lb"].iloc[-1]
        print(f"submit: {path} is up to date"
              f"{'' if pd.isna(lb) or lb == '' else f' (leaderboard {metric.name} {float(lb):.5f})'}")
        return 0
    sample = comp.read_csv(comp.sample_submission, [comp.id_column])
    pred = read_test_predictions(run_dir / "test.csv", comp, sample[comp.id_column])
    sub = build_submission(comp, pred, sample)
    validate_submission(comp, sub)
    atomic_write_csv(path, sub)
    print(f"submit: wrote {path} ({len(sub)} rows, {comp.submission}; CV {metric.name} {cv:.5f})")
    lb = local_leaderboard(comp, sub)
    if lb is not None:
        print(f"leaderboard {metric.name}: {lb:.5f} (scored against {solution_path(comp.name)})")
    uploaded = upload(comp, path, args.source, cv, metric.name) if args.upload else ""
    log_submission(competition=comp.name, source=args.source, file=str(path), cv=cv,
                   lb="" if lb is None else lb, uploaded=uploaded,
                   message=f"{args.source} CV {metric.name} {cv:.5f}")
    return 0


if __name__ == "__main__":
    run(main)
