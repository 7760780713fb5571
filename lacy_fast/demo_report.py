"""The demo's report: the numbers of one run (``lacy_fast.demo``), rendered as Markdown.

It renders what the run measured and the comparisons between those measurements
(differences, seed spreads, which is larger); it holds no explanation written in advance.
The reading of a kept run, with its causes, is written by people from these numbers
(README, docs/demo-cpu).
"""
from __future__ import annotations

from typing import Any

from lacy_fast.progress import duration

Rows = dict[tuple[str, str], dict[str, Any]]

# (header, key, format) of the printed table; "±" cells add the spread when seeds > 1.
TABLE = [("FactScore", "factscore", "{:.3f}"), ("frequent", "factscore_frequent", "{:.3f}"),
         ("rare", "factscore_rare", "{:.3f}"), ("call rate", "call_rate", "{:.1%}"),
         ("curve area", "curve_area", "{:.3f}"), ("train CALL", "train_call_rate", "{:.1%}"),
         ("AUC", "call_auc", "{:.3f}"), ("calls@unknown", "calls_unknown_fact", "{:.0%}"),
         ("calls@free", "calls_free", "{:.0%}"), ("persist", "selection_persistence", "{:.2f}"),
         ("probe nll", "probe_fact_nll", "{:.2f}"), ("leakage", "leakage", "{:.3f}"), ("ppl", "perplexity", "{:.2f}")]
