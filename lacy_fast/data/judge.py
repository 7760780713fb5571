"""The judges of ``lacy-fast prepare``: which words get flag bit 1 (``FLAG_JUDGE``, to delegate).

    lacy-fast prepare --input synth/corpus.jsonl --out data --judge oracle:synth/facts.jsonl
    lacy-fast prepare --input corpus/ --out data --judge hf:models/judge judge.candidates=spacy

The ``judge`` training strategy turns every target with bit 1 into ``<CALL>``. Two judges:

- ``oracle:FACTS``: the perfect judge of the built-in corpus: every word of every occurrence
  of a known fact value (``FactTable.extract``, leftmost-longest) in ``facts.jsonl``.
- ``hf:DIR``: a local Hugging Face causal LM asked, as the paper's LLM judge, about each
  word (``judge.candidates=words``) or only about the words spaCy marked
  (``judge.candidates=spacy``): is it a factual detail a small model could get wrong? It
  reads a passage of the document (``PROMPT``, at most ``judge.context_chars`` characters,
  cut at a sentence end) and one question per word (``QUESTION``); the word is delegated
  when log p(Yes) - log p(No) after the question (``hf_lm.YesNo``) exceeds
  ``judge.threshold``. The passage runs once per batch of questions (its key/value cache
  copied to every question), then every question with its left padding.

Both judges give character spans of words, projected onto our subwords like the spaCy
labels (``labeling.project``, as ``label.subwords`` says). ``relabel.py`` is the step that
rewrites the shards' bit 1 with a judge.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lacy_fast.config import JudgeConfig
from lacy_fast.data.facts import FactTable
from lacy_fast.data.labeling import FLAG_FACT, project
from lacy_fast.data.tokenizer import Tokenizer
from lacy_fast.errors import UserError
from lacy_fast.hf_lm import HINT, YesNo, context_limit, first_line, import_transformers, load_causal_lm, pad_id

VERSION = 1  # of the judges' logic: part of every judge's identity, so a change relabels
_SPEC_HINT = ("pass none, oracle:FACTS.jsonl (the facts.jsonl `lacy-fast synth` wrote) or hf:DIR (a local Hugging "
              "Face causal LM)")

# Words the hf judge is asked about: letters and digits, with inner apostrophes, hyphens,
# periods and commas ("O'Neil-Smith", "1,234.5"), never whitespace or outer punctuation.
WORD = re.compile(r"[^\W_]+(?:['\u2019.,-][^\W_]+)*")
_VALUE_WORD = re.compile(r"[^\W_]+")  # the words of a fact value (letters and digits, as data/facts.py)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+|\n\s*")

PROMPT = (
    "A small language model is learning to write text like the passage below. For each word it is asked about, "
    "decide whether the small model should hand that word over to a larger model: answer Yes if the word is a "
    "factual detail that a small model could easily get wrong (a name, date, number, place, organisation, title "
    "or other specific fact), and No if it is a word that any fluent continuation could choose.\n\n"
    "Passage: {passage}\n\n"
)
QUESTION = 'Question: in "{context}", is "{word}" a factual detail to hand over? Answer:'
ANSWERS = (" Yes", " No")
LEFT_WORDS = 4  # words before the asked word quoted in the question (which occurrence is meant)
MAX_QUOTE_CHARS = 80  # a quoted context or word is cut to its last this many characters


# ----------------------------------------------------------------------------------------
# Judges
# ----------------------------------------------------------------------------------------


class Judge(Protocol):
    kind: str
    needs_candidates: bool  # spans() wants the spaCy fact spans of each text
    questions: int  # words asked so far (cost counters, cumulative)
    forward_tokens: int  # judge-model token positions computed so far

    def spans(self, texts: list[str], candidates: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Per text, the (k, 2) int64 character spans of the words to delegate, sorted, disjoint."""


def parse_spec(spec: str) -> tuple[str, str]:
    kind, _, path = spec.partition(":")
    if spec == "none":
        return "none", ""
    if kind not in ("oracle", "hf") or not path:
        raise UserError(f"--judge {spec} is not a judge; {_SPEC_HINT}")
    return kind, path


