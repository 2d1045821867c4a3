"""``make ensemble``: blend the OOF predictions of finished runs into ``runs/ensemble/``.

    python -m pipeline.ensemble --members a b c [--stack] -- competition=demo

Members are ``runs/<name>/`` folders with ``config.yaml``, ``oof.csv``, ``test.csv`` and
``scores.json`` (without ``--members``: every finished run of the competition). They must share the
competition and the folds file (``folds_sha256``), and their OOF must list every train id once.

Blends are fitted on the pooled OOF predictions only and scored with the competition metric:

- ``mean``: the plain average;
- ``rank_mean``: the average of per-column ranks scaled to [0, 1] (only for ``roc_auc`` on binary or
  multi-label tasks, where only the order of the predictions counts);
- ``weights``: non-negative weights summing to one, fitted with SLSQP. The metric itself is often a
  step function of the weights (accuracy, AUC, kappa), which gradient-based SLSQP cannot follow, so
  SLSQP minimises a smooth surrogate (log loss for classification, squared error for regression;
  these *are* the metric for log_loss and rmse); the fitted weights, the uniform weights and every
  one-hot weight vector are then scored with the real metric and the best is kept;
- ``caruana``: greedy forward selection with replacement (Caruana et al. 2004), starting from the
  best member and scored with the real metric, keeping the best ensemble seen;
- ``stack`` (with ``--stack``): a level-2 LogisticRegression / Ridge on the members' predictions,
  fitted fold by fold on the folds file, so no row's prediction comes from a model that saw it.

The blend with the best OOF score is written. Since ``weights`` and ``caruana`` both include the best
single member, the blend's CV is never worse than the best member's. Writes ``oof.csv``,
``test.csv``, ``weights.json``, ``config.yaml``, ``ensemble.png`` and, last, ``scores.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import optimize
from scipy.stats import rankdata

from pipeline.competition import Competition, load_competition
from pipeline.config import (
    FOLDS_DIR,
    RUNS_DIR,
    PipelineError,
    atomic_save_figure,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    dump,
    load_config,
    run,
)
from pipeline.folds import read_folds
from pipeline.metrics import Metric, get_metric, to_labels

NAME = "ensemble"
NOT_MEMBERS = ("ensemble", "bench", "bundle", "tune")  # run folders that are not experiments
MEMBER_FILES = ("config.yaml", "oof.csv", "test.csv", "scores.json")
CARUANA_ITERS = 50
EPS = 1e-7


@dataclass
class Member:
    name: str
    oof: np.ndarray  # (n_train, k), train order
    test: np.ndarray  # (n_test, k), test order
    cv: float
    folds_sha256: str


# -- members -------------------------------------------------------------------------------------
def run_competition(run_dir: Path) -> str | None:
    """The competition named in ``run_dir/config.yaml`` (None when absent or unreadable)."""
    try:
        return (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("competition")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def discover(competition: str) -> list[str]:
    """Every finished run of ``competition`` under runs/ (oof.csv and scores.json), by name."""
    if not RUNS_DIR.is_dir():
        return []
    return sorted(d.name for d in RUNS_DIR.iterdir()
                  if d.is_dir() and d.name not in NOT_MEMBERS
                  and (d / "oof.csv").exists() and (d / "scores.json").exists()
                  and run_competition(d) == competition)


def read_aligned(path: Path, comp: Competition, ids: pd.Series) -> np.ndarray:
    """The prediction columns of ``path`` as an array in the order of ``ids``; errors name the id."""
    df = pd.read_csv(path, dtype={comp.id_column: str})
    missing = [c for c in [comp.id_column, *comp.pred_columns] if c not in df.columns]
    if missing:
        raise PipelineError(f"{path} lacks the columns {missing} (expected {comp.id_column} and "
                            f"{comp.pred_columns})")
    got = df[comp.id_column]
    if got.duplicated().any():
        raise PipelineError(f"{path}: id {got[got.duplicated()].iloc[0]} appears more than once")
    extra, lacking = set(got) - set(ids), set(ids) - set(got)
    if extra or lacking:
        raise PipelineError(f"{path} does not match the ids of the competition: "
                            f"{len(lacking)} missing (e.g. {sorted(lacking)[:3]}), "
                            f"{len(extra)} unknown (e.g. {sorted(extra)[:3]})")
    pred = df.set_index(comp.id_column).loc[ids, comp.pred_columns].to_numpy(dtype=np.float64)
    if not np.isfinite(pred).all():
        raise PipelineError(f"{path} holds NaN or infinite predictions")
    return pred


def load_member(name: str, comp: Competition, competition: str, train_ids, test_ids) -> Member:
    run_dir = RUNS_DIR / name
    missing = [f for f in MEMBER_FILES if not (run_dir / f).exists()]
    if missing:
        raise PipelineError(f"{run_dir} is not a finished run (no {', '.join(missing)}): "
                            f"run `make train EXP={name}` first")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if config.get("competition") not in (competition, comp.name):
        raise PipelineError(f"{run_dir} belongs to competition '{config.get('competition')}', "
                            f"not '{comp.name}'")
    scores = json.loads((run_dir / "scores.json").read_text())
    return Member(name, read_aligned(run_dir / "oof.csv", comp, train_ids),
                  read_aligned(run_dir / "test.csv", comp, test_ids), float(scores["cv"]),
                  str(config.get("folds_sha256", "")))


def check_folds(members: list[Member], folds_sha: str, folds_path: Path) -> None:
    """All members were trained on the same folds, and those are the current folds file."""
    first = members[0]
    for m in members[1:]:
        if m.folds_sha256 != first.folds_sha256:
            raise PipelineError(
                f"runs/{first.name} and runs/{m.name} were trained on different folds "
                f"(folds_sha256 {first.folds_sha256[:12]} vs {m.folds_sha256[:12]}): their OOF "
                f"predictions cannot be blended; retrain one of them on the same folds")
    if first.folds_sha256 != folds_sha:
        raise PipelineError(f"runs/{first.name} was trained on other folds than the current "
                            f"{folds_path} (folds_sha256 {first.folds_sha256[:12]} vs "
                            f"{folds_sha[:12]}): retrain the members")


# -- blends --------------------------------------------------------------------------------------
def combine(preds: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The weighted sum over members of ``preds`` (m, n, k)."""
    return np.tensordot(np.asarray(w, dtype=np.float64), preds, axes=1)


