"""Submissions from fabricated run folders: format per kind, refusals, local LB, the leaderboard."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_competition
from test_ensemble import setup_comp, write_run

from pipeline import kaggle_io
from pipeline import leaderboard as L
from pipeline import submit as S
from pipeline.competition import load_competition
from pipeline.config import PipelineError
from pipeline.folds import write_folds


def sample_of(workdir, name="toy"):
    return pd.read_csv(workdir / "data" / name / "sample_submission.csv", dtype={"id": str})


def only_submission(workdir):
    files = [p for p in (workdir / "submissions").glob("*.csv") if p.name != "history.csv"]
    assert len(files) == 1, files
    return files[0]


def no_submission(workdir):
    return not list((workdir / "submissions").glob("*-*.csv")) if (workdir / "submissions").exists() \
        else True


def test_label_submission_has_the_sample_format(workdir, capsys):
    comp = setup_comp(workdir)
    test = np.eye(3)[[2, 0, 1, 1, 0, 2, 2, 1, 0, 0]] * 0.6 + 0.1
    test = test[::-1]  # fabricated test.csv rows in reverse order: submit must reorder by id
    train_pred = np.full((40, 3), 1 / 3)
    run = write_run(comp, "exp1", train_pred, test)
    df = pd.read_csv(run / "test.csv", dtype={"id": str})
    df.iloc[::-1].to_csv(run / "test.csv", index=False)
    cv = json.loads((run / "scores.json").read_text())["cv"]
    assert S.main(["--source", "exp1", "--", "competition=toy"]) == 0
    path = only_submission(workdir)
    assert path.name == f"toy-exp1-cv{cv:.5f}.csv"
    sub = pd.read_csv(path, dtype={"id": str})
    sample = sample_of(workdir)
    assert list(sub.columns) == list(sample.columns)
    assert list(sub["id"]) == list(sample["id"])
    assert sub["label"].tolist() == test.argmax(1).tolist()  # in the sample's order, not the file's
    assert "leaderboard" not in capsys.readouterr().out  # no private answers for toy


def test_probs_submission_follows_the_sample_column_order(workdir):
    make_competition(workdir, submission="probs")
    sample = pd.DataFrame({"id": sample_of(workdir)["id"], "2": 0.0, "0": 0.0, "1": 0.0})
    sample.to_csv(workdir / "data" / "toy" / "sample_submission.csv", index=False)
    comp = load_competition("toy")
    write_folds(comp, 4, 0)
    test = np.random.default_rng(0).dirichlet(np.ones(3), 10)
    write_run(comp, "e", np.full((40, 3), 1 / 3), test)
    S.main(["--source", "e", "--", "competition=toy"])
    sub = pd.read_csv(only_submission(workdir), dtype={"id": str})
    assert list(sub.columns) == ["id", "2", "0", "1"]
    assert np.allclose(sub[["0", "1", "2"]].to_numpy(), test)


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_probability_submissions(workdir, task):
    comp = setup_comp(workdir, task=task)
    k = len(comp.pred_columns)
    test = np.random.default_rng(1).uniform(size=(10, k))
    write_run(comp, "e", np.full((40, k), 0.5), test)
    S.main(["--source", "e", "--", "competition=toy"])
    sub = pd.read_csv(only_submission(workdir), dtype={"id": str})
    sample = sample_of(workdir)
    assert list(sub.columns) == list(sample.columns) and list(sub["id"]) == list(sample["id"])
    assert np.allclose(sub.iloc[:, 1:].to_numpy(), test)  # binary value = P(1), not a label


def test_binary_label_submission(workdir):
    comp = setup_comp(workdir, task="binary", submission="label")
    test = np.linspace(0, 1, 10)[:, None]
    write_run(comp, "e", np.full((40, 1), 0.5), test)
    S.main(["--source", "e", "--", "competition=toy"])
    sub = pd.read_csv(only_submission(workdir))
    assert sub["target"].tolist() == [0] * 5 + [1] * 5


@pytest.mark.parametrize("metric", ["rmse", "qwk"])
def test_regression_values_are_clipped_and_graded(workdir, metric):
    comp = setup_comp(workdir, task="regression", metric=metric)
    lo, hi = comp.target_range
    test = np.array([-5, 0.4, 1.2, 1.6, 2.5, 2.7, 3.0, 9, 1.0, 2.2])[:, None]
    write_run(comp, "e", np.full((40, 1), 1.5), test)
    S.main(["--source", "e", "--", "competition=toy"])
    values = pd.read_csv(only_submission(workdir))["score"].to_numpy()
    if metric == "qwk":
        assert values.tolist() == [0, 0, 1, 2, 2, 3, 3, 3, 1, 2]
    else:
        assert values.min() == lo and values.max() == hi
        assert np.allclose(values[1:7], np.clip(test[1:7, 0], lo, hi))


def _valid(workdir, comp):
    write_run(comp, "e", np.full((40, 3), 1 / 3), np.random.default_rng(0).dirichlet(np.ones(3), 10))
    S.main(["--source", "e", "--", "competition=toy"])
    path = only_submission(workdir)
    sub = pd.read_csv(path, dtype={"id": str})
    path.unlink()
    return sub


def test_validate_submission_names_the_problem(workdir):
    comp = setup_comp(workdir)
    sub = _valid(workdir, comp)
    S.validate_submission(comp, sub)
    bad = sub.copy()
    bad.loc[3, "label"] = np.nan
    with pytest.raises(PipelineError, match=r"'label' is empty \(NaN\) for id t003"):
        S.validate_submission(comp, bad)
    with pytest.raises(PipelineError, match=r"10 rows|9 rows"):
        S.validate_submission(comp, sub.drop(index=4))
    swapped = sub.copy()
    swapped.loc[4, "id"] = "t999"
    with pytest.raises(PipelineError, match=r"missing \['t004'\], unexpected \['t999'\]"):
        S.validate_submission(comp, swapped)
    with pytest.raises(PipelineError, match=r"not in the order .* row 0 is t009"):
        S.validate_submission(comp, sub.iloc[::-1].reset_index(drop=True))
    with pytest.raises(PipelineError, match=r"missing \['label'\], unexpected \['class'\]"):
        S.validate_submission(comp, sub.rename(columns={"label": "class"}))
    wrong = sub.copy()
    wrong.loc[0, "label"] = 7
    with pytest.raises(PipelineError, match=r"7 \(id t000\) is not a class"):
        S.validate_submission(comp, wrong)


def test_out_of_range_probability_is_refused(workdir):
    comp = setup_comp(workdir, task="multilabel")
    test = np.full((10, 3), 0.5)
    test[6, 1] = 1.3
    write_run(comp, "e", np.full((40, 3), 0.5), test)
    with pytest.raises(PipelineError, match=r"column 'b': 1.3 \(id t006\) is not a probability"):
        S.main(["--source", "e", "--", "competition=toy"])
    assert no_submission(workdir)


@pytest.mark.parametrize("damage, message", [
    ("nan", r"NaN or infinite predictions \(id t002\)"),
    ("missing_id", r"missing \['t005'\]"),
    ("wrong_column", r"lacks the columns \['1'\]"),
])
def test_broken_test_predictions_write_nothing(workdir, damage, message):
    comp = setup_comp(workdir)
    run = write_run(comp, "e", np.full((40, 3), 1 / 3), np.full((10, 3), 1 / 3))
    df = pd.read_csv(run / "test.csv", dtype={"id": str})
    if damage == "nan":
        df.loc[2, "1"] = np.nan
    elif damage == "missing_id":
        df = df.drop(index=5)
    else:
        df = df.rename(columns={"1": "one"})
    df.to_csv(run / "test.csv", index=False)
    with pytest.raises(PipelineError, match=message):
        S.main(["--source", "e", "--", "competition=toy"])
    assert no_submission(workdir)
    assert not (workdir / "submissions" / "history.csv").exists()


def test_demo_style_leaderboard_score_is_printed_and_logged(workdir, capsys):
    comp = setup_comp(workdir)
    truth = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    solution = pd.DataFrame({"id": sample_of(workdir)["id"], "label": truth})
    (workdir / "data" / "_private" / "toy").mkdir(parents=True)
    solution.to_csv(workdir / "data" / "_private" / "toy" / "solution.csv", index=False)
    test = np.eye(3)[truth] * 0.5 + 0.1
    test[:2] = np.eye(3)[[2, 2]] * 0.5 + 0.1  # two wrong: LB accuracy 0.8
    write_run(comp, "e", np.full((40, 3), 1 / 3), test)
    S.main(["--source", "e", "--upload", "--", "competition=toy"])  # local answers: no upload
    out = capsys.readouterr().out
    assert "leaderboard accuracy: 0.80000" in out and "nothing to upload" in out
    hist = pd.read_csv(workdir / "submissions" / "history.csv")
    assert hist["lb"].tolist() == [0.8] and hist["source"].tolist() == ["e"]
    S.main(["--source", "e", "--", "competition=toy"])
    assert "up to date (leaderboard accuracy 0.80000)" in capsys.readouterr().out
    assert len(pd.read_csv(workdir / "submissions" / "history.csv")) == 1
    write_run(comp, "f", np.full((40, 3), 1 / 3), np.full((10, 3), 1 / 3))
    L.main(["competition=toy"])
    table = capsys.readouterr().out
    assert "note:" not in table  # toy has local answers: Kaggle is not asked
    line_e = next(line for line in table.splitlines() if line.split()[0] == "e")
    assert "0.80000" in line_e and "12s" in line_e


def test_upload_carries_source_and_cv(workdir, monkeypatch, capsys):
    comp = setup_comp(workdir)
    write_run(comp, "e", np.full((40, 3), 1 / 3), np.full((10, 3), 1 / 3))
    calls = []

    def fake_submit(slug, csv_path, message):
        calls.append((slug, csv_path, message))
        return {"ref": 77, "status": "pending"}

    monkeypatch.setattr(kaggle_io, "submit", fake_submit)
    S.main(["--source", "e", "--", "competition=toy"])  # written, not uploaded
    assert calls == []
    S.main(["--source", "e", "--upload", "--", "competition=toy"])
    (slug, path, message), = calls
    assert slug == "toy" and path.exists() and message.startswith("e | CV accuracy")
    assert path.name in message
    S.main(["--source", "e", "--upload", "--", "competition=toy"])
    assert len(calls) == 1 and "up to date" in capsys.readouterr().out


def test_leaderboard_sorts_by_metric_and_survives_kaggle(workdir, monkeypatch, capsys):
    comp = setup_comp(workdir, task="regression")  # rmse: lower is better
    y = comp.targets(comp.train_table())
    for name, noise in (("good", 0.1), ("bad", 1.0), ("mid", 0.4)):
        write_run(comp, name, y + noise, np.full((10, 1), 1.0))
    write_run(comp, "alien", y, np.full((10, 1), 1.0), competition="elsewhere")

    def broken(slug):
        raise kaggle_io.KaggleCredentialsError("no kaggle.json found")

    monkeypatch.setattr(kaggle_io, "list_submissions", broken)
    assert L.main(["competition=toy"]) == 0
    out = capsys.readouterr().out
    assert "note: Kaggle scores not fetched (KaggleCredentialsError: no kaggle.json found)" in out
    lines = [line.split() for line in out.splitlines()]
    names = [words[0] for words in lines[lines.index(next(w for w in lines if w[:1] == ["run"])) + 1:]]
    assert names == ["good", "mid", "bad"]
    cv_mid = json.loads((workdir / "runs" / "mid" / "scores.json").read_text())["cv"]
    monkeypatch.setattr(kaggle_io, "list_submissions", lambda slug: [
        {"fileName": f"toy-mid-cv{cv_mid:.5f}.csv", "description": "", "publicScore": 0.4321}])
    L.main(["competition=toy"])
    mid = next(line for line in capsys.readouterr().out.splitlines() if line.split()[0] == "mid")
    assert mid.rstrip().endswith("0.43210")
