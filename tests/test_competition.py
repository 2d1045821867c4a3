import pytest
import yaml
from conftest import make_competition

from pipeline.competition import CompetitionError, load_competition
from pipeline.config import ConfigError


def _edit(workdir, name, **changes):
    path = workdir / "configs" / "competitions" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))


def test_valid_description_loads(toy):
    comp = load_competition("toy")
    assert comp.classes == [0, 1, 2]
    assert comp.pred_columns == ["0", "1", "2"]


def test_missing_column_is_named(toy, workdir):
    _edit(workdir, "toy", target_columns=["labell"])
    with pytest.raises(CompetitionError, match="no column 'labell'"):
        load_competition("toy")


def test_unknown_task_metric_and_key(toy, workdir):
    _edit(workdir, "toy", task="segmentation")
    with pytest.raises(CompetitionError, match="unknown task 'segmentation'"):
        load_competition("toy")
    _edit(workdir, "toy", task="multiclass", metric="top5")
    with pytest.raises(CompetitionError, match="unknown metric 'top5'"):
        load_competition("toy")
    _edit(workdir, "toy", metric="accuracy", id_col="id")
    with pytest.raises(ConfigError, match="id_col.*did you mean 'id_column'"):
        load_competition("toy")


def test_missing_image_is_named(toy, workdir):
    (workdir / "data" / "toy" / "train_images" / "r007.png").unlink()
    with pytest.raises(CompetitionError, match="r007"):
        load_competition("toy")


def test_ids_with_extension_and_several_folders(workdir):
    make_competition(workdir, image_ext="")
    data = workdir / "data" / "toy"
    import pandas as pd

    train = pd.read_csv(data / "train.csv")
    train["id"] = train["id"] + ".png"
    train.to_csv(data / "train.csv", index=False)
    (data / "extra").mkdir()
    (data / "train_images" / "r001.png").rename(data / "extra" / "r001.png")
    _edit(workdir, "toy", train_images=["train_images", "extra"], test_images=["test_images"],
          image_ext="auto")
    comp = load_competition("toy")
    paths = comp.image_paths(comp.train_table(), "train")
    assert paths[1].parent.name == "extra"


@pytest.mark.parametrize("task", ["binary", "multilabel", "regression"])
def test_other_tasks_load(workdir, task):
    make_competition(workdir, task=task)
    comp = load_competition("toy")
    y = comp.targets(comp.train_table())
    assert len(y) == 40


def test_binary_target_must_be_01(workdir):
    make_competition(workdir, task="binary")
    import pandas as pd

    path = workdir / "data" / "toy" / "train.csv"
    df = pd.read_csv(path)
    df.loc[3, "target"] = 2
    df.to_csv(path, index=False)
    with pytest.raises(CompetitionError, match="'target' must be 0/1"):
        load_competition("toy")


def test_submission_kind_must_fit_task(workdir):
    make_competition(workdir, task="regression", submission="probs")
    with pytest.raises(CompetitionError, match="submission 'probs' does not fit task regression"):
        load_competition("toy")
