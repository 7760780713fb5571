"""Short human tables of evaluation results (``lacy_fast.eval.run.evaluate``).

    print(format_table({"lacy": result_a, "none": result_b}))   # models side by side
    print(format_report(result))                                 # one model, with details

``eval --facts`` and ``eval --knowledge`` print the same table (``format_rows``): one row
per mode, ``alone`` (the SLM, nothing called) or ``cascade`` (the SLM calling the big model).
"""
from __future__ import annotations

from typing import Any

# One layout for every evaluation: a row per mode (alone, cascade) or model, these columns.
# A row is flat (``facts_row``, ``knowledge_row``); a measure a source cannot give is '-'
# (leakage, held-out calls and perplexity need held-out text: the synthetic fact table only).
COLUMNS: list[tuple[str, str, str]] = [
    ("FactScore", "factscore", "{:.3f}"),
    ("micro", "micro", "{:.3f}"),
    ("facts/gen", "facts_per_generation", "{:.2f}"),
    ("with facts", "share_with_facts", "{:.0%}"),
    ("call rate", "call_rate", "{:.1%}"),
    ("leakage", "leakage", "{:.3f}"),
    ("call P", "call_precision", "{:.3f}"),
    ("call R", "call_recall", "{:.3f}"),
    ("ppl", "perplexity", "{:.2f}"),
]


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def facts_row(result: dict[str, Any]) -> dict[str, Any]:
    """The row of an ``evaluate`` result (synthetic fact table)."""
    fs = result["factscore_detail"]
    return {"factscore": result["factscore"], "micro": fs["micro"], "facts_per_generation": fs["facts_per_generation"],
            "share_with_facts": fs.get("share_with_facts"), "call_rate": result["call_rate"],
            "leakage": result["leakage"], "call_precision": result["calls"]["precision"],
            "call_recall": result["calls"]["recall"], "perplexity": result["perplexity"]}


def knowledge_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The row of one mode of an ``evaluate_knowledge`` result (a knowledge source)."""
    return {"factscore": summary["factscore"], "micro": summary.get("micro"),
            "facts_per_generation": summary["facts_per_generation"], "share_with_facts": summary["share_with_facts"],
            "call_rate": summary["generation"]["call_rate"]}


def mode_of(result: dict[str, Any]) -> str:
    """'cascade' when the SLM called a big model, 'alone' otherwise."""
    return "alone" if result.get("big", "none") == "none" else "cascade"


def format_rows(rows: dict[str, dict[str, Any]], first: str = "mode") -> str:
    """One aligned line per row (flat rows, see COLUMNS); missing values show as '-'."""
    header = [first] + [name for name, _, _ in COLUMNS]
    cells = [[name] + [_cell(r.get(key), fmt) for _, key, fmt in COLUMNS] for name, r in rows.items()]
    widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]

    def line(values: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(values, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """``evaluate`` results side by side, one row per model."""
    return format_rows({name: facts_row(r) for name, r in results.items()}, first="model")


def format_report(result: dict[str, Any], name: str | None = None) -> str:
    """The table for one result, then how its numbers were obtained and a few marked samples."""
    fs, gen, calls, leak, ppl = (result["factscore_detail"], result["generation"], result["calls"],
                                 result["leakage_detail"], result["perplexity_detail"])
    lines = [
        f"SLM {result['slm']} | big {result['big']} | rule {result['rule']} | {result['people']} people",
        "",
        format_rows({name or mode_of(result): facts_row(result)}),
        "",
        f"FactScore: {fs['supported']}/{fs['stated']} facts supported over {fs['generations']} generations; "
        f"{_cell(fs['share_with_facts'], '{:.0%}')} state a fact (macro: mean per generation that states one)",
        f"generation: {gen['steps']} steps, {gen['calls']} calls ({gen['answered']} answered), "
        f"{_cell(gen['big_token_share'], '{:.1%}')} of tokens from the big model, "
        f"{gen['tokens_per_generation']:.1f} tokens per generation",
        f"held-out calls (rule {result['rule_heldout']}): rate {_cell(calls['call_rate'], '{:.1%}')}, recall of first "
        f"value tokens {_cell(calls['recall_first'], '{:.3f}')}, mean p(CALL) {_cell(calls['mean_p_call_fact'], '{:.3g}')}"
        f" on facts vs {_cell(calls['mean_p_call_other'], '{:.3g}')} elsewhere",
        f"leakage: {leak['leaked']}/{leak['facts']} held-out facts reproduced with <CALL> forbidden; perplexity "
        f"{_cell(ppl['fact'], '{:.2f}')} on fact tokens, {_cell(ppl['other'], '{:.2f}')} elsewhere",
    ]
    if result.get("samples"):
        lines += ["", "samples ([[...]]: from the big model; facts: + supported, - not):"]
        for s in result["samples"]:
            facts = " ".join(f"{'+' if f['supported'] else '-'}{f['attribute']}={f['value']}" for f in s["facts"])
            lines += [f"  {s['marked']}", f"    facts: {facts or 'none'}"]
    return "\n".join(lines)
