"""``make train``: train every fold of one experiment; write OOF and test predictions and scores.

    python -m pipeline.train --exp baseline [key=value ...]

For each fold k: train on the other folds, evaluate on fold k every epoch with the competition
metric, keep the best weights (early stopping in the metric's direction), then predict fold k (OOF)
and the test set with the same TTA. ``runs/<name>/`` then holds ``config.yaml``, ``fold<k>/``
(``best.pt``, ``log.csv``, ``curve.png``), ``oof.csv``, ``test.csv`` and ``scores.json``.

A finished fold is never retrained. An unfinished one resumes from ``fold<k>/last.pt``, written
atomically after every epoch with the model, optimizer, scheduler, AMP scaler, EMA, early-stopping
state and history; all randomness is derived from (seed, fold, epoch, row), so a resumed run gives
exactly the predictions of an uninterrupted one.

Under ``torchrun --nproc_per_node=N -m pipeline.train ...`` (``make train NPROC=N``) each fold trains
with DistributedDataParallel: every process takes ``batch_size`` rows of each global batch of
``batch_size * N`` and predicts a slice of the validation and test rows; rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from pipeline import distributed
from pipeline.competition import Competition, load_competition
from pipeline.config import (
    RUNS_DIR,
    RUNTIME_KEYS,
    Config,
    ConfigError,
    PipelineError,
    atomic_save_figure,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    config_from_argv,
    dump,
    fold_list,
    run,
)
from pipeline.dataset import (
    BatchInputs,
    ImageDataset,
    cache_images,
    create_loader,
    create_transforms,
    should_cache,
)
from pipeline.folds import read_folds
from pipeline.metrics import Metric, get_metric
from pipeline.model import activate, create_loss, create_model


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite; the fold is left unfinished."""


# -- hardware --------------------------------------------------------------------------------------
def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key device: '{cfg.device}' but CUDA is not available")
    return torch.device(cfg.device)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast dtype, or None for full precision. auto: bf16 (else fp16) on CUDA, off on CPU."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def epoch_seed(cfg: Config, fold: int, epoch: int) -> int:
    return (cfg.seed * 7919 + fold * 104_729 + epoch * 15_485_863) % (2**31)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- one fold --------------------------------------------------------------------------------------