class OracleJudge:
    """Every word of every occurrence of a known fact value (leftmost-longest), from ``facts.jsonl``."""

    kind = "oracle"
    needs_candidates = False

    def __init__(self, path: str):
        if not Path(path).is_file():
            raise UserError(f"--judge oracle:{path}: {path} does not exist; pass the facts.jsonl that "
                            "`lacy-fast synth` wrote beside the corpus")
        self.path = Path(path)
        self.table = FactTable.read(path)
        self.questions = 0
        self.forward_tokens = 0

    def identity(self) -> dict[str, Any]:
        return {"kind": "oracle", "facts_sha256": hashlib.sha256(self.path.read_bytes()).hexdigest()}

    def spans(self, texts: list[str], candidates: list[np.ndarray] | None = None) -> list[np.ndarray]:
        out = []
        for text in texts:
            words = [m.span() for f in self.table.extract(text)
                     for m in _VALUE_WORD.finditer(text, f.start, f.end)]
            out.append(np.array(words, dtype=np.int64).reshape(-1, 2))
        return out


def word_spans(text: str) -> np.ndarray:
    """(W, 2) int64 character spans of the words of ``text`` (``WORD``)."""
    return np.array([m.span() for m in WORD.finditer(text)], dtype=np.int64).reshape(-1, 2)


class HFJudge:
    """A Hugging Face causal LM asked one Yes/No question per word (module doc: prompt and scoring)."""

    kind = "hf"

    def __init__(self, model: Any, tokenizer: Any, cfg: JudgeConfig, path: str):
        self.model = model
        self.tok = tokenizer
        self.cfg = cfg
        self.path = path
        self.needs_candidates = cfg.candidates == "spacy"
        self.max_positions = context_limit(model.config)
        self.answer = yes_no(tokenizer, path)
        self.pad_id = pad_id(tokenizer)
        self.device = next(model.parameters()).device
        self.questions = 0
        self.forward_tokens = 0

    # -- what is asked -----------------------------------------------------------------
    def prefix_ids(self, passage: str) -> list[int]:
        return list(self.tok(PROMPT.format(passage=passage.strip()))["input_ids"])

    def question_ids(self, text: str, words: np.ndarray, j: int) -> list[int]:
        start, end = (int(x) for x in words[j])
        first = int(words[max(j - LEFT_WORDS, 0), 0])
        context = " ".join(text[first:end].split())[-MAX_QUOTE_CHARS:]
        question = QUESTION.format(context=context, word=text[start:end][-MAX_QUOTE_CHARS:])
        return list(self.tok(question, add_special_tokens=False)["input_ids"]) + self.answer.prefix

    # -- scoring -----------------------------------------------------------------------
    def spans(self, texts: list[str], candidates: list[np.ndarray] | None = None) -> list[np.ndarray]:
        out = []
        for i, text in enumerate(texts):
            words = word_spans(text)
            if candidates is not None:
                words = words[_overlapping(words, candidates[i])]
            out.append(words[self.scores(text, words) > self.cfg.threshold])
        return out

    def scores(self, text: str, words: np.ndarray) -> np.ndarray:
        """(W,) float64: log p(Yes) - log p(No) of each word of ``text`` (spans ``words``)."""
        out = np.zeros(len(words), dtype=np.float64)
        if not len(words):
            return out
        cuts = passage_cuts(text, self.cfg.context_chars)
        which = np.searchsorted(cuts, words[:, 0], side="right") - 1  # passage of each word, by its start
        for p in np.unique(which):
            self._score_passage(text, int(cuts[p]), int(cuts[p + 1]), np.flatnonzero(which == p), words, out)
        return out

    def _score_passage(self, text: str, lo: int, hi: int, idx: np.ndarray, words: np.ndarray,
                       out: np.ndarray) -> None:
        prefix = self.prefix_ids(text[lo:hi])
        questions = [self.question_ids(text, words, int(j)) for j in idx]
        if len(prefix) + max(map(len, questions)) > self.max_positions:
            if len(idx) > 1:  # too long for the judge model: halve the passage at a word
                half = len(idx) // 2
                mid = int(words[idx[half], 0])
                self._score_passage(text, lo, mid, idx[:half], words, out)
                self._score_passage(text, mid, hi, idx[half:], words, out)
                return
            j = int(idx[0])
            first = int(words[max(j - LEFT_WORDS, 0), 0])
            if (lo, hi) != (first, int(words[j, 1])):  # the quoted words alone as the passage
                self._score_passage(text, first, int(words[j, 1]), idx, words, out)
                return
            raise UserError(f"the judge model {self.path} reads at most {self.max_positions} tokens, too few for its "
                            "prompt and one question; use a judge model with a longer context")
        step = self.cfg.batch_size
        for b in range(0, len(idx), step):
            out[idx[b:b + step]] = self.score_batch(prefix, questions[b:b + step])

    def score_batch(self, prefix: list[int], questions: list[list[int]]) -> np.ndarray:
        """(B,) log p(Yes) - log p(No) after ``prefix + questions[b]`` for each b.

        The prefix is run once and its cache repeated B times; the questions follow it
        left-padded (masked, with positions counted from the mask), so every row's answer
        is read at the last position (``logits_to_keep=1``: no (B, S, V) logits).
        """
        import torch

        n_prefix, batch, width = len(prefix), len(questions), max(map(len, questions))
        dev = self.device
        with torch.inference_mode():
            first = self.model(input_ids=torch.tensor([prefix], device=dev), use_cache=True, logits_to_keep=1)
            cache = first.past_key_values
            cache.batch_repeat_interleave(batch)
            ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((batch, n_prefix + width), dtype=torch.long)
            mask[:, :n_prefix] = 1
            for b, q in enumerate(questions):
                ids[b, width - len(q):] = torch.tensor(q)
                mask[b, n_prefix + width - len(q):] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0)[:, n_prefix:]
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        self.questions += batch
        self.forward_tokens += n_prefix + batch * width
        return self.answer.margin(logits).cpu().numpy().astype(np.float64)

    def identity(self) -> dict[str, Any]:
        return hf_identity(self.path, self.cfg)


