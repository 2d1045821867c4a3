"""The competition description: one YAML file per competition, checked against the real files.

``configs/competitions/<name>.yaml`` says where the files are, which columns hold the id and the
targets, the task, the metric, how an id becomes an image path and what the submission looks like.
Every key and its default is in :data:`DEFAULTS`; the file holds only what differs. After
:func:`load_competition` returns, the train table has the named columns, ids are unique, targets are
valid for the task and every image exists; otherwise a CompetitionError names the file, column or id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import metrics
from pipeline.config import (
    COMPETITION_DIR,
    DATA_DIR,
    ConfigError,
    PipelineError,
    _suggest_from,
    load_yaml,
)

TASKS = ("binary", "multiclass", "multilabel", "regression")
SUBMISSION_KINDS = ("label", "probs", "value")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

# Every key of a competition YAML, with its default. The file holds only what differs.
DEFAULTS = {
    "name": "",  # Kaggle slug; the files are in data/<name>/
    "task": "multiclass",  # binary | multiclass | multilabel | regression (ordinal: see metric qwk)
    "metric": "accuracy",  # accuracy, log_loss, roc_auc, f1_macro, qwk, rmse, mae
    "id_column": "id",
    "target_columns": ["label"],  # one column, or one 0/1 column per label for multilabel
    "classes": [],  # multiclass: class names in output order; default: sorted unique labels
    "group_column": "",  # rows sharing a value are never split across folds (e.g. a patient)
    "train_csv": "train.csv",
    "test_csv": "sample_submission.csv",  # the table whose id column lists the test images, in order
    "sample_submission": "sample_submission.csv",
    "train_images": ["train_images"],  # folders searched in order (recursively) for train images
    "test_images": ["test_images"],
    "image_ext": "auto",  # appended to an id: ".png", ".jpg", "" (ids carry it) or auto (any image)
    "path_column": "",  # or: a column of the csv files holding each image's path
    "submission": "label",  # label (class or 0/1), probs (one column per class/label), value
    "target_range": [],  # [min, max] a regression submission is clipped to; default: train range
}


class CompetitionError(PipelineError):
    """The competition files or their description do not fit; the message names the culprit."""


@dataclass
class Competition:
    name: str
    task: str
    metric: str
    id_column: str
    target_columns: list[str]
    classes: list
    group_column: str
    train_csv: str
    test_csv: str
    sample_submission: str
    train_images: list[str]
    test_images: list[str]
    image_ext: str
    path_column: str
    submission: str
    target_range: list[float]
    source: str = ""  # the YAML file this came from
    data_root: str = ""  # where the files are, when not data/<name>/ (e.g. /kaggle/input/<name>)
    _index: dict = field(default_factory=dict, repr=False)

    # -- paths -----------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return Path(self.data_root) if self.data_root else DATA_DIR / self.name

    def path(self, name: str) -> Path:
        return self.data_dir / name

    # -- tables ----------------------------------------------------------------------------------
    def read_csv(self, name: str, required: list[str]) -> pd.DataFrame:
        """Read a competition CSV, ids as strings; error naming the file and any missing column."""
        path = self.path(name)
        if not path.exists():
            raise CompetitionError(f"{path} not found (competition '{self.name}', from {self.source})")
        df = pd.read_csv(path, dtype={self.id_column: str})
        for col in required:
            if col and col not in df.columns:
                raise CompetitionError(
                    f"{path} has no column '{col}' (columns: {', '.join(map(str, df.columns))}); "
                    f"fix {self.source}"
                )
        if df[self.id_column].isna().any() or df[self.id_column].duplicated().any():
            dup = df[self.id_column][df[self.id_column].duplicated()].head(3).tolist()
            raise CompetitionError(f"{path}: column '{self.id_column}' has empty or repeated ids {dup}")
        return df

    def train_table(self) -> pd.DataFrame:
        """The train table with valid targets; see :meth:`targets` for the encoded array."""
        df = self.read_csv(self.train_csv, [self.id_column, *self.target_columns,
                                            self.group_column, self.path_column])
        path = self.path(self.train_csv)
        for col in self.target_columns:
            if df[col].isna().any():
                bad = df.loc[df[col].isna(), self.id_column].head(3).tolist()
                raise CompetitionError(f"{path}: column '{col}' is empty for ids {bad}")
            if self.task in ("binary", "multilabel"):
                bad = ~df[col].isin([0, 1])
                if bad.any():
                    raise CompetitionError(
                        f"{path}: column '{col}' must be 0/1 for task {self.task}, "
                        f"found {df.loc[bad, col].iloc[0]!r} (id {df.loc[bad, self.id_column].iloc[0]})")
            if self.task == "regression" and not pd.api.types.is_numeric_dtype(df[col]):
                raise CompetitionError(f"{path}: column '{col}' must be numeric for task regression")
        if self.task == "multiclass":
            unknown = set(df[self.target_columns[0]]) - set(self.classes)
            if unknown:
                raise CompetitionError(
                    f"{path}: labels {sorted(unknown, key=str)[:5]} of column "
                    f"'{self.target_columns[0]}' are not in classes of {self.source}")
        return df

    def test_table(self) -> pd.DataFrame:
        return self.read_csv(self.test_csv, [self.id_column, self.path_column])

    def targets(self, df: pd.DataFrame) -> np.ndarray:
        """Encoded targets: class indices (multiclass), 0/1 (binary), (n, L) 0/1, or (n, T) floats."""
        if self.task == "multiclass":
            lookup = {c: i for i, c in enumerate(self.classes)}
            return df[self.target_columns[0]].map(lookup).to_numpy(dtype=np.int64)
        if self.task == "binary":
            return df[self.target_columns[0]].to_numpy(dtype=np.int64)
        return df[self.target_columns].to_numpy(dtype=np.float64)

    @property
    def pred_columns(self) -> list[str]:
        """Names of the prediction columns in oof.csv and test.csv."""
        if self.task == "multiclass":
            return [str(c) for c in self.classes]
        return list(self.target_columns)

    @property
    def num_outputs(self) -> int:
        return len(self.pred_columns)

    # -- images ----------------------------------------------------------------------------------
    def image_paths(self, df: pd.DataFrame, split: str) -> list[Path]:
        """The image file of every row of ``df`` (split 'train' or 'test'); error naming missing ones."""
        if self.path_column:
            paths = [self.data_dir / p for p in df[self.path_column].astype(str)]
            missing = [str(p) for p in paths if not p.is_file()]
        else:
            index = self._image_index(split)
            exts = {"auto": ("", *IMAGE_EXTS), "": ("",)}.get(self.image_ext, (self.image_ext,))
            paths, missing = [], []
            for id_ in df[self.id_column]:
                found = next((index[id_ + e] for e in exts if id_ + e in index), None)
                if found is None:
                    missing.append(id_)
                paths.append(found)
        if missing:
            dirs = self.train_images if split == "train" else self.test_images
            where = f"column '{self.path_column}'" if self.path_column else \
                f"{', '.join(str(self.data_dir / d) for d in dirs)} (image_ext '{self.image_ext}')"
            raise CompetitionError(
                f"{len(missing)} {split} image(s) not found in {where}: "
                f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}")
        return paths

    def _image_index(self, split: str) -> dict[str, Path]:
        """File name -> path over the split's image folders; earlier folders win."""
        if split not in self._index:
            index: dict[str, Path] = {}
            dirs = self.train_images if split == "train" else self.test_images
            for d in dirs:
                root = self.data_dir / d
                if not root.is_dir():
                    raise CompetitionError(f"image folder {root} not found (from {self.source})")
                for dirpath, _, files in os.walk(root):
                    for f in files:
                        index.setdefault(f, Path(dirpath) / f)
            self._index[split] = index
        return self._index[split]


