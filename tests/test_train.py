"""Training through the real entry point on tiny competitions with timm's tiny test models."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_competition

from pipeline import folds as F
from pipeline import train as T
from pipeline.competition import CompetitionError
from pipeline.config import ConfigError
from pipeline.dataset import ImageError

TINY = ["model=test_resnet", "img_size=32", "batch_size=8", "epochs=2", "lr=0.01",
        "n_folds=3", "infer_batch_size=16", "threads=1"]


def _setup(workdir, **kw):
    make_competition(workdir, **kw)
    F.main(["competition=toy", "n_folds=3"])


def _train(*extra):
    return T.main(["competition=toy", "name=run", *TINY, *extra])


def test_train_writes_the_run_folder(workdir, capsys):
    _setup(workdir)
    assert _train("tta=hflip") == 0
    run = workdir / "runs" / "run"
    train = pd.read_csv(workdir / "data" / "toy" / "train.csv", dtype={"id": str})
    sample = pd.read_csv(workdir / "data" / "toy" / "sample_submission.csv", dtype={"id": str})
    oof = pd.read_csv(run / "oof.csv", dtype={"id": str})
    test = pd.read_csv(run / "test.csv", dtype={"id": str})
    assert list(oof["id"]) == list(train["id"])
    assert list(test["id"]) == list(sample["id"])
    assert list(oof.columns) == ["id", "0", "1", "2"]
    assert np.allclose(oof[["0", "1", "2"]].sum(axis=1), 1, atol=1e-5)
    scores = json.loads((run / "scores.json").read_text())
    assert scores["metric"] == "accuracy" and scores["greater_is_better"] is True
    assert len(scores["folds"]) == 3 and 0 <= scores["cv"] <= 1
    cfg = (run / "config.yaml").read_text()
    assert "folds_sha256" in cfg and "test_resnet" in cfg
    for k in range(3):
        assert (run / f"fold{k}" / "best.pt").exists()
        assert len(pd.read_csv(run / f"fold{k}" / "log.csv")) == 2
        assert (run / f"fold{k}" / "curve.png").stat().st_size > 1000
        assert not (run / f"fold{k}" / "last.pt").exists()
    out = capsys.readouterr().out
    assert "CV accuracy" in out and "±" in out
    # again: nothing to train
    assert _train("tta=hflip") == 0
    assert "nothing to do" in capsys.readouterr().out


def test_interrupted_run_resumes_to_identical_oof(workdir, monkeypatch):
    _setup(workdir)
    _train("name=full", "epochs=3")
    real = T.train_one_epoch
    calls = {"n": 0}

    def crash_in_fold_1(f, loader, scale):
        calls["n"] += 1
        if f.k == 1 and f.epoch == 1:
            raise KeyboardInterrupt  # stands for kill -9: nothing after the last epoch is saved
        return real(f, loader, scale)

    monkeypatch.setattr(T, "train_one_epoch", crash_in_fold_1)
    with pytest.raises(KeyboardInterrupt):
        _train("epochs=3")
    run = workdir / "runs" / "run"
    assert (run / "fold1" / "last.pt").exists() and not (run / "fold1" / "done.json").exists()
    assert not (run / "oof.csv").exists()
    monkeypatch.setattr(T, "train_one_epoch", real)
    _train("epochs=3")
    full = (workdir / "runs" / "full" / "oof.csv").read_bytes()
    assert (run / "oof.csv").read_bytes() == full
    assert (run / "test.csv").read_bytes() == (workdir / "runs" / "full" / "test.csv").read_bytes()


def test_same_seed_same_oof_regardless_of_workers(workdir):
    _setup(workdir)
    _train("name=a", "epochs=1", "hflip=0.5", "auto_augment=rand-m5")
    _train("name=b", "epochs=1", "hflip=0.5", "auto_augment=rand-m5", "num_workers=2",
           "cache_images=false")
    a = (workdir / "runs" / "a" / "oof.csv").read_bytes()
    assert a == (workdir / "runs" / "b" / "oof.csv").read_bytes()


def test_missing_image_fails_before_training(workdir):
    _setup(workdir)
    (workdir / "data" / "toy" / "train_images" / "r005.png").unlink()
    with pytest.raises(CompetitionError, match="r005"):
        _train()
    assert not (workdir / "runs" / "run" / "oof.csv").exists()


def test_corrupt_image_is_named(workdir):
    _setup(workdir)
    (workdir / "data" / "toy" / "train_images" / "r004.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="r004.png"):
        _train()
    assert not (workdir / "runs" / "run" / "oof.csv").exists()


def test_config_typo_fails_before_anything(workdir):
    _setup(workdir)
    with pytest.raises(ConfigError, match="epoch"):
        _train("epoch=3")
    assert not (workdir / "runs").exists()


def test_nan_loss_stops_fold_unfinished(workdir, monkeypatch):
    _setup(workdir)
    monkeypatch.setattr(T, "create_loss", lambda cfg, comp: lambda out, y: out.sum() * float("nan"))
    with pytest.raises(T.TrainingDiverged, match="fold 0 epoch 1"):
        _train()
    assert not (workdir / "runs" / "run" / "fold0" / "done.json").exists()


def test_changed_config_refuses_to_mix_runs(workdir):
    _setup(workdir)
    _train("epochs=1")
    with pytest.raises(ConfigError, match="lr"):
        _train("epochs=1", "lr=0.5")


@pytest.mark.parametrize("task, cols", [("binary", ["target"]), ("multilabel", ["a", "b", "c"]),
                                        ("regression", ["score"])])
def test_other_tasks(workdir, task, cols):
    _setup(workdir, task=task)
    assert _train("epochs=1") == 0
    oof = pd.read_csv(workdir / "runs" / "run" / "oof.csv")
    assert list(oof.columns) == ["id", *cols]
    assert np.isfinite(oof[cols].to_numpy()).all()
    if task != "regression":
        assert ((oof[cols] >= 0) & (oof[cols] <= 1)).all().all()


def test_features_bf16_ema_mixup_accum_clip(workdir):
    _setup(workdir)
    assert _train("amp=bf16", "ema=true", "ema_decay=0.9", "mixup=0.2", "cutmix=1.0",
                  "label_smoothing=0.1", "accum_steps=2", "clip_grad=1.0", "opt=sgd",
                  "sched=step", "decay_epochs=1", "drop_rate=0.1", "patience=1",
                  "channels_last=on") == 0
    assert (workdir / "runs" / "run" / "scores.json").exists()


def test_early_stopping_in_metric_direction(workdir, monkeypatch):
    _setup(workdir)
    scores = iter([0.5, 0.4, 0.3, 0.9, 0.9, 0.9] * 3)
    monkeypatch.setattr(T.Metric, "__call__", lambda self, y, p, task: next(scores))
    _train("epochs=6", "patience=2", "folds=0")
    log = pd.read_csv(workdir / "runs" / "run" / "fold0" / "log.csv")
    assert len(log) == 3  # best at epoch 1, two epochs without improvement
    assert json.loads((workdir / "runs" / "run" / "fold0" / "done.json").read_text())["best_epoch"] == 1


def test_pretrained_from_local_file(workdir):
    from pipeline.config import load_config
    from pipeline.model import create_model

    src = create_model(load_config(None, ["model=test_resnet"]), 5)
    torch.save(src.state_dict(), workdir / "w.pth")
    dst = create_model(load_config(None, ["model=test_resnet", f"pretrained_path={workdir / 'w.pth'}"]), 3)
    k = next(n for n, p in src.state_dict().items() if n.endswith("conv1.weight"))
    assert torch.equal(src.state_dict()[k], dst.state_dict()[k])
    with pytest.raises(ConfigError, match="pretrained_path"):
        create_model(load_config(None, ["model=test_resnet", "pretrained_path=nope.pth"]), 3)
    with pytest.raises(ConfigError, match="model"):
        create_model(load_config(None, ["model=resnet_does_not_exist"]), 3)


def test_fold_subset_then_rest(workdir, capsys):
    _setup(workdir)
    _train("epochs=1", "folds=0,2")
    assert not (workdir / "runs" / "run" / "oof.csv").exists()
    assert "oof.csv is written when all are" in capsys.readouterr().out
    _train("epochs=1")
    assert "fold 0: finished earlier" in capsys.readouterr().out
    assert (workdir / "runs" / "run" / "oof.csv").exists()
    assert os.path.exists(workdir / "runs" / "run" / "scores.json")


@pytest.mark.slow
def test_kill_9_during_third_fold_then_resume_is_byte_identical(workdir):
    import signal
    import subprocess
    import sys
    import time

    _setup(workdir)
    args = ["competition=toy", *TINY, "epochs=4"]
    T.main([*args, "name=full"])
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args, "name=run"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fold2 = workdir / "runs" / "run" / "fold2"
    deadline = time.time() + 120
    while not (fold2 / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (fold2 / "done.json").exists(), "the run finished before it could be killed"
    assert not (workdir / "runs" / "run" / "oof.csv").exists()
    T.main([*args, "name=run"])
    for name in ("oof.csv", "test.csv"):
        assert (workdir / "runs" / "run" / name).read_bytes() == \
            (workdir / "runs" / "full" / name).read_bytes()


def test_epoch_batches_are_shared_between_ranks():
    from pipeline.dataset import EpochBatchSampler

    for n in (37, 40, 5):
        whole = EpochBatchSampler(n, 8, seed=3, drop_last=n > 16)
        ranks = [EpochBatchSampler(n, 4, seed=3, drop_last=n > 16, rank=r, world=2) for r in (0, 1)]
        for s in (whole, *ranks):
            s.set_epoch(2)
        per_rank = [list(s) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == len(whole)
        for batch, b0, b1 in zip(whole, *per_rank, strict=True):
            assert sorted(b0 + b1) == sorted(batch) and not set(b0) & set(b1)
            assert b0 == batch[0::2] and b1 == batch[1::2]


@pytest.mark.slow
def test_data_parallel_two_processes_on_gloo(workdir):
    """torchrun with 2 CPU processes: complete, deterministic outputs written once, OOF rows in order."""
    import subprocess
    import sys

    from pipeline.competition import load_competition
    from pipeline.config import load_config
    from pipeline.dataset import ImageDataset, create_loader

    _setup(workdir)
    args = ["competition=toy", *TINY, "epochs=2", "accum_steps=2", "batch_size=4"]
    for name in ("ddp", "again"):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", "-m", "pipeline.train", *args, f"name={name}"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("CV accuracy") == 1  # rank 0 alone reports
        assert "2 processes (cpu) x batch_size 4 = 8 rows per step" in done.stdout
    run = workdir / "runs" / "ddp"
    assert (run / "oof.csv").read_bytes() == (workdir / "runs" / "again" / "oof.csv").read_bytes()
    assert "world_size: 2" in (run / "config.yaml").read_text()
    oof = pd.read_csv(run / "oof.csv", dtype={"id": str})
    train = pd.read_csv(workdir / "data" / "toy" / "train.csv", dtype={"id": str})
    assert list(oof["id"]) == list(train["id"])
    # every OOF row is what its fold's best model predicts for it in one process
    cfg = load_config(None, args)
    comp = load_competition("toy")
    _, _, folds, _, paths, cache, max_side = T.prepare(cfg, comp, verbose=False)
    for k in range(3):
        f = T.Fold(cfg, comp, k, 10, torch.device("cpu"))
        f.eval_model.load_state_dict(torch.load(run / f"fold{k}" / "best.pt"))
        va = np.flatnonzero(folds == k)
        ds = ImageDataset([paths["train"][i] for i in va], None, f.transforms.eval,
                          images=[cache["train"][i] for i in va], max_side=max_side)
        pred, _ = T.predict(f.eval_model, create_loader(ds, cfg, train=False, device=f.device), f, [])
        assert np.allclose(pred, oof.iloc[va, 1:].to_numpy(), atol=1e-5)
    # a different number of processes would train differently: refused, not mixed
    with pytest.raises(ConfigError, match="world_size: 2 -> 1"):
        T.main([*args, "name=ddp"])


def test_image_cache_only_when_it_fits(workdir, monkeypatch, capsys):
    from pipeline import dataset as D

    _setup(workdir)
    paths = sorted((workdir / "data" / "toy" / "train_images").glob("*.png"))
    need = D.estimate_cache_bytes(paths, 0)
    assert 40 * 16 * 16 * 3 <= need <= 40 * 16 * 16 * 3 * 1.1  # 40 RGB images of 16x16
    assert D.estimate_cache_bytes(paths, 8) < need / 3  # resized to a shorter side of 8
    monkeypatch.setattr(D, "available_memory", lambda: 10 * need)
    assert D.should_cache("auto", paths, 0)[0] is True
    assert D.should_cache("auto", paths, 0, copies=8)[0] is False  # 8 processes, 8 caches
    monkeypatch.setattr(D, "available_memory", lambda: need)
    use, why = D.should_cache("auto", paths, 0)
    assert use is False and "decoding from disk" in why
    assert D.should_cache("on", paths, 0)[0] is True and D.should_cache("off", paths, 0)[0] is False
    # training without the cache gives the same predictions as with it
    _train("name=disk", "epochs=1")
    assert "decoding from disk" in capsys.readouterr().out
    monkeypatch.setattr(D, "available_memory", lambda: 10**12)
    _train("name=ram", "epochs=1")
    assert "caching decoded images" in capsys.readouterr().out
    run = workdir / "runs"
    assert (run / "disk" / "oof.csv").read_bytes() == (run / "ram" / "oof.csv").read_bytes()
    free = D.available_memory()
    assert free is None or free > 0


def test_workers_auto_and_booleans_for_cache(workdir, monkeypatch):
    from pipeline.config import load_config
    from pipeline.dataset import resolve_workers

    assert resolve_workers("auto", torch.device("cpu")) == 0
    assert 0 <= resolve_workers("auto", torch.device("cuda")) <= 8
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert resolve_workers("auto", torch.device("cuda")) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes share 16 cores
    assert resolve_workers("auto", torch.device("cuda")) == 3
    assert resolve_workers("3", torch.device("cpu")) == 3
    cfg = load_config(None, ["cache_images=false", "num_workers=2"])
    assert cfg.cache_images == "off" and cfg.num_workers == "2"
    with pytest.raises(ConfigError, match="num_workers"):
        load_config(None, ["num_workers=many"])
    with pytest.raises(ConfigError, match="cache_images"):
        load_config(None, ["cache_images=maybe"])


def test_compiled_model_saves_plain_weights(workdir, monkeypatch):
    """compile=true wraps the model for the forward pass only: checkpoints keep the plain keys
    (so a bundle or a resume loads them into an uncompiled model). The eager backend keeps this
    test free of a C++ toolchain; inductor itself is measured by `make bench` on CUDA."""
    import functools

    _setup(workdir)
    calls = []
    real = torch.compile

    def eager_compile(model, **kw):
        calls.append(type(model).__name__)
        return functools.partial(real, backend="eager")(model, **kw)

    monkeypatch.setattr(torch, "compile", eager_compile)
    assert _train("compile=true", "epochs=1") == 0
    assert calls and all(c == "ResNet" for c in calls)
    state = torch.load(workdir / "runs" / "run" / "fold0" / "best.pt")
    assert not any(k.startswith("_orig_mod") for k in state)
