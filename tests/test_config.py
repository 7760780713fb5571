import dataclasses

import pytest

from lacy_fast.config import (
    MODEL_SHAPES, RunConfig, PrepareConfig, explain, from_dict, load_config, parse_override, run_files, to_dict,
)
from lacy_fast.errors import ConfigError, UserError


def test_every_run_file_loads_and_round_trips():
    assert {"tiny", "gpt2-124m", "lacy-334m", "lacy-1.3b"} <= set(run_files())
    for name in run_files():
        cfg = load_config(RunConfig, name)
        assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_overrides_are_typed_and_win_over_the_run_file():
    cfg = load_config(RunConfig, "tiny", ["train.lr=3e-4", "objective.strategy=spacy", "zero_stage=2",
                                           "data.path=/tmp/x y", "model.shape=gpt2-124m", "train.seq_len=1024"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.objective.strategy == "spacy"
    assert cfg.zero_stage == 2
    assert cfg.data.path == "/tmp/x y"
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model) == MODEL_SHAPES["gpt2-124m"][:3]


def test_explicit_shape_field_beats_model_preset():
    cfg = load_config(RunConfig, None, ["model.shape=lacy-334m", "model.n_layer=3"])
    assert cfg.model.n_layer == 3 and cfg.model.d_model == 1024


def test_tuple_fields_accept_lists_and_comma_strings():
    cfg = load_config(PrepareConfig, None, ["label.pos_tags=[PROPN,NUM]", 'label.entity_types=["PERSON", "GPE"]'])
    assert cfg.label.pos_tags == ("PROPN", "NUM")
    assert cfg.label.entity_types == ("PERSON", "GPE")


@pytest.mark.parametrize("override, key, words", [
    ("train.lrr=1", "train.lrr", "did you mean 'train.lr'"),
    ("trian.lr=1", "trian", "did you mean 'train'"),
    ("train.lr=abc", "train.lr", "expects a finite number"),
    ("train.max_steps=1.5", "train.max_steps", "expects an integer"),
    ("train.max_steps=0", "train.max_steps", "must be > 0"),
    ("objective.strategy=magic", "objective.strategy", "choose one of"),
    ("objective.call_fraction=1.5", "objective.call_fraction", "[0, 1]"),
    ("zero_stage=4", "zero_stage", "choose 0, 1, 2 or 3"),
    ("model.n_head=5", "model.d_model", "multiple of n_head"),
    ("train.seq_len=100000", "train.seq_len", "max_seq_len"),
    ("objective.strategy=rho", "objective.ref_checkpoint", "rho"),
    ("train=3", "train", "is a section"),
    ("objective.call_rate=1.5", "objective.call_rate", "[0, 1]"),
    ("objective.call_rate=often", "objective.call_rate", "expects 'auto' or a number, got 'often'"),
    ("objective.call_rate=true", "objective.call_rate", "expects 'auto' or a number"),
])
def test_bad_keys_and_values_name_the_full_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, "tiny", [override])
    assert info.value.key == key
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no run file named 'nope'"):
        load_config(RunConfig, "nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(RunConfig, str(bad))
    with pytest.raises(UserError, match="does not exist"):
        load_config(RunConfig, str(tmp_path / "missing.toml"))
    with pytest.raises(UserError, match="key=value"):
        parse_override("train.lr")


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('out_dir = "x"\n[train]\nlr = 0.01\nmax_steps = 7\n')
    cfg = load_config(RunConfig, str(path), ["train.lr=0.02"])
    assert (cfg.out_dir, cfg.train.lr, cfg.train.max_steps) == ("x", 0.02, 7)


def test_every_field_is_documented():
    for cls in (RunConfig, PrepareConfig):
        rows = explain(cls)
        assert rows
        undocumented = [key for key, _, text in rows if not text.strip()]
        assert not undocumented, undocumented


def test_configs_are_plain_dataclasses():
    cfg = RunConfig()
    assert dataclasses.is_dataclass(cfg) and dataclasses.is_dataclass(cfg.train)


def test_call_rate_is_auto_or_a_number():
    """A union of a literal and a float: each value goes to the member that takes it."""
    assert load_config(RunConfig, "tiny").objective.call_rate == "auto"
    for text, value in (("0.15", 0.15), ("1", 1.0), ("0", 0.0), ("auto", "auto")):
        cfg = load_config(RunConfig, "tiny", [f"objective.call_rate={text}"])
        assert cfg.objective.call_rate == value and type(cfg.objective.call_rate) is type(value)
        assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_run_files_and_model_shapes_cannot_be_confused(tmp_path):
    # A shape where a run file belongs: named as a shape, with the key to use instead.
    with pytest.raises(UserError, match=r"'small' is a model shape, not a run file; pass model.shape=small"):
        load_config(RunConfig, "small")
    # A run file where a shape belongs.
    with pytest.raises(ConfigError, match=r"'model.shape' is 'my-run.toml', a run file; .*passed as --config"):
        load_config(RunConfig, None, ["model.shape=my-run.toml"])
    with pytest.raises(ConfigError, match="'model.shape' is 'nope', no model shape; choose one of tiny, small"):
        load_config(RunConfig, None, ["model.shape=nope"])
    # The old key is refused with its new name.
    with pytest.raises(ConfigError, match="'model.preset' was renamed model.shape; set model.shape=small"):
        load_config(RunConfig, None, ["model.preset=small"])
    assert load_config(RunConfig, "tiny", ["model.shape=small"]).model.d_model == MODEL_SHAPES["small"][2]
