import pytest

from pipeline.config import Config, ConfigError, fold_list, load_config, parse_overrides


def test_defaults_then_yaml_then_command_line(workdir):
    (workdir / "configs" / "exp.yaml").write_text("lr: 0.01\nepochs: 3\n")
    cfg = load_config("exp", ["epochs=5", "tta=hflip,vflip", "scale=0.5,1.0"])
    assert cfg.lr == 0.01  # from YAML
    assert cfg.epochs == 5  # command line wins
    assert cfg.tta == ["hflip", "vflip"]
    assert cfg.scale == (0.5, 1.0)
    assert cfg.batch_size == Config().batch_size  # default
    assert cfg.name == "exp"


def test_unknown_key_is_named_with_suggestion(workdir):
    with pytest.raises(ConfigError, match=r"n_foldz.*did you mean 'n_folds'"):
        load_config(None, ["n_foldz=3"])
    (workdir / "configs" / "bad.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"learning_rate.*configs/bad.yaml"):
        load_config("bad")


def test_wrong_type_names_key(workdir):
    with pytest.raises(ConfigError, match="epochs"):
        load_config(None, ["epochs=many"])
    with pytest.raises(ConfigError, match="ema"):
        load_config(None, ["ema=maybe"])


def test_scientific_notation_is_a_number(workdir):
    assert parse_overrides(["lr=3e-4"]) == {"lr": 3e-4}
    (workdir / "configs" / "sci.yaml").write_text("lr: 1e-3\nweight_decay: 5E-2\n")  # YAML 1.1: strings
    cfg = load_config("sci")
    assert cfg.lr == 0.001 and cfg.weight_decay == 0.05
    (workdir / "configs" / "bad.yaml").write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="lr"):
        load_config("bad")


@pytest.mark.parametrize("args, key", [
    (["ema_decay=0.9"], "ema_decay"),  # EMA off: decay does nothing
    (["min_delta=0.01"], "min_delta"),  # early stopping off
    (["mixup_prob=0.5"], "mixup_prob"),  # mixup and cutmix off
    (["epochs=3", "patience=5"], "patience"),
    (["pretrained=true", "pretrained_path=w.pth"], "pretrained"),
    (["tta=rotate"], "tta"),
])
def test_combinations_that_do_nothing_are_errors(args, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, args)


def test_missing_experiment_file_named(workdir):
    with pytest.raises(ConfigError, match="configs/nope.yaml"):
        load_config("nope")


def test_fold_subset():
    cfg = load_config(None, ["folds=2,0"])
    assert fold_list(cfg, 5) == [0, 2]
    with pytest.raises(ConfigError, match="folds"):
        fold_list(load_config(None, ["folds=7"]), 5)
