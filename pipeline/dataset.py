"""Images and targets for training and prediction: PIL decoding, an optional RAM cache, timm transforms.

Augmentation randomness is a function of ``(seed, epoch, row)`` alone: each sample seeds Python's,
NumPy's and torch's generators from that triple (and restores them afterwards), so the images a model
sees do not depend on the number of loader workers, and a run resumed at any epoch sees exactly what
an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.random_erasing import RandomErasing

from pipeline.config import Config, PipelineError


class ImageError(PipelineError):
    """An image that cannot be read; the message names its file."""


def load_image(path: Path, max_side: int = 0) -> Image.Image:
    """Decode ``path`` to RGB; shrink so the shorter side is at most ``max_side`` (0 = keep)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except Exception as e:  # PIL raises several types for truncated or foreign files
        raise ImageError(f"cannot decode image {path}: {e}") from None
    if max_side and min(im.size) > max_side:
        w, h = im.size
        s = max_side / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    return im


CACHE_FRACTION = 0.5  # cache_images=auto caches when the images take at most this much free RAM


def available_memory() -> int | None:
    """Bytes of RAM this process may still use: MemAvailable, capped by a cgroup (container) limit."""
    avail = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as fh:
            avail = int(next(line for line in fh if line.startswith("MemAvailable")).split()[1]) * 1024
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            room = int(Path(limit_file).read_text()) - int(Path(usage_file).read_text())
            avail = room if avail is None else min(avail, room)
    return avail


