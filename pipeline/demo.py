"""The built-in demo competition, made offline from the handwritten digits inside scikit-learn.

:func:`build` lays the 1,797 8x8 digits out like a Kaggle image competition: 32x32 grayscale PNGs in
``train_images/`` and ``test_images/``, ``train.csv`` (``id,label``) and ``sample_submission.csv``.
A stratified fifth is the test set; its labels go to ``data/_private/demo/solution.csv``, apart from
the competition files, and are used only to score demo submissions the way Kaggle would. The same
bytes are written every time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pipeline.config import PRIVATE_DIR, atomic_write_csv

SIZE = 32
SEED = 2024


def solution_path(name: str = "demo") -> Path:
    return PRIVATE_DIR / name / "solution.csv"


def build(dest: Path) -> None:
    """Write the demo competition into ``dest`` (must not exist), through a temporary folder."""
    dest = Path(dest)
    digits = load_digits()
    ids = np.array([f"{i:04d}" for i in range(len(digits.target))])
    train_idx, test_idx = train_test_split(np.arange(len(ids)), test_size=0.2,
                                           stratify=digits.target, random_state=SEED)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        folder = tmp / f"{split}_images"
        folder.mkdir(parents=True)
        for i in idx:
            pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
            img = Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR)
            img.save(folder / f"{ids[i]}.png", optimize=False)
    pd.DataFrame({"id": ids[train_idx], "label": digits.target[train_idx]}).to_csv(
        tmp / "train.csv", index=False)
    pd.DataFrame({"id": ids[test_idx], "label": 0}).to_csv(tmp / "sample_submission.csv", index=False)
    atomic_write_csv(solution_path(dest.name),
                     pd.DataFrame({"id": ids[test_idx], "label": digits.target[test_idx]}))
    tmp.rename(dest)
