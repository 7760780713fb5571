"""Builders that many test files share: a small tokenizer, tiny models and exports, a
prepared corpus, and `lacy-fast train` at a test's size. The data built from them once per
test run lives in conftest.py."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from lacy_fast.config import ModelConfig, PrepareConfig, TokenizerConfig
from lacy_fast.data import synth
from lacy_fast.data.prepare import prepare
from lacy_fast.data.tokenizer import Tokenizer
from lacy_fast.model import GPT
from lacy_fast.model.io import save_export

CLI = [sys.executable, "-m", "lacy_fast.cli"]
# Small and quick: 64-token sequences of a 512-piece vocabulary, tiny model.
SMALL = ["model.n_layer=1", "model.d_model=64", "model.n_head=2", "train.seq_len=64", "train.micro_batch_size=4",
         "train.warmup_steps=2", "train.lr=3e-3", "train.log_every=2", "train.ckpt_every=0", "--quiet"]


def train_small(directory: Path, seed: int) -> Tokenizer:
    """A 400-piece tokenizer of 300 synthetic biographies."""
    texts = [ts[0] for _, ts, _ in synth.generate(300, seed=seed, heldout=0.0)]
    return Tokenizer.train(texts, TokenizerConfig(vocab_size=400), directory / "t.model")


def prepared(root: Path, people: int, seed: int, vocab: int) -> Path:
    """A synthetic corpus of ``people`` (ROOT/synth) prepared with a ``vocab``-piece tokenizer
    (ROOT/prep, returned)."""
    synth.write(root / "synth", people, seed=seed)
    prepare(PrepareConfig(inputs=(str(root / "synth" / "corpus.jsonl"),), out=str(root / "prep"), workers=1,
                          tokenizer=TokenizerConfig(vocab_size=vocab)), progress=False)
    return root / "prep"


def tiny_gpt(tok, seed=0, d_model=32, n_layer=1, max_seq_len=128, call_scale=30.0) -> GPT:
    """A random GPT whose <CALL> logit varies more than the others, so <CALL> is the argmax at
    roughly a third of positions: every rule sees both outcomes."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(shape="tiny", n_layer=n_layer, n_head=2, d_model=d_model, max_seq_len=max_seq_len,
                            vocab_size=tok.vocab_size))
    with torch.no_grad():
        model.wte.weight[tok.call_id] *= call_scale
    return model.eval()


def export(path, model, tok):
    return save_export(path, model, tokenizer_path=tok.path, tokenizer_sha256=tok.sha256, call_id=tok.call_id)


def train(out: Path, data: Path, *extra: str, launcher: list[str] | None = None, check: bool = True,
          **kw) -> subprocess.CompletedProcess:
    """`lacy-fast train` at the SMALL size on ``data`` into ``out`` (``launcher``: torchrun or
    deepspeed in front of `-m lacy_fast.cli`)."""
    cmd = (launcher or CLI) + ["train", "--config", "tiny", f"data.path={data}", f"out_dir={out}", *SMALL, *extra]
    if launcher:  # torchrun runs `-m lacy_fast.cli`
        cmd = launcher + ["-m", "lacy_fast.cli"] + cmd[len(launcher):]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def byte_bpe(texts, merges=0):
    """A byte-level BPE trained on ``texts`` with ``merges`` merges, as a transformers tokenizer
    (EOS ``<|endoftext|>``): no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=len(alphabet) + 1 + merges,
                                                       initial_alphabet=alphabet, special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")


def save_hf(directory, model, hf_tok):
    """``directory`` holding the model and its tokenizer (save_pretrained of both)."""
    model.save_pretrained(directory)
    hf_tok.save_pretrained(directory)
    return directory


def tiny_gpt2(vocab_size: int, *, n_positions: int = 256, n_embd: int = 32, n_layer: int = 1, **config):
    """A randomly initialised (seed 0) GPT-2 of transformers' own classes, two heads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                      n_head=2, **config))
