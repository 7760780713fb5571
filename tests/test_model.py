import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lacy_fast.config import ModelConfig
from lacy_fast.errors import UserError
from lacy_fast.fileio import write_manifest
from lacy_fast.model import GPT, padded_vocab_size
from lacy_fast.model.io import load_export, save_export


def tiny(vocab=211, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(shape="tiny", n_layer=2, n_head=4, d_model=48, max_seq_len=64, vocab_size=vocab, **kw))


def test_forward_returns_hidden_states_and_pads_the_vocabulary():
    model = tiny()
    idx = torch.randint(0, 211, (3, 17))
    hidden = model(idx)
    assert hidden.shape == (3, 17, 48)
    assert model.head_weight.shape == (256, 48) and padded_vocab_size(211) == 256
    assert model.logits(hidden).shape == (3, 17, 211)
    assert model.head_weight is model.wte.weight  # tied


def test_forward_is_causal():
    model = tiny().eval()
    idx = torch.randint(0, 211, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 211
    torch.testing.assert_close(model(idx)[:, :12], model(changed)[:, :12])
    assert not torch.allclose(model(idx)[:, 12:], model(changed)[:, 12:])


def test_incremental_decoding_with_cache_matches_full_forward():
    model = tiny().eval()
    idx = torch.randint(0, 211, (2, 23))
    full = model(idx)
    cache = model.new_cache(batch=2, max_len=32)
    parts = [model(idx[:, :9], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(9, 23)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 23


def test_reserve_grows_the_cache_and_keeps_what_it_held():
    model = tiny().eval()
    idx = torch.randint(0, 211, (2, 23))
    valid = torch.ones(2, 23, dtype=torch.bool)
    valid[1, :4] = False  # a left-padded row: positions must survive the growth too
    cache = model.new_cache(batch=2, max_len=5)
    parts = [model(idx[:, :5], cache=cache, valid=valid[:, :5])]
    for t in range(5, 23):
        cache.reserve(1)
        parts.append(model(idx[:, t:t + 1], cache=cache))
    assert cache.max_len == 40 and cache.length == 23  # 5 -> 10 -> 20 -> 40: doubling
    full = model(idx, cache=model.new_cache(batch=2, max_len=23), valid=valid)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_decodes_like_each_row_alone():
    model = tiny().eval()
    a, b = torch.randint(0, 211, (1, 11)), torch.randint(0, 211, (1, 6))
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])  # (2, 11), row 1 left-padded
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :5] = False
    cache = model.new_cache(batch=2, max_len=16)
    h = model(batch, cache=cache, valid=valid)
    torch.testing.assert_close(h[0], model(a)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h[1, 5:], model(b)[0], rtol=1e-5, atol=1e-5)
    nxt = torch.randint(0, 211, (2, 1))
    step = model(nxt, cache=cache)
    torch.testing.assert_close(step[1, 0], model(torch.cat([b, nxt[1:]], 1))[0, -1], rtol=1e-5, atol=1e-5)


def test_flops_formula_matches_a_counted_training_step():
    """6N + 12LHQT against torch's FLOP counter on forward + backward of model and head."""
    model = tiny(vocab=1000)
    B, T = 2, 64
    idx = torch.randint(0, 1000, (B, T))
    # The math backend spells attention as matmuls the counter sees (no fused CPU kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        hidden = model(idx)
        logits = F.linear(hidden, model.head_weight)
        F.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    counted = counter.get_total_flops()
    estimate = model.estimate_flops_per_token(T) * B * T
    # The counter sees matmuls only; the estimate also charges 6 FLOPs per bias / LayerNorm
    # parameter (about 1% at this width, less at real widths).
    assert abs(counted - estimate) / counted < 0.03, (counted, estimate)


@pytest.mark.parametrize("shape, vocab, low, high", [
    ("gpt2-124m", 50257, 123e6, 126e6),  # GPT-2 small with its own vocabulary
    ("lacy-334m", 32001, 325e6, 345e6),  # the paper's 334M SLM: 32K SentencePiece + <CALL>
    ("lacy-1.3b", 32001, 1.25e9, 1.40e9),
])
def test_shape_sizes_match_the_paper(shape, vocab, low, high):
    with torch.device("meta"):
        model = GPT(ModelConfig(shape=shape, vocab_size=vocab))
    assert low < model.num_params() < high