class Fold:
    """Everything one fold trains and saves: built from the config, restorable from ``last.pt``."""

    def __init__(self, cfg: Config, comp: Competition, k: int, n_train: int, device,
                 dist: distributed.Dist = distributed.SINGLE):
        self.cfg, self.comp, self.k, self.device, self.dist = cfg, comp, k, device, dist
        seed_all(epoch_seed(cfg, k, -1))
        self.model = create_model(cfg, comp.num_outputs).to(device)
        self.channels_last = cfg.channels_last == "on" or (
            cfg.channels_last == "auto" and device.type == "cuda")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.transforms = create_transforms(cfg, self.model)
        self.inputs = BatchInputs(self.transforms.mean, self.transforms.std, device,
                                  self.channels_last, cfg.reprob)
        self.ddp = None
        if dist.enabled:  # gradients averaged over ranks; the weights stay in self.model
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        net = self.ddp if self.ddp is not None else self.model
        self.forward = torch.compile(net) if cfg.compile else net
        self.amp = amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.optimizer = create_optimizer_v2(self.model, opt=cfg.opt, lr=cfg.lr,
                                             weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        self.updates_per_epoch = max(1, (n_train // (cfg.batch_size * dist.world)) // cfg.accum_steps)
        self.scheduler = None
        if cfg.sched != "none":
            self.scheduler, _ = create_scheduler_v2(
                self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
                decay_rate=cfg.decay_rate, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
                warmup_epochs=cfg.warmup_epochs, updates_per_epoch=self.updates_per_epoch,
                plateau_mode="max" if get_metric(comp.metric).greater_is_better else "min")
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.loss_fn = create_loss(cfg, comp)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               label_smoothing=cfg.label_smoothing, num_classes=comp.num_outputs)
        self.epoch = 0  # next epoch to run
        self.best_score, self.best_epoch, self.bad_epochs = None, -1, 0
        self.history: list[dict] = []

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema else None,
                "epoch": self.epoch, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "history": self.history}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema:
            self.ema.module.load_state_dict(state["ema"])
        for key in ("epoch", "best_score", "best_epoch", "bad_epochs", "history"):
            setattr(self, key, state[key])


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_one_epoch(f: Fold, loader, target_scale) -> float:
    """One pass over the training rows; returns the mean loss. Raises TrainingDiverged on NaN."""
    cfg, device = f.cfg, f.device
    f.model.train()
    loader.batch_sampler.set_epoch(f.epoch)
    total = torch.zeros((), device=device)
    n_steps = len(loader)
    bar = tqdm(loader, desc=f"fold {f.k} epoch {f.epoch + 1}/{cfg.epochs}", leave=False,
               dynamic_ncols=True, mininterval=1.0, disable=not f.dist.is_main)
    for step, (x, y) in enumerate(bar):
        sync = (step + 1) % cfg.accum_steps == 0 or step + 1 == n_steps
        x, y = f.inputs(x, train=True), y.to(device, non_blocking=True)
        if f.mixup is not None:
            x, y = f.mixup(x, y)
        elif target_scale is not None:
            y = (y.float() - target_scale[0]) / target_scale[1]
        # Under DDP, gradients of accumulation micro-steps are averaged once, at the update.
        no_sync = f.ddp.no_sync() if f.ddp is not None and not sync else contextlib.nullcontext()
        with no_sync:
            with autocast(device, f.amp):
                out = f.forward(x)
                loss = f.loss_fn(out, y if f.comp.task == "multiclass"
                                 else y.float().reshape(out.shape))
            f.scaler.scale(loss / cfg.accum_steps).backward()
        total += loss.detach()
        if sync:
            if cfg.clip_grad:
                f.scaler.unscale_(f.optimizer)
                torch.nn.utils.clip_grad_norm_(f.model.parameters(), cfg.clip_grad)
            f.scaler.step(f.optimizer)
            f.scaler.update()
            f.optimizer.zero_grad(set_to_none=True)
            updates = f.epoch * f.updates_per_epoch + (step + 1) // cfg.accum_steps
            if f.scheduler:
                f.scheduler.step_update(num_updates=updates)
            if f.ema:
                f.ema.update(f.model, step=updates)
        if step % 10 == 0 or step + 1 == n_steps:  # the only host sync: progress and the NaN check
            # summed over ranks, so that every rank sees a NaN at the same step and stops together
            mean = distributed.sum_scalar(total, f.dist).item() / ((step + 1) * f.dist.world)
            if not math.isfinite(mean):
                raise TrainingDiverged(
                    f"fold {f.k} epoch {f.epoch + 1}: training loss is {mean} at step {step}; "
                    f"lower lr (now {cfg.lr}) or set amp=off. The fold stays unfinished.")
            bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
    return distributed.sum_scalar(total, f.dist).item() / (max(1, n_steps) * f.dist.world)


@torch.inference_mode()
def predict(model, loader, f: Fold, views: list[str], target_scale=None):
    """Activated predictions (n, k) averaged over the identity view and ``views``; also raw logits.

    Under DDP ``loader`` holds this rank's :func:`distributed.shard` of the rows; the result holds
    all rows, gathered in order, on every rank.
    """
    model.eval()
    outs, logits_all = [], []
    for x, _ in loader:
        x = f.inputs(x)
        preds = []
        with autocast(f.device, f.amp):
            for view in ["none", *views]:
                xv = {"none": x, "hflip": x.flip(3), "vflip": x.flip(2)}[view]
                logits = model(xv).float()
                if view == "none":
                    logits_all.append(logits.cpu())
                preds.append(activate(logits, f.comp.task))
        outs.append(torch.stack(preds).mean(0).cpu())
    pred = distributed.gather_rows(torch.cat(outs), f.dist).numpy().astype(np.float64)
    if target_scale is not None:
        pred = pred * target_scale[1].cpu().numpy() + target_scale[0].cpu().numpy()
    return pred, distributed.gather_rows(torch.cat(logits_all), f.dist)


def plot_curve(history: list[dict], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(history)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(df.epoch, df.train_loss, label="train loss")
    a.plot(df.epoch, df.val_loss, label="valid loss")
    a.set_xlabel("epoch")
    a.legend()
    b.plot(df.epoch, df[metric], color="tab:green", marker="o")
    b.set_xlabel("epoch")
    b.set_ylabel(f"valid {metric}")
    fig.suptitle(path.parent.name)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def run_fold(f: Fold, fold_dir: Path, data: dict, metric: Metric) -> None:
    """Train fold ``f.k`` to the end (or early stop), resuming from ``last.pt`` when present."""
    cfg, main = f.cfg, f.dist.is_main
    last, best = fold_dir / "last.pt", fold_dir / "best.pt"
    if last.exists():
        f.load_state(torch.load(last, map_location=f.device, weights_only=False))
        if main:
            print(f"fold {f.k}: resuming after epoch {f.epoch} (best {metric.name} {f.best_score})")
    train_loader, val_loader = data["train_loader"], data["val_loader"]
    y_val, scale, val_t = data["y_val"], data["target_scale"], data["val_targets_t"]
    stop = False
    while f.epoch < cfg.epochs and not stop:
        t0 = time.time()
        seed_all(epoch_seed(cfg, f.k, f.epoch) + f.dist.rank)  # dropout, mixup: their own per rank
        train_loss = train_one_epoch(f, train_loader, scale)
        pred, logits = predict(f.eval_model, val_loader, f, [], scale)
        val_loss = _val_loss(f, logits, val_t, scale)
        score = metric(y_val, pred, f.comp.task)
        improved = metric.better(score, f.best_score, cfg.min_delta)
        if improved:
            f.best_score, f.best_epoch, f.bad_epochs = score, f.epoch, 0
            if main:
                save_atomic(f.eval_model.state_dict(), best)
        else:
            f.bad_epochs += 1
        if f.scheduler:
            f.scheduler.step(f.epoch + 1, score)
        lr = f.optimizer.param_groups[0]["lr"]
        f.history.append({"epoch": f.epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                          metric.name: score, "lr": lr, "seconds": round(time.time() - t0, 2)})
        f.epoch += 1
        stop = cfg.patience > 0 and f.bad_epochs >= cfg.patience
        if main:
            atomic_write_csv(fold_dir / "log.csv", pd.DataFrame(f.history))
            save_atomic(f.state(), last)
        distributed.barrier(f.dist)  # best.pt and last.pt are on disk before any rank reads them
        if main:
                tqdm.write(f"fold {f.k} epoch {f.epoch:>3}/{cfg.epochs}  train_loss {train_loss:.4f}  "
                       f"val_loss {val_loss:.4f}  {metric.name} {score:.5f}"
                       f"{' *' if improved else '  '}  lr {lr:.2e}  {time.time() - t0:.1f}s"
                       + ("  early stop" if stop else ""))
    if main:
        plot_curve(f.history, fold_dir / "curve.png", metric.name)


def _val_loss(f: Fold, logits, targets, scale) -> float:
    if targets is None:
        return float("nan")
    y = targets
    if scale is not None:
        y = (y - scale[0].cpu()) / scale[1].cpu()
    with torch.no_grad():
        if f.comp.task == "multiclass":
            return float(torch.nn.functional.cross_entropy(logits, y))
        return float(f.loss_fn(logits, y.float().reshape(logits.shape)))


# -- the run ---------------------------------------------------------------------------------------
def check_run_dir(run_dir: Path, resolved: dict) -> None:
    """Refuse to mix a run folder's outputs with a different config or folds file."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    old = yaml.safe_load(path.read_text()) or {}
    old.setdefault("world_size", 1)  # recorded since data-parallel training came
    diff = [k for k in resolved if k not in RUNTIME_KEYS and old.get(k) != resolved[k]]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {resolved[k]!r}" for k in diff[:5])
        raise ConfigError(f"{run_dir} was trained with another config ({shown}); "
                          f"delete {run_dir} or pick another name=...")


def prepare(cfg: Config, comp: Competition, verbose: bool = True, copies: int = 1):
    """Tables, folds, image paths (all checked to exist) and decoded caches shared by all folds."""
    train = comp.train_table()
    folds, folds_sha = read_folds(comp, train)
    test = comp.test_table()
    paths = {"train": comp.image_paths(train, "train"), "test": comp.image_paths(test, "test")}
    max_side = int(cfg.img_size * 2)
    cache = {}
    use_cache, why = should_cache(cfg.cache_images, paths["train"] + paths["test"], max_side, copies)
    if verbose:
        print(why)
    if use_cache:
        t0 = time.time()
        cache = {s: cache_images(p, max_side) for s, p in paths.items()}
        if verbose:
            print(f"cached {len(paths['train'])} train and {len(paths['test'])} test images "
                  f"in {time.time() - t0:.1f}s")
    return train, test, folds, folds_sha, paths, cache, max_side


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(argv, "pipeline.train", __doc__)
    comp = load_competition(cfg.competition)
    metric = get_metric(comp.metric)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg)
    d = distributed.init(device.type)
    try:
        if d.enabled and device.type == "cuda":
            device = torch.device("cuda", d.local_rank)
        return _train_run(cfg, comp, metric, device, d)
    finally:
        distributed.close(d)


def _train_run(cfg: Config, comp: Competition, metric: Metric, device, d: distributed.Dist) -> int:
    main = d.is_main
    run_dir = RUNS_DIR / cfg.name
    # every process of a data-parallel run holds its own cache
    train, test, folds, folds_sha, paths, cache, max_side = prepare(cfg, comp, verbose=main,
                                                                    copies=d.world)
    n_folds = int(folds.max()) + 1
    todo = fold_list(cfg, n_folds)
    resolved = {**cfg.to_dict(), "folds_sha256": folds_sha, "n_folds": n_folds, "world_size": d.world}
    check_run_dir(run_dir, resolved)
    distributed.barrier(d)  # every rank has checked config.yaml before rank 0 rewrites it
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump(resolved))
    if (run_dir / "scores.json").exists() and all(
            (run_dir / f"fold{k}" / "done.json").exists() for k in range(n_folds)):
        if main:
            os.utime(run_dir / "scores.json")
            print(f"train: {run_dir} is complete, nothing to do")
        return 0
    if main and d.enabled:
        print(f"data parallel: {d.world} processes ({device.type}) x batch_size {cfg.batch_size} "
              f"= {d.world * cfg.batch_size} rows per step")

    y = comp.targets(train)
    t_start = time.time()
    for k in todo:
        fold_dir = run_dir / f"fold{k}"
        if (fold_dir / "done.json").exists():
            if main:
                print(f"fold {k}: finished earlier, skipping")
            continue
        distributed.barrier(d)
        fold_dir.mkdir(parents=True, exist_ok=True)
        train_one_fold(cfg, comp, k, folds, y, paths, cache, max_side, fold_dir, device, metric, d)

    done = [k for k in range(n_folds) if (run_dir / f"fold{k}" / "done.json").exists()]
    if len(done) < n_folds:
        if main:
            print(f"train: folds {done} of {n_folds} finished; oof.csv is written when all are")
        return 0
    if main:
        write_outputs(run_dir, comp, train, test, folds, y, metric, n_folds, time.time() - t_start)
    distributed.barrier(d)
    return 0


def train_one_fold(cfg, comp, k, folds, y, paths, cache, max_side, fold_dir, device, metric,
                   d: distributed.Dist = distributed.SINGLE):
    """Train, then predict the fold's validation rows and the test set; ``done.json`` last."""
    tr, va = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
    target_scale = None
    if comp.task == "regression":
        target_scale = (torch.tensor(y[tr].mean(0), dtype=torch.float32, device=device),
                        torch.tensor(y[tr].std(0) + 1e-8, dtype=torch.float32, device=device))
    f = Fold(cfg, comp, k, len(tr), device, d)
    train_tf, eval_tf = f.transforms.train, f.transforms.eval

    def subset(split, idx, tf, targets):
        imgs = cache.get(split)
        return ImageDataset([paths[split][i] for i in idx], targets, tf,
                            images=[imgs[i] for i in idx] if imgs else None,
                            seed=epoch_seed(cfg, k, 0), max_side=max_side)

    y_t = y.astype(np.float32) if comp.task in ("regression", "multilabel") else y
    train_ds = subset("train", tr, train_tf, y_t[tr])
    # each rank predicts its slice of the rows; predict() gathers them in order
    val_ds = subset("train", distributed.shard(va, d), eval_tf, None)
    test_ds = subset("test", distributed.shard(np.arange(len(paths["test"])), d), eval_tf, None)
    data = {"train_loader": create_loader(train_ds, cfg, train=True, device=device,
                                          epoch_seed=epoch_seed(cfg, k, 0), rank=d.rank,
                                          world=d.world),
            "val_loader": create_loader(val_ds, cfg, train=False, device=device),
            "y_val": y[va], "target_scale": target_scale, "val_targets_t": torch.as_tensor(y_t[va])}
    run_fold(f, fold_dir, data, metric)

    f.eval_model.load_state_dict(torch.load(fold_dir / "best.pt", map_location=device))
    oof, _ = predict(f.eval_model, data["val_loader"], f, cfg.tta, target_scale)
    test_pred, _ = predict(f.eval_model, create_loader(test_ds, cfg, train=False, device=device),
                           f, cfg.tta, target_scale)
    score = metric(y[va], oof, comp.task)
    if d.is_main:
        oof_df = pd.DataFrame(oof, columns=comp.pred_columns)
        oof_df.insert(0, "_row", va)  # position in train.csv, for pooling
        atomic_write_csv(fold_dir / "oof.csv", oof_df)
        np.save(fold_dir / "test.npy", test_pred)
        atomic_write_json(fold_dir / "done.json", {
            "fold": k, "score": score, "best_epoch": f.best_epoch + 1, "epochs_run": f.epoch,
            "seconds": sum(h["seconds"] for h in f.history)})
        (fold_dir / "last.pt").unlink(missing_ok=True)
        print(f"fold {k}: {metric.name} {score:.5f} (best epoch {f.best_epoch + 1}"
              f"{', with TTA ' + '+'.join(cfg.tta) if cfg.tta else ''})")
    distributed.barrier(d)  # done.json is on disk before any rank looks for it


def write_outputs(run_dir, comp, train, test, folds, y, metric, n_folds, seconds) -> None:
    """Pool the folds: oof.csv in train order, test.csv averaged over folds, scores.json last."""
    cols = comp.pred_columns
    parts = [pd.read_csv(run_dir / f"fold{k}" / "oof.csv") for k in range(n_folds)]
    oof = pd.concat(parts).sort_values("_row")
    if not np.array_equal(oof["_row"].to_numpy(), np.arange(len(train))):
        raise PipelineError(f"{run_dir}: fold OOF files do not cover train.csv exactly once; "
                            f"delete the run folder and train again")
    pred = oof[cols].to_numpy()
    fold_scores = [metric(y[folds == k], pred[folds == k], comp.task) for k in range(n_folds)]
    cv = metric(y, pred, comp.task)
    oof_df = pd.DataFrame(pred, columns=cols)
    oof_df.insert(0, comp.id_column, train[comp.id_column].to_numpy())
    test_pred = np.mean([np.load(run_dir / f"fold{k}" / "test.npy") for k in range(n_folds)], axis=0)
    test_df = pd.DataFrame(test_pred, columns=cols)
    test_df.insert(0, comp.id_column, test[comp.id_column].to_numpy())
    atomic_write_csv(run_dir / "oof.csv", oof_df)
    atomic_write_csv(run_dir / "test.csv", test_df)
    train_seconds = sum(json.loads((run_dir / f"fold{k}" / "done.json").read_text())["seconds"]
                        for k in range(n_folds))
    atomic_write_json(run_dir / "scores.json", {
        "metric": metric.name, "greater_is_better": metric.greater_is_better, "cv": cv,
        "folds": fold_scores, "cv_mean": float(np.mean(fold_scores)),
        "cv_std": float(np.std(fold_scores)), "train_seconds": round(train_seconds, 1)})
    print(f"CV {metric.name}: {cv:.5f} pooled OOF | {np.mean(fold_scores):.5f} ± "
          f"{np.std(fold_scores):.5f} over {n_folds} folds  ({run_dir})")


if __name__ == "__main__":
    run(main)
