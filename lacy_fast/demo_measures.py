"""What the demo measured, as the numbers of its results.json and report.md.

- ``measures``: one evaluation's numbers beside what its training run realised
  (``training_summary``), one dict per seed;
- ``mean_row``: one table row per (strategy, mode), the mean over seeds and the spread of
  ``SPREAD``;
- ``curve_point``, ``curve_area``, ``add_curves``: the FactScore-vs-budget curve of every
  cascade row and its area;
- ``regime_stats``: the corpus-side diagnostics of the regime.

``demo_report`` renders these numbers as Markdown; ``demo`` runs the pipeline that produces them.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------
# Rows: one per (strategy, mode), means over seeds
# ----------------------------------------------------------------------------------------

# Measures averaged over seeds (with a spread for those marked).
SPREAD = ("factscore", "factscore_frequent", "factscore_rare", "call_auc", "selection_persistence", "probe_fact_nll")


def training_summary(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """What the training run realised: steps, ground-truth tokens, the share of <CALL> targets;
    for the ranked strategies the selection persistence and its chance level over the second
    half of training; the probe's last ground-truth nll of the frequent people's facts."""
    rates = [r["call_rate"] for r in metrics if r.get("call_rate") is not None]
    late = [r for r in metrics if r["step"] > metrics[-1]["step"] / 2]

    def late_mean(key: str) -> float | None:
        values = [r[key] for r in late if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    probed = [r for r in metrics if r.get("probe_judge_nll") is not None]
    return {"train_steps": metrics[-1]["step"], "gt_tokens": metrics[-1].get("gt_tokens"),
            "train_call_rate": sum(rates) / len(rates) if rates else 0.0,
            "selection_persistence": late_mean("selection_persistence"),
            "selection_chance": late_mean("selection_chance"),
            "probe_fact_nll": probed[-1]["probe_judge_nll"] if probed else None}


def measures(result: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    calls = result["calls"]
    return {
        "factscore": result["factscore"],
        "factscore_frequent": result.get("factscore_frequent"),
        "factscore_rare": result.get("factscore_rare"),
        "call_rate": result["call_rate"],
        "leakage": result["leakage"],
        "perplexity": result["perplexity"],
        "call_auc": calls["auc"],
        "call_auc_first": calls["auc_first"],
        "calls_unknown_fact": calls["landing"]["unknown_fact"],
        "calls_known_fact": calls["landing"]["known_fact"],
        "calls_free": calls["landing"]["free"],
        "calls_other": calls["landing"]["other"],
        "call_precision": calls["precision"],
        "call_recall": calls["recall"],
        "mean_p_call_fact": calls["mean_p_call_fact"],
        "mean_p_call_other": calls["mean_p_call_other"],
        "facts_per_generation": result["factscore_detail"]["facts_per_generation"],
        **training,
        "score": result["score"],
        "handoff": result.get("handoff"),  # what one answered call supplies: word, or value (the upper bound)
    }


def mean_row(strategy: str, mode: str, values: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds (None where any seed has None), and the spread of SPREAD measures."""
    row: dict[str, Any] = {"strategy": strategy, "mode": mode, "seeds": len(values)}
    for key, first in values[0].items():
        column = [v[key] for v in values]
        if isinstance(first, str):
            row[key] = first
        elif any(c is None for c in column):
            row[key] = None
        else:
            row[key] = statistics.fmean(column)
            if key in SPREAD and len(column) > 1:
                row[f"{key}_std"] = statistics.stdev(column)
    return row


# ----------------------------------------------------------------------------------------
# The budget curve
# ----------------------------------------------------------------------------------------


def curve_point(budget: float, result: dict[str, Any]) -> dict[str, Any]:
    """A budget-curve point (as ``eval.run.sweep`` writes it) from an ``evaluate`` result."""
    fs = result["factscore_detail"]
    gen = result["generation"]
    return {"budget": budget, "call_rate": result["call_rate"], "answered_rate": gen["answered_rate"],
            "steps": gen["steps"], "calls": gen["calls"],
            "factscore": fs["factscore"], "factscore_micro": fs["micro"],
            **{f"factscore_{b}": f["factscore"] for b, f in result["factscore_by_bucket"].items()},
            "facts_per_generation": fs["facts_per_generation"],
            "supported_per_generation": fs["supported_per_generation"], "share_with_facts": fs["share_with_facts"]}