LACY_FAMILY_PREFIX = "lacy"


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table; '-' where a value is missing, '±' the seed spread."""
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        if row.get(key) is None:
            return "-"
        text = fmt.format(row[key])
        return text + (f" ±{fmt.format(row[key + '_std']).lstrip('0')}" if row.get(key + "_std") is not None else "")

    header = ["model", "score"] + [h for h, _, _ in TABLE]
    body = [[f"{r['strategy']} {r['mode']}", r["score"] if r["mode"] not in ("slm", "alone") else "-"]
            + [cell(r, k, f) for _, k, f in TABLE] for r in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def fmt(row: dict[str, Any] | None, key: str = "factscore", spec: str = "{:.3f}") -> str:
    """A value with its seed spread ('-' when missing)."""
    if row is None or row.get(key) is None:
        return "-"
    spread = row.get(f"{key}_std")
    return spec.format(row[key]) + (f" ± {spec.format(spread)}" if spread is not None else "")


def render(rows: list[dict[str, Any]], setup: str, table: str, regime: dict[str, Any], seeds: int, budget: float,
           call_fraction: float, seconds: float) -> str:
    """report.md: the setup paragraph, the table, the plots and the measured sections."""
    by: Rows = {(r["strategy"], r["mode"]): r for r in rows}
    lines = ["# lacy-fast demo", "", setup + (f" Values are means over {seeds} seeds, ± the standard deviation."
                                              if seeds > 1 else "") + f" Whole run: {duration(seconds)}.",
             "", "```", table, "```", "",
             "![FactScore against the call budget](budget_curve.png)", "",
             "![what training did to the learnable facts](lock_in.png)", "",
             "![training curves](curves.png)", "", "![the regime](regime.png)", ""]
    for title, section in (("The regime", regime_lines(by, regime, call_fraction)),
                           ("The budget curve", curve_lines(by, seeds)),
                           (f"At the {budget:.0%} budget", budget_lines(by, seeds)),
                           ("Lock-in, measured", lock_in_lines(by)),
                           ("Where the calls land", landing_lines(by))):
        if section:
            lines += [f"## {title}", "", *section, ""]
    return "\n".join(lines)


def setup_paragraph(scale: Any, seeds: int, stats: dict[str, Any], regime: dict[str, Any], budget: float) -> str:
    """The report's first paragraph: what was run (sizes, models, partner, modes). ``scale``:
    the run's ``demo.Scale``; ``budget``: the main cascade row's call budget."""
    return (
        f"Built-in corpus in the paper's regime: {regime['people']} fictional people, {regime['frequent']} of them "
        f"*frequent* ({regime['frequent_documents']} of the {regime['documents']} biographies), the others *rare* "
        f"(one biography each); {stats['tokens']} tokens, {stats['fact_fraction']:.1%} of them fact tokens (spaCy "
        f"proxy), {regime['free_token_share']:.1%} free wording. SLMs: `{scale.slm}` shape, each trained on "
        f"{scale.slm_epochs:g} passes' worth of ground-truth-gradient tokens ({seeds} seed{'s' if seeds > 1 else ''} "
        f"per row). Reference (Rho-1's, and the `big alone` row): `{scale.ref}` shape, a bigger model trained "
        f"as a plain LM on the same data ({scale.ref_epochs:g} passes). The model the SLMs call is the fact table "
        "(`oracle:facts.jsonl`), answering as the paper's big model on another tokenizer does: one word of the "
        "value per call after a cue, declining elsewhere (`handoff` `word`). Evaluated on "
        f"{scale.eval_people} held-out people, half frequent and half rare; greedy decoding from each name. "
        f"Modes: `slm` alone; `cascade`: calls on {budget:.0%} of decoding steps, those whose call score "
        "(column `score`: p(<CALL>) as log-odds, the entropy of its next-token distribution for a plain LM, or "
        "their rank product) is highest; each cascade also at the budgets "
        f"{', '.join(f'{b:.0%}' for b in scale.sweep)} (`curve area`: the mean FactScore over them); "
        "`cascade-argmax`: calls whenever <CALL> is the most likely token. AUC, where calls land, leakage and "
        "perplexity come from teacher-forced held-out renderings; `persist` and `probe nll` from training "
        "(selection persistence in its second half; the probe's ground-truth nll of frequent people's fact values "
        "at its end).")


def _mode(by: Rows, mode: str) -> dict[str, dict[str, Any]]:
    return {s: r for (s, m), r in by.items() if m == mode}


def _by_bucket(row: dict[str, Any]) -> str:
    return f"{fmt(row, 'factscore_frequent')} on frequent people, {fmt(row, 'factscore_rare')} on rare ones."


def regime_lines(by: Rows, regime: dict[str, Any], call_fraction: float) -> list[str]:
    """The regime's two properties and the proxy's coverage, as measured."""
    out = []
    plain = by.get(("none", "slm"))
    if plain is not None:
        out.append(f"- The plain LM alone: {_by_bucket(plain)}")
    out.append(f"- Facts about rare people: {regime['rare_fact_share']:.0%} of the corpus's fact statements; LaCy "
               f"relabels the highest-loss {call_fraction:.0%} of the fact tokens.")
    big = by.get(("big", "alone"))
    if big is not None:
        out.append(f"- The reference (a bigger model on the same data) alone: {_by_bucket(big)}")
    out.append(f"- Free wording: {regime['free_token_share']:.1%} of the held-out tokens; spaCy's rule flags "
               f"{regime['free_flagged']:.2%} of them ({regime['free_share_of_fact_flags']:.2%} of its flags).")
    out.append(f"- spaCy's rule flags {regime['values_flagged']:.0%} of the tokens of fact-table values; "
               f"{1 - regime['value_share_of_fact_flags']:.0%} of the tokens it flags are not in a value.")
    trained = _mode(by, "slm")
    out.append("- Realised share of <CALL> targets in training: "
               + ", ".join(f"`{s}` {r['train_call_rate']:.1%}" for s, r in trained.items()) + ".")
    return out


def _above(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    """'above', 'below' or 'within the spread of' ``b`` for ``a``'s ``key`` (the larger spread)."""
    diff = a[key] - b[key]
    spread = max(a.get(f"{key}_std") or 0.0, b.get(f"{key}_std") or 0.0)
    if abs(diff) <= spread:
        return f"{diff:+.3f}, within the larger seed spread ({spread:.3f})"
    return f"{diff:+.3f}, {'above' if diff > 0 else 'below'} by more than the larger seed spread ({spread:.3f})"


def curve_lines(by: Rows, seeds: int) -> list[str]:
    """curve_area of every cascade row, and each LaCy-family row against the plain LM's."""
    cascades = _mode(by, "cascade")
    rows = {s: r for s, r in cascades.items() if r.get("curve_area") is not None}
    if not rows:
        return ["- No row has a curve area: at some budget, some seed's generations stated no fact."] if cascades else []
    out = ["- Mean FactScore over the budgets 5% to 50% (`curve_area`): " + ", ".join(
        f"`{s}` {fmt(r, 'curve_area')}" for s, r in sorted(rows.items(), key=lambda kv: -kv[1]["curve_area"])) + "."]
    rates = []
    for s, r in rows.items():
        worst = max((abs(p["call_rate_max"] - p["budget"]), abs(p["call_rate_min"] - p["budget"]))
                    for p in r.get("curve", []) if p.get("call_rate_max") is not None) if r.get("curve") else None
        if worst is not None:
            rates.append(max(worst))
    if rates:
        out.append(f"- Realised call rates: every point of every curve within {max(rates):.2%} of its budget "
                   f"(largest deviation over rows, budgets and seeds).")
    plain = rows.get("none")
    if plain is not None:
        for s, r in rows.items():
            if s.startswith(LACY_FAMILY_PREFIX):
                out.append(f"- `{s}` against `none` (curve area): {_above(r, plain, 'curve_area')}"
                           + ("" if seeds > 1 else "; one seed, no spread") + ".")
    return out


