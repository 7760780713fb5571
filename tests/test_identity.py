"""The run identity: every config key is either compared on resume or listed as free to
change, and the settings that change what a step computes are compared."""
import pytest

from lacy_fast.config import RunConfig, load_config
from lacy_fast.errors import UserError
from lacy_fast.train.identity import MAY_CHANGE, check_resume, config_keys, run_identity


def identity(*overrides, **resolved):
    cfg = load_config(RunConfig, "tiny", ["data.path=/data", *overrides])
    base = dict(model=cfg.model, precision="fp32", call_rate=None, tokenizer_sha256="ab" * 32, call_id=2,
                world_size=1, data="d1", ref=None)
    if cfg.objective.strategy in ("loss", "rho"):
        base["call_rate"] = 0.15
    return run_identity(cfg, **{**base, **resolved})


def test_every_key_is_compared_or_free_to_change():
    keys = config_keys()
    assert not set(MAY_CHANGE) - set(keys), "MAY_CHANGE names keys that do not exist"
    compared = set(identity())
    for key in keys:
        assert (key in compared) != (key in MAY_CHANGE), key


@pytest.mark.parametrize("key", [
    "objective.strategy", "objective.call_fraction", "objective.ignore_index", "data.path", "data.seed",
    "data.source", "model.n_layer", "model.d_model", "model.vocab_size", "model.dropout", "train.seq_len",
    "train.micro_batch_size", "train.grad_accum", "train.precision", "train.weight_decay", "train.beta1",
    "zero_stage", "tokenizer.sha256", "world_size"])
def test_settings_that_change_a_step_are_compared(key):
    assert key in identity()


def test_a_difference_is_refused_naming_the_key(tmp_path):
    saved = identity()
    check_resume(saved, identity("train.max_steps=5000", "train.lr=1e-4", "train.log_every=3"), tmp_path, tmp_path)
    check_resume(saved, identity("model.shape=tiny", "model.n_layer=2"), tmp_path, tmp_path)  # same shape
    for overrides, resolved, key in [
        (["objective.strategy=none"], {}, "objective.strategy"),
        (["objective.call_fraction=0.5"], {}, "objective.call_fraction"),
        ([], {"data": "d2"}, "data.path"),
        ([], {"world_size": 2}, "world_size"),
        ([], {"tokenizer_sha256": "cd" * 32}, "tokenizer.sha256"),
        (["train.micro_batch_size=3"], {}, "train.micro_batch_size"),
    ]:
        with pytest.raises(UserError, match=f"trained with {key}=") as info:
            check_resume(saved, identity(*overrides, **resolved), tmp_path, tmp_path)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="older lacy-fast"):
        check_resume(None, saved, tmp_path, tmp_path)


def test_loss_and_rho_compare_the_resolved_call_rate_and_the_reference():
    loss = identity("objective.strategy=loss")
    assert loss["objective.call_rate"] == 0.15 and loss["objective.call_fraction"] is None
    assert identity("objective.strategy=loss", call_rate=0.2)["objective.call_rate"] == 0.2
    assert identity()["objective.call_rate"] is None  # lacy does not read it
    rho = identity("objective.strategy=rho", "objective.ref_checkpoint=/ref", ref="r1")
    assert rho["objective.ref_checkpoint"] == "r1"
    assert identity("objective.strategy=spacy")["objective.call_fraction"] is None
