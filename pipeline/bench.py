"""``make bench``: how fast the template trains and predicts, against the compute limit, in one run.

    python -m pipeline.bench [n=512 size=64 model=resnet18 batch_size=64 repeats=3 ...]

Builds a synthetic 10-class competition of ``scale * n`` JPEGs in ``data/bench/`` (its description
in ``runs/bench/bench.yaml``), then measures images/second on this machine, each the best of
``repeats`` timings after ``warmup`` untimed steps; the figures compared in a ratio are timed
round-robin, one repeat of each in turn, so that a change in the machine's speed reaches them alike:

  train_bare          the training step (forward, loss, backward, optimizer) on batches in memory
  train_pipeline      one epoch of the template's loop: Fold + train_one_epoch, RAM cache, its loader
  train_reference     timm's reference-script way: a DataLoader decoding the JPEGs with PIL on every
                      access, timm.data.create_transform(is_training=True), no cache; same step
  infer_bare          inference_mode forward on batches in memory
  infer_pipeline      the template's predict over the cached images (and ``_tta``: with hflip)
  scaling             seconds per image at n and scale*n images and 0/1/2 loader workers; a proxy:
                      the template's dataset and loader + the training step for ``scale_batches``
                      batches, plus the one-off RAM caching cost per image

The main figures use the first n images. On CUDA every figure is also measured with AMP and
channels_last off (``_fp32``) and with torch.compile (``_compile``). Writes ``runs/bench/bench.json``
(figures, ratios, scaling, settings) and ``runs/bench/scaling.png``; prints the table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import yaml
from PIL import Image, ImageDraw
from timm.data import create_transform, resolve_data_config

from pipeline.competition import load_competition
from pipeline.config import (
    DATA_DIR,
    RUNS_DIR,
    ConfigError,
    _suggest_from,
    atomic_save_figure,
    atomic_write_json,
    atomic_write_text,
    load_config,
    run,
)
from pipeline.dataset import ImageDataset, cache_images, create_loader
from pipeline.train import Fold, autocast, predict, resolve_device, seed_all, train_one_epoch

# Every setting and its default; ``key=value`` on the command line overrides them.
DEFAULTS = {
    "n": 512,  # training images of the main figures
    "size": 64,  # image side in pixels, also the model's img_size
    "model": "resnet18",  # any timm model
    "batch_size": 64,
    "repeats": 5,  # timings per figure (and scaling point); the best is reported
    "warmup": 2,  # untimed steps (bare) or epochs' worth of batches (loops) before timing
    "workers": 0,  # loader workers of train_pipeline and train_reference (template default: 0)
    "scale": 10,  # scaling: n and scale*n images
    "scale_workers": "0,1,2",  # scaling: loader workers tried
    "scale_batches": 4,  # scaling: timed batches per point
    "threads": 0,  # torch CPU threads; 0 = torch's default
    "device": "auto",  # auto, cpu, cuda
    "seed": 0,
}
NAME = "bench"
OUT_DIR = RUNS_DIR / NAME
N_CLASSES = 10


def parse_args(argv: list[str] | None) -> dict:
    """DEFAULTS overridden by ``key=value`` arguments; ConfigError naming an unknown or bad key."""
    settings = dict(DEFAULTS)
    for arg in argv or []:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise ConfigError(f"bench argument {arg!r} is not of the form key=value")
        if key not in DEFAULTS:
            raise ConfigError(f"unknown bench key '{key}'{_suggest_from(key, DEFAULTS)}")
        try:
            settings[key] = type(DEFAULTS[key])(raw)
        except ValueError:
            raise ConfigError(f"bench key {key}: expected {type(DEFAULTS[key]).__name__}, "
                              f"got {raw!r}") from None
    for key in ("n", "size", "batch_size", "repeats", "scale", "scale_batches"):
        if settings[key] < 1:
            raise ConfigError(f"bench key {key} must be at least 1")
    return settings


# -- the synthetic competition ---------------------------------------------------------------------
def _image(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """Noise on a label-tinted background with a few random shapes."""
    base = np.array([25 * label, 255 - 25 * label, 128], dtype=np.float32)
    arr = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = rng.integers(0, size, 2)
        x1, y1 = x0 + rng.integers(2, size // 2 + 3), y0 + rng.integers(2, size // 2 + 3)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return im


def make_competition(n_train: int, n_test: int, size: int, seed: int) -> Path:
    """Write data/bench/ and runs/bench/bench.yaml (reused when the parameters match)."""
    data, yaml_path = DATA_DIR / NAME, OUT_DIR / f"{NAME}.yaml"
    params = {"n_train": n_train, "n_test": n_test, "size": size, "seed": seed}
    stamp = data / "params.json"
    if yaml_path.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return yaml_path
    shutil.rmtree(data, ignore_errors=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, n_train)
    for split, ids, ys in (("train", [f"tr{i:06d}" for i in range(n_train)], labels),
                           ("test", [f"te{i:06d}" for i in range(n_test)], rng.integers(0, N_CLASSES, n_test))):
        folder = data / f"{split}_images"
        folder.mkdir(parents=True)
        for id_, y in zip(ids, ys, strict=True):
            _image(rng, int(y), size).save(folder / f"{id_}.jpg", quality=90)
        if split == "train":
            pd.DataFrame({"id": ids, "label": labels}).to_csv(data / "train.csv", index=False)
        else:
            pd.DataFrame({"id": ids, "label": 0}).to_csv(data / "sample_submission.csv", index=False)
    atomic_write_text(yaml_path, yaml.safe_dump({
        "name": NAME, "task": "multiclass", "metric": "accuracy", "image_ext": ".jpg",
        "classes": list(range(N_CLASSES))}, sort_keys=False))
    atomic_write_text(stamp, json.dumps(params))
    return yaml_path


# -- timing ----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def train_step(f: Fold, x: torch.Tensor, y: torch.Tensor) -> None:
    """The template's update without its loader: what ``train_one_epoch`` does per batch."""
    x, y = f.inputs(x, train=True), y.to(f.device, non_blocking=True)
    with autocast(f.device, f.amp):
        loss = f.loss_fn(f.forward(x), y)
    f.scaler.scale(loss).backward()
    f.scaler.step(f.optimizer)
    f.scaler.update()
    f.optimizer.zero_grad(set_to_none=True)