def curve_area(points: list[dict[str, Any]]) -> float | None:
    """Trapezoid area of FactScore against the nominal budget, divided by the budgets' width:
    a mean FactScore over the budgets (None when a point states no fact)."""
    points = sorted(points, key=lambda p: p["budget"])
    if len(points) < 2 or any(p["factscore"] is None for p in points):
        return None
    area = sum((b["budget"] - a["budget"]) * (a["factscore"] + b["factscore"]) / 2 for a, b in zip(points, points[1:]))
    return area / (points[-1]["budget"] - points[0]["budget"])


def add_curves(rows: list[dict[str, Any]], curves: dict[str, list[list[dict[str, Any]]]]) -> None:
    """Each cascade row gets ``curve_area`` (mean over seeds), ``curve_area_std`` (None with
    one seed or a missing area) and ``curve``: per budget, the mean FactScore, its spread,
    and the realised call rate (mean, min and max over seeds)."""
    def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
        if not values or any(v is None for v in values):
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    for row in rows:
        per_seed = curves.get(row["strategy"]) if row["mode"] == "cascade" else None
        if not per_seed:
            continue
        row["curve_area"], row["curve_area_std"] = mean_std([curve_area(points) for points in per_seed])
        row["curve"] = []
        for i, first in enumerate(per_seed[0]):
            at = [points[i] for points in per_seed]
            fs, fs_std = mean_std([p["factscore"] for p in at])
            rates = [p["call_rate"] for p in at]
            row["curve"].append({"budget": first["budget"], "factscore": fs, "factscore_std": fs_std,
                                 "call_rate": statistics.fmean(rates), "call_rate_min": min(rates),
                                 "call_rate_max": max(rates)})


# ----------------------------------------------------------------------------------------
# The regime's diagnostics
# ----------------------------------------------------------------------------------------


def regime_stats(corpus: Path, data: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """Corpus-side facts of the regime: buckets, and what spaCy's rule flags on the held-out
    texts, whose fact values and free-wording spans are known: how much free wording it
    takes for a fact, how many value tokens it finds, and what else it flags."""
    import numpy as np

    from lacy_fast.config import LabelConfig
    from lacy_fast.data.facts import FactTable, read_heldout, value_spans
    from lacy_fast.data.labeling import FLAG_FACT, FactLabeler
    from lacy_fast.data.tokenizer import Tokenizer

    people = [json.loads(line) for line in (corpus / "facts.jsonl").open()]
    held = read_heldout(corpus / "heldout.jsonl", FactTable.read(corpus / "facts.jsonl"))
    tok = Tokenizer.load(data / "tokenizer.model")
    labeled = FactLabeler(LabelConfig(), tok).label_batch([h.text for h in held])
    n = {"tokens": 0, "flagged": 0, "free": 0, "flagged_free": 0, "value": 0, "flagged_value": 0}
    for h, (_, flags) in zip(held, labeled):
        _, starts, ends = tok.encode_with_offsets(h.text)
        fact = (flags[: len(starts)] & FLAG_FACT) != 0  # (T,)

        def inside(spans) -> np.ndarray:
            return np.array([any(s < e_ and e > s_ for s_, e_ in spans) for s, e in zip(starts, ends)], dtype=bool)

        free, value = inside(h.free), inside(value_spans(h.text, h.person).values())
        for key, mask in (("tokens", np.ones_like(fact)), ("flagged", fact), ("free", free),
                          ("flagged_free", fact & free), ("value", value), ("flagged_value", fact & value)):
            n[key] += int(mask.sum())
    frequent = [p for p in people if p["bucket"] == "frequent"]
    statements = sum(p["documents"] * len(p["facts"]) for p in people)  # every biography states all its facts
    rare_statements = sum(p["documents"] * len(p["facts"]) for p in people if p["bucket"] == "rare")

    def share(a: str, b: str) -> float:
        return n[a] / n[b] if n[b] else 0.0

    return {
        "people": len(people), "frequent": len(frequent),
        "rare_fact_share": rare_statements / statements if statements else 0.0,
        "documents": sum(p["documents"] for p in people),
        "frequent_documents": sum(p["documents"] for p in frequent),
        "free_token_share": share("free", "tokens"),
        "free_share_of_fact_flags": share("flagged_free", "flagged"),
        "free_flagged": share("flagged_free", "free"),
        "values_flagged": share("flagged_value", "value"),
        "value_share_of_fact_flags": share("flagged_value", "flagged"),
        "fact_fraction": stats["fact_fraction"],
    }