def surrogate(y: np.ndarray, pred: np.ndarray, task: str) -> float:
    """A smooth loss standing in for the metric: log loss (classification) or mean squared error."""
    if task == "regression":
        return float(np.mean((np.asarray(y, dtype=np.float64).reshape(pred.shape) - pred) ** 2))
    p = np.clip(pred, EPS, 1 - EPS)
    if task == "multiclass":
        p = p / p.sum(1, keepdims=True)
        return float(-np.mean(np.log(p[np.arange(len(y)), y])))
    t = np.asarray(y, dtype=np.float64).reshape(p.shape)
    return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))


def best_of(candidates: list[np.ndarray], preds, y, task, metric: Metric) -> np.ndarray:
    """The candidate weight vector with the best metric (the first one on ties)."""
    best, best_score = None, None
    for w in candidates:
        s = metric(y, combine(preds, w), task)
        if best is None or metric.better(s, best_score):
            best, best_score = w, s
    return best


def fit_weights(preds: np.ndarray, y, task: str, metric: Metric) -> np.ndarray:
    """Non-negative weights summing to one: SLSQP on the surrogate, then the best by the metric
    among the fitted, the uniform and every one-hot weight vector."""
    m = len(preds)
    uniform = np.full(m, 1.0 / m)
    candidates = [uniform, *np.eye(m)]
    if m > 1:
        res = optimize.minimize(lambda w: surrogate(y, combine(preds, w), task), uniform,
                                method="SLSQP", bounds=[(0.0, 1.0)] * m,
                                constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
                                options={"maxiter": 200, "ftol": 1e-10})
        w = np.clip(res.x, 0.0, None)
        if w.sum() > 0:
            candidates.insert(0, w / w.sum())
    return best_of(candidates, preds, y, task, metric)


