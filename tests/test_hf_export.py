"""Exports that Hugging Face transformers opens as they are: the same logits, the same
tokens, the same greedy generation as lacy-fast, on the CPU, with no custom code."""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lacy_fast import cli
from lacy_fast.cascade import Cascade, LacyBig, load_big, load_model
from lacy_fast.cascade.slm import context_ids
from lacy_fast.config import CascadeConfig, ModelConfig, TokenizerConfig, to_dict
from lacy_fast.data.synth import generate
from lacy_fast.data.tokenizer import Tokenizer
from lacy_fast.fileio import write_manifest
from lacy_fast.errors import UserError
from lacy_fast.model import GPT
from lacy_fast.model.io import load_export, read_export_meta
from helpers import export, tiny_gpt, train_small
from test_data_tokenizer import TRICKY

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# Plain text the tokenizers must agree on (SentencePiece ids, decoded text): runs of
# whitespace, leading / trailing spaces, tabs, newlines, byte-fallback characters, emoji.
PLAIN = [t for t in TRICKY if "▁" not in t and "<CALL>" not in t] + [
    " x", "  ", " ", "\n", "a\n b", "\t\tq", "1,234,567", "日本語のテキスト", "🙂🙃", "é" * 5, "x  \n  y",
    "Zürich  is \n\nbig: 1,234.5 O'Neil-Smith 😀 北京"]


def trained_tokenizer(directory, model_type):
    texts = [ts[0] for _, ts, _ in generate(300, seed=0, heldout=0.0)]
    return Tokenizer.train(texts, TokenizerConfig(vocab_size=400, model_type=model_type), directory / "t.model")


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tok(request, tmp_path_factory):
    return trained_tokenizer(tmp_path_factory.mktemp(request.param), request.param)


