"""Short human tables of evaluation results (``lacy_fast.eval.run.evaluate``).

    print(format_table({"lacy": result_a, "none": result_b}))   # models side by side
    print(format_report(result))                                 # one model, with details
"""
from __future__ import annotations

from typing import Any, Callable

# column header -> value of a result
COLUMNS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("FactScore", lambda r: r["factscore"], "{:.3f}"),
    ("micro", lambda r: r["factscore_detail"]["micro"], "{:.3f}"),
    ("facts/gen", lambda r: r["factscore_detail"]["facts_per_generation"], "{:.2f}"),
    ("call rate", lambda r: r["call_rate"], "{:.1%}"),
    ("leakage", lambda r: r["leakage"], "{:.3f}"),
    ("call P", lambda r: r["calls"]["precision"], "{:.3f}"),
    ("call R", lambda r: r["calls"]["recall"], "{:.3f}"),
    ("ppl", lambda r: r["perplexity"], "{:.2f}"),
]


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per result, aligned; missing values (None) show as '-'."""
    header = ["model"] + [name for name, _, _ in COLUMNS]
    rows = [[name] + [_cell(get(r), fmt) for _, get, fmt in COLUMNS] for name, r in results.items()]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_report(result: dict[str, Any], name: str = "slm") -> str:
    """The table for one result, then how its numbers were obtained and a few marked samples."""
    fs, gen, calls, leak, ppl = (result["factscore_detail"], result["generation"], result["calls"],
                                 result["leakage_detail"], result["perplexity_detail"])
    lines = [
        f"SLM {result['slm']} | big {result['big']} | rule {result['rule']} | {result['people']} people",
        "",
        format_table({name: result}),
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