def budget_lines(by: Rows, seeds: int) -> list[str]:
    """The equal-budget cascade (the paper's deployment) and the SLMs alone, ranked."""
    def ranked(rows: dict[str, dict[str, Any]]) -> str:
        scored = {s: r for s, r in rows.items() if r.get("factscore") is not None}
        return ", ".join(f"`{s}` {fmt(r)}" for s, r in sorted(scored.items(), key=lambda kv: -kv[1]["factscore"]))

    cascade, alone = _mode(by, "cascade"), _mode(by, "slm")
    out = []
    if cascade:
        handoffs = sorted({str(r.get("handoff")) for r in cascade.values()})
        out.append(f"- Cascade (handoff: {', '.join(handoffs)}): {ranked(cascade)}.")
        out.append("- Realised call rates: " + ", ".join(f"`{s}` {r['call_rate']:.1%}" for s, r in cascade.items())
                   + ".")
        out.append("- By bucket (frequent / rare): " + ", ".join(
            f"`{s}` {fmt(r, 'factscore_frequent')} / {fmt(r, 'factscore_rare')}" for s, r in cascade.items()) + ".")
        lacy, plain = cascade.get("lacy"), cascade.get("none")
        if lacy is not None and lacy.get("factscore") is not None:
            for s, r in cascade.items():
                if s != "lacy" and r.get("factscore") is not None:
                    out.append(f"- `lacy` against `{s}`: {_above(lacy, r, 'factscore')}.")
        if plain is not None and plain.get("factscore") is not None:
            for s, r in cascade.items():
                if s.startswith(LACY_FAMILY_PREFIX) and s != "lacy" and r.get("factscore") is not None:
                    out.append(f"- `{s}` against `none`: {_above(r, plain, 'factscore')}.")
    if alone:
        out.append(f"- Alone (no calls): {ranked(alone)}.")
    argmax = _mode(by, "cascade-argmax")
    if argmax:
        out.append("- Calling whenever <CALL> is the argmax: " + ", ".join(
            f"`{s}` {fmt(r)} at {r['call_rate']:.0%} of steps" for s, r in argmax.items()) + ".")
    return out


def lock_in_lines(by: Rows) -> list[str]:
    """Selection persistence against chance, and what each SLM learned of the learnable facts."""
    alone = _mode(by, "slm")
    out = []
    tracked = {s: r for s, r in alone.items() if r.get("selection_persistence") is not None}
    if tracked:
        out.append("- Selected again at their next occurrence, second half of training (chance level in brackets): "
                   + ", ".join(f"`{s}` {fmt(r, 'selection_persistence', '{:.2f}')} "
                               f"({r['selection_chance']:.2f})" for s, r in tracked.items()) + ".")
    probed = {s: r for s, r in alone.items() if r.get("probe_fact_nll") is not None}
    if probed:
        out.append("- Ground-truth nll of frequent people's fact values (the training probe) at the end of training: "
                   + ", ".join(f"`{s}` {fmt(r, 'probe_fact_nll', '{:.2f}')}" for s, r in
                               sorted(probed.items(), key=lambda kv: kv[1]["probe_fact_nll"])) + ".")
    learned = {s: r for s, r in alone.items() if r.get("factscore_frequent") is not None}
    if learned:
        out.append("- Alone, FactScore on frequent people: " + ", ".join(
            f"`{s}` {fmt(r, 'factscore_frequent')}" for s, r in learned.items()) + ".")
    return out


def landing_lines(by: Rows) -> list[str]:
    """Where the equal-budget calls land on held-out text, and how the call score ranks."""
    landing = {s: r for s, r in _mode(by, "cascade").items() if r.get("calls_free") is not None}
    if not landing:
        return []
    return [
        "- Share of calls on unknown facts / known facts / free wording / other tokens: " + "; ".join(
            f"`{s}` {r['calls_unknown_fact']:.0%} / {r['calls_known_fact']:.0%} / {r['calls_free']:.0%} / "
            f"{r['calls_other']:.0%}" for s, r in landing.items()) + ".",
        "- ROC AUC of the call score for unknown-fact tokens against all others: "
        + ", ".join(f"`{s}` {fmt(r, 'call_auc')}" for s, r in landing.items()) + ".",
        "- Mean p(<CALL>) on held-out fact tokens / elsewhere: " + ", ".join(
            f"`{s}` {r['mean_p_call_fact']:.2f} / {r['mean_p_call_other']:.2f}" for s, r in landing.items()
            if r.get("mean_p_call_fact") is not None) + ".",
    ]
