"""``make tune``: Optuna search over an experiment's hyperparameters, each trial a real training run.

    python -m pipeline.tune --exp baseline [--trials 20] [--folds 0] -- competition=demo [key=value]

The search space is ``configs/tune/<exp>.yaml``: config key -> ``{low: x, high: y}`` (a float or int
range by the key's type in ``Config``; optional ``log: true`` or ``step``) or ``{choices: [...]}``.
An unknown key, a malformed spec, ``low >= high``, ``log`` with ``low <= 0``, or a key that cannot be
tuned (runtime keys, ``name``, ``competition``, fold settings, or a key also set on the command line)
is a ConfigError naming the file and the key, raised before anything trains.

Trial ``n`` trains ``runs/tune/<exp>/trial<nnn>/`` through ``pipeline.train.main`` with the
experiment's YAML, the command-line overrides and the sampled values, one fold at a time (default
fold 0 only). Its objective is the mean of those folds' scores (``fold<k>/done.json``), in the
competition metric's direction. After each fold but the last the running mean is reported, and a
trial below the median of the finished trials at that fold is pruned (MedianPruner). A sampled
combination that the config refuses, a diverged loss or a CUDA out-of-memory error prunes that trial
with the reason in ``trials.csv``; if no trial produces a score, the command ends with an error.

The study lives in ``runs/tune/<exp>/study.db`` (SQLite) and resumes: ``--trials N`` means N
finished (complete or pruned) trials in total. A lock allows one process per study, so a trial left
RUNNING was killed: it is marked FAIL and its values are enqueued again, as are those of a trial
stopped by Ctrl-C (a trial that raised an error is not retried). Trial numbers never repeat, so a
trial folder is never reused; one that exists already (left by a deleted study) is an error. The
resolved config (tuned and runtime keys aside), the folds tuned on and the folds file's hash are
recorded; resuming with different ones is refused. The sampler is TPE seeded with ``seed`` plus the
number of trials already in the study: the same config and history give the same suggestions, and a
resumed study does not replay its first ones.

After every trial ``trials.csv``, ``history.png`` and ``best.yaml`` are rewritten atomically;
``best.yaml`` is the experiment's YAML with the best trial's values, ready to copy to
``configs/<exp>_tuned.yaml`` and train on every fold.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from pipeline import train
from pipeline.competition import load_competition
from pipeline.config import (
    _HINTS,
    CONFIG_DIR,
    FIELDS,
    RUNS_DIR,
    RUNTIME_KEYS,
    Config,
    ConfigError,
    PipelineError,
    _coerce,
    _suggest_from,
    atomic_save_figure,
    atomic_write_csv,
    atomic_write_text,
    fold_list,
    load_config,
    load_yaml,
    parse_overrides,
    run,
)
from pipeline.folds import read_folds
from pipeline.metrics import get_metric

SPACE_DIR = CONFIG_DIR / "tune"
TUNE_DIR = RUNS_DIR / "tune"
NOT_TUNABLE = RUNTIME_KEYS | {"name", "competition", "folds", "n_folds", "fold_seed"}
RANGE_KEYS = {"low", "high", "log", "step"}
TOP = 5  # trials shown in the final table


# -- the search space ------------------------------------------------------------------------------
def load_space(path: Path) -> dict:
    """``{key: optuna distribution}`` from a search-space file; ConfigError naming file and key."""
    if not path.exists():
        raise ConfigError(f"search space {path} does not exist: write one, e.g. "
                          f"'lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}'")
    data = load_yaml(path)
    if not data:
        raise ConfigError(f"search space {path} is empty: give at least one key to tune")
    return {key: _distribution(key, spec, path) for key, spec in data.items()}


def _number(value):
    """YAML 1.1 reads ``1e-3`` as a string; let it be the number it looks like."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value) if any(c in value for c in ".eE") else int(value)
    return value


