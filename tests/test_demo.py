"""The main job at a minimal size: every stage runs, results.json keeps the contract that
outside checks read, the report and plots are written, a rerun reuses everything and a
fresh rerun with the same seeds reproduces results.json, bad options are one line."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lacy_fast.demo import DEFAULT_ROWS, SCALES, run_demo
from lacy_fast.demo_measures import curve_area
from lacy_fast.demo_report import format_rows

SMOKE = dataclasses.replace(SCALES["cpu"], people=30, frequent_share=0.2, frequent_docs=3, heldout=0.5, vocab=400,
                            seq_len=64, micro_batch=4, ref="tiny", slm_epochs=1.0, ref_epochs=1.0, eval_people=8,
                            max_new_tokens=12, sweep=(0.05, 0.22, 0.5))
ROWS = DEFAULT_ROWS + ("lacy-mix",)  # lacy-mix: lacy's SLMs with the combined call score
CONTRACT = {"strategy", "mode", "factscore", "factscore_frequent", "factscore_rare", "call_rate", "leakage",
            "perplexity", "call_auc", "train_call_rate", "seeds", "score"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(out, SMOKE, strategies=ROWS, seeds=2, quiet=True)


@pytest.mark.slow
def test_results_keep_the_contract(demo):
    out, rows = demo
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    for row in saved:
        assert CONTRACT <= set(row), CONTRACT - set(row)
        assert row["seeds"] == (1 if row["strategy"] == "big" else 2)
        if row["factscore"] is not None and row["strategy"] != "big":
            assert "factscore_std" in row
    modes = {(r["strategy"], r["mode"]) for r in saved}
    for s in DEFAULT_ROWS:
        assert {(s, "slm"), (s, "cascade"), (s, "cascade-argmax")} <= modes
    assert ("big", "alone") in modes
    assert all(r["call_rate"] == 0 for r in saved if r["mode"] in ("slm", "alone"))
    # The plain LM calls by its own uncertainty, the others by p(<CALL>); none never trains <CALL>.
    by = {(r["strategy"], r["mode"]): r for r in saved}
    assert by[("none", "cascade")]["score"] == "entropy" and by[("lacy", "cascade")]["score"] == "p_call"
    assert by[("none", "slm")]["train_call_rate"] == 0 and by[("lacy", "slm")]["train_call_rate"] > 0
    # Equal budgets: every SLM trained on the same number of ground-truth tokens (to one step).
    gt = [r["gt_tokens"] for r in saved if r["mode"] == "slm"]
    assert max(gt) - min(gt) <= SMOKE.seq_len * SMOKE.micro_batch


def test_every_cascade_meets_its_budgets_with_the_word_partner(demo):
    """Each seed's cascade calls on each budget's share of steps within one call; the rows
    carry the handoff, the curve's area and the realised rates."""
    out, rows = demo
    curves = json.loads((out / "sweep.json").read_text())
    for name, per_seed in curves.items():
        assert len(per_seed) == 2
        for points in per_seed:
            assert [p["budget"] for p in points] == list(SMOKE.sweep)
            for p in points:
                assert abs(p["calls"] - p["budget"] * p["steps"]) <= 1, (name, p)
    cascades = [r for r in rows if r["mode"] == "cascade"]
    assert {r["strategy"] for r in cascades} == set(ROWS)
    for r in cascades:
        assert r["handoff"] == "word"
        assert [c["budget"] for c in r["curve"]] == list(SMOKE.sweep)
        areas = [curve_area(points) for points in curves[r["strategy"]]]
        if None not in areas:
            assert r["curve_area"] == pytest.approx(sum(areas) / 2)
            assert r["curve_area_std"] == pytest.approx(abs(areas[0] - areas[1]) / 2 ** 0.5)
    by = {(r["strategy"], r["mode"]): r for r in rows}
    assert by[("lacy-mix", "cascade")]["score"] == "combined" and ("lacy-mix", "slm") not in by
    assert all(r.get("handoff") is None for r in rows if r["mode"] in ("slm", "alone"))