def _check_keys(data: dict, source: str) -> None:
    for key in data:
        if key not in DEFAULTS:
            raise ConfigError(f"unknown key '{key}' in {source}{_suggest_from(key, DEFAULTS)}")


def load_competition(name: str, check_files: bool = True) -> Competition:
    """Read ``configs/competitions/<name>.yaml`` and, with ``check_files``, check it against the data.

    ``name`` may also be a path to a YAML file.
    """
    source = Path(name) if str(name).endswith((".yaml", ".yml")) else COMPETITION_DIR / f"{name}.yaml"
    if not source.exists():
        raise CompetitionError(
            f"no competition description {source}; write one (see configs/competitions/demo.yaml) "
            f"or run `make init COMPETITION={Path(name).stem}` after `make data`")
    data = load_yaml(source)
    _check_keys(data, str(source))
    values = {**DEFAULTS, **data}
    values["name"] = values["name"] or source.stem
    for key in ("target_columns", "train_images", "test_images", "classes", "target_range"):
        if isinstance(values[key], str | int | float):
            values[key] = [values[key]]
        values[key] = list(values[key] or [])
    for key in ("id_column", "group_column", "path_column", "image_ext", "train_csv", "test_csv",
                "sample_submission", "submission", "task", "metric"):
        values[key] = "" if values[key] is None else str(values[key])
    comp = Competition(**values, source=str(source))
    _check_description(comp)
    if check_files:
        check_against_files(comp)
    return comp


