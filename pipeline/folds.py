"""``make folds``: assign every training row to one cross-validation fold, once, and save it.

Folds are data: computed with a seed, written to ``folds/<competition>.csv`` and read by every later
step. Each run records the file's SHA-256 so that OOF predictions from different splits are never
blended.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold

from pipeline.competition import Competition, CompetitionError, load_competition
from pipeline.config import (
    FOLDS_DIR,
    atomic_write_csv,
    atomic_write_json,
    config_from_argv,
    file_sha256,
    run,
)


def strategy(comp: Competition) -> str:
    """The splitter the competition calls for."""
    if comp.group_column:
        return "stratified_group" if comp.task in ("binary", "multiclass") else "group"
    return {"multilabel": "multilabel_stratified", "regression": "binned_stratified"}.get(
        comp.task, "stratified")


def make_folds(comp: Competition, train: pd.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    """Return an int array, one fold in ``0..n_folds-1`` per row of ``train``.

    Invariants: every row gets exactly one fold, so the validation sets are disjoint and cover the
    table; every fold is non-empty; classification folds keep each class's share of the table
    (within one row per class and fold); multi-label folds keep each label's share as closely as
    iterative stratification can; regression folds keep the distribution of the target's quantile
    bins; rows sharing a group value are always in the same fold. The same inputs and seed give the
    same folds; a different seed gives a different assignment. A class with fewer rows than folds
    triggers a warning naming it.
    """
    n = len(train)
    if n < n_folds:
        raise CompetitionError(f"{comp.train_csv} has {n} rows, fewer than n_folds={n_folds}")
    kind = strategy(comp)
    y = comp.targets(train)
    x = np.zeros(n)
    if kind in ("stratified", "stratified_group"):
        counts = pd.Series(train[comp.target_columns[0]]).value_counts()
        rare = counts[counts < n_folds]
        if len(rare):
            warnings.warn(
                f"classes with fewer than {n_folds} rows cannot appear in every fold: "
                + ", ".join(f"{c!r} ({k} rows)" for c, k in rare.items()), stacklevel=2)
    if kind in ("group", "stratified_group"):
        groups = train[comp.group_column].astype(str).to_numpy()
        n_groups = len(set(groups))
        if n_groups < n_folds:
            raise CompetitionError(f"column '{comp.group_column}' has {n_groups} groups, "
                                   f"fewer than n_folds={n_folds}")
    if kind == "stratified":
        splitter, args = StratifiedKFold(n_folds, shuffle=True, random_state=seed), (x, y)
    elif kind == "stratified_group":
        splitter, args = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed), (x, y, groups)
    elif kind == "group":
        splitter, args = GroupKFold(n_folds, shuffle=True, random_state=seed), (x, None, groups)
    elif kind == "multilabel_stratified":
        splitter, args = MultilabelStratifiedKFold(n_folds, shuffle=True, random_state=seed), (x, y)
    else:  # binned_stratified: stratify on quantile bins of the (first) target
        bins = pd.qcut(pd.Series(y[:, 0]).rank(method="first"),
                       q=max(2, min(10, n // n_folds)), labels=False)
        splitter, args = StratifiedKFold(n_folds, shuffle=True, random_state=seed), (x, bins)
    folds = np.full(n, -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for k, (_, val) in enumerate(splitter.split(*args)):
            folds[val] = k
    assert (folds >= 0).all(), "splitter left rows without a fold"
    return folds


def write_folds(comp: Competition, n_folds: int, seed: int) -> tuple[str, bool]:
    """Write ``folds/<name>.csv`` (id, fold) unless it already holds this split; (path, written)."""
    path = FOLDS_DIR / f"{comp.name}.csv"
    meta_path = path.with_suffix(".json")
    train = comp.train_table()
    meta = {"competition": comp.name, "n_folds": n_folds, "fold_seed": seed,
            "strategy": strategy(comp), "rows": len(train)}
    if path.exists() and meta_path.exists():
        import json

        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in meta} == meta and old.get("sha256") == file_sha256(path):
            return str(path), False
    folds = make_folds(comp, train, n_folds, seed)
    atomic_write_csv(path, pd.DataFrame({comp.id_column: train[comp.id_column], "fold": folds}))
    atomic_write_json(meta_path, {**meta, "sha256": file_sha256(path)})
    return str(path), True


def read_folds(comp: Competition, train: pd.DataFrame) -> tuple[np.ndarray, str]:
    """The fold of every row of ``train`` and the folds file's hash; errors name the file."""
    path = FOLDS_DIR / f"{comp.name}.csv"
    if not path.exists():
        raise CompetitionError(f"{path} not found: run `make folds COMPETITION={comp.name}`")
    df = pd.read_csv(path, dtype={comp.id_column: str})
    if comp.id_column not in df.columns or "fold" not in df.columns:
        raise CompetitionError(f"{path} must have columns '{comp.id_column}' and 'fold'")
    lookup = df.set_index(comp.id_column)["fold"]
    ids = train[comp.id_column]
    if set(lookup.index) != set(ids) or len(df) != len(train):
        raise CompetitionError(f"{path} does not list every id of {comp.train_csv} exactly once: "
                               f"rerun `make folds COMPETITION={comp.name}`")
    return lookup.loc[ids].to_numpy(dtype=np.int64), file_sha256(path)


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(argv, "pipeline.folds", __doc__)
    comp = load_competition(cfg.competition)
    path, written = write_folds(comp, cfg.n_folds, cfg.fold_seed)
    if written:
        counts = pd.read_csv(path)["fold"].value_counts().sort_index().tolist()
        print(f"folds: wrote {path} ({strategy(comp)}, {cfg.n_folds} folds, rows per fold {counts})")
    else:
        print(f"folds: {path} is up to date")
    return 0


if __name__ == "__main__":
    run(main)
