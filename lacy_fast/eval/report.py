"""Short human tables of FactScore results: of ``run.evaluate`` and of ``lacy-fast factscore``.

    print(format_table({"lacy": result_a, "none": result_b}))   # models side by side
    print(format_report(result))                                 # one evaluation, with details
    print(format_scores(result, out))                            # scored generations

Every evaluation prints the same table (``format_rows``): one row per mode, ``alone`` (the
SLM, nothing called) or ``cascade`` (the SLM calling the big model).
"""
from __future__ import annotations

from typing import Any

# One layout for every evaluation: a row per mode (alone, cascade) or model, these columns.
# A row is flat (``row``); a measure a source cannot give is '-'
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


def row(summary: dict[str, Any], call_rate: float | None, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat row of a FactScore summary (``sources.summarize``) and the held-out measures of
    ``result`` where it has them."""
    out = {"factscore": summary["factscore"], "micro": summary.get("micro"),
           "facts_per_generation": summary["facts_per_generation"], "share_with_facts": summary.get("share_with_facts"),
           "call_rate": call_rate}
    if result is not None and "calls" in result:
        out.update(leakage=result["leakage"], call_precision=result["calls"]["precision"],
                   call_recall=result["calls"]["recall"], perplexity=result["perplexity"])
    return out


def _rows(result: dict[str, Any], name: str | None = None) -> dict[str, dict[str, Any]]:
    """An evaluation's rows: its mode (or ``name``), or each mode apart (a source without held-out text)."""
    if "factscore_detail" in result:
        return {name or mode_of(result): row(result["factscore_detail"], result["call_rate"], result)}
    return {mode: row(result[mode], result[mode]["generation"]["call_rate"]) for mode in ("alone", "cascade")
            if mode in result}


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
    return format_rows({name: row for name, r in results.items() for row in _rows(r, name).values()}, first="model")


def format_report(result: dict[str, Any], name: str | None = None) -> str:
    """The table for one evaluation, then how its numbers were obtained and a few marked samples."""
    lines = [f"SLM {result['slm']} | big {result['big']} | rule {result['rule']} | "
             + (f"{result['people']} people" if "factscore_detail" in result else
                f"{result['people']} titles of {result['knowledge']} | judge {result['judge']}"), "",
             format_rows(_rows(result, name)), ""]
    lines += _heldout_lines(result) if "factscore_detail" in result else _modes_lines(result)
    if result.get("samples"):
        lines += ["", "samples ([[...]]: from the big model; facts: + supported, - not):"]
        for s in result["samples"]:
            facts = " ".join(f"{'+' if f['supported'] else '-'}" + (f"{f['attribute']}={f['value']}" if "attribute" in f
                                                                    else f["text"]) for f in s["facts"])
            lines += [f"  {s['marked']}", f"    facts: {facts or 'none'}"]
    return "\n".join(lines)


def _heldout_lines(result: dict[str, Any]) -> list[str]:
    fs, gen, calls, leak, ppl = (result["factscore_detail"], result["generation"], result["calls"],
                                 result["leakage_detail"], result["perplexity_detail"])
    return [
        f"FactScore: {fs['supported']}/{fs['facts']} facts supported over {fs['generations']} generations; "
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


def _modes_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"{mode}: {result[mode]['supported']}/{result[mode]['facts']} facts supported"
             for mode in ("alone", "cascade") if mode in result]
    return lines + ["", f"leakage, held-out calls, perplexity: not reported ({result['leakage_note']})"]


def format_sweep(points: list[dict[str, Any]]) -> str:
    """One line per budget of ``run.sweep``."""
    lines = ["", "sweep (budget -> call rate, FactScore, supported facts per generation):"]
    for p in points:
        lines.append(f"  {p['budget']:.2f} -> {p['call_rate']:.1%}, {_cell(p['factscore'], '{:.3f}')}, "
                     f"{p['supported_per_generation']:.2f}")
    return "\n".join(lines)


def format_scores(result: dict[str, Any], out: Any, rows: int = 20) -> str:
    """``lacy-fast factscore``: the summary table, then one line per generation (the first ``rows``)."""
    lines = [f"FactScore of {result['generations']} generations against {result['knowledge']} ({result['source']}, "
             f"judge {result['judge']}, {result['seconds']:.1f} s)", "",
             f"{'FactScore':>9}  {'micro':>5}  {'supported':>9}  {'facts/gen':>9}  {'with facts':>10}",
             f"{_cell(result['factscore'], '{:.3f}'):>9}  {_cell(result['micro'], '{:.3f}'):>5}  "
             f"{str(result['supported']) + '/' + str(result['facts']):>9}  {result['facts_per_generation']:>9.2f}  "
             f"{result['share_with_facts']:>10.0%}", ""]
    items = result["items"]
    width = min(40, max([len("title")] + [len(i["title"]) for i in items[:rows]]))
    lines.append(f"{'title':<{width}}  {'facts':>5}  {'supported':>9}  {'score':>5}")
    for i in items[:rows]:
        lines.append(f"{i['title'][:width]:<{width}}  {i['facts']:>5}  {i['supported']:>9}  "
                     f"{_cell(i['score'], '{:.2f}'):>5}")
    if len(items) > rows:
        lines.append(f"... {len(items) - rows} more")
    lines += ["", f"details (each claim and its verdict): {out}" if out is not None else
              "pass --out FILE for the details (each claim and its verdict), or --json to print them"]
    return "\n".join(lines)
