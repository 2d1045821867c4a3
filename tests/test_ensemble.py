"""Blending fabricated run folders: alignment, refusals, blend choice, leak-free stacking."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import make_competition

from pipeline import ensemble as E
from pipeline.competition import load_competition
from pipeline.config import PipelineError, file_sha256
from pipeline.folds import read_folds, write_folds
from pipeline.metrics import get_metric


def setup_comp(workdir, task="multiclass", name="toy", **kw):
    """A tiny competition with 4 folds written; returns the loaded Competition."""
    make_competition(workdir, name=name, task=task, **kw)
    comp = load_competition(name)
    write_folds(comp, 4, 0)
    return comp


def write_run(comp, name, oof, test, folds_sha=None, competition=None, train_ids=None):
    """A run folder as pipeline.train writes it, with the given OOF and test predictions."""
    train, tst = comp.train_table(), comp.test_table()
    run = Path("runs") / name
    run.mkdir(parents=True, exist_ok=True)
    sha = folds_sha or file_sha256(Path("folds") / f"{comp.name}.csv")
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"competition": competition or comp.name, "name": name, "seed": 0, "folds_sha256": sha}))
    ids = train[comp.id_column] if train_ids is None else train_ids
    for fname, pred, id_ in (("oof.csv", oof, ids), ("test.csv", test, tst[comp.id_column])):
        df = pd.DataFrame(np.asarray(pred).reshape(len(id_), -1), columns=comp.pred_columns)
        df.insert(0, comp.id_column, list(id_))
        df.to_csv(run / fname, index=False)
    metric = get_metric(comp.metric)
    y = comp.targets(train)
    cv = metric(y, np.asarray(oof)[: len(y)], comp.task) if train_ids is None else 0.0
    folds, _ = read_folds(comp, train)
    fold_scores = [metric(y[folds == f], np.asarray(oof)[folds == f], comp.task) for f in range(4)] \
        if train_ids is None else []
    (run / "scores.json").write_text(json.dumps({
        "metric": metric.name, "greater_is_better": metric.greater_is_better, "cv": cv,
        "folds": fold_scores, "cv_mean": float(np.mean(fold_scores or [0])), "cv_std": 0.0,
        "train_seconds": 12.5}))
    return run


def complementary(n, n_classes=3, strong_on=0):
    """Class probabilities right with confidence on one third of the rows, wrong elsewhere.

    Two members strong on different thirds blend into a better one than either.
    """
    y = np.arange(n) % n_classes
    group = (np.arange(n) // n_classes) % 3
    p = np.zeros((n, n_classes))
    for i in range(n):
        wrong = (y[i] + 1) % n_classes
        if group[i] == strong_on:
            p[i, y[i]], p[i, wrong] = 0.8, 0.1
        else:
            p[i, y[i]], p[i, wrong] = 0.4, 0.5
        p[i, p[i] == 0] = 1 - p[i].sum()
    return p


def noisy(y_onehot, seed, scale=1.0):
    """Probabilities (or values) = target + noise, squashed into (0, 1) for classification."""
    rng = np.random.default_rng(seed)
    return y_onehot + rng.normal(0, scale, y_onehot.shape)


def test_two_members_blend_beats_both(workdir, capsys):
    comp = setup_comp(workdir)
    n, m = 40, 10
    test_pred = np.full((m, 3), 1 / 3)
    write_run(comp, "a", complementary(n, strong_on=0), test_pred)
    write_run(comp, "b", complementary(n, strong_on=1), test_pred)
    assert E.main(["--members", "a", "b", "--", "competition=toy"]) == 0
    out = workdir / "runs" / "ensemble"
    scores = json.loads((out / "scores.json").read_text())
    best_member = max(json.loads((workdir / "runs" / r / "scores.json").read_text())["cv"]
                      for r in ("a", "b"))
    assert scores["cv"] > best_member
    assert len(scores["folds"]) == 4 and scores["metric"] == "accuracy"
    weights = json.loads((out / "weights.json").read_text())
    w = weights["weights"]
    assert set(w) == {"a", "b"} and all(v > 0 for v in w.values())
    assert sum(w.values()) == pytest.approx(1.0)
    assert {"mean", "weights", "caruana"} <= set(weights["blends"])
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["members"] == ["a", "b"] and cfg["competition"] == "toy"
    assert cfg["method"] == weights["method"]
    assert cfg["folds_sha256"] == file_sha256(workdir / "folds" / "toy.csv")
    oof = pd.read_csv(out / "oof.csv", dtype={"id": str})
    train = pd.read_csv(workdir / "data" / "toy" / "train.csv", dtype={"id": str})
    assert list(oof["id"]) == list(train["id"]) and list(oof.columns[1:]) == ["0", "1", "2"]
    test = pd.read_csv(out / "test.csv", dtype={"id": str})
    assert len(test) == m and np.allclose(test[["0", "1", "2"]].sum(axis=1), 1)
    assert (out / "ensemble.png").stat().st_size > 1000
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2].startswith("blend (") and "a " in printed[1] and "b " in printed[2]


def test_blend_never_worse_than_best_member(workdir):
    """A strong member and a useless one: the blend keeps (at least) the strong member's CV."""
    comp = setup_comp(workdir)
    y = comp.targets(comp.train_table())
    good = np.eye(3)[y] * 0.7 + 0.1
    bad = np.random.default_rng(0).dirichlet(np.ones(3), len(y))
    write_run(comp, "good", good, np.full((10, 3), 1 / 3))
    write_run(comp, "bad", bad, np.full((10, 3), 1 / 3))
    E.main(["--members", "good", "bad", "--stack", "--", "competition=toy"])
    scores = json.loads((workdir / "runs" / "ensemble" / "scores.json").read_text())
    assert scores["cv"] >= 1.0