def _check_description(comp: Competition) -> None:
    src = comp.source
    if comp.task not in TASKS:
        raise CompetitionError(f"{src}: unknown task '{comp.task}'; use one of {', '.join(TASKS)}")
    if comp.metric not in metrics.METRICS:
        raise CompetitionError(f"{src}: unknown metric '{comp.metric}'; use one of "
                               f"{', '.join(metrics.METRICS)}")
    if comp.task not in metrics.METRICS[comp.metric].tasks:
        raise CompetitionError(f"{src}: metric '{comp.metric}' does not apply to task '{comp.task}'")
    if comp.submission not in SUBMISSION_KINDS:
        raise CompetitionError(f"{src}: unknown submission '{comp.submission}'; use one of "
                               f"{', '.join(SUBMISSION_KINDS)}")
    if not comp.target_columns:
        raise CompetitionError(f"{src}: target_columns is empty")
    if comp.task in ("binary", "multiclass") and len(comp.target_columns) != 1:
        raise CompetitionError(f"{src}: task {comp.task} takes one target column, "
                               f"got {comp.target_columns}")
    allowed = {"binary": ("label", "value"), "multiclass": ("label", "probs"),
               "multilabel": ("probs",), "regression": ("value",)}[comp.task]
    if comp.submission not in allowed:
        raise CompetitionError(f"{src}: submission '{comp.submission}' does not fit task "
                               f"{comp.task}; use {' or '.join(allowed)}")
    if comp.classes and comp.task != "multiclass":
        raise CompetitionError(f"{src}: classes is set but task is {comp.task} (only multiclass uses it)")
    if comp.target_range and (comp.task != "regression" or len(comp.target_range) != 2):
        raise CompetitionError(f"{src}: target_range must be [min, max] and only for regression")


def check_against_files(comp: Competition) -> None:
    """Check the description against the data files: columns, targets, ids and images."""
    if not comp.data_dir.is_dir():
        raise CompetitionError(f"{comp.data_dir} not found: run `make data COMPETITION={comp.name}`")
    train = comp.read_csv(comp.train_csv, [comp.id_column, *comp.target_columns,
                                           comp.group_column, comp.path_column])
    if comp.task == "multiclass" and not comp.classes:
        comp.classes = sorted(train[comp.target_columns[0]].unique().tolist(), key=_class_key)
    comp.classes = [c.item() if hasattr(c, "item") else c for c in comp.classes]
    train = comp.train_table()
    if comp.task == "regression" and not comp.target_range:
        col = comp.target_columns[0]
        comp.target_range = [float(train[col].min()), float(train[col].max())]
    comp.image_paths(train, "train")
    test = comp.test_table()
    comp.image_paths(test, "test")
    sample = comp.read_csv(comp.sample_submission, [comp.id_column])
    if comp.submission == "probs":
        missing = [c for c in comp.pred_columns if c not in sample.columns]
        if missing:
            raise CompetitionError(
                f"{comp.path(comp.sample_submission)} lacks the prediction columns {missing[:5]} "
                f"(submission: probs expects one column per {'class' if comp.task == 'multiclass' else 'label'})")


def _class_key(c):
    return (0, c, "") if isinstance(c, int | float | np.integer | np.floating) else (1, 0, str(c))
