"""A knowledge source: one article per entity, split into passages, retrieved with BM25.

    kb = KnowledgeBase.read("wiki_bios.jsonl")            # {"title", "text"} per line
    passages = kb.retrieve("Ada Lovelace", "born in London in 1815", k=5)

As FActScore (Min et al. 2023) does, a fact about an entity is checked against passages of
*that entity's* article only: retrieval ranks the passages of the article the title names,
never another entity's, so a generation earns nothing for facts of someone else.

Passages: the article's paragraphs (blank-line separated), each cut at sentence ends into
passages of at most ``passage_words`` words (a longer sentence is a passage of its own).
FActScore cuts articles into 256-token passages and retrieves 5; 120 words and k=5 are the
same order of size.

Retrieval: ``bm25s`` (BM25, Lucene's variant; sparse matrices, numpy only) indexes every
passage of the source once, lower-cased words of two or more characters, English stop words
removed; a query is scored against the passages of one article through bm25s' weight mask,
which leaves every other article's passages at score 0. A query with no indexed word
returns the article's passages in article order.

Titles: exact, or equal after case folding and collapsing whitespace. A title that is not
in the source is a ``UserError`` (one sentence, exit code 2).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lacy_fast.errors import UserError
from lacy_fast.fileio import jsonl_string_pairs

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")
KB_HINT = 'a JSONL knowledge source, one {"title": ..., "text": ...} per line'


def title_key(title: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", title).casefold().split())


@dataclass(frozen=True)
class Passage:
    title: str
    index: int  # position in its article
    text: str


def split_passages(text: str, max_words: int) -> list[str]:
    """Paragraphs cut at sentence ends into passages of at most ``max_words`` words."""
    out = []
    for para in _PARAGRAPH.split(text):
        current: list[str] = []
        words = 0
        for sentence in _SENTENCE_END.split(para.strip()):
            n = len(sentence.split())
            if not n:
                continue
            if current and words + n > max_words:
                out.append(" ".join(current))
                current, words = [], 0
            current.append(sentence)
            words += n
        if current:
            out.append(" ".join(current))
    return out


class KnowledgeBase:
    """Articles by title, their passages, and a BM25 index over all passages."""

    def __init__(self, articles: dict[str, str], path: Path | None = None, passage_words: int = 120):
        import bm25s  # imported here: `lacy-fast --help` never pays for it

        self.path = path
        self.articles = articles
        self.keys = {title_key(t): t for t in articles}
        self.passages: list[Passage] = []
        self.by_title: dict[str, np.ndarray] = {}  # title -> (P,) indices into self.passages
        for title, text in articles.items():
            start = len(self.passages)
            self.passages += [Passage(title, i, p) for i, p in enumerate(split_passages(text, passage_words))]
            self.by_title[title] = np.arange(start, len(self.passages))
        self.tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
        corpus = self.tokenizer.tokenize([p.text for p in self.passages], show_progress=False, return_as="ids")
        self.index = bm25s.BM25()
        self.index.index(corpus, show_progress=False)

    @classmethod
    def read(cls, path: str | Path, passage_words: int = 120) -> "KnowledgeBase":
        path = Path(path)
        articles: dict[str, str] = {}
        for n, title, text in jsonl_string_pairs(path, ("title", "text"), "knowledge source", "knowledge-source",
                                                 KB_HINT):
            if not title.strip():
                raise UserError(f"{path}:{n} has an empty title; give each article its entity's name")
            if title in articles:
                raise UserError(f"{path}:{n} repeats the title {title!r}; give each entity one article")
            articles[title] = text
        return cls(articles, path, passage_words)

    def resolve(self, title: str, where: str = "") -> str:
        """The source's own spelling of ``title``; ``where`` (e.g. "gen.jsonl:3") names it in the error."""
        if title in self.articles:
            return title
        found = self.keys.get(title_key(title))
        if found is None:
            at = f" ({where})" if where else ""
            source = f"the knowledge source {self.path}" if self.path else "the knowledge source"
            raise UserError(f"title {title!r}{at} is not in {source}; add its article or score only titles the "
                            "source has")
        return found

    def retrieve(self, title: str, query: str, k: int = 5) -> list[Passage]:
        """The ``k`` passages of ``title``'s article that BM25 ranks highest for ``query``."""
        ids = self.by_title[self.resolve(title)]
        k = min(k, len(ids))
        if k == 0:
            return []
        tokens = self.tokenizer.tokenize([query], update_vocab=False, show_progress=False, return_as="ids")
        if len(ids) <= k or not tokens[0]:
            return [self.passages[i] for i in ids[:k]]
        mask = np.zeros(len(self.passages), dtype=np.float32)
        mask[ids] = 1.0
        found, scores = self.index.retrieve(tokens, k=k, show_progress=False, weight_mask=mask)
        ranked = [int(i) for i, s in zip(found[0], scores[0]) if mask[int(i)] and s > 0]
        rest = [int(i) for i in ids if int(i) not in ranked]  # zero-score passages, in article order
        return [self.passages[i] for i in (ranked + rest)[:k]]
