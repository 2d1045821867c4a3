import numpy as np
import pandas as pd
import pytest
from conftest import make_competition

from pipeline import folds as F
from pipeline.competition import load_competition


def _folds(workdir, n_folds=4, seed=0, **kw):
    make_competition(workdir, **kw)
    comp = load_competition("toy")
    train = comp.train_table()
    return comp, train, F.make_folds(comp, train, n_folds, seed)


def test_every_row_one_fold_disjoint_and_nonempty(workdir):
    _, train, folds = _folds(workdir, n_train=60)
    assert len(folds) == len(train)
    assert set(folds) == {0, 1, 2, 3}
    assert np.bincount(folds).min() >= 60 // 4 - 1


def test_stratified_keeps_class_ratios(workdir):
    comp, train, folds = _folds(workdir, n_train=120, n_classes=3)
    y = comp.targets(train)
    for k in range(4):
        share = np.bincount(y[folds == k], minlength=3) / (folds == k).sum()
        assert np.abs(share - 1 / 3).max() < 0.02 + 1 / (folds == k).sum()


def test_groups_never_split(workdir):
    _, train, folds = _folds(workdir, n_train=64, groups=True)
    per_group = pd.Series(folds).groupby(train["patient"].to_numpy()).nunique()
    assert (per_group == 1).all()


def test_multilabel_and_regression_strategies(workdir):
    comp, train, folds = _folds(workdir, task="multilabel", n_train=80)
    assert F.strategy(comp) == "multilabel_stratified"
    y = comp.targets(train)
    for k in range(4):
        assert abs(y[folds == k, 0].mean() - y[:, 0].mean()) < 0.1


def test_regression_bins(workdir):
    comp, train, folds = _folds(workdir, task="regression", n_train=80)
    assert F.strategy(comp) == "binned_stratified"
    y = comp.targets(train)[:, 0]
    for k in range(4):
        assert abs(np.median(y[folds == k]) - np.median(y)) <= 1.0


def test_same_seed_same_folds_other_seed_other_folds(workdir):
    comp, train, a = _folds(workdir, n_train=60, seed=1)
    b = F.make_folds(comp, train, 4, 1)
    c = F.make_folds(comp, train, 4, 2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rare_class_warns_naming_it(workdir):
    make_competition(workdir, n_train=30)
    path = workdir / "data" / "toy" / "train.csv"
    df = pd.read_csv(path)
    df.loc[0, "label"] = 9
    df.to_csv(path, index=False)
    comp = load_competition("toy")
    with pytest.warns(UserWarning, match="9"):
        F.make_folds(comp, comp.train_table(), 4, 0)


def test_write_folds_file_and_rerun_is_noop(workdir, capsys):
    make_competition(workdir)
    assert F.main(["competition=toy", "n_folds=4"]) == 0
    path = workdir / "folds" / "toy.csv"
    df = pd.read_csv(path, dtype={"id": str})
    train = pd.read_csv(workdir / "data" / "toy" / "train.csv", dtype={"id": str})
    assert list(df.columns) == ["id", "fold"]
    assert sorted(df["id"]) == sorted(train["id"]) and df["id"].is_unique
    mtime = path.stat().st_mtime_ns
    F.main(["competition=toy", "n_folds=4"])
    assert path.stat().st_mtime_ns == mtime
    assert "up to date" in capsys.readouterr().out
    F.main(["competition=toy", "n_folds=5"])
    assert pd.read_csv(path)["fold"].nunique() == 5
