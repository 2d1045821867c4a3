"""The whole chain on the demo competition through the real entry points: data to submission."""

import json

import pandas as pd
import pytest

from pipeline import data, ensemble, folds, leaderboard, submit, train

TINY = ["model=test_resnet", "img_size=16", "batch_size=64", "epochs=1", "threads=2",
        "infer_batch_size=256"]


@pytest.mark.slow
def test_demo_data_to_validated_submission(workdir, capsys):
    (workdir / "configs" / "competitions" / "demo.yaml").write_text(
        "name: demo\ntask: multiclass\nmetric: accuracy\nimage_ext: .png\n")
    assert data.main([]) == 0
    first = (workdir / "data" / "demo" / "train_images" / "0000.png").read_bytes()
    assert folds.main(["n_folds=2"]) == 0
    assert train.main(["name=a", *TINY]) == 0
    assert train.main(["name=b", "seed=7", *TINY]) == 0
    assert ensemble.main(["--members", "a", "b"]) == 0
    scores = json.loads((workdir / "runs" / "ensemble" / "scores.json").read_text())
    members = [json.loads((workdir / "runs" / m / "scores.json").read_text())["cv"] for m in "ab"]
    assert scores["cv"] >= max(members)
    assert submit.main(["--source", "ensemble"]) == 0
    out = capsys.readouterr().out
    assert "leaderboard accuracy" in out
    [sub_path] = (workdir / "submissions").glob("demo-ensemble-cv*.csv")
    sub = pd.read_csv(sub_path, dtype=str)
    sample = pd.read_csv(workdir / "data" / "demo" / "sample_submission.csv", dtype=str)
    assert list(sub.columns) == list(sample.columns)
    assert list(sub["id"]) == list(sample["id"])
    assert leaderboard.main([]) == 0
    assert "ensemble" in capsys.readouterr().out
    # the demo data is rebuilt byte for byte
    import shutil

    shutil.rmtree(workdir / "data")
    data.main([])
    assert (workdir / "data" / "demo" / "train_images" / "0000.png").read_bytes() == first
