"""The ``combined`` call score: p(<CALL>) and the SLM's own uncertainty, as one rank product.

    calib = calibrate(slm, "synth/corpus.jsonl", exclude={p.id for p in evaluated})
    score = calib.combined(logits, call_id)  # (N,) in (0, 1), higher: call

A LaCy-trained SLM signals with p(<CALL>) what it was taught to delegate; its own entropy
says what it does not know. Neither scale compares with the other, so each is mapped to its
*rank*: its empirical CDF over the positions of a teacher-forced pass over training
documents (``u = F(x)``, in (0, 1)). The call score is the product ``u_call x u_entropy``:
high only where both are high, and monotone in each (a rank product, no weight to fit).
The rules then treat it like any score; the budget rule calls on its top share.

The CDFs come from documents of the SLM's *training* corpus about people who are never
evaluated: ``exclude`` holds every person of the held-out file, so the calibration never
reads an evaluated person's text, whichever number of them an evaluation takes. They are
computed once per SLM and corpus and stored beside the export (``call_calibration.json``:
at most ``POINTS`` quantiles of each score, the corpus and the documents read); a later
evaluation with the same corpus and exclusions reads them back.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lacy_fast.cascade.rules import call_scores
from lacy_fast.cascade.slm import ExportedModel, context_ids
from lacy_fast.data.facts import FactTable
from lacy_fast.errors import UserError
from lacy_fast.fileio import write_json

KINDS = ("call_logodds", "entropy")  # the two scores the product ranks
POINTS = 4096  # quantiles of each score kept
FILE = "call_calibration.json"


@dataclass
class Calibration:
    """Sorted reference values of each score in ``KINDS``; ``meta`` says where they come from."""

    values: dict[str, np.ndarray]  # kind -> (K,) float64, ascending
    meta: dict[str, Any]

    def cdf(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """(N,) scores -> (N,) their mid-rank empirical CDF, (count below + count equal / 2 + 1/2) / (K + 1)."""
        ref = torch.from_numpy(self.values[kind]).to(device=x.device, dtype=torch.float64)  # (K,)
        x = x.double()
        below = torch.searchsorted(ref, x, right=False)  # (N,) reference values < x
        upto = torch.searchsorted(ref, x, right=True)  # (N,) reference values <= x
        return ((below + upto).double() / 2 + 0.5) / (len(ref) + 1)

    def combined(self, logits: torch.Tensor, call_id: int) -> torch.Tensor:
        """(N, V) logits -> (N,) fp32 rank product of p(<CALL>) and the SLM's entropy."""
        raw = call_scores(logits, call_id, KINDS)
        return (self.cdf("call_logodds", raw["call_logodds"]) * self.cdf("entropy", raw["entropy"])).float()

    def rank_product(self, call_logodds: np.ndarray, entropy: np.ndarray) -> np.ndarray:
        """``combined`` from scores already computed (``call_scores``), (T,) float32 each."""
        u = self.cdf("call_logodds", torch.from_numpy(call_logodds)) * self.cdf("entropy", torch.from_numpy(entropy))
        return u.float().numpy()


def calibration_documents(corpus: str | Path, table: FactTable, exclude: set[int], documents: int) -> list[str]:
    """The first ``documents`` texts of ``corpus`` (JSONL of {"text"}) about a known person not
    in ``exclude`` (ids) that name no person of ``exclude`` either (a biography may mention others)."""
    path = Path(corpus)
    if not path.is_file():
        raise UserError(f"training corpus {path} does not exist; the combined call score calibrates on it (pass the "
                        "corpus.jsonl the SLM was trained on, written by `lacy-fast synth` beside facts.jsonl)")
    names = [table.by_id[i].name for i in exclude if i in table.by_id]
    out = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{n} is not a corpus row {{\"text\"}}; pass corpus.jsonl of `lacy-fast synth`")
            person = table.person_in(text)
            if person is not None and person.id not in exclude and not any(n in text for n in names):
                out.append(text)
                if len(out) == documents:
                    break
    if not out:
        raise UserError(f"training corpus {path} holds no document about a person outside the evaluation; the "
                        "combined call score needs some to calibrate on")
    return out


@torch.inference_mode()
def calibrate(slm: ExportedModel, corpus: str | Path, table: FactTable, exclude: set[int], *, documents: int = 64,
              device: torch.device | str = "cpu") -> Calibration:
    """The CDFs of ``KINDS`` for ``slm`` (read back from its export when stored with the same inputs)."""
    key = {"corpus": str(Path(corpus).resolve()), "corpus_bytes": Path(corpus).stat().st_size
           if Path(corpus).is_file() else None, "documents": documents,
           "excluded": hashlib.sha256("\n".join(map(str, sorted(exclude))).encode()).hexdigest()}
    stored = slm.path / FILE
    if stored.is_file():
        try:
            data = json.loads(stored.read_text())
            if data["key"] == key:
                return Calibration({k: np.asarray(data["values"][k], dtype=np.float64) for k in KINDS}, data["meta"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # damaged or older: computed again below
    texts = calibration_documents(corpus, table, exclude, documents)
    model, tok = slm.model, slm.tokenizer
    seen: dict[str, list[np.ndarray]] = {k: [] for k in KINDS}
    rows = sorted((context_ids(tok, t)[: model.cfg.max_seq_len] for t in texts), key=len)
    for start in range(0, len(rows), 16):
        chunk = rows[start:start + 16]
        # Right padding: causal attention never lets a real position see the padding after it.
        ids = torch.full((len(chunk), len(chunk[-1])), tok.eos_id, dtype=torch.long)  # (B, T)
        for r, row in enumerate(chunk):
            ids[r, : len(row)] = torch.tensor(row)
        hidden = model(ids.to(device))  # (B, T, D)
        for r, row in enumerate(chunk):
            logits = model.logits(hidden[r, : len(row)]).float()  # (T, V)
            for k, v in call_scores(logits, tok.call_id, KINDS).items():
                seen[k].append(v.double().cpu().numpy())
    values = {}
    for k in KINDS:
        everything = np.sort(np.concatenate(seen[k]))
        values[k] = everything if len(everything) <= POINTS else np.quantile(everything, np.linspace(0, 1, POINTS))
    meta = {"documents": len(texts), "positions": int(sum(len(v) for v in seen[KINDS[0]])), "corpus": key["corpus"],
            "excluded_people": len(exclude)}
    try:
        write_json(stored, {"key": key, "meta": meta, "values": {k: v.tolist() for k, v in values.items()}})
    except OSError:
        pass  # a read-only export: the calibration is only kept for this process
    return Calibration(values, meta)