def _distribution(key: str, spec, path: Path):
    where = f"search space {path}, key '{key}'"
    if key not in FIELDS:
        raise ConfigError(f"unknown config key '{key}' in search space {path}"
                          f"{_suggest_from(key, FIELDS)}")
    if key in NOT_TUNABLE:
        raise ConfigError(f"{where}: '{key}' cannot be tuned (it does not change what a run learns)")
    hint = _HINTS[key]
    if isinstance(spec, dict) and set(spec) == {"choices"}:
        return _categorical(key, spec["choices"], where, numeric=hint in (int, float))
    if not (isinstance(spec, dict) and {"low", "high"} <= set(spec) <= RANGE_KEYS):
        raise ConfigError(f"{where}: expected {{low: x, high: y}} (optional log: true or step: s) "
                          f"or {{choices: [...]}}, got {spec!r}")
    if hint not in (int, float):
        raise ConfigError(f"{where}: '{key}' is a {getattr(hint, '__name__', hint)}; "
                          f"only int and float keys take a range, use choices")
    low, high = (_coerce(key, _number(spec[b]), where) for b in ("low", "high"))
    log, step = spec.get("log", False), spec.get("step")
    if low >= high:
        raise ConfigError(f"{where}: low ({low}) must be smaller than high ({high})")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: log: true needs low > 0, got {low}")
    try:
        if hint is int:
            return IntDistribution(low, high, log=log,
                                   step=1 if step is None else _coerce(key, _number(step), where))
        return FloatDistribution(low, high, log=log,
                                 step=None if step is None else _coerce(key, _number(step), where))
    except ValueError as e:  # optuna's own checks, e.g. log together with step
        raise ConfigError(f"{where}: {e}") from None


def _categorical(key: str, choices, where: str, numeric: bool) -> CategoricalDistribution:
    if not isinstance(choices, list) or len(choices) < 2:
        raise ConfigError(f"{where}: choices must be a list of at least two values, got {choices!r}")
    if numeric:
        choices = [_number(c) for c in choices]
    for c in choices:
        if c is not None and not isinstance(c, bool | int | float | str):
            raise ConfigError(f"{where}: choice {c!r} must be a number, a string or a boolean "
                              f"(write a pair or a list as a string: '0.5,1.0')")
        _coerce(key, c, where)
    return CategoricalDistribution(choices)