def caruana(preds: np.ndarray, y, task: str, metric: Metric, iters: int = CARUANA_ITERS) -> np.ndarray:
    """Greedy forward selection with replacement from the best member; the best ensemble's weights."""
    scores = [metric(y, p, task) for p in preds]
    start = 0
    for i, s in enumerate(scores):
        if metric.better(s, scores[start]):
            start = i
    counts = np.zeros(len(preds))
    counts[start] = 1
    total = preds[start].copy()
    best_counts, best_score = counts.copy(), scores[start]
    for _ in range(iters):
        trial = [metric(y, (total + p) / (counts.sum() + 1), task) for p in preds]
        pick = 0
        for i, s in enumerate(trial):
            if metric.better(s, trial[pick]):
                pick = i
        counts[pick] += 1
        total += preds[pick]
        if metric.better(trial[pick], best_score):
            best_counts, best_score = counts.copy(), trial[pick]
    return best_counts / best_counts.sum()


def rank_columns(pred: np.ndarray) -> np.ndarray:
    """Each column replaced by its ranks scaled to (0, 1]."""
    return np.column_stack([rankdata(c) / len(c) for c in pred.T])


# -- stacking ------------------------------------------------------------------------------------
def level2_model(task: str):
    """The level-2 model: a regularised linear model, hard to overfit with a few members."""
    from sklearn.linear_model import LogisticRegression, Ridge

    return Ridge(alpha=1.0) if task == "regression" else LogisticRegression(C=1.0, max_iter=1000)


def _features(preds: np.ndarray, task: str) -> list[tuple[np.ndarray, list[int]]]:
    """Level-2 problems as (features (n, f), output columns): log-probabilities / logits / values."""
    m, n, k = preds.shape
    if task == "regression":
        return [(preds.transpose(1, 0, 2).reshape(n, m * k), list(range(k)))]
    p = np.clip(preds, EPS, 1 - EPS)
    if task == "multiclass":
        return [(np.log(p).transpose(1, 0, 2).reshape(n, m * k), list(range(k)))]
    logit = np.log(p) - np.log1p(-p)
    return [(logit[:, :, j].T, [j]) for j in range(k)]  # binary, multilabel: one model per label


def _level2_predict(model, x: np.ndarray, task: str, k: int) -> np.ndarray:
    if task == "regression":
        return np.asarray(model.predict(x), dtype=np.float64).reshape(len(x), -1)
    proba = model.predict_proba(x)
    classes = list(model.classes_)
    if task == "multiclass":
        out = np.zeros((len(x), k))
        out[:, classes] = proba
        return out
    return (proba[:, classes.index(1)] if 1 in classes else np.zeros(len(x)))[:, None]


def stack(preds: np.ndarray, test_preds: np.ndarray, y: np.ndarray, folds: np.ndarray, task: str,
          make_model=level2_model) -> tuple[np.ndarray, np.ndarray]:
    """Level-2 OOF and test predictions.

    The OOF rows of fold ``f`` are predicted by models fitted on the rows of the other folds only;
    the test predictions average those fold models, like the members' test predictions.
    """
    k = preds.shape[2]
    oof, test = np.zeros(preds.shape[1:]), np.zeros(test_preds.shape[1:])
    fold_ids = np.unique(folds)
    for (x, cols), (xt, _) in zip(_features(preds, task), _features(test_preds, task), strict=True):
        yy = y[:, cols[0]] if task == "multilabel" else y
        for f in fold_ids:
            fit_rows, val_rows = folds != f, folds == f
            try:
                model = make_model(task).fit(x[fit_rows], yy[fit_rows])
            except ValueError as e:
                raise PipelineError(f"stacking: level-2 model failed on fold {f}: {e}") from e
            oof[np.ix_(val_rows, cols)] = _level2_predict(model, x[val_rows], task, k)
            test[:, cols] += _level2_predict(model, xt, task, k) / len(fold_ids)
    return oof, test


