"""The official kaggle client end to end against a local emulator of the Kaggle API.

Downloads, unpacks, drafts the competition YAML, makes folds, submits and lists; every failure a
user can meet (no or bad credentials, unaccepted rules, unknown slug, no network, a hostile archive)
must give one clear line and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import make_competition
from kaggle_emulator import FakeCompetition, KaggleEmulator, zip_folder

from pipeline import data, folds, init_competition, kaggle_io
from pipeline.competition import load_competition
from pipeline.config import PipelineError, run

SLUG = "toy-comp"
ANSWERS = {f"t{i:03d}": str(i % 3) for i in range(10)}  # the emulator's hidden test labels


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The competition files as Kaggle ships them (not in the working directory)."""
    root = tmp_path_factory.mktemp("kaggle_source")
    make_competition(root, name=SLUG)
    return root / "data" / SLUG


@pytest.fixture
def kaggle(workdir, source, monkeypatch, tmp_path_factory):
    """A running emulator serving SLUG; the client is pointed at it with valid credentials."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(var, raising=False)
    with KaggleEmulator() as kg:
        for k, v in kg.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("KAGGLE_USERNAME", kg.username)
        monkeypatch.setenv("KAGGLE_KEY", kg.key)
        kg.competitions[SLUG] = FakeCompetition(zip_folder(source), dict(ANSWERS))
        yield kg


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_download_init_folds_end_to_end(kaggle, source, workdir, capsys):
    assert data.main([f"competition={SLUG}"]) == 0
    assert tree(workdir / "data" / SLUG) == tree(source)
    assert sorted(p.name for p in (workdir / "data").iterdir()) == [SLUG]  # no temp folder left
    api_calls = [c for c in kaggle.calls if c[0] == "POST"]
    assert api_calls == [("POST", "DownloadDataFiles", {"competitionName": SLUG})]

    assert data.main([f"competition={SLUG}"]) == 0  # present: no second download
    assert "already present" in capsys.readouterr().out
    assert len([c for c in kaggle.calls if c[0] == "POST"]) == 1

    assert init_competition.main([f"competition={SLUG}"]) == 0
    text = (workdir / "configs" / "competitions" / f"{SLUG}.yaml").read_text()
    assert "image_ext: .png  # guess:" in text
    comp = load_competition(SLUG)
    assert (comp.task, comp.metric, comp.submission) == ("multiclass", "accuracy", "label")
    assert (comp.id_column, comp.target_columns, comp.image_ext) == ("id", ["label"], ".png")
    assert (comp.train_images, comp.test_images) == (["train_images"], ["test_images"])

    assert folds.main([f"competition={SLUG}"]) == 0
    fold_table = pd.read_csv(workdir / "folds" / f"{SLUG}.csv", dtype={"id": str})
    train = pd.read_csv(workdir / "data" / SLUG / "train.csv", dtype={"id": str})
    assert sorted(fold_table["id"]) == sorted(train["id"])


def test_init_never_overwrites(kaggle, workdir):
    kaggle_io.download(SLUG, workdir / "data" / SLUG)
    target = workdir / "configs" / "competitions" / f"{SLUG}.yaml"
    target.write_text("task: binary\n")
    with pytest.raises(PipelineError, match="already exists"):
        init_competition.main([f"competition={SLUG}"])
    assert target.read_text() == "task: binary\n"


def test_submit_and_list_submissions(kaggle, workdir):
    csv = workdir / "submissions" / "first.csv"
    csv.parent.mkdir()
    preds = {k: (v if k < "t005" else "0") for k, v in ANSWERS.items()}  # 7 of 10 right
    csv.write_text("id,label\n" + "".join(f"{k},{v}\n" for k, v in preds.items()))

    sub = kaggle_io.submit(SLUG, csv, "baseline cv 0.91")
    assert kaggle.uploads[next(iter(kaggle.uploads))] == csv.read_bytes()
    assert sub["status"] == "complete" and sub["publicScore"] == pytest.approx(0.7)
    assert (sub["fileName"], sub["description"]) == ("first.csv", "baseline cv 0.91")
    assert "Successfully" in sub["message"]

    csv.write_text("id,label\n" + "".join(f"{k},{v}\n" for k, v in ANSWERS.items()))
    kaggle_io.submit(SLUG, csv, "second")
    subs = kaggle_io.list_submissions(SLUG)
    assert [s["description"] for s in subs] == ["second", "baseline cv 0.91"]  # newest first
    assert [s["publicScore"] for s in subs] == [1.0, 0.7]
    for s in subs:
        assert {"fileName", "description", "date", "status", "publicScore"} <= set(s)
        assert s["date"][:2] == "20"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hostile(kg: KaggleEmulator, source: Path, entry: str) -> None:
    kg.competitions[SLUG].archive = zip_folder(source, extra={entry: b"pwned"})


FAILURES = {
    "401": (lambda kg, mp, src: mp.setenv("KAGGLE_KEY", "wrong-key"),
            ["401", "rejected the credentials", "KAGGLE_USERNAME", "KAGGLE_KEY"]),
    "403": (lambda kg, mp, src: setattr(kg.competitions[SLUG], "rules_accepted", False),
            ["403", f"accept the competition rules at https://www.kaggle.com/competitions/{SLUG}/rules"]),
    "404": (lambda kg, mp, src: kg.competitions.pop(SLUG),
            [f"unknown competition '{SLUG}'", "404"]),
    "no-credentials": (lambda kg, mp, src: (mp.delenv("KAGGLE_USERNAME"), mp.delenv("KAGGLE_KEY")),
                       ["no Kaggle credentials", "KAGGLE_USERNAME", "KAGGLE_KEY", "kaggle.json",
                        "KAGGLE_API_TOKEN"]),
    "network": (lambda kg, mp, src: [mp.setenv(v, f"http://127.0.0.1:{_closed_port()}")
                                     for v in ("http_proxy", "HTTP_PROXY")],
                ["could not reach Kaggle", "connection refused"]),
    "dotdot-zip": (lambda kg, mp, src: _hostile(kg, src, "../../../evil.txt"),
                   ["refusing entry '../../../evil.txt'", "outside the folder"]),
    "absolute-zip": (lambda kg, mp, src: _hostile(kg, src, "/tmp/evil.txt"),
                     ["refusing entry '/tmp/evil.txt'"]),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failures_give_one_clear_line_and_leave_nothing(case, kaggle, source, workdir,
                                                        monkeypatch, capsys):
    setup, expected = FAILURES[case]
    setup(kaggle, monkeypatch, source)
    before = tree(workdir)
    monkeypatch.setattr("sys.argv", ["pipeline.data", f"competition={SLUG}"])
    with pytest.raises(SystemExit) as exit_:
        run(data.main)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err
    assert kaggle.key not in out + err
    assert tree(workdir) == before  # nothing written, no data/<slug>/, no temp folder
    assert not (workdir / "data" / SLUG).exists()
    assert not list(workdir.parent.glob("evil.txt")) and not Path("/tmp/evil.txt").exists()


def test_symlink_entry_is_refused(tmp_path):
    archive = tmp_path / "a.zip"
    info = zipfile.ZipInfo("link")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(kaggle_io.UnsafeArchiveError, match="link entry 'link'"):
        kaggle_io.extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "ok.txt").exists()  # checked before anything is written


def test_nested_zip_unpacked_in_place(kaggle, source, workdir):
    nested = zip_folder(source / "test_images")
    kaggle.competitions[SLUG].archive = zip_folder(source / "train_images", extra={
        "test_images.zip": nested})
    kaggle_io.download(SLUG, workdir / "data" / SLUG)
    names = set(tree(workdir / "data" / SLUG))
    assert "test_images.zip" not in names and "t000.png" in names and "r000.png" in names


def test_kaggle_json_in_config_dir_and_permission_warning(kaggle, workdir, monkeypatch,
                                                          tmp_path_factory, capsys):
    config = tmp_path_factory.mktemp("kaggle_config")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    cred = config / "kaggle.json"
    cred.write_text(json.dumps({"username": kaggle.username, "key": kaggle.key}))
    os.chmod(cred, 0o644)
    with pytest.warns(UserWarning, match="readable by other users.*chmod 600"):
        kaggle_io.download(SLUG, workdir / "data" / SLUG)
    assert (workdir / "data" / SLUG / "train.csv").is_file()
    assert kaggle.key not in "".join(capsys.readouterr())


@pytest.mark.parametrize("task", ["binary", "multilabel", "regression"])
def test_init_guesses_other_formats(workdir, task):
    desc = make_competition(workdir, name=task, task=task, groups=task == "binary")
    (workdir / "configs" / "competitions" / f"{task}.yaml").unlink()
    assert init_competition.main([f"competition={task}"]) == 0
    comp = load_competition(task)
    for key in ("task", "metric", "submission", "target_columns", "image_ext", "group_column"):
        assert getattr(comp, key) == desc.get(key, ""), key
    text = (workdir / "configs" / "competitions" / f"{task}.yaml").read_text()
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(body) == len(yaml.safe_load(text)) and all("  # guess: " in line for line in body)


def test_init_ids_with_extension_and_probs_per_class(workdir):
    root = workdir / "data" / "ext"
    make_competition(workdir, name="ext")
    (workdir / "configs" / "competitions" / "ext.yaml").unlink()
    train = pd.read_csv(root / "train.csv", dtype={"id": str})
    train["id"] = train["id"] + ".png"
    train["label"] = train["label"].map({0: "cat", 1: "dog", 2: "fox"})
    train.to_csv(root / "train.csv", index=False)
    sample = pd.read_csv(root / "sample_submission.csv", dtype={"id": str})
    sample = pd.DataFrame({"id": sample["id"] + ".png", "cat": 0.3, "dog": 0.3, "fox": 0.4})
    sample.to_csv(root / "sample_submission.csv", index=False)
    assert init_competition.main(["competition=ext"]) == 0
    comp = load_competition("ext")
    assert (comp.task, comp.submission, comp.target_columns) == ("multiclass", "probs", ["label"])
    assert comp.image_ext == "" and comp.classes == ["cat", "dog", "fox"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_data_init_folds(kaggle, workdir):
    """The Makefile path: the client runs in child processes, reaching the emulator the same way."""
    repo = Path(__file__).resolve().parents[1]
    venv = workdir / ".venv"  # the repository's venv seen from the working directory, installed
    venv.mkdir()
    for name in ("bin", "lib", "lib64", "include", "pyvenv.cfg"):
        if (repo / ".venv" / name).exists():
            (venv / name).symlink_to(repo / ".venv" / name)
    (workdir / "pyproject.toml").symlink_to(repo / "pyproject.toml")
    (venv / ".installed").touch()  # newer than pyproject.toml: make does not reinstall

    def make(*targets, slug=SLUG):
        return subprocess.run(["make", "-s", "-f", str(repo / "Makefile"), *targets,
                               f"COMPETITION={slug}"], capture_output=True, text=True, timeout=120)

    kaggle.competitions["closed"] = FakeCompetition(kaggle.competitions[SLUG].archive,
                                                    rules_accepted=False)
    failed = make("data", slug="closed")
    assert failed.returncode != 0
    assert "error: Kaggle refused to download 'closed' (403 Forbidden)" in failed.stderr
    assert not (workdir / "data" / "closed").exists()

    done = make("data", "init")
    assert done.returncode == 0, done.stderr
    assert (workdir / "configs" / "competitions" / f"{SLUG}.yaml").is_file()
    done = make("folds")
    assert done.returncode == 0, done.stderr
    assert (workdir / "folds" / f"{SLUG}.csv").is_file()
    assert make("data").stdout == ""  # data/<slug>/ is up to date: no second download
    assert [c[1] for c in kaggle.calls if c[0] == "POST"] == ["DownloadDataFiles"] * 2
