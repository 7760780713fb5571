"""The demo's report renders measured numbers and the comparisons between them: differences
against the larger seed spread, persistence beside its chance level, rows ranked."""
from lacy_fast.demo_report import budget_lines, curve_lines, fmt, lock_in_lines


def row(strategy, mode, **values):
    return {"strategy": strategy, "mode": mode, **values}


def by(*rows):
    return {(r["strategy"], r["mode"]): r for r in rows}


def test_differences_are_judged_against_the_larger_seed_spread():
    rows = by(row("none", "cascade", curve_area=0.60, curve_area_std=0.02),
              row("lacy-soft", "cascade", curve_area=0.70, curve_area_std=0.03),
              row("lacy", "cascade", curve_area=0.58, curve_area_std=0.05))
    lines = curve_lines(rows, seeds=3)
    assert lines[0].startswith("- Mean FactScore") and lines[0].index("`lacy-soft`") < lines[0].index("`none`")
    soft = next(x for x in lines if x.startswith("- `lacy-soft` against `none`"))
    assert "+0.100, above by more than the larger seed spread (0.030)" in soft
    lacy = next(x for x in lines if x.startswith("- `lacy` against `none`"))
    assert "-0.020, within the larger seed spread (0.050)" in lacy


def test_budget_lines_rank_rows_and_name_the_handoff():
    rows = by(row("none", "cascade", factscore=0.9, factscore_std=0.01, call_rate=0.22, handoff="word",
                  factscore_frequent=1.0, factscore_rare=0.8),
              row("lacy", "cascade", factscore=0.7, factscore_std=0.1, call_rate=0.219, handoff="word",
                  factscore_frequent=0.6, factscore_rare=0.8))
    lines = budget_lines(rows, seeds=3)
    assert lines[0] == "- Cascade (handoff: word): `none` 0.900 ± 0.010, `lacy` 0.700 ± 0.100."
    assert "- `lacy` against `none`: -0.200, below by more than the larger seed spread (0.100)." in lines


def test_lock_in_lines_put_persistence_beside_chance():
    rows = by(row("lacy", "slm", selection_persistence=0.95, selection_persistence_std=0.01, selection_chance=0.6,
                  probe_fact_nll=3.2, factscore_frequent=0.4),
              row("none", "slm", selection_persistence=None, probe_fact_nll=0.4, factscore_frequent=0.95))
    lines = lock_in_lines(rows)
    assert "`lacy` 0.95 ± 0.01 (0.60)" in lines[0] and "`none`" not in lines[0]
    assert lines[1].index("`none` 0.40") < lines[1].index("`lacy` 3.20")  # lowest nll first
    assert fmt(None) == "-" and fmt({"x": 1.0}, "x") == "1.000"
