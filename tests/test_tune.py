"""Hyperparameter search: real training on a tiny competition, and a fake trainer for the rest."""

import fcntl
import json

import optuna
import pandas as pd
import pytest
import yaml
from conftest import make_competition

from pipeline import ensemble, tune
from pipeline import folds as F
from pipeline import train as T
from pipeline.config import (
    RUNS_DIR,
    RUNTIME_KEYS,
    ConfigError,
    PipelineError,
    atomic_write_json,
    config_from_argv,
    load_config,
    parse_overrides,
)

EXP = {"model": "test_resnet", "img_size": 32, "batch_size": 8, "epochs": 1, "threads": 1,
       "infer_batch_size": 16}
SPACE = {"lr": {"low": 1e-3, "high": 1e-1, "log": True}, "opt": {"choices": ["adamw", "sgd"]}}


def _write(workdir, space=SPACE, exp=EXP):
    (workdir / "configs" / "tune").mkdir(parents=True, exist_ok=True)
    (workdir / "configs" / "tiny.yaml").write_text(yaml.safe_dump(exp))
    (workdir / "configs" / "tune" / "tiny.yaml").write_text(yaml.safe_dump(space))


def _setup(workdir, space=SPACE, exp=EXP):
    make_competition(workdir)
    F.main(["competition=toy", "n_folds=3"])
    _write(workdir, space, exp)


def _tune(*args, overrides=()):
    return tune.main(["--exp", "tiny", *args, "--", "competition=toy", *overrides])


def _trials(workdir) -> pd.DataFrame:
    return pd.read_csv(workdir / "runs" / "tune" / "tiny" / "trials.csv")


T_ARGV = []  # the argv of every fake training call


def fake_train(monkeypatch, score):
    """Replace training: write ``done.json`` with ``score(trial, fold, overrides)``; log the calls."""
    calls = []

    def main(argv):
        T_ARGV.append(argv)
        o = parse_overrides(argv[2:])
        trial, fold = int(o["name"].rsplit("trial", 1)[1]), int(o["folds"])
        calls.append((trial, fold))
        fold_dir = RUNS_DIR / o["name"] / f"fold{fold}"
        fold_dir.mkdir(parents=True)
        atomic_write_json(fold_dir / "done.json", {"score": score(trial, fold, o)})
        return 0

    monkeypatch.setattr(T, "main", main)
    return calls


def test_study_trains_trials_writes_best_config_and_resumes(workdir, capsys):
    _setup(workdir)
    assert _tune("--trials", "3", overrides=("batch_size=10",)) == 0
    out = workdir / "runs" / "tune" / "tiny"
    trials = _trials(workdir)
    assert list(trials["number"]) == [0, 1, 2] and set(trials["state"]) == {"COMPLETE"}
    for n, value in zip(trials["number"], trials["value"], strict=True):
        run = out / f"trial{n:03d}"
        assert value == json.loads((run / "fold0" / "done.json").read_text())["score"]
        assert not (run / "fold1").exists()  # fold 0 only by default
    assert (out / "history.png").stat().st_size > 1000
    # best.yaml is the best trial's config: everything that changes what a run learns is equal
    best = trials.loc[trials["value"].idxmax(), "number"]
    trained = yaml.safe_load((out / f"trial{best:03d}" / "config.yaml").read_text())
    cfg = load_config(str(out / "best.yaml")).to_dict()
    learned = [k for k in cfg if k not in RUNTIME_KEYS | {"name", "n_folds"}]  # n_folds: from file
    assert {k: cfg[k] for k in learned} == {k: trained[k] for k in learned}
    assert cfg["model"] == "test_resnet" and cfg["competition"] == "toy" and cfg["batch_size"] == 10
    keys = [line.split(":")[0] for line in (out / "best.yaml").read_text().splitlines()
            if line and not line.startswith(("#", " ", "-"))]
    assert len(keys) == len(set(keys)), keys  # the command line's batch_size replaces the file's
    text = capsys.readouterr().out
    assert text.count("tune: trial ") == 3 and "make train EXP=tiny_tuned COMPETITION=toy" in text
    # runs/tune/ is not an experiment: ensembles do not pick it up
    assert ensemble.discover("toy") == []
    # resume: 4 trials in total means exactly one more; then nothing more
    assert _tune("--trials", "4", overrides=("batch_size=10",)) == 0
    assert list(_trials(workdir)["number"]) == [0, 1, 2, 3]
    assert _tune("--trials", "4", overrides=("batch_size=10",)) == 0
    assert "0 to run" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("trial[0-9]*")) == [f"trial{n:03d}" for n in range(4)]


