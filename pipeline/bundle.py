"""``make bundle``: a self-contained folder for Kaggle code competitions, checked offline before upload.

    python -m pipeline.bundle --source ensemble -- competition=demo

A code competition runs your notebook without internet on a hidden test set that replaces the public
one. ``runs/bundle/<source>/`` holds everything that notebook needs, to upload as a Kaggle dataset:

    predict.py          python predict.py [--data DIR] [--out submission.csv]
    pipeline/           this package's source (the notebook imports this copy, nothing installed)
    competition.yaml    the competition description, classes and target range frozen
    bundle.json         members, fold count, blend weights, the CV it was built from
    models/<member>/    config.yaml (the run's resolved config), fold<k>.pt (each fold's best
                        weights, EMA when enabled), scale.json (regression target scaling per fold)
    check.json          the local check's figures

``predict.py`` reads the test table and images wherever ``--data`` points (default: the first of
``/kaggle/input/<competition>``, ``/kaggle/input/competitions/<competition>`` and
``data/<competition>`` that exists), warns when torch, timm, pandas or numpy differ in major.minor
from the versions the bundle was checked with, predicts with every fold of
every member with the member's TTA, blends as ``make ensemble`` chose (mean, rank mean, fitted
weights or Caruana; stacking is refused: its level-2 models are not saved), and writes a submission
validated like ``make submit``'s.

After this returns, ``runs/bundle/<source>/`` exists only if the check passed: ``predict.py`` ran in a
fresh process, from a directory outside the repository, with the network pointed at a closed port and
the Hugging Face hub offline, importing the bundle's own ``pipeline``; its test predictions match
``runs/<source>/test.csv`` (to ``TOLERANCE`` on CPU; ``AMP_TOLERANCE`` on CUDA, where autocast and
cuDNN's algorithm choice make the last digits vary) and its submission equals the one ``make submit``
writes, except for labels of rows the reference itself scores as a tie within that tolerance.
The bundle is built in a temporary folder and renamed into place only then.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.competition import DEFAULTS, Competition, load_competition
from pipeline.config import (
    FIELDS,
    RUNS_DIR,
    PipelineError,
    atomic_write_csv,
    atomic_write_json,
    dump,
    load_config,
    run,
)

BUNDLE_DIR = RUNS_DIR / "bundle"
PACKAGE_DIR = Path(__file__).resolve().parent
TOLERANCE = 1e-4  # max |bundle - runs/<source>/test.csv|: same code and weights, other batching
AMP_TOLERANCE = 2e-2  # the same on CUDA, where the check runs with the runs' AMP setting
BLEND_METHODS = ("single", "mean", "weights", "caruana", "rank_mean")
PREDICT_PY = '''"""Predict the test set of a Kaggle code competition offline: python predict.py --help"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # this bundle's own copy of the pipeline package

from pipeline.bundle import predict_main  # noqa: E402
from pipeline.config import run  # noqa: E402

