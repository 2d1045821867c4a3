"""make bundle: the offline folder for code competitions, built from real runs and checked offline."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import make_competition, write_image

from pipeline import bundle as B
from pipeline import ensemble as E
from pipeline import folds as F
from pipeline import train as T

TINY = ["model=test_resnet", "img_size=32", "batch_size=8", "epochs=1", "lr=0.01",
        "infer_batch_size=16", "threads=1"]


def _runs(workdir, task="multiclass", names=("a", "b")):
    make_competition(workdir, task=task)
    F.main(["competition=toy", "n_folds=3"])
    for i, name in enumerate(names):
        T.main(["competition=toy", f"name={name}", *TINY, f"seed={i}",
                *(["tta=hflip"] if i == 0 else [])])


@pytest.mark.slow
def test_bundle_predicts_a_hidden_test_set_offline(workdir, capsys):
    _runs(workdir)
    E.main(["--", "competition=toy"])
    assert B.main(["--source", "ensemble", "--", "competition=toy"]) == 0
    out = capsys.readouterr().out
    assert "checked offline" in out and "same submission" in out
    bundle = workdir / "runs" / "bundle" / "ensemble"
    manifest = json.loads((bundle / "bundle.json").read_text())
    weights = json.loads((workdir / "runs" / "ensemble" / "weights.json").read_text())
    assert manifest["method"] == weights["method"]
    assert {m: s["weight"] for m, s in manifest["members"].items()} == \
        {m: w for m, w in weights["weights"].items() if w > 0}
    assert json.loads((bundle / "check.json").read_text())["max_abs_diff"] <= B.TOLERANCE
    assert [p.name for p in (workdir / "runs" / "bundle").iterdir()] == ["ensemble"]  # no leftovers
    # up to date: nothing rebuilt
    assert B.main(["--source", "ensemble", "--", "competition=toy"]) == 0
    assert "up to date" in capsys.readouterr().out

    # Kaggle reruns the notebook on a hidden test set: other ids, other images, another folder.
    hidden = workdir / "hidden"
    shutil.copytree(workdir / "data" / "toy", hidden)
    shutil.rmtree(hidden / "test_images")
    ids = [f"h{i:03d}" for i in range(7)]
    for i, id_ in enumerate(ids):
        write_image(hidden / "test_images" / f"{id_}.png", i % 3)
    pd.DataFrame({"id": ids, "label": 0}).to_csv(hidden / "sample_submission.csv", index=False)
    shutil.rmtree(workdir / "configs")  # the notebook has the bundle only
    shutil.move(workdir / "runs" / "bundle" / "ensemble", workdir / "upload")
    done = subprocess.run([sys.executable, str(workdir / "upload" / "predict.py"), "--data",
                           str(hidden), "--out", str(workdir / "submission.csv")],
                          cwd=workdir / "hidden", env=B.offline_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    sub = pd.read_csv(workdir / "submission.csv", dtype={"id": str})
    assert list(sub.columns) == ["id", "label"] and list(sub["id"]) == ids
    assert set(sub["label"]) <= {0, 1, 2}


@pytest.mark.slow
def test_regression_bundle_restores_the_target_scaling(workdir):
    _runs(workdir, task="regression", names=("r",))
    assert B.main(["--source", "r", "--", "competition=toy"]) == 0
    scale = json.loads((workdir / "runs" / "bundle" / "r" / "models" / "r" / "scale.json").read_text())
    assert len(scale) == 3 and all(std[0] > 0 for _, std in scale)
    check = json.loads((workdir / "runs" / "bundle" / "r" / "check.json").read_text())
    assert check["max_abs_diff"] <= B.TOLERANCE


def test_refusals_leave_no_bundle(workdir, monkeypatch):
    _runs(workdir, names=("a",))
    with pytest.raises(B.BundleError, match="runs/nope/scores.json not found"):
        B.main(["--source", "nope", "--", "competition=toy"])
    ens = workdir / "runs" / "ensemble"
    ens.mkdir()
    (ens / "scores.json").write_text(json.dumps({"metric": "accuracy", "cv": 0.5}))
    (ens / "weights.json").write_text(json.dumps({"method": "stack", "weights": None}))
    with pytest.raises(B.BundleError, match="blend 'stack' cannot be bundled"):
        B.main(["--source", "ensemble", "--", "competition=toy"])
    # a bundle whose offline prediction disagrees with the run is refused, and nothing is left
    monkeypatch.setattr(B, "TOLERANCE", -1.0)
    with pytest.raises(B.BundleError, match="differ from runs/a/test.csv"):
        B.main(["--source", "a", "--", "competition=toy"])
    assert list((workdir / "runs" / "bundle").iterdir()) == []


def test_rank_blend_matches_the_ensemble():
    rng = np.random.default_rng(0)
    preds = [rng.random((20, 1)), rng.random((20, 1))]
    expected = E.combine(np.stack([E.rank_columns(p) for p in preds]), np.array([0.5, 0.5]))
    assert np.allclose(B.blend("rank_mean", preds, [0.5, 0.5]), expected)
    assert np.allclose(B.blend("weights", preds, [0.25, 0.75]), 0.25 * preds[0] + 0.75 * preds[1])


def test_submission_mismatch_allows_only_near_ties(workdir):
    make_competition(workdir)
    from pipeline.competition import load_competition

    comp = load_competition("toy")
    ref = pd.DataFrame([[0.5, 0.49995, 0.00005], [0.9, 0.05, 0.05]], columns=["0", "1", "2"])
    expected = pd.DataFrame({"id": ["t0", "t1"], "label": [0, 0]})
    tie_flip = pd.DataFrame({"id": ["t0", "t1"], "label": [1, 0]})
    real_flip = pd.DataFrame({"id": ["t0", "t1"], "label": [0, 2]})
    assert B.submission_mismatch(comp, tie_flip, expected, ref, 1e-4) == ""
    assert "other labels (id t1)" in B.submission_mismatch(comp, real_flip, expected, ref, 1e-4)
    assert B.submission_mismatch(comp, expected.iloc[::-1], expected, ref, 1e-4) == \
        "other columns or ids"


def test_version_drift_is_reported():
    here = B.library_versions()
    assert B.version_warnings(here) == []
    drift = B.version_warnings({**here, "timm": "0.4.12"})
    assert len(drift) == 1 and "timm" in drift[0] and "0.4.12" in drift[0]
