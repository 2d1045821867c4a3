"""Experiment config: every default in one block, YAML deltas on top, ``key=value`` overrides last.

Precedence is defaults < ``configs/<exp>.yaml`` < command line. An unknown key is an error that names
it and suggests the closest known key; a combination that would silently do nothing is an error too.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Every path the pipeline reads or writes, relative to the repository root (the working directory).
CONFIG_DIR = Path("configs")
COMPETITION_DIR = CONFIG_DIR / "competitions"
DATA_DIR = Path("data")
PRIVATE_DIR = DATA_DIR / "_private"  # demo test labels, kept apart from the competition files
FOLDS_DIR = Path("folds")
RUNS_DIR = Path("runs")
SUBMISSIONS_DIR = Path("submissions")


class PipelineError(ValueError):
    """Bad input a user can fix; entry points print its message (which names the culprit) and exit."""


class ConfigError(PipelineError):
    """A config file or override that cannot be used; the message names the key or file."""


@dataclass
class Config:
    # -- what to train on ------------------------------------------------------------------------
    competition: str = "demo"  # configs/competitions/<competition>.yaml
    name: str = ""  # run folder runs/<name>; defaults to the experiment's file name
    n_folds: int = 5  # used by `make folds`; training reads the folds file
    fold_seed: int = 42  # seed of the fold split
    folds: str = ""  # subset of folds to train, e.g. "0,2"; empty = all
    seed: int = 42  # seed of everything else (init, shuffling, augmentation, dropout)
    # -- model -----------------------------------------------------------------------------------
    model: str = "resnet18"  # any timm model name
    pretrained: bool = False  # load weights from the hub (needs internet)...
    pretrained_path: str = ""  # ...or from this local file (.pth/.bin/.safetensors), for offline use
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    img_size: int = 224
    crop_pct: float = 1.0  # eval resize: 1.0 keeps the whole image (no centre crop)
    # -- augmentation (timm.data.create_transform) -----------------------------------------------
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.0
    auto_augment: str = ""  # e.g. "rand-m9-mstd0.5-inc1" (RandAugment) or "original" (AutoAugment)
    reprob: float = 0.0  # random erasing probability
    mixup: float = 0.0  # mixup alpha; 0 = off
    cutmix: float = 0.0  # cutmix alpha; 0 = off
    mixup_prob: float = 1.0  # probability of applying mixup or cutmix to a batch
    label_smoothing: float = 0.0
    # -- optimisation (timm.optim / timm.scheduler) ----------------------------------------------
    epochs: int = 10
    batch_size: int = 64
    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: str = "cosine"  # cosine, step, multistep, plateau, poly, tanh, none
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    decay_epochs: float = 30  # step schedule
    decay_rate: float = 0.1
    accum_steps: int = 1  # gradient accumulation
    clip_grad: float = 0.0  # max grad norm; 0 = off
    loss: str = "auto"  # auto (by task), ce, bce, mse, huber
    ema: bool = False  # evaluate and save the EMA of the weights (timm.utils.ModelEmaV3)
    ema_decay: float = 0.998
    # -- early stopping on the competition metric ------------------------------------------------
    patience: int = 0  # epochs without improvement before stopping; 0 = never stop early
    min_delta: float = 0.0
    # -- predictions -----------------------------------------------------------------------------
    tta: list[str] = field(default_factory=list)  # extra views averaged in: hflip, vflip
    infer_batch_size: int = 256
    # -- hardware and data loading ---------------------------------------------------------------
    device: str = "auto"  # auto, cpu, cuda
    amp: str = "auto"  # auto (bf16 on CUDA when supported, else fp16; off on CPU), bf16, fp16, off
    channels_last: str = "auto"  # auto (on CUDA), on, off
    compile: bool = False  # torch.compile the model
    num_workers: str = "auto"  # DataLoader workers: auto (CUDA: one per spare core, up to 8; CPU: 0) or N
    cache_images: str = "auto"  # decoded, pre-resized images in RAM: auto (if they fit), on, off
    threads: int = 0  # torch CPU threads; 0 = torch's default

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)
TTA_VIEWS = ("hflip", "vflip")
# Keys that change how a run executes but not what it computes: a finished run may be resumed with
# other values for these.
RUNTIME_KEYS = {"folds", "device", "num_workers", "threads", "infer_batch_size", "cache_images"}


def _suggest_from(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value, source: str):
    """Return ``value`` converted to the declared type of ``key``; ConfigError when impossible."""
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    where = f"{key} (from {source})"
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError
            return float(value)
        if hint is str:
            if value is None:
                return ""
            if isinstance(value, bool):  # YAML 1.1 reads on/off as booleans
                return "on" if value else "off"
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, list | tuple) or len(value) != 2:
                raise TypeError
            return tuple(float(v) for v in value)
        if origin is list:
            if value is None:
                return []
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, list | tuple):
                raise TypeError
            return [str(v) for v in value]
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"config key {where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def parse_overrides(args: list[str]) -> dict:
    """``["lr=3e-4", "tta=hflip,vflip"]`` -> ``{"lr": 3e-4, "tta": "hflip,vflip"}`` (YAML-typed)."""
    out = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"override {arg!r} is not of the form key=value")
        key, raw = arg.split("=", 1)
        key = key.strip()
        value = yaml.safe_load(raw) if raw.strip() else ""
        # YAML reads "1e-3" as a string: let numeric-looking strings be numbers.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        out[key] = value
    return out


def _apply(cfg: Config, values: dict, source: str) -> None:
    for key, value in values.items():
        if key not in FIELDS:
            raise ConfigError(f"unknown config key '{key}' in {source}{_suggest_from(key, FIELDS)}")
        setattr(cfg, key, _coerce(key, value, source))


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping; ConfigError naming the file when it is missing or not a mapping."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return data


def load_config(exp: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Build the resolved config of experiment ``exp`` (a name under configs/ or a path).

    After the call every key holds a value of its declared type and :func:`validate` has passed.
    """
    cfg = Config()
    if exp:
        path = Path(exp)
        if path.suffix not in (".yaml", ".yml"):
            path = CONFIG_DIR / f"{exp}.yaml"
        _apply(cfg, load_yaml(path), str(path))
        if not cfg.name:
            cfg.name = path.stem
    if overrides:
        values = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        _apply(cfg, values, "command line")
    if not cfg.name:
        cfg.name = "default"
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Refuse values out of range and combinations that would silently do nothing."""
    defaults = Config()

    def changed(key: str) -> bool:
        return getattr(cfg, key) != getattr(defaults, key)

    checks = [
        (cfg.n_folds >= 2, "n_folds must be at least 2"),
        (cfg.epochs >= 1, "epochs must be at least 1"),
        (cfg.batch_size >= 1, "batch_size must be at least 1"),
        (cfg.accum_steps >= 1, "accum_steps must be at least 1"),
        (cfg.img_size >= 8, "img_size must be at least 8"),
        (cfg.lr > 0, "lr must be positive"),
        (cfg.patience >= 0, "patience must be >= 0"),
        (0 <= cfg.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
        (0 < cfg.crop_pct <= 1, "crop_pct must be in (0, 1]"),
        (cfg.amp in ("auto", "bf16", "fp16", "off"), "amp must be one of auto, bf16, fp16, off"),
        (cfg.channels_last in ("auto", "on", "off"), "channels_last must be one of auto, on, off"),
        (cfg.cache_images in ("auto", "on", "off"), "cache_images must be one of auto, on, off"),
        (cfg.num_workers == "auto" or cfg.num_workers.isdigit(),
         "num_workers must be auto or a whole number >= 0"),
        (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
         "device must be auto, cpu or cuda"),
        (cfg.loss in ("auto", "ce", "bce", "mse", "huber"), "loss must be auto, ce, bce, mse or huber"),
        (all(v in TTA_VIEWS for v in cfg.tta), f"tta views must be among {', '.join(TTA_VIEWS)}"),
        (not (cfg.pretrained and cfg.pretrained_path),
         "set either pretrained=true (hub) or pretrained_path (local file), not both"),
        (not (changed("ema_decay") and not cfg.ema), "ema_decay is set but ema is false"),
        (not (changed("min_delta") and cfg.patience == 0),
         "min_delta is set but patience is 0 (early stopping is off)"),
        (not (changed("mixup_prob") and cfg.mixup == 0 and cfg.cutmix == 0),
         "mixup_prob is set but mixup and cutmix are both 0"),
        (cfg.patience < cfg.epochs or cfg.patience == 0,
         f"patience={cfg.patience} >= epochs={cfg.epochs}: early stopping could never trigger"),
        (not (cfg.warmup_epochs and cfg.sched == "none"), "warmup_epochs is set but sched is none"),
        (cfg.warmup_epochs < cfg.epochs, "warmup_epochs must be smaller than epochs"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"config: {message}")
    if cfg.folds:
        try:
            [int(f) for f in cfg.folds.split(",")]
        except ValueError:
            raise ConfigError(f"config key folds: expected e.g. '0,2', got {cfg.folds!r}") from None


def fold_list(cfg: Config, n_folds: int) -> list[int]:
    """The folds to train: all of them, or the subset in ``cfg.folds`` (checked against n_folds)."""
    if not cfg.folds:
        return list(range(n_folds))
    folds = sorted({int(f) for f in cfg.folds.split(",")})
    bad = [f for f in folds if not 0 <= f < n_folds]
    if bad:
        raise ConfigError(f"config key folds: {bad} not in 0..{n_folds - 1}")
    return folds


def dump(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_save_figure(fig, path: Path, dpi: int = 90) -> None:
    """Save a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def atomic_write_csv(path: Path, df) -> None:
    """Write a DataFrame as CSV atomically (full float precision, no index)."""
    atomic_write_text(path, df.to_csv(index=False))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def config_from_argv(argv: list[str] | None, prog: str, doc: str) -> Config:
    """The shared command line of every entry point: ``[--exp NAME] [key=value ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--exp", default=None, help="experiment config: configs/<EXP>.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    return load_config(args.exp, args.overrides)


def run(main) -> None:
    """Run an entry point's ``main()`` and exit: a PipelineError prints one line, exit status 2."""
    import sys

    try:
        sys.exit(main())
    except PipelineError as e:
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"error{rank}: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
