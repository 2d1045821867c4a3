"""``make leaderboard``: one table of every finished run of a competition, best CV first.

    python -m pipeline.leaderboard competition=demo

Per run (``runs/*/scores.json`` whose ``config.yaml`` names the competition, the ensemble included):
metric, pooled OOF CV, fold scores as mean ± std, training time, and the leaderboard score where it
is known: from ``submissions/history.csv`` (written by ``make submit``; a score counts only while the
run's CV is still the one submitted) and, for a real competition, from the account's Kaggle
submissions (skipped with a one-line note when the client has no credentials or no network).
"""

from __future__ import annotations

import json
import math

import pandas as pd

from pipeline.competition import load_competition
from pipeline.config import RUNS_DIR, config_from_argv, run
from pipeline.demo import solution_path
from pipeline.ensemble import run_competition
from pipeline.metrics import get_metric
from pipeline.submit import read_history


def collect(competition: str, names: tuple[str, ...]) -> list[dict]:
    """One row per finished run of the competition."""
    rows = []
    if not RUNS_DIR.is_dir():
        return rows
    for d in sorted(RUNS_DIR.iterdir()):
        path = d / "scores.json"
        if not path.exists() or run_competition(d) not in names:
            continue
        s = json.loads(path.read_text())
        folds = s.get("folds") or []
        mean = s.get("cv_mean", sum(folds) / len(folds) if folds else math.nan)
        std = s.get("cv_std", pd.Series(folds, dtype=float).std(ddof=0) if folds else math.nan)
        rows.append({"run": d.name, "metric": s.get("metric", ""), "cv": float(s["cv"]),
                     "folds": f"{mean:.5f} ± {std:.5f} ({len(folds)})",
                     "time": _duration(s.get("train_seconds")), "lb": None})
    return rows


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def local_scores(rows: list[dict], competition: str) -> None:
    """Fill ``lb`` from submissions/history.csv: the latest score of the run at its current CV."""
    hist = read_history()
    hist = hist[(hist["competition"] == competition) & pd.to_numeric(hist["lb"], errors="coerce").notna()]
    for row in rows:
        mine = hist[(hist["source"] == row["run"])
                    & (pd.to_numeric(hist["cv"], errors="coerce").round(5) == round(row["cv"], 5))]
        if len(mine):
            row["lb"] = float(mine["lb"].iloc[-1])


def kaggle_scores(rows: list[dict], slug: str) -> None:
    """Fill ``lb`` from the account's Kaggle submissions, matched on our file names / messages."""
    try:
        from pipeline import kaggle_io

        subs = kaggle_io.list_submissions(slug)
    except Exception as e:  # any failure only costs the Kaggle column
        print(f"note: Kaggle scores not fetched ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return
    for row in rows:
        prefix = f"{slug}-{row['run']}-cv{row['cv']:.5f}"
        for s in subs:  # newest first
            if s.get("publicScore") is not None and (
                    str(s.get("fileName", "")).startswith(prefix)
                    or str(s.get("description", "")).startswith(f"{row['run']} | CV {row['metric']} "
                                                              f"{row['cv']:.5f}")):
                row["lb"] = float(s["publicScore"])
                break


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(argv, "pipeline.leaderboard", __doc__)
    comp = load_competition(cfg.competition, check_files=False)
    metric = get_metric(comp.metric)
    rows = collect(cfg.competition, (cfg.competition, comp.name))
    if not rows:
        print(f"leaderboard: no finished runs of '{comp.name}' under {RUNS_DIR}/")
        return 0
    local_scores(rows, comp.name)
    if not solution_path(comp.name).exists():
        kaggle_scores(rows, comp.name)
    rows.sort(key=lambda r: -r["cv"] if metric.greater_is_better else r["cv"])
    table = pd.DataFrame(rows)
    table["cv"] = table["cv"].map(lambda v: f"{v:.5f}")
    table["lb"] = table["lb"].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.5f}")
    table.columns = ["run", "metric", "CV", "folds mean ± std (n)", "train time", "leaderboard"]
    direction = "higher" if metric.greater_is_better else "lower"
    print(f"{comp.name}: {len(rows)} run(s), {metric.name} ({direction} is better)")
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    run(main)