# -- the blend -----------------------------------------------------------------------------------
def candidates(comp: Competition, members: list[Member], y, folds, use_stack: bool) -> dict:
    """method -> {"weights": {member: w} or None, "oof", "test", "cv"} for every blend tried."""
    metric = get_metric(comp.metric)
    preds = np.stack([m.oof for m in members])
    tests = np.stack([m.test for m in members])
    names = [m.name for m in members]
    out = {}

    def add(method, oof, test, w=None):
        out[method] = {"weights": None if w is None else dict(zip(names, map(float, w), strict=True)),
                       "oof": oof, "test": test, "cv": metric(y, oof, comp.task)}

    uniform = np.full(len(members), 1.0 / len(members))
    add("mean", combine(preds, uniform), combine(tests, uniform), uniform)
    if comp.metric == "roc_auc" and comp.task in ("binary", "multilabel"):
        add("rank_mean", combine(np.stack([rank_columns(p) for p in preds]), uniform),
            combine(np.stack([rank_columns(t) for t in tests]), uniform), uniform)
    for method, fit in (("weights", fit_weights), ("caruana", caruana)):
        w = fit(preds, y, comp.task, metric)
        add(method, combine(preds, w), combine(tests, w), w)
    if use_stack:
        add("stack", *stack(preds, tests, y, folds, comp.task))
    return out


def choose(blends: dict, metric: Metric) -> str:
    best = None
    for method, b in blends.items():
        if best is None or metric.better(b["cv"], blends[best]["cv"]):
            best = method
    return best


# -- outputs -------------------------------------------------------------------------------------
def up_to_date(out: Path, names: list[str], meta: dict, inputs: list[Path]) -> bool:
    """The outputs exist, were made from the same members and options, and are newer than inputs."""
    files = [out / f for f in ("config.yaml", "oof.csv", "test.csv", "weights.json", "scores.json")]
    if not all(f.exists() for f in files) or not all(p.exists() for p in inputs):
        return False
    old = yaml.safe_load((out / "config.yaml").read_text()) or {}
    if old.get("members") != names or any(old.get(k) != v for k, v in meta.items()):
        return False
    return (out / "scores.json").stat().st_mtime >= max(p.stat().st_mtime for p in inputs)