def shaken(model):
    """LayerNorm weights away from 1 and biases away from 0, so that a misplaced one shows."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_f"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if name.endswith("weight") else
                        0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def bias_free_gpt(tok):
    torch.manual_seed(1)
    model = GPT(ModelConfig(shape="tiny", n_layer=2, n_head=2, d_model=32, max_seq_len=64, vocab_size=tok.vocab_size,
                            bias=False))
    return shaken(model).eval()


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {"bias": export(root / "bias", shaken(tiny_gpt(tok, n_layer=2, max_seq_len=64)), tok),
            "nobias": export(root / "nobias", bias_free_gpt(tok), tok)}


def hf_model(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype).eval()


@pytest.mark.parametrize("kind", ["bias", "nobias"])
def test_logits_of_transformers_match_lacy_fast(exported, tok, kind):
    """fp64 first: the two networks are the same function (any mapping error, a GELU variant,
    a LayerNorm eps, attention scaling, a transposed matrix, shows far above fp64 rounding);
    then fp32: transformers' error against fp64 is of the size of lacy-fast's own, at most 4
    times it (the README's claim: the two may sum in another order, so equal bits are not
    promised, an error of another size would be a different computation)."""
    path = exported[kind]
    ours = load_model(path).model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (3, ours.cfg.max_seq_len), generator=gen)  # every position
    with torch.no_grad():
        ref = ours.double().logits(ours(ids))  # (B, T, V), fp64
        hf64 = hf_model(path, torch.float64)(ids).logits
        assert hf64.shape[-1] == ours.padded_vocab_size
        assert (hf64[..., : tok.vocab_size] - ref).abs().max() < 1e-10 * ref.abs().max()
        # the padding rows are the tied embedding's too
        full = torch.nn.functional.linear(ours(ids), ours.wte.weight)
        assert (hf64 - full).abs().max() < 1e-10 * ref.abs().max()
        ours.float()
        ours32 = ours.logits(ours(ids)).double()
        hf32 = hf_model(path)(ids).logits[..., : tok.vocab_size].double()
    ours_err = (ours32 - ref).abs().max().item()
    hf_err = (hf32 - ref).abs().max().item()
    assert 0 < ours_err < 1e-4
    assert hf_err <= 4 * ours_err, (hf_err, ours_err)
    print(f"{kind}: max |hf - lacy-fast| fp32 {(hf32 - ours32).abs().max().item():.2e}, "
          f"errors vs fp64: lacy-fast {ours_err:.2e}, transformers {hf_err:.2e}")


def test_tokenizer_gives_sentencepiece_ids_and_text(exported, tok):
    hf = AutoTokenizer.from_pretrained(str(exported["bias"]), local_files_only=True)
    assert hf.convert_tokens_to_ids("<CALL>") == tok.call_id and "<CALL>" in hf.all_special_tokens
    assert hf.eos_token_id == tok.eos_id and hf.bos_token_id == tok.eos_id and len(hf) == tok.vocab_size
    corpus = [ts[0] for _, ts, _ in generate(60, seed=5, heldout=0.0)]
    for text in PLAIN + corpus:
        ids = hf(text)["input_ids"]
        assert ids == context_ids(tok, text), text  # EOS first, as lacy-fast decodes a prompt
        assert hf.decode(ids, skip_special_tokens=True) == text
        assert hf.decode(ids[1:]) == text == tok.decode(ids[1:])
    # A literal "▁" is SentencePiece's own space marker: both decode it as SentencePiece does.
    for text in ["a literal ▁ marker and ▁▁ two", "▁", "x ▁y"]:
        ids = hf(text)["input_ids"]
        assert ids == context_ids(tok, text) and hf.decode(ids[1:]) == tok.decode(ids[1:])


def test_tokenizer_round_trips_text_with_call(exported, tok):
    hf = AutoTokenizer.from_pretrained(str(exported["bias"]), local_files_only=True)
    for text in ["a <CALL> b", "<CALL>x", "x<CALL>", "  <CALL>  ", "born in<CALL> Tolmere.", "<CALL> <CALL>",
                 "Zürich<CALL>  😀\n<CALL>"]:
        ids = hf(text)["input_ids"][1:]
        assert ids.count(tok.call_id) == text.count("<CALL>")
        assert hf.decode(ids) == text
    # ids a model generated, <CALL> among them: decode, encode, the same ids again
    ids = tok.encode("Anna Tolk was born in") + [tok.call_id] + tok.encode("Tolmere on 12 May 1901.")
    assert hf(hf.decode(ids))["input_ids"][1:] == ids
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_greedy_generate_of_transformers_equals_lacy_fast(exported, tok):
    """generation_config.json suppresses <CALL> and the padding rows, as the SLM alone does:
    the random model has <CALL> (scaled up) and padding rows among its argmaxes."""
    path = exported["bias"]
    slm = load_model(path)
    hf = hf_model(path)
    hf_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    prompts = ["Thynoxine Nahoxski", "Anna", "By profession, she was a", " ünïcode  x"]
    ours = Cascade(slm, None, CascadeConfig(max_new_tokens=30)).generate(prompts)
    with torch.no_grad():
        logits = hf(torch.tensor([hf_tok(prompts[0])["input_ids"]])).logits[0]
    raw = logits.argmax(-1)
    assert bool(((raw == tok.call_id) | (raw >= tok.vocab_size)).any())  # suppression matters here
    for prompt, g in zip(prompts, ours):
        ids = torch.tensor([hf_tok(prompt)["input_ids"]])
        full = hf.generate(ids, do_sample=False, max_new_tokens=30, pad_token_id=tok.eos_id)[0].tolist()
        assert full[ids.shape[1]:] == g.tokens, prompt
        assert hf_tok.decode(full, skip_special_tokens=True) == prompt + g.text


def test_lacy_fast_loads_it_as_model_big_model_and_reference(exported, tok, tmp_path):
    path = exported["nobias"]
    model, meta = load_export(path)
    assert meta["version"] == 2 and meta["tokenizer_sha256"] == tok.sha256 and not model.cfg.bias
    assert isinstance(load_big(str(path)), LacyBig)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["lacy_fast"]["call_id"] == tok.call_id
    # A transformers save_pretrained of the loaded model (lacy-fast's fields carried in its
    # config) loads back in lacy-fast with the same weights.
    resaved = tmp_path / "resaved"
    hf_model(path).save_pretrained(str(resaved))
    shutil.copy(path / "tokenizer.model", resaved / "tokenizer.model")
    again = load_model(resaved).model
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_version_1_exports_still_load(exported, tok, tmp_path):
    """The layout before this format: lacy-fast's names, config.json with only its fields."""
    model = load_model(exported["bias"]).model
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old / "model.safetensors"),
              metadata={"format": "lacy-fast-export"})
    (old / "config.json").write_text(json.dumps({"format": "lacy-fast-export", "version": 1, "model": to_dict(model.cfg),
                                                 "tokenizer_sha256": tok.sha256, "call_id": tok.call_id}))
    shutil.copy(tok.path, old / "tokenizer.model")
    loaded = load_model(old).model
    ids = torch.tensor([context_ids(tok, "Anna Tolk was born")])
    with torch.no_grad():
        assert torch.equal(loaded.logits(loaded(ids)), model.logits(model(ids)))