@pytest.mark.parametrize("task", ["binary", "multilabel", "regression"])
def test_other_tasks_with_stacking(workdir, task):
    comp = setup_comp(workdir, task=task)
    y = comp.targets(comp.train_table()).reshape(40, -1).astype(float)
    k = y.shape[1]
    members = []
    for seed in (1, 2, 3):
        pred = noisy(y, seed, 0.6 if task != "regression" else 1.0)
        if task != "regression":
            pred = 1 / (1 + np.exp(-4 * (pred - 0.5)))
        members.append(f"m{seed}")
        write_run(comp, f"m{seed}", pred, np.full((10, k), 0.5))
    assert E.main(["--members", *members, "--stack", "competition=toy"]) == 0
    out = workdir / "runs" / "ensemble"
    scores = json.loads((out / "scores.json").read_text())
    metric = get_metric(comp.metric)
    cvs = [json.loads((workdir / "runs" / m / "scores.json").read_text())["cv"] for m in members]
    best = max(cvs) if metric.greater_is_better else min(cvs)
    assert not metric.better(best, scores["cv"])
    blends = json.loads((out / "weights.json").read_text())["blends"]
    assert "stack" in blends and ("rank_mean" in blends) == (task != "regression")
    assert list(pd.read_csv(out / "test.csv").columns[1:]) == comp.pred_columns


def test_members_on_different_folds_are_refused(workdir):
    comp = setup_comp(workdir)
    p = complementary(40)
    write_run(comp, "a", p, np.full((10, 3), 1 / 3))
    write_run(comp, "b", p, np.full((10, 3), 1 / 3), folds_sha="0" * 64)
    with pytest.raises(PipelineError, match=r"runs/a and runs/b were trained on different folds"):
        E.main(["--members", "a", "b", "--", "competition=toy"])
    assert not (workdir / "runs" / "ensemble").exists()


def test_members_on_stale_folds_are_refused(workdir):
    comp = setup_comp(workdir)
    write_run(comp, "a", complementary(40), np.full((10, 3), 1 / 3), folds_sha="0" * 64)
    with pytest.raises(PipelineError, match=r"runs/a was trained on other folds than the current"):
        E.main(["--members", "a", "--", "competition=toy"])