def estimate_cache_bytes(paths: list[Path], max_side: int, sample: int = 256) -> int:
    """RAM the decoded, resized RGB images of ``paths`` would take, from the headers of a sample."""
    if not paths:
        return 0
    picked = paths[:: max(1, len(paths) // sample)]
    total = 0
    for p in picked:
        try:
            with Image.open(p) as im:  # reads the header only
                w, h = im.size
        except Exception as e:
            raise ImageError(f"cannot decode image {p}: {e}") from None
        if max_side and min(w, h) > max_side:
            s = max_side / min(w, h)
            w, h = max(1, round(w * s)), max(1, round(h * s))
        total += w * h * 3
    return int(total / len(picked) * len(paths) * 1.05)  # + PIL object overhead


def should_cache(setting: str, paths: list[Path], max_side: int, copies: int = 1) -> tuple[bool, str]:
    """Whether to cache (``cache_images`` auto/on/off) and a line saying why, for the log."""
    if setting != "auto":
        return setting == "on", f"image cache: {setting} (cache_images={setting})"
    need, avail = estimate_cache_bytes(paths, max_side) * copies, available_memory()
    gib = 2**30
    if avail is None or need <= CACHE_FRACTION * avail:
        room = "" if avail is None else f" of {avail / gib:.1f} GiB free"
        return True, f"image cache: ~{need / gib:.2f} GiB{room}: caching decoded images in RAM"
    return False, (f"image cache: ~{need / gib:.1f} GiB would not fit in half of the "
                   f"{avail / gib:.1f} GiB free: decoding from disk every epoch (cache_images=on "
                   f"forces it; more num_workers make up for it on a GPU)")


def resolve_workers(setting, device: torch.device) -> int:
    """``num_workers``: a number, or auto: 0 on CPU (where loader processes take cores from the
    model's own threads: measured by ``make bench``); on CUDA the spare cores shared among this
    machine's training processes (torchrun's ``LOCAL_WORLD_SIZE``), at most 8 each."""
    if str(setting) != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(8, max(0, ((os.cpu_count() or 1) - local) // local))


def cache_images(paths: list[Path], max_side: int, workers: int = 4) -> list[Image.Image]:
    """Decode every image once (threads: PIL releases the GIL while decoding)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda p: load_image(p, max_side), paths))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + index) % (2**32)


class ImageDataset(torch.utils.data.Dataset):
    """Rows of a competition table as ``(image tensor, target)``.

    ``key`` is a row index, or ``(epoch, index)`` from :class:`EpochBatchSampler` for seeded
    augmentation. ``images`` is the RAM cache (same order as ``paths``) or None to decode on access.
    """

    def __init__(self, paths, targets, transform, images=None, seed: int = 0, max_side: int = 0):
        self.paths, self.targets, self.transform = list(paths), targets, transform
        self.images, self.seed, self.max_side = images, seed, max_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list:
        """The samples of ``keys`` (a DataLoader fetches each batch through this).

        Each ``(epoch, index)`` key seeds Python's, NumPy's and torch's CPU generators before its
        transform; their previous states are restored once per call, not per sample (saving them
        costs ~70 us, a sample's transform ~250 us).
        """
        seeded = any(isinstance(k, tuple) for k in keys)
        with _restored_rng() if seeded else contextlib.nullcontext():
            return [self._sample(k) for k in keys]

    def _sample(self, key):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        img = self.images[i] if self.images is not None else load_image(self.paths[i], self.max_side)
        if epoch is not None:
            seed = sample_seed(self.seed, epoch, i)
            random.seed(seed)
            np.random.seed(seed)
            # The CPU generator alone: torch.manual_seed also reseeds every CUDA device (~90 us).
            torch.default_generator.manual_seed(seed)
        y = self.targets[i] if self.targets is not None else 0
        return self.transform(img), torch.as_tensor(y)


@contextlib.contextmanager
def _restored_rng():
    """Python's, NumPy's and torch's CPU generators are back in their entry state on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches of ``(epoch, index)`` keys; the order depends only on (seed, epoch).

    Call :meth:`set_epoch` before iterating. Works with persistent workers because the sampler runs
    in the training process. Under data-parallel training (``world`` > 1) the shuffled order is cut
    into global batches of ``batch_size * world`` rows and rank ``r`` takes every ``world``-th row of
    each from the ``r``-th on, so the ranks see disjoint rows and the same number of batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool, rank: int = 0,
                 world: int = 1):
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 7))
        order = torch.randperm(self.n, generator=g).tolist()
        step = self.batch_size * self.world
        for s in range(0, self.n, step):
            batch = order[s:s + step]
            if self.drop_last and len(batch) < step:
                return
            yield [(self.epoch, i) for i in batch[self.rank::self.world]]

    def __len__(self) -> int:
        step = self.batch_size * self.world
        return self.n // step if self.drop_last else -(-self.n // step)


@dataclass
class Transforms:
    """Per-sample transforms (PIL image -> uint8 tensor) and the normalisation applied per batch."""

    train: Callable
    eval: Callable
    mean: tuple[float, ...]
    std: tuple[float, ...]


def create_transforms(cfg: Config, model: torch.nn.Module) -> Transforms:
    """timm's transforms, augmentation from the config and statistics from the model's data config.

    As with timm's ``use_prefetcher``, samples stay uint8 and :class:`BatchInputs` normalises (and
    randomly erases) whole batches on the device: four times less to copy to a GPU, and one
    vectorised operation per batch instead of one per image.
    """
    data_cfg = resolve_data_config({"input_size": (3, cfg.img_size, cfg.img_size),
                                    "crop_pct": cfg.crop_pct}, model=model)
    common = dict(input_size=data_cfg["input_size"], mean=data_cfg["mean"], std=data_cfg["std"],
                  interpolation=data_cfg["interpolation"], use_prefetcher=True)
    train_tf = create_transform(
        **common, is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
        vflip=cfg.vflip, color_jitter=cfg.color_jitter or None,
        auto_augment=cfg.auto_augment or None)
    eval_tf = create_transform(**common, is_training=False, crop_pct=data_cfg["crop_pct"])
    return Transforms(train_tf, eval_tf, tuple(data_cfg["mean"]), tuple(data_cfg["std"]))


class BatchInputs:
    """uint8 image batches -> normalised float batches on the device, in channels_last if asked.

    The arithmetic is torchvision's ``ToTensor`` then ``Normalize`` (divide by 255, subtract the
    mean, divide by the std), done once per batch; random erasing (``reprob``, training only) is
    timm's, applied to the normalised batch as timm's prefetcher does.
    """

    def __init__(self, mean, std, device: torch.device, channels_last: bool, reprob: float = 0.0):
        self.device, self.channels_last = device, channels_last
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.erase = RandomErasing(reprob, mode="const", device=device) if reprob > 0 else None

    def __call__(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float().div_(255).sub_(self.mean).div_(self.std)
        if train and self.erase is not None:
            x = self.erase(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def create_loader(dataset, cfg: Config, *, train: bool, device: torch.device, epoch_seed: int = 0,
                  rank: int = 0, world: int = 1):
    """A DataLoader: seeded epoch batches (this rank's share) for training, ordered batches for
    prediction."""
    workers = resolve_workers(cfg.num_workers, device)
    kwargs = dict(num_workers=workers, pin_memory=device.type == "cuda",
                  persistent_workers=workers > 0)
    if train:
        sampler = EpochBatchSampler(len(dataset), cfg.batch_size, epoch_seed,
                                    drop_last=len(dataset) > cfg.batch_size * world,
                                    rank=rank, world=world)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **kwargs)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.infer_batch_size, shuffle=False,
                                       **kwargs)
