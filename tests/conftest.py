"""Shared fixtures: tiny Kaggle-style competitions made in ``tmp_path`` (the working directory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run the test inside ``tmp_path``: every pipeline path (data/, runs/, ...) lands there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "competitions").mkdir(parents=True)
    return tmp_path


def write_image(path: Path, value: int, size: int = 16, fmt: str = "PNG") -> None:
    """A small RGB image whose brightness encodes ``value`` (so a model can learn it)."""
    rng = np.random.default_rng(value)
    arr = np.clip(rng.normal(40 + 40 * value, 10, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def make_competition(root: Path, name: str = "toy", task: str = "multiclass", n_train: int = 40,
                     n_test: int = 10, n_classes: int = 3, groups: bool = False,
                     seed: int = 0, **yaml_overrides) -> dict:
    """Write ``data/<name>/`` and ``configs/competitions/<name>.yaml`` for a tiny competition.

    Returns the YAML dict. Images are PNG, ``<id>.png`` under train_images/ and test_images/.
    """
    rng = np.random.default_rng(seed)
    data = root / "data" / name
    ids = [f"r{i:03d}" for i in range(n_train)]
    train = pd.DataFrame({"id": ids})
    desc = {"name": name, "task": task, "image_ext": ".png"}
    if task == "multiclass":
        y = np.arange(n_train) % n_classes
        train["label"] = y
        desc.update(metric="accuracy", target_columns=["label"], submission="label")
        sample = pd.DataFrame({"id": [f"t{i:03d}" for i in range(n_test)], "label": 0})
    elif task == "binary":
        y = np.arange(n_train) % 2
        train["target"] = y
        desc.update(metric="roc_auc", target_columns=["target"], submission="value")
        sample = pd.DataFrame({"id": [f"t{i:03d}" for i in range(n_test)], "target": 0.5})
    elif task == "multilabel":
        y = (rng.random((n_train, 3)) < 0.4).astype(int)
        y[:, 0] = np.arange(n_train) % 2
        for j, col in enumerate(["a", "b", "c"]):
            train[col] = y[:, j]
        desc.update(metric="roc_auc", target_columns=["a", "b", "c"], submission="probs")
        sample = pd.DataFrame({"id": [f"t{i:03d}" for i in range(n_test)], "a": 0.5, "b": 0.5, "c": 0.5})
        y = y[:, 0]
    else:
        y = np.arange(n_train) % 4
        train["score"] = y.astype(float) + rng.random(n_train) * 0.1
        desc.update(metric="rmse", target_columns=["score"], submission="value")
        sample = pd.DataFrame({"id": [f"t{i:03d}" for i in range(n_test)], "score": 0.0})
    if groups:
        train["patient"] = [f"p{i // 4}" for i in range(n_train)]
        desc["group_column"] = "patient"
    for id_, v in zip(ids, y, strict=True):
        write_image(data / "train_images" / f"{id_}.png", int(v))
    for i, id_ in enumerate(sample["id"]):
        write_image(data / "test_images" / f"{id_}.png", i % 3)
    train.to_csv(data / "train.csv", index=False)
    sample.to_csv(data / "sample_submission.csv", index=False)
    desc.update(yaml_overrides)
    comp_dir = root / "configs" / "competitions"
    comp_dir.mkdir(parents=True, exist_ok=True)
    (comp_dir / f"{name}.yaml").write_text(yaml.safe_dump(desc))
    return desc


@pytest.fixture
def toy(workdir):
    """A 3-class competition of 40 train and 10 test images in ``workdir``."""
    return make_competition(workdir)
