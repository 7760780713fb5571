"""FactScore scorer speed (atomic facts per second) and its verdicts on known cases.

    python bench/bench_factscore.py [--people 200] [--no-record]

The knowledge source is the built-in corpus: one article per person (their corpus
biography). Generations, per person, all scored in one run with the default judge
(``rules``, no model), one thread:
- ``paraphrase``: the person's held-out rendering: the same facts through other templates
  than the article's. Every checkable claim is true, so the share supported is the judge's
  recall on paraphrased true facts.
- ``changed year``: the paraphrase with the birth year moved by one (a false date).
- ``other person``: another person's held-out rendering, scored as this person's: every fact
  belongs to someone else.
Measured: facts/s and generations/s over everything the scorer does (spaCy on generations
and retrieved passages, BM25 retrieval, matching; the source's index and spaCy's loading
excluded), the share of facts supported per case, and, for ``changed year``, the share of
generations whose year is judged unsupported.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lacy_fast.data.labeling import single_threaded  # noqa: E402

single_threaded()

from harness import env_info, print_table, record  # noqa: E402

from lacy_fast.data import synth  # noqa: E402
from lacy_fast.data.facts import FactTable, read_heldout  # noqa: E402
from lacy_fast.data.labeling import load_spacy  # noqa: E402
from lacy_fast.eval.verify import RuleVerifier  # noqa: E402
from lacy_fast.eval.knowledge import KnowledgeBase  # noqa: E402
from lacy_fast.eval.sources import KnowledgeSource, summarize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--people", type=int, default=200, help="people scored (default 200)")
    parser.add_argument("--no-record", action="store_true", help="print only, append no row")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        synth.write(tmp, 2000, seed=0, heldout=0.5)
        table = FactTable.read(Path(tmp) / "facts.jsonl")
        held = read_heldout(Path(tmp) / "heldout.jsonl", table)[: args.people]
        corpus = (Path(tmp) / "corpus.jsonl").read_text().splitlines()
    # corpus line i is person i's biography (rendering 0)
    articles = {person.name: json.loads(line)["text"] for person, line in zip(table.people, corpus)}
    rng = random.Random(0)
    cases: dict[str, list[tuple[str, str]]] = {"paraphrase": [], "changed year": [], "other person": []}
    for h in held:
        cases["paraphrase"].append((h.person.name, h.text))
        date = h.person.facts["birth_date"]
        year = int(date.split()[-1])
        cases["changed year"].append((h.person.name, h.text.replace(date, f"{date[:-4]}{year + rng.choice((-1, 1))}")))
        other = held[(held.index(h) + 1) % len(held)]
        cases["other person"].append((h.person.name, other.text))

    nlp = load_spacy(full=True)
    t0 = time.perf_counter()
    kb = KnowledgeBase(articles)
    index_seconds = time.perf_counter() - t0
    rows = []
    for name, pairs in cases.items():
        source = KnowledgeSource(kb, RuleVerifier(nlp), nlp)  # a fresh judge: article passages parsed anew
        start = time.perf_counter()
        items = source.score(pairs)
        seconds = time.perf_counter() - start
        s = summarize(items)
        row = {"provider": "rules", "case": name, "generations": len(items), "facts": s["facts"],
               "seconds": seconds, "facts_per_s": s["facts"] / seconds, "generations_per_s": len(items) / seconds,
               "supported_share": s["micro"], "facts_per_generation": s["facts_per_generation"],
               "articles": len(articles), "passages": len(kb.passages), "index_seconds": index_seconds}
        if name == "changed year":
            caught = sum(not any(f["supported"] for f in i.facts if f["kind"] == "date") for i in items)
            row["year_caught_share"] = caught / len(items)
        rows.append(row)
    print_table(rows, ["case", "generations", "facts", "facts_per_s", "generations_per_s", "supported_share",
                       "year_caught_share", "index_seconds"])
    if not args.no_record:
        print(f"rows appended to {record('factscore', rows, env_info('cpu'))}")


if __name__ == "__main__":
    main()
