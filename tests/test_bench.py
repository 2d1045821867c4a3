"""The benchmark through its entry point on tiny settings: every figure is written and sane."""

import json
import math

import pytest

from pipeline import bench
from pipeline.config import ConfigError

TINY = ["model=test_resnet", "n=32", "size=32", "batch_size=8", "repeats=1", "warmup=1",
        "scale=2", "scale_batches=2", "scale_workers=0,1"]


def test_bench_writes_every_figure_and_ratio(workdir, capsys):
    assert bench.main(TINY) == 0
    out = workdir / "runs" / "bench"
    result = json.loads((out / "bench.json").read_text())
    figures = ["train_bare", "train_pipeline", "train_reference", "infer_bare", "infer_pipeline",
               "infer_pipeline_tta"]
    ratios = ["train_pipeline/train_bare", "train_pipeline/train_reference",
              "infer_pipeline/infer_bare"]
    assert set(figures) <= set(result["figures"]) and set(ratios) <= set(result["ratios"])
    for v in [*result["figures"].values(), *result["ratios"].values()]:
        assert isinstance(v, float) and math.isfinite(v) and v > 0
    ratio = result["ratios"]["train_pipeline/train_bare"]
    assert ratio == pytest.approx(result["figures"]["train_pipeline"] / result["figures"]["train_bare"])
    points = {(r["n"], r["workers"]) for r in result["scaling"]}
    assert points == {(32, 0), (32, 1), (64, 0), (64, 1)}
    for r in result["scaling"]:
        assert math.isfinite(r["train_s_per_image"]) and r["train_s_per_image"] > 0
        assert math.isfinite(r["cache_s_per_image"]) and r["cache_s_per_image"] > 0
    assert (out / "scaling.png").stat().st_size > 1000
    assert (workdir / "data" / "bench" / "train.csv").exists()
    assert "train_pipeline/train_bare" in capsys.readouterr().out


@pytest.mark.parametrize("arg, message", [("batchsize=8", "did you mean 'batch_size'"),
                                          ("n=many", "bench key n"), ("n=0", "at least 1"),
                                          ("n", "key=value")])
def test_bad_arguments_are_errors_naming_the_key(workdir, arg, message):
    with pytest.raises(ConfigError, match=message):
        bench.main([arg])
