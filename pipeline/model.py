"""The model, its loss and its output activation, sized from the competition."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from pipeline.competition import Competition
from pipeline.config import Config, ConfigError


def create_model(cfg: Config, num_outputs: int) -> nn.Module:
    """A timm model with a ``num_outputs`` head; pretrained from the hub or from ``pretrained_path``.

    With ``pretrained_path`` the file (state dict as .pth/.bin/.safetensors) is loaded through timm's
    own pretrained loader, which drops a classifier of another size and adapts the input channels,
    exactly as it does for hub weights: what offline Kaggle notebooks need.
    """
    kwargs = dict(num_classes=num_outputs, drop_rate=cfg.drop_rate)
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.pretrained_path:
        path = Path(cfg.pretrained_path)
        if not path.is_file():
            raise ConfigError(f"config key pretrained_path: file {path} not found")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path.resolve())})
    else:
        kwargs["pretrained"] = cfg.pretrained
    if not timm.is_model(cfg.model):
        close = timm.list_models(f"*{cfg.model.split('.')[0][:8]}*")[:5]
        raise ConfigError(f"config key model: unknown timm model '{cfg.model}'"
                          + (f" (similar: {', '.join(close)})" if close else ""))
    return timm.create_model(cfg.model, **kwargs)


def loss_name(cfg: Config, comp: Competition) -> str:
    """The loss for this task; ConfigError for a loss or mixup that does not fit it."""
    auto = {"multiclass": "ce", "binary": "bce", "multilabel": "bce", "regression": "mse"}[comp.task]
    name = auto if cfg.loss == "auto" else cfg.loss
    fits = {"ce": ("multiclass",), "bce": ("binary", "multilabel"),
            "mse": ("regression",), "huber": ("regression",)}[name]
    if comp.task not in fits:
        raise ConfigError(f"config key loss: '{name}' does not fit task {comp.task}")
    if (cfg.mixup or cfg.cutmix) and comp.task != "multiclass":
        raise ConfigError(f"config keys mixup/cutmix: only for task multiclass, not {comp.task}")
    if cfg.label_smoothing and comp.task == "regression":
        raise ConfigError("config key label_smoothing: has no effect on a regression task")
    return name


def create_loss(cfg: Config, comp: Competition) -> nn.Module:
    name = loss_name(cfg, comp)
    if name == "ce":  # soft targets from Mixup already carry the smoothing
        mixing = cfg.mixup > 0 or cfg.cutmix > 0
        return nn.CrossEntropyLoss(label_smoothing=0.0 if mixing else cfg.label_smoothing)
    if name == "bce":
        return _SmoothedBCE(cfg.label_smoothing)
    return nn.MSELoss() if name == "mse" else nn.HuberLoss()


class _SmoothedBCE(nn.Module):
    def __init__(self, smoothing: float):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits, target):
        target = target.float().reshape(logits.shape)
        if self.smoothing:
            target = target * (1 - self.smoothing) + 0.5 * self.smoothing
        return nn.functional.binary_cross_entropy_with_logits(logits, target)


def activate(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Model outputs as stored predictions: probabilities, or raw values for regression."""
    if task == "multiclass":
        return logits.float().softmax(1)
    if task in ("binary", "multilabel"):
        return logits.float().sigmoid()
    return logits.float()