def test_damaged_exports_are_refused_in_one_sentence(exported, tmp_path, capsys):
    cases = {}
    plain = tmp_path / "plain"  # a Hugging Face GPT-2 that is no lacy-fast export
    shutil.copytree(exported["bias"], plain)
    config = json.loads((plain / "config.json").read_text())
    del config["lacy_fast"]
    (plain / "config.json").write_text(json.dumps(config))
    cases[plain] = "is not a lacy-fast model export"
    future = tmp_path / "future"
    shutil.copytree(exported["bias"], future)
    config = json.loads((future / "config.json").read_text())
    config["lacy_fast"]["version"] = 9
    (future / "config.json").write_text(json.dumps(config))
    cases[future] = "export version 9"
    biased = tmp_path / "biased"  # bias=false in its config, non-zero biases in its weights
    shutil.copytree(exported["nobias"], biased)
    from safetensors.torch import load_file
    state = load_file(str(biased / "model.safetensors"))
    state["transformer.h.0.mlp.c_fc.bias"] += 1
    save_file(state, str(biased / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(biased)  # consistent checksums: the check of the weights themselves speaks
    cases[biased] = "non-zero biases"
    short = tmp_path / "short"
    shutil.copytree(exported["bias"], short)
    del state["transformer.h.1.attn.c_proj.weight"]
    save_file(state, str(short / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(short)
    cases[short] = "lacks transformer.h.1.attn.c_proj.weight"
    for path, message in cases.items():
        with pytest.raises(UserError, match=message):
            load_export(path)
        assert cli.main(["generate", "--slm", str(path), "--prompt", "x"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert read_export_meta(exported["bias"])["format"] == "lacy-fast-export"


def test_cli_generate_reads_the_export(exported, capsys):
    assert cli.main(["generate", "--slm", str(exported["bias"]), "--prompt", "Anna", "--max-new-tokens", "5",
                     "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["tokens"] == 5


def test_small_tokenizer_of_the_other_tests_converts_too(tmp_path):
    tok = train_small(tmp_path, seed=3)
    path = export(tmp_path / "e", tiny_gpt(tok), tok)
    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    for text in PLAIN:
        assert hf(text)["input_ids"] == context_ids(tok, text)


def test_a_tokenizer_without_dummy_prefix_converts_exactly(tmp_path):
    """A SentencePiece model brought by the user (``tokenizer.path``) may not prepend a space."""
    import io

    import sentencepiece as spm

    texts = [ts[0] for _, ts, _ in generate(300, seed=0, heldout=0.0)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=False, unk_id=0, eos_id=1,
                                   bos_id=-1, pad_id=-1, control_symbols=["<CALL>"], minloglevel=2)
    (tmp_path / "t.model").write_bytes(model.getvalue())
    tok = Tokenizer.load(tmp_path / "t.model")
    assert not tok.sp.encode("x", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    path = export(tmp_path / "e", tiny_gpt(tok), tok)
    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    for text in PLAIN:
        ids = hf(text)["input_ids"]
        assert ids == context_ids(tok, text), text
        assert hf.decode(ids[1:]) == text


ROOT = Path(__file__).resolve().parent.parent

# From the repository root ('' first on sys.path, as `python -c` and `python -m` put it): the
# process imports a top-level `kernels` itself and has transformers load the export.
_LOAD_FROM_ROOT = """
import sys, torch, kernels
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.tensor([[int(x) for x in sys.argv[2].split(",")]])).logits
print(kernels.__file__)
print(repr(logits.double().sum().item()))
"""


def test_an_export_loads_in_transformers_from_the_repository_root(exported, tok):
    """transformers >= 5.25 imports Hugging Face's `kernels`; the repository's folder
    `kernels/` must not take its place (it once did: ImportError, CUDAProperties)."""
    try:
        installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` distribution is not installed (constraints.txt installs it)")
    ids = tok.encode("Anna Tolk was born in Tolmere.")
    proc = subprocess.run([sys.executable, "-c", _LOAD_FROM_ROOT, str(exported["bias"]), ",".join(map(str, ids))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, total = proc.stdout.split()
    assert Path(where).resolve() == Path(installed).resolve(), where
    with torch.no_grad():
        expected = hf_model(exported["bias"])(torch.tensor([ids])).logits.double().sum().item()
    assert float(total) == expected


def test_the_kernels_folder_never_shadows_a_package_of_that_name(tmp_path):
    """Any regular package named `kernels` on the path wins over the repository's folder,
    from the repository's root too, and lacy_fast.kernels still works beside it."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("MARK = 'other'\n")
    code = ("import kernels, lacy_fast.kernels as k\n"
            "print(kernels.MARK, callable(k.lacy_linear_cross_entropy), k.lacy_ce.__name__)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["other", "True", "lacy_fast.kernels.lacy_ce"]