run(lambda: predict_main(sys.argv[1:], HERE))
'''


class BundleError(PipelineError):
    """A source that cannot be bundled, or a bundle that failed its check."""


# -- building ------------------------------------------------------------------------------------
def members_of(source: str) -> tuple[str, dict[str, float]]:
    """(blend method, {member run: weight > 0}) of an experiment or of runs/ensemble."""
    run_dir = RUNS_DIR / source
    if not (run_dir / "scores.json").exists():
        raise BundleError(f"{run_dir / 'scores.json'} not found: `make train` or `make ensemble` first")
    if not (run_dir / "weights.json").exists():
        return "single", {source: 1.0}
    blend = json.loads((run_dir / "weights.json").read_text())
    method = blend["method"]
    if method not in BLEND_METHODS:
        raise BundleError(f"{run_dir}/weights.json: blend '{method}' cannot be bundled (its level-2 "
                          f"models are not saved); run `make ensemble` without STACK=1, or bundle "
                          f"one experiment with EXP=")
    return method, {m: float(w) for m, w in blend["weights"].items() if w > 0}


def frozen_competition(comp: Competition) -> dict:
    """The description with what loading derives from train.csv (classes, target_range) written out."""
    return {key: getattr(comp, key) for key in DEFAULTS}


def target_scales(comp: Competition, member: str) -> list:
    """Per fold, the (mean, std) train.py standardised regression targets with, or []."""
    if comp.task != "regression":
        return []
    from pipeline.folds import read_folds

    config = yaml.safe_load((RUNS_DIR / member / "config.yaml").read_text())
    train = comp.train_table()
    folds, sha = read_folds(comp, train)
    if sha != config.get("folds_sha256"):
        raise BundleError(f"runs/{member} was trained on other folds than the current folds file; "
                          f"its target scaling cannot be recovered: retrain it")
    y = comp.targets(train)
    return [[y[folds != k].mean(0).tolist(), (y[folds != k].std(0) + 1e-8).tolist()]
            for k in range(int(config["n_folds"]))]


def copy_member(comp: Competition, member: str, dest: Path) -> int:
    """Copy a finished run's config and fold weights into ``dest``; the number of folds."""
    run_dir = RUNS_DIR / member
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    n_folds = int(config.get("n_folds", 0))
    missing = [k for k in range(n_folds) if not (run_dir / f"fold{k}" / "best.pt").exists()]
    if not n_folds or missing:
        raise BundleError(f"{run_dir}: fold weights {missing} missing (fold<k>/best.pt): retrain")
    dest.mkdir(parents=True)
    shutil.copy2(run_dir / "config.yaml", dest / "config.yaml")
    for k in range(n_folds):
        shutil.copy2(run_dir / f"fold{k}" / "best.pt", dest / f"fold{k}.pt")
    atomic_write_json(dest / "scale.json", target_scales(comp, member))
    return n_folds


def build(source: str, competition: str, out: Path) -> dict:
    """Write the bundle of ``source`` into the empty folder ``out``; its manifest."""
    comp = load_competition(competition)
    method, weights = members_of(source)
    scores = json.loads((RUNS_DIR / source / "scores.json").read_text())
    shutil.copytree(PACKAGE_DIR, out / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (out / "predict.py").write_text(PREDICT_PY)
    (out / "competition.yaml").write_text(dump(frozen_competition(comp)))
    manifest = {"competition": comp.name, "source": source, "method": method,
                "members": {m: {"weight": w, "folds": copy_member(comp, m, out / "models" / m)}
                            for m, w in weights.items()},
                "metric": scores["metric"], "cv": scores["cv"], "versions": library_versions(),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(out / "bundle.json", manifest)
    return manifest


def library_versions() -> dict:
    import timm
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__.split("+")[0],
            "timm": timm.__version__, "pandas": pd.__version__, "numpy": np.__version__}


def version_warnings(built: dict) -> list[str]:
    """One line per library whose major.minor here differs from the one the bundle was built with."""
    here = library_versions()
    return [f"predict.py: {lib} {here[lib]} here, the bundle was checked with {v}: if predictions "
            f"look wrong, pin {lib}=={v} in the notebook"
            for lib, v in built.items() if lib in here and here[lib].split(".")[:2] != v.split(".")[:2]]


# -- predicting (this runs inside the bundle, on Kaggle) -------------------------------------------
def member_config(path: Path):
    """The run's resolved config as a Config, with hub downloads off (weights come from the bundle)."""
    values = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k in FIELDS}
    values.update(pretrained=False, pretrained_path="", folds="")
    return load_config(None, values)


def predict_member(bundle: Path, member: str, n_folds: int, comp: Competition, paths: list[Path],
                   device, workers: int | None) -> np.ndarray:
    """The member's test predictions: its fold models' TTA predictions, averaged over folds.

    The model, its transforms and batch inputs are built by the training code's own :class:`Fold`,
    so the bundle predicts exactly as ``make train`` did.
    """
    import torch

    from pipeline.dataset import ImageDataset, create_loader
    from pipeline.train import Fold, predict

    cfg = member_config(bundle / "models" / member / "config.yaml")
    if workers is not None:
        cfg.num_workers = str(workers)
    scales = json.loads((bundle / "models" / member / "scale.json").read_text())
    f = Fold(cfg, comp, 0, 1, device)
    dataset = ImageDataset(paths, None, f.transforms.eval, max_side=cfg.img_size * 2)
    loader = create_loader(dataset, cfg, train=False, device=device)
    total = 0.0
    for k in range(n_folds):
        f.model.load_state_dict(torch.load(bundle / "models" / member / f"fold{k}.pt",
                                           map_location=device, weights_only=True))
        scale = None
        if scales:
            scale = tuple(torch.tensor(v, dtype=torch.float32, device=device) for v in scales[k])
        pred, _ = predict(f.model, loader, f, cfg.tta, scale)
        total = total + pred
    return total / n_folds


def blend(method: str, preds: list[np.ndarray], weights: list[float]) -> np.ndarray:
    from pipeline.ensemble import combine, rank_columns

    if method == "rank_mean":
        preds = [rank_columns(p) for p in preds]
    return combine(np.stack(preds), np.asarray(weights))


def default_data_dir(name: str) -> Path:
    for candidate in (Path("/kaggle/input") / name, Path("/kaggle/input/competitions") / name,
                      Path("data") / name):
        if candidate.is_dir():
            return candidate
    raise BundleError(f"no data folder for '{name}' in /kaggle/input/ or data/: pass --data DIR")


def predict_main(argv: list[str] | None, bundle: Path) -> int:
    """Entry point of ``predict.py``: write a validated submission for the test set under ``--data``."""
    import torch

    from pipeline.submit import build_submission, validate_submission

    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="the competition's files (default: /kaggle/input/<name>)")
    parser.add_argument("--out", type=Path, default=Path("submission.csv"))
    parser.add_argument("--raw", type=Path, help="also write the blended test predictions here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the run's)")
    args = parser.parse_args(argv)
    t0 = time.time()
    manifest = json.loads((bundle / "bundle.json").read_text())
    for line in version_warnings(manifest.get("versions", {})):
        print(line, file=sys.stderr)
    comp = load_competition(str(bundle / "competition.yaml"), check_files=False)
    comp.data_root = str(args.data or default_data_dir(comp.name))
    test = comp.test_table()
    paths = comp.image_paths(test, "test")
    sample = comp.read_csv(comp.sample_submission, [comp.id_column])
    device = torch.device(args.device)
    members = manifest["members"]
    preds = [predict_member(bundle, m, spec["folds"], comp, paths, device, args.workers)
             for m, spec in members.items()]
    pred = blend(manifest["method"], preds, [spec["weight"] for spec in members.values()])
    pred_df = pd.DataFrame(pred, columns=comp.pred_columns, index=test[comp.id_column].to_numpy())
    sub = build_submission(comp, pred_df, sample)
    validate_submission(comp, sub)
    if args.raw:
        atomic_write_csv(args.raw, pred_df.rename_axis(comp.id_column).reset_index())
    atomic_write_csv(args.out, sub)
    import pipeline

    print(f"predict.py: wrote {args.out} ({len(sub)} rows) from {len(members)} member(s), "
          f"{sum(s['folds'] for s in members.values())} fold models, {manifest['method']} blend, "
          f"in {time.time() - t0:.1f}s on {device.type}; package {Path(pipeline.__file__).parent}")
    return 0


# -- the check -----------------------------------------------------------------------------------
def offline_env() -> dict:
    """The environment of a notebook without internet: proxies to a closed port, hubs offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_PROXY", "no_proxy")}
    closed = "http://127.0.0.1:9"
    env.update(HTTP_PROXY=closed, HTTPS_PROXY=closed, http_proxy=closed, https_proxy=closed,
               ALL_PROXY=closed, HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    return env


def check(bundle: Path, source: str, comp: Competition) -> dict:
    """Run the bundle's predict.py offline and compare it with ``make submit``'s result."""
    import torch

    from pipeline.submit import build_submission, read_test_predictions

    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the runs were trained
    tol = AMP_TOLERANCE if device == "cuda" else TOLERANCE
    with tempfile.TemporaryDirectory(prefix="bundle-check-") as tmp:
        t0 = time.time()
        done = subprocess.run(
            [sys.executable, str(bundle / "predict.py"), "--data", str(comp.data_dir.resolve()),
             "--out", "submission.csv", "--raw", "raw.csv", "--device", device],
            cwd=tmp, env=offline_env(), capture_output=True, text=True)
        seconds = time.time() - t0
        if done.returncode != 0:
            raise BundleError(f"the bundle's predict.py failed offline:\n{done.stderr[-2000:]}")
        if f"package {bundle / 'pipeline'}" not in done.stdout:
            raise BundleError(f"predict.py did not import the bundle's own package:\n{done.stdout}")
        sample = comp.read_csv(comp.sample_submission, [comp.id_column])
        ids = sample[comp.id_column]
        mine = read_test_predictions(Path(tmp) / "raw.csv", comp, ids)
        ref = read_test_predictions(RUNS_DIR / source / "test.csv", comp, ids)
        diff = float(np.abs(mine.to_numpy() - ref.to_numpy()).max())
        if not diff <= tol:
            raise BundleError(f"the bundle's test predictions differ from runs/{source}/test.csv by "
                              f"up to {diff:.2e} (tolerance {tol})")
        sub = pd.read_csv(Path(tmp) / "submission.csv", dtype={comp.id_column: str})
        bad = submission_mismatch(comp, sub, build_submission(comp, ref, sample), ref, tol)
        if bad:
            raise BundleError(f"the bundle's submission differs from what `make submit` writes for "
                              f"runs/{source}: {bad}")
    return {"max_abs_diff": diff, "tolerance": tol, "device": device, "seconds": round(seconds, 1),
            "rows": len(sub), "checked": time.strftime("%Y-%m-%dT%H:%M:%S")}


def submission_mismatch(comp: Competition, sub: pd.DataFrame, expected: pd.DataFrame,
                        ref: pd.DataFrame, tol: float) -> str:
    """'' when ``sub`` equals ``expected``, up to ``tol`` and to labels of near-ties; else why not."""
    if list(sub.columns) != list(expected.columns) or \
            not (sub[comp.id_column].to_numpy() == expected[comp.id_column].to_numpy()).all():
        return "other columns or ids"
    p = np.sort(ref.to_numpy(), axis=1)
    margin = p[:, -1] - p[:, -2] if p.shape[1] > 1 else np.abs(p[:, 0] - 0.5) * 2
    for col in sub.columns.drop(comp.id_column):
        if comp.submission == "label":
            differ = sub[col].astype(str).to_numpy() != expected[col].astype(str).to_numpy()
            if (differ & (margin > 2 * tol)).any():
                return f"column '{col}' has other labels (id {sub[comp.id_column][differ].iloc[0]})"
        elif not np.allclose(sub[col].to_numpy(dtype=float), expected[col].to_numpy(dtype=float),
                             atol=tol):
            return f"column '{col}' has other values"
    return ""


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline.bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="ensemble", help="run folder under runs/ (default ensemble)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(None, args.overrides)
    comp = load_competition(cfg.competition)
    final = BUNDLE_DIR / args.source
    source_files = [RUNS_DIR / args.source / f for f in ("scores.json", "test.csv")]
    if (final / "check.json").exists() and all(p.exists() for p in source_files) and \
            (final / "check.json").stat().st_mtime >= max(p.stat().st_mtime for p in source_files):
        print(f"bundle: {final} is up to date")
        return 0
    BUNDLE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.source}.", dir=BUNDLE_DIR)).resolve()
    try:
        manifest = build(args.source, cfg.competition, tmp)
        figures = check(tmp, args.source, comp)
        atomic_write_json(tmp / "check.json", figures)  # last: its presence marks a checked bundle
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_models = sum(m["folds"] for m in manifest["members"].values())
    print(f"bundle: {final}/ ({size_mb(final):.0f} MB, {len(manifest['members'])} member(s), "
          f"{n_models} fold models, {manifest['method']} blend, CV {manifest['metric']} "
          f"{manifest['cv']:.5f})")
    print(f"bundle: checked offline in {figures['seconds']}s on {figures['device']}: predictions "
          f"within {figures['max_abs_diff']:.1e} of runs/{args.source}/test.csv, same submission")
    print(f"upload: kaggle datasets init -p {final}  (edit its id), then "
          f"kaggle datasets create -p {final} --dir-mode zip; in the notebook: "
          f"!python /kaggle/input/<dataset>/predict.py --out submission.csv")
    return 0


if __name__ == "__main__":
    run(main)