def plot(path: Path, comp: Competition, members: list[Member], blends: dict, chosen: str, y,
         metric: Metric) -> None:
    """Bar chart of member and blend CV; confusion matrix of the chosen blend for classification."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    classify = comp.task in ("binary", "multiclass")
    fig, axes = plt.subplots(1, 2 if classify else 1, figsize=(12 if classify else 7, 4.5))
    axes = np.atleast_1d(axes)
    labels = [m.name for m in members] + [f"[{k}]" for k in blends]
    values = [m.cv for m in members] + [b["cv"] for b in blends.values()]
    colors = ["tab:gray"] * len(members) + ["tab:red" if k == chosen else "tab:blue" for k in blends]
    axes[0].barh(labels, values, color=colors)
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.5 or abs(hi) * 0.01 or 0.01
    axes[0].set_xlim(lo - pad, hi + pad)
    axes[0].invert_yaxis()
    axes[0].set_xlabel(f"CV {metric.name} ({'higher' if metric.greater_is_better else 'lower'} "
                       f"is better)")
    axes[0].set_title(f"members and blends (chosen: {chosen})")
    if classify:
        cm = confusion_matrix(y, to_labels(blends[chosen]["oof"], comp.task))
        names = comp.pred_columns if comp.task == "multiclass" else ["0", "1"]
        axes[1].imshow(cm, cmap="Blues")
        axes[1].set_xticks(range(len(names)), names, rotation=90 if len(names) > 10 else 0)
        axes[1].set_yticks(range(len(names)), names)
        if len(names) <= 15:
            for (i, j), v in np.ndenumerate(cm):
                axes[1].text(j, i, str(v), ha="center", va="center",
                             color="white" if v > cm.max() / 2 else "black", fontsize=8)
        axes[1].set_xlabel("predicted")
        axes[1].set_ylabel("true")
        axes[1].set_title(f"confusion matrix of the {chosen} OOF")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=100)


def write_outputs(out: Path, comp, train, test, folds, y, members, blends, chosen, meta,
                  seconds) -> dict:
    metric = get_metric(comp.metric)
    best = blends[chosen]
    for name, pred, ids in (("oof.csv", best["oof"], train), ("test.csv", best["test"], test)):
        df = pd.DataFrame(pred, columns=comp.pred_columns)
        df.insert(0, comp.id_column, ids[comp.id_column].to_numpy())
        atomic_write_csv(out / name, df)
    atomic_write_json(out / "weights.json", {
        "method": chosen, "weights": best["weights"],
        "members": {m.name: m.cv for m in members},
        "blends": {k: {"cv": b["cv"], "weights": b["weights"]} for k, b in blends.items()}})
    atomic_write_text(out / "config.yaml", dump({"name": NAME, **meta, "method": chosen,
                                                 "members": [m.name for m in members]}))
    plot(out / "ensemble.png", comp, members, blends, chosen, y, metric)
    fold_scores = [metric(y[folds == f], best["oof"][folds == f], comp.task)
                   for f in np.unique(folds)]
    scores = {"metric": metric.name, "greater_is_better": metric.greater_is_better,
              "cv": best["cv"], "folds": fold_scores, "cv_mean": float(np.mean(fold_scores)),
              "cv_std": float(np.std(fold_scores)), "train_seconds": round(seconds, 1),
              "method": chosen}
    atomic_write_json(out / "scores.json", scores)  # last: its presence marks a finished blend
    return scores


def print_table(members: list[Member], blends: dict, chosen: str, metric: Metric) -> None:
    weights = blends[chosen]["weights"] or {}
    width = max(len("member"), *(len(m.name) for m in members), len(f"blend ({chosen})"))
    print(f"{'member':<{width}}  {metric.name:>10}  {'weight':>7}")
    for m in members:
        w = weights.get(m.name)
        print(f"{m.name:<{width}}  {m.cv:>10.5f}  {'-' if w is None else f'{w:.3f}':>7}")
    others = ", ".join(f"{k} {b['cv']:.5f}" for k, b in blends.items())
    print(f"{'blend (' + chosen + ')':<{width}}  {blends[chosen]['cv']:>10.5f}    ({others})")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="pipeline.ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", nargs="*", default=[], help="run names under runs/")
    parser.add_argument("--stack", action="store_true", help="also try a level-2 stacking model")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    # `--members a b competition=demo` without `--`: the overrides are the ones with '='
    args.overrides = [*[m for m in args.members if "=" in m], *args.overrides]
    args.members = [m for m in args.members if "=" not in m]
    return args


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    args = parse_args(argv)
    cfg = load_config(None, args.overrides)
    comp = load_competition(cfg.competition)
    names = list(dict.fromkeys(args.members)) or discover(cfg.competition)
    if not names:
        raise PipelineError(f"no finished runs of competition '{comp.name}' under {RUNS_DIR}/: "
                            f"run `make train` first")
    bad = [n for n in names if n in NOT_MEMBERS]
    if bad:
        raise PipelineError(f"runs/{bad[0]} cannot be an ensemble member")
    train, test = comp.train_table(), comp.test_table()
    folds, folds_sha = read_folds(comp, train)
    out = RUNS_DIR / NAME
    meta = {"competition": cfg.competition, "folds_sha256": folds_sha, "stack": args.stack}
    inputs = [RUNS_DIR / n / f for n in names for f in ("oof.csv", "test.csv")]
    if up_to_date(out, names, meta, [*inputs, FOLDS_DIR / f"{comp.name}.csv"]):
        os.utime(out / "scores.json")
        print(f"ensemble: {out} is up to date ({', '.join(names)})")
        return 0
    members = [load_member(n, comp, cfg.competition, train[comp.id_column], test[comp.id_column])
               for n in names]
    check_folds(members, folds_sha, FOLDS_DIR / f"{comp.name}.csv")
    y = comp.targets(train)
    metric = get_metric(comp.metric)
    blends = candidates(comp, members, y, folds, args.stack)
    chosen = choose(blends, metric)
    write_outputs(out, comp, train, test, folds, y, members, blends, chosen, meta, time.time() - t0)
    print_table(members, blends, chosen, metric)
    print(f"ensemble: wrote {out}/ (method {chosen})")
    return 0


if __name__ == "__main__":
    run(main)