def test_same_seed_same_suggestions_and_resume_does_not_repeat(tmp_path, monkeypatch):
    params = {}
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        root = tmp_path / name
        root.mkdir()
        monkeypatch.chdir(root)
        _setup(root)
        fake_train(monkeypatch, lambda trial, fold, o: float(o["lr"]))
        _tune("--trials", "3", overrides=[f"seed={seed}"])
        params[name] = _trials(root)[["lr", "opt"]].values.tolist()
    assert params["a"] == params["b"]
    assert params["a"] != params["c"]
    _tune("--trials", "6", overrides=["seed=7"])  # resumed: new suggestions, not the first 3 again
    assert _trials(tmp_path / "c")["lr"].nunique() == 6


@pytest.mark.parametrize("space, overrides, match", [
    ({"lrr": {"low": 0.1, "high": 0.2}}, [], r"'lrr' in search space configs/tune/tiny.yaml "
                                             r"\(did you mean 'lr'\?\)"),
    ({"lr": {"low": 0.1, "high": 0.01}}, [], r"tiny.yaml, key 'lr': low \(0.1\) must be smaller"),
    ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, [], r"key 'lr': log: true needs low > 0"),
    ({"threads": {"choices": [1, 2]}}, [], r"key 'threads': 'threads' cannot be tuned"),
    ({"n_folds": {"low": 2, "high": 5}}, [], r"key 'n_folds': 'n_folds' cannot be tuned"),
    ({"lr": [0.01, 0.1]}, [], r"key 'lr': expected \{low: x, high: y\}"),
    ({"opt": {"low": 1, "high": 2}}, [], r"key 'opt': 'opt' is a str; .* use choices"),
    ({"epochs": {"low": 1.5, "high": 3}}, [], r"epochs .*expected int, got 1.5"),
    ({"opt": {"choices": ["sgd"]}}, [], r"key 'opt': choices must be a list of at least two"),
    ({"lr": {"low": 0.01, "high": 0.1}}, ["lr=0.05"], r"'lr' is set on the command line and tuned"),
])
def test_bad_search_space_is_refused_before_anything_runs(workdir, space, overrides, match):
    _write(workdir, space)
    with pytest.raises(ConfigError, match=match):
        _tune("--trials", "2", overrides=overrides)
    assert not (workdir / "runs").exists()


def test_scientific_notation_reads_as_numbers(workdir):
    path = workdir / "space.yaml"
    path.write_text("lr: {low: 1e-4, high: 1e-2, log: true}\nwarmup_lr: {choices: [1e-6, 1e-5]}\n")
    space = tune.load_space(path)
    assert (space["lr"].low, space["lr"].high, space["lr"].log) == (1e-4, 1e-2, True)
    assert space["warmup_lr"].choices == (1e-6, 1e-5)


def test_clearly_worse_trial_is_pruned_between_folds(workdir, monkeypatch):
    _setup(workdir)
    # running means: trials 0 and 1 give the medians 0.5 after fold 0 and 0.7 after fold 1
    table = {0: [0.5, 0.9], 1: [0.5, 0.9], 2: [0.1, 0.9], 3: [0.6, 0.0]}
    calls = fake_train(monkeypatch, lambda trial, fold, o: table[trial][fold])
    assert _tune("--trials", "4", "--folds", "0,1") == 0
    trials = _trials(workdir)
    assert list(trials["state"]) == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert trials["value"][0] == pytest.approx(0.7)  # the mean of the folds
    assert [c for c in calls if c[0] == 2] == [(2, 0)]  # fold 1 never trained
    assert "pruned after fold 0" in trials["note"][2]
    # trial 3 is below the median after its last fold, yet kept: pruning it would only lose its score
    assert trials["value"][3] == pytest.approx(0.3)