def suggest(trial: optuna.Trial, space: dict) -> dict:
    out = {}
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            out[key] = trial.suggest_categorical(key, d.choices)
        elif isinstance(d, IntDistribution):
            out[key] = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
        else:
            out[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
    return out


def as_override(key: str, value) -> str:
    """``key=value`` that :func:`pipeline.config.parse_overrides` reads back as ``value``."""
    if value is None:
        return f"{key}="
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


def plain(key: str, value):
    """``value`` as the config holds it (declared type; pairs as lists), for YAML."""
    value = _coerce(key, value, "search space")
    return list(value) if isinstance(value, tuple) else value


# -- one study -------------------------------------------------------------------------------------
@dataclass
class Tuning:
    exp: str  # the experiment's name: configs/tune/<exp>.yaml, runs/tune/<exp>/
    exp_arg: str  # --exp as given (a name or a path), passed on to pipeline.train
    exp_path: Path
    overrides: list[str]
    space_path: Path
    space: dict
    folds: list[int]  # folds each trial trains on, one at a time
    metric: str
    out: Path

    def run_name(self, number: int) -> str:
        return f"tune/{self.exp}/trial{number:03d}"


def objective(trial: optuna.Trial, t: Tuning) -> float:
    """Train the trial's folds one by one; the mean fold score, or TrialPruned with the reason."""
    try:
        return _train_trial(trial, t)
    except optuna.TrialPruned:
        raise
    except Exception as e:  # a failed trial keeps its reason; an interrupted one (no note) is retried
        trial.set_user_attr("note", f"{type(e).__name__}: {e}")
        raise
    finally:
        if torch.cuda.is_available():  # the next trial starts with the memory this one held
            torch.cuda.empty_cache()


def _prune(trial: optuna.Trial, note: str):
    trial.set_user_attr("note", note)
    raise optuna.TrialPruned(note)


def _train_trial(trial: optuna.Trial, t: Tuning) -> float:
    params = suggest(trial, t.space)
    args = [*t.overrides, *(as_override(k, v) for k, v in params.items()),
            f"name={t.run_name(trial.number)}"]
    try:
        cfg = load_config(t.exp_arg, [*args, f"folds={t.folds[0]}"])
    except ConfigError as e:
        _prune(trial, f"invalid config: {e}")
    lost = [k for k, v in params.items() if getattr(cfg, k) != _coerce(k, v, str(t.space_path))]
    if lost:  # the trial must train exactly the sampled values
        raise PipelineError(f"{t.space_path}: {lost[0]}={params[lost[0]]!r} reads back as "
                            f"{getattr(cfg, lost[0])!r} on the command line; write it another way")
    run_dir = RUNS_DIR / t.run_name(trial.number)
    if run_dir.exists():  # trial numbers never repeat within a study: this is another study's
        raise PipelineError(f"{run_dir} already exists but trial {trial.number} is new: it was left "
                            f"by an earlier study; delete {t.out}/ to start over")
    scores = []
    for i, k in enumerate(t.folds):
        try:
            train.main(["--exp", t.exp_arg, *args, f"folds={k}"])
        except (train.TrainingDiverged, torch.cuda.OutOfMemoryError) as e:
            _prune(trial, f"fold {k}: {type(e).__name__}: {str(e).splitlines()[0]}")
        scores.append(json.loads((run_dir / f"fold{k}" / "done.json").read_text())["score"])
        trial.set_user_attr("fold_scores", scores)
        mean = float(np.mean(scores))
        if not math.isfinite(mean):
            _prune(trial, f"fold {k}: {t.metric} is {mean}")
        trial.report(mean, step=i)
        # after the last fold the trial is finished: pruning it then would only discard its score
        if i + 1 < len(t.folds) and trial.should_prune():
            _prune(trial, f"pruned after fold {k}: mean {t.metric} {mean:.5f} is worse than the "
                          f"median of earlier trials")
    return mean


def fingerprint(cfg: Config, t: Tuning, folds_sha: str) -> dict:
    """What a study's trials share: the config without tuned or runtime keys, folds, folds file."""
    skip = RUNTIME_KEYS | {"name"} | set(t.space)
    return {"config": {k: v for k, v in cfg.to_dict().items() if k not in skip},
            "metric": t.metric, "tune_folds": t.folds, "folds_sha256": folds_sha}


def check_fingerprint(stored: dict, current: dict, t: Tuning) -> None:
    diff = [k for k in ("metric", "tune_folds", "folds_sha256") if stored[k] != current[k]]
    diff += [k for k in stored["config"] if k not in t.space
             and stored["config"][k] != current["config"].get(k)]
    if diff:
        shown = ", ".join(f"{k}: {_get(stored, k)!r} -> {_get(current, k)!r}" for k in diff[:5])
        raise ConfigError(f"{t.out}/study.db was tuned with another setup ({shown}); restore it, "
                          f"or delete {t.out}/ to start a new study")


def _get(fp: dict, key: str):
    return fp[key] if key in fp else fp["config"].get(key)


@contextlib.contextmanager
def locked(out: Path):
    """One process per study; the OS releases the lock when the process dies, even on kill -9."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"another pipeline.tune is running on {out}/") from None
        yield


def open_study(t: Tuning, greater_is_better: bool, seed: int, fp: dict) -> optuna.Study:
    study = optuna.create_study(
        storage=f"sqlite:///{(t.out / 'study.db').resolve()}", study_name=t.exp, load_if_exists=True,
        direction="maximize" if greater_is_better else "minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    if "fingerprint" in study.user_attrs:
        check_fingerprint(study.user_attrs["fingerprint"], fp, t)
    else:
        study.set_user_attr("fingerprint", fp)
    # seeded by the history's length: a resumed study does not replay the first suggestions
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    retry_interrupted(study)
    return study


def retry_interrupted(study: optuna.Study) -> None:
    """Trials left RUNNING (the process was killed) become FAIL; every interrupted trial's values
    are enqueued once, so the interrupted combination is still evaluated, in a new trial folder."""
    for tr in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(tr.number, state=TrialState.FAIL)  # the lock says its process is gone
    retried = {tr.user_attrs.get("retry_of") for tr in study.trials}
    for tr in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        # a trial that failed with an error has a note; one without was killed or interrupted
        if "note" not in tr.user_attrs and tr.number not in retried and tr.params:
            study.enqueue_trial(tr.params, user_attrs={"retry_of": tr.number})
            print(f"tune: trial {tr.number} was interrupted; its values are tried again")


def finished(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


# -- outputs ---------------------------------------------------------------------------------------
def trials_table(study: optuna.Study, space: dict) -> pd.DataFrame:
    keys = list(dict.fromkeys([*space, *(k for tr in study.trials for k in tr.params)]))
    rows = []
    for tr in study.trials:
        seconds = None
        if tr.datetime_start and tr.datetime_complete:
            seconds = round((tr.datetime_complete - tr.datetime_start).total_seconds(), 1)
        # a pruned trial's optuna value is a partial mean: fold_scores shows it for what it is
        value = tr.value if tr.state == TrialState.COMPLETE else None
        rows.append({"number": tr.number, "state": tr.state.name, "value": value,
                     **{k: tr.params.get(k) for k in keys},
                     "fold_scores": " ".join(f"{s:.5f}" for s in tr.user_attrs.get("fold_scores", ())),
                     "seconds": seconds, "note": tr.user_attrs.get("note", "")})
    return pd.DataFrame(rows, columns=["number", "state", "value", *keys, "fold_scores", "seconds",
                                       "note"])


def best_trial(study: optuna.Study):
    return study.best_trial if study.get_trials(states=(TrialState.COMPLETE,)) else None


def best_yaml(t: Tuning, study: optuna.Study, command: str) -> str:
    """The experiment's YAML, non-runtime command-line overrides, then the best trial's values."""
    best = best_trial(study)
    drop = {"name", "folds", *best.params}
    cli = {k: plain(k, v) for k, v in parse_overrides(t.overrides).items()
           if k not in drop and k not in RUNTIME_KEYS}
    # one value per key: the command line's wins over the experiment file's, as when training
    deltas = {k: v for k, v in load_yaml(t.exp_path).items() if k not in drop and k not in cli}
    parts = [f"# Tuned by `python -m pipeline.tune --exp {t.exp_arg}`: trial {best.number} of "
             f"{len(study.trials)}, {t.metric} {best.value:.5f} (mean over folds "
             f"{','.join(map(str, t.folds))}).\n# Next: {command}\n"]
    if deltas:
        parts += [f"# From {t.exp_path}:\n", _block(deltas)]
    if cli:
        parts += ["# From the command line:\n", _block(cli)]
    parts += ["# Tuned:\n", _block({k: plain(k, v) for k, v in best.params.items()})]
    return "".join(parts)


def _block(data: dict) -> str:
    """``key: value`` lines (config.dump would write a mapping of scalars as one ``{...}`` line)."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def next_command(t: Tuning, competition: str) -> str:
    comp = "" if competition == Config().competition else f" COMPETITION={competition}"
    return (f"cp {t.out}/best.yaml {CONFIG_DIR}/{t.exp}_tuned.yaml && "
            f"make train EXP={t.exp}_tuned{comp}")


def plot_history(study: optuna.Study, path: Path, metric: str, greater: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = [tr for tr in study.trials if tr.state == TrialState.COMPLETE]
    pruned = [tr for tr in study.trials if tr.state == TrialState.PRUNED and tr.intermediate_values]
    fig, ax = plt.subplots(figsize=(7, 4))
    if pruned:
        ax.scatter([tr.number for tr in pruned],
                   [tr.intermediate_values[max(tr.intermediate_values)] for tr in pruned],
                   marker="x", color="tab:gray", label="pruned (last running mean)")
    if done:
        values = np.array([tr.value for tr in done])
        best = np.maximum.accumulate(values) if greater else np.minimum.accumulate(values)
        ax.scatter([tr.number for tr in done], values, color="tab:blue", label="complete")
        last = study.trials[-1].number  # the best-so-far line runs to the latest trial
        ax.step([tr.number for tr in done] + [last], [*best, best[-1]], where="post",
                color="tab:green", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} ({'higher' if greater else 'lower'} is better)")
    ax.set_title(path.parent.as_posix())
    if done or pruned:
        ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


def write_outputs(t: Tuning, study: optuna.Study, competition: str, greater: bool) -> None:
    """trials.csv, history.png and, once a trial has completed, best.yaml; each atomically."""
    atomic_write_csv(t.out / "trials.csv", trials_table(study, t.space))
    plot_history(study, t.out / "history.png", t.metric, greater)
    if best_trial(study) is not None:
        atomic_write_text(t.out / "best.yaml", best_yaml(t, study, next_command(t, competition)))


def describe(tr) -> str:
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in tr.params.items())
    return params or "-"


def print_trial(tr, metric: str, best) -> None:
    seconds = (tr.datetime_complete - tr.datetime_start).total_seconds()
    result = (f"{metric} {tr.value:.5f}" if tr.state == TrialState.COMPLETE
              else tr.user_attrs.get("note", ""))
    best_s = f"  | best {best.value:.5f} (trial {best.number})" if best is not None else ""
    print(f"tune: trial {tr.number:>3} {tr.state.name:<8} {result}  [{describe(tr)}]  "
          f"{seconds:.1f}s{best_s}", flush=True)


def print_summary(t: Tuning, study: optuna.Study, competition: str, greater: bool) -> None:
    done = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda tr: tr.value,
                  reverse=greater)
    n_pruned = len(study.get_trials(states=(TrialState.PRUNED,)))
    table = pd.DataFrame([{"trial": tr.number, t.metric: f"{tr.value:.5f}", **tr.params}
                          for tr in done[:TOP]])
    print(f"\ntune {t.exp}: {len(done)} complete, {n_pruned} pruned; {t.metric} on folds "
          f"{','.join(map(str, t.folds))}, {'higher' if greater else 'lower'} is better")
    print(table.to_string(index=False))
    print(f"best: trial {done[0].number}, {t.metric} {done[0].value:.5f} -> {t.out}/best.yaml")
    print(f"next: {next_command(t, competition)}")