def test_member_of_other_competition_or_ids_is_refused(workdir):
    comp = setup_comp(workdir)
    p = complementary(40)
    write_run(comp, "a", p, np.full((10, 3), 1 / 3))
    write_run(comp, "other", p, np.full((10, 3), 1 / 3), competition="elsewhere")
    with pytest.raises(PipelineError, match=r"runs/other belongs to competition 'elsewhere'"):
        E.main(["--members", "a", "other", "--", "competition=toy"])
    ids = comp.train_table()["id"].tolist()
    write_run(comp, "short", p[:39], np.full((10, 3), 1 / 3), train_ids=ids[:39])
    with pytest.raises(PipelineError, match=r"short/oof.csv does not match .* 1 missing .*r039"):
        E.main(["--members", "a", "short", "--", "competition=toy"])
    with pytest.raises(PipelineError, match=r"runs/nope is not a finished run"):
        E.main(["--members", "a", "nope", "--", "competition=toy"])


def test_discovers_members_and_is_idempotent(workdir, capsys):
    comp = setup_comp(workdir)
    write_run(comp, "a", complementary(40, strong_on=0), np.full((10, 3), 1 / 3))
    write_run(comp, "b", complementary(40, strong_on=1), np.full((10, 3), 1 / 3))
    write_run(comp, "bench", complementary(40), np.full((10, 3), 1 / 3))
    write_run(comp, "x", complementary(40), np.full((10, 3), 1 / 3), competition="elsewhere")
    (workdir / "runs" / "half").mkdir()  # an unfinished run: config.yaml only
    E.main(["competition=toy"])
    out = workdir / "runs" / "ensemble"
    assert yaml.safe_load((out / "config.yaml").read_text())["members"] == ["a", "b"]
    capsys.readouterr()
    before = (out / "oof.csv").stat().st_mtime_ns
    E.main(["--members", "a", "b", "--", "competition=toy"])
    assert "up to date" in capsys.readouterr().out
    assert (out / "oof.csv").stat().st_mtime_ns == before
    # a retrained member makes the blend stale
    later = (out / "scores.json").stat().st_mtime + 5
    os.utime(workdir / "runs" / "b" / "oof.csv", (later, later))
    E.main(["--members", "a", "b", "--", "competition=toy"])
    assert "up to date" not in capsys.readouterr().out
    # another member list is another blend
    E.main(["--members", "a", "--", "competition=toy"])
    assert yaml.safe_load((out / "config.yaml").read_text())["members"] == ["a"]


@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel", "regression"])
def test_stacking_is_leak_free(task):
    """Level-2 OOF rows of a fold do not change when that fold's targets change: by construction
    they come from models that never saw those rows. Test rows average the fold models."""
    rng = np.random.default_rng(0)
    n, k = 60, {"multiclass": 3, "binary": 1, "multilabel": 2, "regression": 1}[task]
    folds = (np.arange(n) // 3) % 3
    if task == "multiclass":
        y = np.arange(n) % 3
    elif task == "binary":
        y = np.arange(n) % 2
    elif task == "multilabel":
        y = np.column_stack([np.arange(n) % 2, (np.arange(n) // 2) % 2]).astype(float)
    else:
        y = rng.normal(size=(n, 1))
    preds = rng.uniform(0.05, 0.95, size=(2, n, k))
    tests = rng.uniform(0.05, 0.95, size=(2, 7, k))
    oof, test = E.stack(preds, tests, y, folds, task)
    assert oof.shape == (n, k) and test.shape == (7, k)
    y2 = y.copy()
    rows = folds == 1
    if task == "regression":
        y2[rows] = rng.normal(size=(rows.sum(), 1)) * 100
    elif task == "multilabel":
        y2[rows] = 1 - y2[rows]
    else:
        y2[rows] = (y2[rows] + 1) % (3 if task == "multiclass" else 2)
    oof2, _ = E.stack(preds, tests, y2, folds, task)
    assert np.allclose(oof2[rows], oof[rows])
    assert not np.allclose(oof2[~rows], oof[~rows])  # the others did learn from fold 1's rows