def _batches(loader):
    """Batches of a training loader forever, epoch after epoch."""
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class FolderDataset(torch.utils.data.Dataset):
    """timm's reference-script data path: decode the file with PIL on every access, then transform."""

    def __init__(self, paths, targets, transform):
        self.paths, self.targets, self.transform = paths, targets, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), int(self.targets[i])


def _interleaved(fns: dict, repeats: int, device: torch.device) -> dict:
    """Best seconds of each function, timed round-robin: a drift in the machine's speed (another
    process, thermal limits) reaches every figure alike instead of biasing the ratios."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], _best_seconds(fn, 1, device))
    return best


def measure(s: dict, cfg, comp, paths, y, cache) -> dict:
    """images/second of every figure for one config (device, AMP, channels_last, compile)."""
    device, n, bs, reps = resolve_device(cfg), s["n"], cfg.batch_size, s["repeats"]

    def fold():
        return Fold(cfg, comp, 0, n, device)

    # train_bare: as many steps as an epoch, on two batches already on the device
    bare_f = fold()
    loader = create_loader(ImageDataset(paths, y, bare_f.transforms.train, images=cache, seed=s["seed"]), cfg,
                           train=True, device=device, epoch_seed=s["seed"])
    steps, per_epoch = len(loader), len(loader) * min(bs, n)
    g = torch.Generator().manual_seed(s["seed"])
    mem = [(torch.randint(0, 256, (min(bs, n), 3, cfg.img_size, cfg.img_size), generator=g,
                          dtype=torch.uint8).to(device),
            torch.randint(0, N_CLASSES, (min(bs, n),), generator=g).to(device)) for _ in range(2)]
    bare_f.model.train()
    for i in range(s["warmup"]):
        train_step(bare_f, *mem[i % 2])

    def bare_epoch():
        for i in range(steps):
            train_step(bare_f, *mem[i % 2])

    # train_pipeline: whole epochs of the template's loop
    pipe_f = fold()
    epoch = iter(range(10**9))

    def pipeline_epoch():
        pipe_f.epoch = next(epoch)
        seed_all(pipe_f.epoch)
        train_one_epoch(pipe_f, loader, None)

    # train_reference: DataLoader over the JPEG files, timm's transform, no cache
    ref_f = fold()
    ref_tf = create_transform(**resolve_data_config({"input_size": (3, cfg.img_size, cfg.img_size)},
                                                    model=ref_f.model), is_training=True)
    w = s["workers"]
    ref = torch.utils.data.DataLoader(FolderDataset(paths, y, ref_tf), batch_size=bs, shuffle=True,
                                      drop_last=n > bs, num_workers=w, persistent_workers=w > 0,
                                      pin_memory=device.type == "cuda")
    ref_f.model.train()

    def reference_epoch():
        for x, t in ref:
            train_step(ref_f, x, t)

    pipeline_epoch()  # warm-up epochs, untimed
    reference_epoch()
    train = _interleaved({"train_bare": bare_epoch, "train_pipeline": pipeline_epoch,
                          "train_reference": reference_epoch}, reps, device)
    out = {name: per_epoch / seconds for name, seconds in train.items()}

    # inference: forward on batches in memory, then the template's predict (with and without TTA)
    f = ref_f
    ibs = min(cfg.infer_batch_size, n)
    xs = torch.randn(ibs, 3, cfg.img_size, cfg.img_size, generator=g).to(device)
    if f.channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    n_batches = -(-n // ibs)
    f.model.eval()

    @torch.inference_mode()
    def infer_bare():
        for _ in range(n_batches):
            with autocast(device, f.amp):
                f.model(xs)

    val = create_loader(ImageDataset(paths, y, f.transforms.eval, images=cache), cfg, train=False,
                        device=device)
    fns = {"infer_bare": infer_bare,
           "infer_pipeline": lambda: predict(f.model, val, f, []),
           "infer_pipeline_tta": lambda: predict(f.model, val, f, ["hflip"])}
    for fn in fns.values():
        fn()  # warm-up
    infer = _interleaved(fns, reps, device)
    out["infer_bare"] = n_batches * ibs / infer["infer_bare"]
    out["infer_pipeline"] = n / infer["infer_pipeline"]
    out["infer_pipeline_tta"] = n / infer["infer_pipeline_tta"]
    return out


def measure_scaling(s: dict, cfg, comp, paths, y) -> list[dict]:
    """Seconds per image at n and scale*n images for each loader worker count (see module doc)."""
    device, rows = resolve_device(cfg), []
    f = Fold(cfg, comp, 0, s["n"], device)
    train_tf = f.transforms.train
    f.model.train()
    workers = [int(w) for w in str(s["scale_workers"]).split(",") if w != ""]
    for n in sorted({s["n"], s["n"] * s["scale"]}):
        t0 = time.perf_counter()
        cache = cache_images(paths[:n], cfg.img_size * 2)
        cache_s = time.perf_counter() - t0
        ds = ImageDataset(paths[:n], y[:n], train_tf, images=cache, seed=s["seed"])
        for w in workers:
            loader = create_loader(ds, dataclasses.replace(cfg, num_workers=w), train=True,
                                   device=device, epoch_seed=s["seed"])
            batches = _batches(loader)
            for _ in range(max(1, s["warmup"])):
                train_step(f, *next(batches))

            def timed(batches=batches):
                for _ in range(s["scale_batches"]):
                    train_step(f, *next(batches))

            seconds = _best_seconds(timed, s["repeats"], device)
            batches.close()
            del loader
            rows.append({"n": n, "workers": w, "cache_s_per_image": cache_s / n,
                         "train_s_per_image": seconds / (s["scale_batches"] * min(cfg.batch_size, n))})
            print(f"scaling: n={n} workers={w}: {rows[-1]['train_s_per_image'] * 1e3:.2f} ms/image")
    return rows


def plot_scaling(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for w, part in df.groupby("workers"):
        a.plot(part.n, part.train_s_per_image * 1e3, marker="o", label=f"num_workers={w}")
    a.set(xlabel="training images", ylabel="ms per image (loader + step)", ylim=(0, None))
    a.legend()
    first = df.drop_duplicates("n")
    b.plot(first.n, first.cache_s_per_image * 1e3, marker="o", color="tab:green")
    b.set(xlabel="training images", ylabel="ms per image (RAM caching, once)", ylim=(0, None))
    for ax in (a, b):
        ax.set(xscale="log", xticks=sorted(df.n.unique()), xticklabels=sorted(df.n.unique()))
        ax.minorticks_off()
    fig.tight_layout()
    atomic_save_figure(fig, path)


RATIOS = [("train_pipeline", "train_bare"), ("train_pipeline", "train_reference"),
          ("infer_pipeline", "infer_bare")]


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    s = parse_args(argv)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    n_total = s["n"] * s["scale"]
    comp = load_competition(str(make_competition(n_total, max(8, s["n"] // 8), s["size"], s["seed"])))
    train = comp.train_table()
    paths, y = comp.image_paths(train, "train"), comp.targets(train)
    base = load_config(None, {"competition": NAME, "name": NAME, "model": s["model"],
                              "img_size": s["size"], "batch_size": s["batch_size"],
                              "epochs": 1 + s["repeats"], "device": s["device"], "seed": s["seed"]})
    device = resolve_device(base)
    variants = {"": {}}
    if device.type == "cuda":
        variants.update({"_fp32": {"amp": "off", "channels_last": "off"}, "_compile": {"compile": True}})
    main_paths, main_y = paths[:s["n"]], y[:s["n"]]
    t0 = time.perf_counter()
    cache = cache_images(main_paths, s["size"] * 2)
    cache_seconds = time.perf_counter() - t0
    figures, ratios = {}, {}
    for suffix, changes in variants.items():
        got = measure(s, dataclasses.replace(base, **changes), comp, main_paths, main_y, cache)
        figures.update({k + suffix: v for k, v in got.items()})
        ratios.update({f"{a}/{b}{suffix}": got[a] / got[b] for a, b in RATIOS})
    scaling = measure_scaling(s, base, comp, paths, y)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    plot_scaling(scaling, OUT_DIR / "scaling.png")
    result = {"figures": figures, "ratios": ratios, "scaling": scaling,
              "cache_seconds": cache_seconds, "seconds": time.perf_counter() - t_start,
              "settings": s, "device": str(device), "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "timm": timm.__version__}
    atomic_write_json(OUT_DIR / "bench.json", result)
    print(f"\n{'figure':<28}{'images/s':>12}")
    for key, v in figures.items():
        print(f"{key:<28}{v:>12.1f}")
    print(f"\n{'ratio':<40}{'value':>8}")
    for key, v in ratios.items():
        flag = "" if math.isfinite(v) else "  (not finite)"
        print(f"{key:<40}{v:>8.3f}{flag}")
    print(f"\n{len(main_paths)} images cached in {cache_seconds:.1f}s; bench took "
          f"{result['seconds']:.0f}s; wrote {OUT_DIR / 'bench.json'} and {OUT_DIR / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    run(main)
