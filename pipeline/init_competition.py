"""``make init``: draft ``configs/competitions/<competition>.yaml`` from the files in ``data/<competition>/``.

Reads the train table and the sample submission, and guesses the id column, the target columns, the
task, the metric, the submission kind and where the images are; each guessed key carries a
``# guess: ...`` comment saying why. The draft is checked with ``load_competition``; a draft that
does not load is still written, with the reason printed, for the user to fix. An existing file is
never overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import yaml

from pipeline.competition import DEFAULTS, IMAGE_EXTS, load_competition
from pipeline.config import (
    COMPETITION_DIR,
    DATA_DIR,
    PipelineError,
    atomic_write_text,
    config_from_argv,
    run,
)

MAX_CLASSES = 50  # more distinct integer labels than this is read as a regression target
GROUP_WORDS = ("patient", "subject", "group", "study", "case", "individual", "person")


# -- csv files -----------------------------------------------------------------------------------
def _pick(csvs: list[str], exact: str, words: tuple[str, ...], avoid: tuple[str, ...]) -> str | None:
    """``exact`` if present, else the shallowest csv whose name holds one of ``words`` (not ``avoid``)."""
    if exact in csvs:
        return exact
    hits = [c for c in csvs if any(w in Path(c).name.lower() for w in words)
            and not any(a in Path(c).name.lower() for a in avoid)]
    return min(hits, key=lambda c: (c.count("/"), len(c)), default=None)


def find_csvs(data_dir: Path) -> tuple[str, str]:
    """The train table and the sample submission, as paths relative to ``data_dir``."""
    csvs = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*.csv"))
    train = _pick(csvs, "train.csv", ("train",), ("sample", "submission"))
    sample = _pick(csvs, "sample_submission.csv", ("sample", "submission"), ())
    if train is None or sample is None:
        missing = "a train table (train*.csv)" if train is None else "a sample submission"
        raise PipelineError(f"{data_dir} has no {missing} among its csv files {csvs[:10]}")
    return train, sample


# -- columns and task ----------------------------------------------------------------------------
def guess_id(train: pd.DataFrame, sample: pd.DataFrame) -> tuple[str, str]:
    shared = [c for c in sample.columns if c in train.columns]
    if shared:
        return shared[0], "first column shared by the train table and the sample submission"
    return str(sample.columns[0]), "first column of the sample submission (not in the train table!)"


def _is01(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and bool(s.dropna().isin([0, 1]).all())


def _is_int(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and bool((s.dropna() % 1 == 0).all())


def guess_targets(train, sample, id_col) -> tuple[list[str], bool, str]:
    """(target columns, submission has one column per class, why)."""
    sub_cols = [c for c in sample.columns if c != id_col]
    in_train = [c for c in sub_cols if c in train.columns]
    if sub_cols and len(in_train) == len(sub_cols):
        return sub_cols, False, "sample submission columns that the train table also has"
    names = {str(c) for c in sub_cols}
    for col in train.columns:
        if col != id_col and set(train[col].astype(str).unique()) <= names:
            return [col], True, (f"its values are the sample submission's columns "
                                 f"({len(names)} classes)")
    rest = [c for c in train.columns if c != id_col]
    if not rest:
        raise PipelineError(f"the train table has no column besides '{id_col}'")
    return rest[-1:], False, "last train column (the sample submission's columns are not in it)"


def guess_task(train, sample, targets, one_col_per_class) -> dict:
    """The task, metric and submission kind for these targets, each with its reason."""
    cols = train[targets]
    if one_col_per_class:
        return {"task": ("multiclass", "one sample submission column per class"),
                "metric": ("log_loss", "probabilities per class are usually scored by log loss"),
                "submission": ("probs", "one probability column per class")}
    if len(targets) > 1:
        if all(_is01(cols[c]) for c in targets):
            return {"task": ("multilabel", "several 0/1 target columns"),
                    "metric": ("roc_auc", "mean column-wise ROC AUC, the usual multi-label metric"),
                    "submission": ("probs", "one probability per label")}
        return {"task": ("regression", "several numeric target columns"),
                "metric": ("rmse", "regression"), "submission": ("value", "regression")}
    y, col = cols[targets[0]], targets[0]
    sub_is_int = col in sample.columns and _is_int(sample[col])
    if _is01(y):
        if sub_is_int:
            return {"task": ("binary", "0/1 target"),
                    "metric": ("accuracy", "the sample submission holds 0/1 labels"),
                    "submission": ("label", "the sample submission holds 0/1 labels")}
        return {"task": ("binary", "0/1 target"),
                "metric": ("roc_auc", "the sample submission holds probabilities; or log_loss"),
                "submission": ("value", "a probability per row")}
    n_unique = y.nunique()
    if not pd.api.types.is_numeric_dtype(y) or (_is_int(y) and n_unique <= MAX_CLASSES):
        return {"task": ("multiclass", f"{n_unique} distinct labels"),
                "metric": ("accuracy", "one label per row; use qwk for ordinal grades"),
                "submission": ("label", "the sample submission holds one label per row")}
    return {"task": ("regression", "numeric target with many values"),
            "metric": ("rmse", "regression; or mae"),
            "submission": ("value", "one number per row")}


def guess_group(train, id_col, targets) -> str | None:
    for col in train.columns:
        if col not in (id_col, *targets) and any(w in str(col).lower() for w in GROUP_WORDS) \
                and train[col].duplicated().any():
            return col
    return None


# -- images --------------------------------------------------------------------------------------
def image_files(data_dir: Path) -> dict[str, set[str]]:
    """Top-level folder (or '.') -> names of the image files anywhere under it."""
    out: dict[str, set[str]] = {}
    for dirpath, _, files in os.walk(data_dir):
        rel = Path(dirpath).relative_to(data_dir).parts
        top = rel[0] if rel else "."
        out.setdefault(top, set()).update(f for f in files if f.lower().endswith(IMAGE_EXTS))
    return {k: v for k, v in out.items() if v}


def match_images(ids: list[str], folders: dict[str, set[str]]) -> tuple[list[str], set[str], int]:
    """(folders holding these ids' images, most matches first; how ids matched; matched count)."""
    found, kinds, matched = [], set(), set()
    for folder, names in folders.items():
        stems = {}
        for n in names:
            stems.setdefault(os.path.splitext(n)[0], os.path.splitext(n)[1])
        hits = 0
        for id_ in ids:
            if id_ in names:
                kinds.add("")
            elif id_ in stems:
                kinds.add(stems[id_])
            else:
                continue
            hits += 1
            matched.add(id_)
        if hits:
            found.append((hits, folder))
    return [f for _, f in sorted(found, key=lambda t: -t[0])], kinds, len(matched)


def guess_images(data_dir: Path, train_ids: list[str], test_ids: list[str]) -> dict:
    folders = image_files(data_dir)
    tr, tr_kinds, tr_n = match_images(train_ids, folders)
    te, te_kinds, te_n = match_images(test_ids, folders)
    kinds = tr_kinds | te_kinds
    ext = next(iter(kinds)) if len(kinds) == 1 else "auto"
    why_ext = ("ids carry the file extension" if ext == "" else
               f"every matched image is <id>{ext}" if ext != "auto" else
               f"mixed: {sorted(kinds)}" if kinds else "no image matched an id")
    return {
        "train_images": (tr or ["train_images"],
                         f"{tr_n} of {len(train_ids)} train ids matched an image" if tr else
                         "NO folder holds images named by the train ids; fix or set path_column"),
        "test_images": (te or ["test_images"],
                        f"{te_n} of {len(test_ids)} test ids matched an image" if te else
                        "NO folder holds images named by the test ids; fix or set path_column"),
        "image_ext": (ext, why_ext),
    }


# -- the draft -----------------------------------------------------------------------------------
def draft(slug: str, data_dir: Path) -> dict[str, tuple[object, str]]:
    """Every guessed key -> (value, reason), in the order of :data:`DEFAULTS`."""
    train_csv, sample_csv = find_csvs(data_dir)
    train = pd.read_csv(data_dir / train_csv)
    sample = pd.read_csv(data_dir / sample_csv)
    id_col, why_id = guess_id(train, sample)
    train = pd.read_csv(data_dir / train_csv, dtype={id_col: str}) if id_col in train else train
    sample = pd.read_csv(data_dir / sample_csv, dtype={id_col: str})
    targets, per_class, why_targets = guess_targets(train, sample, id_col)
    keys = {"name": (slug, "the Kaggle slug: files are in data/<name>/"),
            **guess_task(train, sample, targets, per_class),
            "id_column": (id_col, why_id),
            "target_columns": (targets, why_targets)}
    group = guess_group(train, id_col, targets)
    if group:
        keys["group_column"] = (group, "rows sharing it must stay in one fold (check!)")
    keys["train_csv"] = (train_csv, "the train table")
    keys["test_csv"] = (sample_csv, "its ids list the test images, in submission order")
    keys["sample_submission"] = (sample_csv, "the sample submission")
    train_ids = train[id_col].astype(str).tolist() if id_col in train else []
    keys.update(guess_images(data_dir, train_ids, sample[id_col].astype(str).tolist()))
    return {k: keys[k] for k in DEFAULTS if k in keys}


def render(slug: str, keys: dict[str, tuple[object, str]]) -> str:
    """The YAML text: a header, then ``key: value  # guess: reason`` per key."""
    lines = [f"# Drafted by `make init COMPETITION={slug}` from data/{slug}/.",
             "# Check every guess; every key and its default: DEFAULTS in pipeline/competition.py."]
    for key, (value, why) in keys.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000)
        text = text.removesuffix("\n...\n").strip()
        lines.append(f"{key}: {text}  # guess: {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(argv, "pipeline.init_competition", __doc__)
    slug = cfg.competition
    out = COMPETITION_DIR / f"{slug}.yaml"
    if out.exists():
        raise PipelineError(f"{out} already exists; edit it, or delete it to draft it again")
    data_dir = DATA_DIR / slug
    if not data_dir.is_dir():
        raise PipelineError(f"{data_dir} not found: run `make data COMPETITION={slug}` first")
    atomic_write_text(out, render(slug, draft(slug, data_dir)))
    print(f"init: wrote {out}; check each '# guess' line")
    try:
        load_competition(slug)
    except PipelineError as e:
        print(f"init: the draft does not load yet, fix it: {e}")
        return 1
    return 0


if __name__ == "__main__":
    run(main)