def yes_no(tokenizer: Any, path: str) -> YesNo:
    """The judge's answer tokens: " Yes" and " No" (``ANSWERS``) tokenized alone."""
    ids = (list(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in ANSWERS)
    return YesNo.of(*ids, f"the judge model {path}")


def hf_identity(path: str, cfg: JudgeConfig) -> dict[str, Any]:
    """What determines an hf judge's labels: the model files, the prompt and the options (not speed)."""
    root = Path(path).resolve()
    files = {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.is_file()}
    config = root / "config.json"
    prompt = json.dumps([PROMPT, QUESTION, ANSWERS, LEFT_WORDS, MAX_QUOTE_CHARS, WORD.pattern])
    return {
        "kind": "hf", "path": str(root), "files": files,
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        "candidates": cfg.candidates, "threshold": cfg.threshold, "context_chars": cfg.context_chars,
    }


def passage_cuts(text: str, limit: int) -> np.ndarray:
    """Character positions ``[0, ..., len(text)]`` cutting ``text`` into passages of at most
    ``limit`` characters: at the last sentence end of the second half of each window, else at
    its last whitespace, else hard."""
    cuts = [0]
    while len(text) - cuts[-1] > limit:
        lo = cuts[-1]
        window = text[lo:lo + limit]
        cut = 0
        for m in _SENTENCE_END.finditer(window):
            cut = m.end()
        if cut <= limit // 2:
            space = max(window.rfind(" "), window.rfind("\n"))
            cut = space + 1 if space > 0 else limit
        cuts.append(lo + cut)
    cuts.append(len(text))
    return np.array(cuts, dtype=np.int64)


def _overlapping(words: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """(W,) bool: words that overlap any of ``spans`` ((k, 2), sorted)."""
    hit = np.zeros(len(words), dtype=bool)
    if len(words) and len(spans):
        w = project(words[:, 0].copy(), words[:, 1].copy(), spans[:, 0].copy(), spans[:, 1].copy(), "all")
        hit[w[w >= 0]] = True
    return hit


def check_hf(path: str, cfg: JudgeConfig) -> None:
    """Refuse, in one sentence, a directory that is not a local causal LM with a usable tokenizer
    (cheap: config, tokenizer and the presence of weights; the workers load the weights)."""
    spec = f"hf:{path}"
    root, hint = Path(path), HINT
    if not root.is_dir():
        raise UserError(f"--judge {spec}: {path} is not a directory; {hint}")
    try:
        meta = json.loads((root / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or "model_type" not in meta:
        raise UserError(f"--judge {spec}: {path} is not a Hugging Face model (no config.json with a model_type); "
                        f"{hint}")
    transformers = import_transformers(f"--judge {spec}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"--judge {spec}: cannot read its config ({first_line(err)}); {hint}")
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"--judge {spec}: {path} holds a {meta['model_type']} model, not a causal LM; {hint}")
    if not any(p.suffix in (".safetensors", ".bin", ".pt", ".pth") for p in root.iterdir()):
        raise UserError(f"--judge {spec}: {path} holds no model weights (*.safetensors or *.bin); {hint}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--judge {spec}: cannot load its tokenizer ({first_line(err)}); {hint}")
    yes_no(tokenizer, path)
    limit = context_limit(config)
    need = len(tokenizer(PROMPT.format(passage="x"))["input_ids"]) + len(
        tokenizer(QUESTION.format(context="a b c d x", word="x"), add_special_tokens=False)["input_ids"]) + 2
    if need > limit:
        raise UserError(f"the judge model {path} reads at most {limit} tokens, fewer than its prompt and one question "
                        f"need ({need}); use a judge model with a longer context")


def load_hf(path: str, cfg: JudgeConfig) -> HFJudge:
    model, tokenizer = load_causal_lm(path, cfg.device, flag=f"--judge hf:{path}")
    return HFJudge(model, tokenizer, cfg, str(path))


def load_judge(cfg: JudgeConfig) -> Judge | None:
    """The judge ``cfg.spec`` names (None for ``none``), loaded in full."""
    kind, path = parse_spec(cfg.spec)
    if kind == "oracle":
        return OracleJudge(path)
    if kind == "hf":
        return load_hf(path, cfg)
    return None


def describe(cfg: JudgeConfig, subwords: str) -> dict[str, Any]:
    """The identity of the judge ``cfg.spec`` names, checked cheaply (raises UserError when unusable)."""
    kind, path = parse_spec(cfg.spec)
    if kind == "oracle":
        identity = OracleJudge(path).identity()
    else:
        check_hf(path, cfg)
        identity = hf_identity(path, cfg)
    return {**identity, "subwords": subwords, "version": VERSION}


# ----------------------------------------------------------------------------------------
# Labeling: spans -> flag bit 1
# ----------------------------------------------------------------------------------------


def judge_documents(judge: Judge, tokenizer: Tokenizer, texts: list[str], ids: list[np.ndarray],
                    fact_flags: list[np.ndarray] | None, subwords: str) -> list[np.ndarray]:
    """(T_i,) bool per document: the subwords of ``ids[i]`` (encoded from ``texts[i]``, no EOS)
    that the judge delegates. ``fact_flags``: the documents' flags, for ``judge.candidates=spacy``."""
    offsets = [tokenizer.offsets(t, i.tolist()) for t, i in zip(texts, ids)]
    candidates = None
    if judge.needs_candidates:
        candidates = [np.stack([s, e], 1)[(f[:len(s)] & FLAG_FACT) != 0] for (_, s, e), f in zip(offsets, fact_flags)]
    spans = judge.spans(texts, candidates)
    # Documents end to end in one character space (a gap between them) to project at once.
    base = np.cumsum([0] + [len(t) + 1 for t in texts])[:-1]

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([p + b for p, b in zip(parts, base)]) if parts else np.zeros(0, np.int64)

    word_of_tok = project(cat([s[:, 0] for s in spans]), cat([s[:, 1] for s in spans]), cat([o[1] for o in offsets]),
                          cat([o[2] for o in offsets]), subwords)
    flagged = word_of_tok >= 0
    out, start = [], 0
    for o in offsets:
        out.append(flagged[start:start + len(o[0])])
        start += len(o[0])
    return out
