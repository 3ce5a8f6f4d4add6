import pytest
import yaml

from lmtrain.config import Config, apply_overrides, dump_yaml, from_dict, load_config
from lmtrain.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_valid_and_round_trip():
    cfg = from_dict({})
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_every_preset_loads():
    from tests.conftest import ROOT

    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(presets) >= 10
    for path in presets:
        assert load_config(path).output.name == path.stem


def test_name_defaults_to_file_name(tmp_path):
    cfg = load_config(write(tmp_path, "seed: 1\n", "my-run.yaml"))
    assert cfg.output.name == "my-run"


@pytest.mark.parametrize(
    "text,message",
    [
        ("train:\n  lr_decy: 0.5\n", "unknown key 'train.lr_decy'; did you mean 'train.lr_decay'?"),
        ("model:\n  hiden_size: 10\n", "did you mean 'model.hidden_size'?"),
        ("trian:\n  lr: 1\n", "did you mean 'train'?"),
        ("model:\n  hidden_size: 0\n", "'model.hidden_size' must be at least 1, got 0"),
        ("model:\n  hidden_size: -5\n", "must be at least 1"),
        ("model:\n  hidden_size: ten\n", "'model.hidden_size' must be an integer, got 'ten'"),
        ("model:\n  hidden_size: 2.5\n", "must be an integer"),
        ("model:\n  tie_weights: yes please\n", "must be true or false"),
        ("train:\n  lr: 0\n", "'train.lr' must be greater than 0"),
        ("train:\n  optimizer: rmsprop\n", "'train.optimizer' must be one of sgd, adam"),
        ("model:\n  dropout: 1.5\n", "at most 1.0"),
        ("model: 5\n", "'model' must be a mapping"),
        (
            "model: {emb_size: 10, hidden_size: 20, tie_weights: true}\n",
            "tie_weights needs model.emb_size == model.hidden_size",
        ),
        ("data: {source: text, train: a.txt, valid: b.txt}\n", "data.valid is set but data.test is not"),
        ("data: {source: text, train: a.txt, split: [0.9, 0.2, 0.1]}\n", "that add up to 1"),
        ("data: {synthetic: {min_distance: 9, max_distance: 3}}\n", "is larger than"),
        ("[1, 2]\n", "expected a mapping of sections"),
        ("", "the config file is empty"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml:3:\d+: invalid YAML"):
        load_config(write(tmp_path, "model:\n  emb_size: 10\n  hidden_size: 3: 4\n"))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_overrides_use_the_same_paths_and_checks(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0\n")
    cfg = load_config(
        path,
        [
            "train.lr=0.5",
            "model.tie_weights=true",
            "model.emb_size=32",
            "model.hidden_size=32",
            "data.synthetic.max_distance=7",
            "train.clip_grad_norm=null",
        ],
    )
    assert cfg.train.lr == 0.5 and cfg.model.tie_weights and cfg.data.synthetic.max_distance == 7
    assert cfg.train.clip_grad_norm is None
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match="must be at least 1"):
        load_config(path, ["train.batch_size=0"])


def test_override_does_not_mutate_input():
    raw = {"train": {"lr": 1.0}}
    apply_overrides(raw, ["train.lr=2"])
    assert raw == {"train": {"lr": 1.0}}


def test_int_accepted_where_float_expected():
    assert from_dict({"train": {"lr": 1}}).train.lr == 1.0
    assert isinstance(Config().train.lr, float)


def test_configuration_doc_lists_every_key():
    from lmtrain.config import reference_table
    from tests.conftest import ROOT

    assert reference_table() in (ROOT / "docs" / "configuration.md").read_text()