def test_invalid_combinations_are_pruned_and_all_invalid_is_an_error(workdir, monkeypatch):
    _setup(workdir, {"warmup_epochs": {"choices": [0, 5]}, "lr": SPACE["lr"]}, {**EXP, "epochs": 2})
    calls = fake_train(monkeypatch, lambda trial, fold, o: 0.5)
    assert _tune("--trials", "6") == 0
    trials = _trials(workdir)
    bad = trials[trials["warmup_epochs"] == 5]
    assert len(bad) and set(bad["state"]) == {"PRUNED"}
    assert bad["note"].str.contains("warmup_epochs must be smaller than epochs").all()
    assert {c[0] for c in calls} == set(trials.loc[trials["warmup_epochs"] == 0, "number"])

    _write(workdir, {"ema_decay": {"low": 0.9, "high": 0.99}}, {**EXP, "epochs": 2})
    (workdir / "configs" / "tiny.yaml").rename(workdir / "configs" / "other.yaml")
    (workdir / "configs" / "tune" / "tiny.yaml").rename(workdir / "configs" / "tune" / "other.yaml")
    with pytest.raises(ConfigError, match="every sampled config was refused.*ema_decay is set"):
        tune.main(["--exp", "other", "--trials", "3", "--", "competition=toy"])
    assert not (workdir / "runs" / "tune" / "other" / "trial000").exists()


def test_interrupted_and_killed_trials_are_retried_once(workdir, monkeypatch):
    _setup(workdir)

    def interrupt_trial_1(trial, fold, o):
        if trial == 1:
            raise KeyboardInterrupt
        return 0.5

    fake_train(monkeypatch, interrupt_trial_1)
    with pytest.raises(KeyboardInterrupt):
        _tune("--trials", "3")
    # a killed process leaves its trial RUNNING
    study = optuna.load_study(study_name="tiny",
                              storage=f"sqlite:///{workdir}/runs/tune/tiny/study.db")
    killed = study.ask()
    killed.suggest_float("lr", 1e-3, 1e-1, log=True)
    killed.suggest_categorical("opt", ["adamw", "sgd"])
    assert list(_trials(workdir)["state"]) == ["COMPLETE", "FAIL"]

    calls = fake_train(monkeypatch, lambda trial, fold, o: 0.5)
    assert _tune("--trials", "3") == 0
    trials = _trials(workdir).set_index("number")
    assert list(trials["state"]) == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials.loc[3, ["lr", "opt"]].tolist() == trials.loc[1, ["lr", "opt"]].tolist()
    assert trials.loc[4, ["lr", "opt"]].tolist() == trials.loc[2, ["lr", "opt"]].tolist()
    assert [c[0] for c in calls] == [3, 4]
    assert _tune("--trials", "3") == 0  # retried once only: nothing left to run
    assert len(_trials(workdir)) == 5


def test_resume_refuses_another_setup_a_running_study_and_stale_folders(workdir, monkeypatch):
    _setup(workdir)
    fake_train(monkeypatch, lambda trial, fold, o: 0.5)
    _tune("--trials", "1")
    with pytest.raises(ConfigError, match=r"another setup \(epochs: 1 -> 2\)"):
        _tune("--trials", "2", overrides=["epochs=2"])
    assert _tune("--trials", "2", overrides=["threads=2"]) == 0  # runtime keys may change
    out = workdir / "runs" / "tune" / "tiny"
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(PipelineError, match="another pipeline.tune is running"):
            _tune("--trials", "3")
    (out / "study.db").unlink()  # a new study must not reuse the old trial folders
    with pytest.raises(PipelineError, match="trial000 already exists"):
        _tune("--trials", "1")


def test_values_of_every_type_reach_training_unchanged(workdir, monkeypatch):
    space = {"tta": {"choices": ["", "hflip", "hflip,vflip"]},
             "scale": {"choices": ["0.5,1", "0.08,1"]},
             "auto_augment": {"choices": [None, "rand-m9-mstd0.5"]},
             "pretrained": {"choices": [False, True]}, "epochs": {"low": 1, "high": 5, "step": 2},
             "drop_rate": {"low": 0.0, "high": 0.3, "step": 0.1}}
    _setup(workdir, space)
    seen = {}

    def score(trial, fold, o):
        seen[trial] = config_from_argv(T_ARGV[-1], "train", "").to_dict()  # as train reads it
        return 0.5

    fake_train(monkeypatch, score)
    assert _tune("--trials", "6") == 0
    study = optuna.load_study(study_name="tiny",
                              storage=f"sqlite:///{workdir}/runs/tune/tiny/study.db")
    assert len(seen) == 6 and {tuple(seen[n]["tta"]) for n in seen} > {()}
    for tr in study.trials:
        sampled = {k: tune.plain(k, v) for k, v in tr.params.items()}
        assert {k: seen[tr.number][k] for k in space} == sampled