def test_export_round_trip(tmp_path, tok):
    model = tiny()
    out = save_export(tmp_path / "export", model, tokenizer_path=tok.path, tokenizer_sha256="ab", call_id=3,
                      train_config={"train": {"lr": 1.0}}, extra={"step": 7})
    loaded, meta = load_export(out)
    assert meta["call_id"] == 3 and meta["step"] == 7 and meta["tokenizer_sha256"] == "ab"
    assert (out / "tokenizer.model").read_bytes() == tok.path.read_bytes()
    assert json.loads((out / "train_config.json").read_text()) == {"train": {"lr": 1.0}}
    fake = tmp_path / "fake.model"
    fake.write_bytes(b"fake tokenizer bytes")
    with pytest.raises(UserError, match="is not a SentencePiece model"):
        save_export(tmp_path / "export2", model, tokenizer_path=fake)
    assert not (tmp_path / "export2").exists()
    idx = torch.randint(0, 211, (1, 9))
    torch.testing.assert_close(loaded(idx), model.eval()(idx))


def test_damaged_or_foreign_exports_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_export(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_export(tmp_path / "empty")
    out = save_export(tmp_path / "export", tiny())
    config = json.loads((out / "config.json").read_text())
    meta = config["lacy_fast"]
    meta["model"]["d_model"] = 64
    (out / "config.json").write_text(json.dumps(config))
    write_manifest(out)  # consistent checksums: the config check itself speaks
    with pytest.raises(UserError, match="does not match its config.json"):
        load_export(out)
    meta["version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    write_manifest(out)
    with pytest.raises(UserError, match="version 99"):
        load_export(out)


def test_a_file_or_a_run_without_export_is_named_for_what_it_is(tmp_path):
    out = save_export(tmp_path / "export", tiny())
    with pytest.raises(UserError, match=f"{out / 'model.safetensors'} is a file, not a model export; pass the "
                                        f"export directory {out}$"):
        load_export(out / "model.safetensors")
    loose = tmp_path / "weights.bin"
    loose.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file, not a model export"):
        load_export(loose)
    run = tmp_path / "run"  # a training run that has not saved yet: its own config.json, no export
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"out_dir": str(run), "train": {}}))
    with pytest.raises(UserError) as info:
        load_export(run)
    assert "is a training run without an export" in str(info.value) and "None" not in str(info.value)


def test_flash_backend_without_flash_attn_is_a_user_error():
    from lacy_fast.model import attention
    if attention.flash_available():
        pytest.skip("flash-attn is installed")
    with pytest.raises(UserError, match="flash-attn is not installed"):
        tiny(attention="flash")


@pytest.mark.parametrize("strategy", ["lacy", "none"])
def test_gradcheck_model_with_the_lacy_op(strategy):
    """Finite differences of the whole model + fused loss (chunked path, float64) against
    autograd, every parameter at once through torch.func.functional_call."""
    from torch.func import functional_call

    from lacy_fast.kernels import lacy_linear_cross_entropy

    torch.manual_seed(0)
    model = GPT(ModelConfig(shape="tiny", n_layer=1, n_head=2, d_model=8, max_seq_len=16, vocab_size=37)).double()
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in model.named_parameters())
    idx = torch.randint(3, 37, (2, 7))
    targets = torch.randint(3, 37, (2, 7)).flatten()
    targets[3] = -100
    flags = (torch.arange(14) % 3 == 0).to(torch.uint8)

    def loss_of(*ps):
        state = dict(zip(names, ps))
        hidden = functional_call(model, state, (idx,))
        loss, _ = lacy_linear_cross_entropy(hidden.flatten(0, 1), state["wte.weight"], targets, flags, call_id=2,
                                            strategy=strategy, call_fraction=0.5, impl="chunked")
        return loss

    assert torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-7, rtol=1e-5)