def test_curve_area_is_the_mean_factscore_over_the_budgets():
    points = [{"budget": b, "factscore": f} for b, f in ((0.5, 1.0), (0.05, 0.0), (0.1, 0.5), (0.22, 0.5), (0.35, 1.0))]
    # trapezoids: 0.05*0.25 + 0.12*0.5 + 0.13*0.75 + 0.15*1.0 = 0.32, over the width 0.45
    assert curve_area(points) == pytest.approx(0.32 / 0.45)
    assert curve_area([{"budget": 0.05, "factscore": 0.3}, {"budget": 0.5, "factscore": None}]) is None


def test_report_and_plots_are_written(demo):
    out, rows = demo
    for name in ("curves.png", "sweep.png", "regime.png", "lock_in.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    for section in ("## The regime", "## The budget curve", "## At the 22% budget", "## Lock-in, measured",
                    "## Where the calls land"):
        assert section in report, section
    assert "±" in report
    by = {(r["strategy"], r["mode"]): r for r in rows}
    # the training-side measures reach every SLM row: the probe for all, persistence keyed for all
    assert by[("lacy", "slm")]["probe_fact_nll"] is not None and "selection_persistence" in by[("lacy", "slm")]
    assert set(json.loads((out / "sweep.json").read_text())) == set(ROWS)
    assert (out / "budget_curve.png").read_bytes()[:4] == b"\x89PNG"
    table = format_rows(rows)
    assert "lacy cascade" in table and "FactScore" in table and "±" in table


@pytest.mark.slow
def test_rerun_reuses_and_fresh_rerun_reproduces(demo, tmp_path):
    out, rows = demo
    again = run_demo(out, SMOKE, strategies=ROWS, seeds=2, quiet=True)  # every stage is there: nothing retrains
    assert again == rows
    from lacy_fast.errors import UserError

    with pytest.raises(UserError, match="other settings"):
        run_demo(out, dataclasses.replace(SMOKE, people=31), strategies=ROWS, seeds=2, quiet=True)
    # Same settings and seeds, another process and directory: the same results.json, number
    # for number. One thread: with more, MKL's fp32 GEMM may split a sum differently in
    # another process (README, "Reproducible"), which is outside this project.
    code = ("import sys; from pathlib import Path; sys.path.insert(0, {tests!r}); from test_demo import SMOKE; "
            "from lacy_fast.demo import run_demo; run_demo(Path(sys.argv[1]), SMOKE, strategies=('none', 'lacy', 'lacy-mix'), "
            "seeds=1, quiet=True)").format(tests=str(Path(__file__).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("first", "again"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], env=env, check=True, capture_output=True)
    first, again = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("first", "again"))
    assert first == again


def test_a_signal_during_training_stops_the_demo(tmp_path, monkeypatch):
    """A run stopped by SIGTERM/SIGINT saved a checkpoint; the demo must not evaluate it as if trained."""
    import lacy_fast.train.loop as loop
    from lacy_fast.errors import UserError

    monkeypatch.setattr(loop, "train", lambda cfg, progress=True: {"step": 3, "stopped_by": "SIGINT"})
    with pytest.raises(UserError, match="stopped by SIGINT while training .*reference; rerun the same command"):
        run_demo(tmp_path / "out", SMOKE, quiet=True)
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("args, words", [
    (["--strategies", "magic"], "--strategies has magic"),
    (["--people", "5"], "at least 20"),
    (["--seeds", "0"], "--seeds is 0"),
    (["--scale", "huge"], "invalid choice"),
])
def test_demo_bad_options_are_one_line(tmp_path, args, words):
    proc = subprocess.run([sys.executable, "-m", "lacy_fast.cli", "demo", "--out", str(tmp_path / "d"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and words in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