def no_score_error(t: Tuning, trials: list) -> PipelineError:
    notes = [tr.user_attrs.get("note", "") for tr in trials]
    if notes and all(n.startswith("invalid config") for n in notes):
        return ConfigError(f"every sampled config was refused ({len(notes)} trials), e.g. trial "
                           f"{trials[0].number}: {notes[0]}; fix {t.space_path} (or the experiment) "
                           f"and delete {t.out}/")
    return PipelineError(f"no trial of {t.out} produced a score ({len(notes)} pruned)"
                         + (f", e.g. {notes[0]}" if notes else ""))


# -- entry point -----------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="pipeline.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, help="experiment config: configs/<EXP>.yaml")
    parser.add_argument("--trials", type=int, default=20,
                        help="finished trials in total, those already in the study included")
    parser.add_argument("--folds", default="",
                        help="folds each trial trains on, e.g. 0,1 (default: the config's folds, "
                             "else 0)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    return args


def setup(args) -> tuple[Tuning, Config, str]:
    """Everything checked before the study opens: config, search space, competition, folds."""
    cfg = load_config(args.exp, args.overrides)
    exp_path = Path(args.exp)
    if exp_path.suffix not in (".yaml", ".yml"):  # as load_config reads it
        exp_path = CONFIG_DIR / f"{args.exp}.yaml"
    space_path = SPACE_DIR / f"{exp_path.stem}.yaml"
    space = load_space(space_path)
    both = [k for k in parse_overrides(args.overrides) if k in space]
    if both:
        raise ConfigError(f"'{both[0]}' is set on the command line and tuned in {space_path}: "
                          f"drop one of them")
    comp = load_competition(cfg.competition)
    folds, folds_sha = read_folds(comp, comp.train_table())
    tune_folds = fold_list(dataclasses.replace(cfg, folds=args.folds or cfg.folds or "0"),
                           int(folds.max()) + 1)
    t = Tuning(exp=exp_path.stem, exp_arg=args.exp, exp_path=exp_path, overrides=list(args.overrides),
               space_path=space_path, space=space, folds=tune_folds, metric=comp.metric,
               out=TUNE_DIR / exp_path.stem)
    return t, cfg, folds_sha


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t, cfg, folds_sha = setup(args)
    greater = get_metric(t.metric).greater_is_better
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with locked(t.out):
        study = open_study(t, greater, cfg.seed, fingerprint(cfg, t, folds_sha))
        todo = args.trials - len(finished(study))
        print(f"tune {t.exp}: {len(finished(study))} finished trial(s) in {t.out}/study.db, "
              f"{max(todo, 0)} to run; {t.metric} on folds {','.join(map(str, t.folds))}", flush=True)

        def report(study, tr):
            print_trial(tr, t.metric, best_trial(study))
            write_outputs(t, study, cfg.competition, greater)

        t0 = time.time()
        try:
            if todo > 0:
                study.optimize(lambda trial: objective(trial, t), n_trials=todo, callbacks=[report],
                               gc_after_trial=True)
        finally:
            write_outputs(t, study, cfg.competition, greater)
    if best_trial(study) is None:
        raise no_score_error(t, finished(study))
    print_summary(t, study, cfg.competition, greater)
    print(f"tune: {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    run(main)
