"""The main job at a minimal size: every stage runs, results.json has the contract's rows,
the report and plots are written, a rerun reuses everything, bad options are one line."""
import dataclasses
import json
import subprocess
import sys

import pytest

from lacy_fast.demo import SCALES, STRATEGIES, run_demo

SMOKE = dataclasses.replace(SCALES["cpu"], people=30, renderings=2, heldout=0.5, vocab=400, seq_len=64,
                            micro_batch=4, big="tiny", big_epochs=1.0, slm_gt_share=0.4, eval_people=8,
                            max_new_tokens=12, sweep=(0.0, 0.5, 1.0))


def test_demo_end_to_end_at_a_minimal_size(tmp_path, capsys):
    out = tmp_path / "demo"
    rows = run_demo(out, SMOKE, quiet=True)
    table = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    for row in saved:
        assert {"strategy", "factscore", "call_rate", "leakage", "perplexity"} <= set(row)
    modes = {(r["strategy"], r["mode"]) for r in saved}
    for s in STRATEGIES:  # the cascade-free SLM too
        assert {(s, "slm"), (s, "cascade"), (s, "cascade-argmax")} <= modes
    assert ("big", "alone") in modes
    assert all(r["call_rate"] == 0 for r in saved if r["mode"] in ("slm", "alone"))
    # Equal budgets: every SLM trained on the same number of ground-truth tokens (to one step).
    gt = [r["gt_tokens"] for r in saved if r["mode"] == "slm"]
    assert max(gt) - min(gt) <= SMOKE.seq_len * SMOKE.micro_batch
    for name in ("curves.png", "sweep.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "## What the table shows" in report and "lacy" in table and "FactScore" in table
    assert set(json.loads((out / "sweep.json").read_text())) == set(STRATEGIES)

    # A rerun with the same settings reuses every stage; other settings are refused.
    again = run_demo(out, SMOKE, quiet=True)
    assert [r["train_steps"] for r in again] == [r["train_steps"] for r in rows]
    from lacy_fast.errors import UserError

    with pytest.raises(UserError, match="other settings"):
        run_demo(out, dataclasses.replace(SMOKE, people=31), quiet=True)


@pytest.mark.parametrize("args, words", [
    (["--strategies", "magic"], "--strategies has magic"),
    (["--people", "5"], "at least 20"),
    (["--scale", "huge"], "invalid choice"),
])
def test_demo_bad_options_are_one_line(tmp_path, args, words):
    proc = subprocess.run([sys.executable, "-m", "lacy_fast.cli", "demo", "--out", str(tmp_path / "d"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and words in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
