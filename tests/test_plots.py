import json

from lacy_fast import cli
from lacy_fast.eval.plots import read_metrics, smooth


def write_run(path, n=30, torn=False):
    path.mkdir()
    rows = [{"step": s, "loss": 5 - s / 10, "loss_gt": 5 - s / 12, "loss_call": 3.0, "call_rate": 0.15} for s in range(1, n + 1)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + ('{"step": 31, "lo' if torn else "")
    (path / "metrics.jsonl").write_text(text)


def test_plot_writes_a_png_for_several_runs(tmp_path, capsys):
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", torn=True)
    assert cli.main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--smooth", "5"]) == 0
    png = (tmp_path / "a" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_torn_last_line_is_tolerated_but_damage_is_not(tmp_path):
    write_run(tmp_path / "a", torn=True)
    assert len(read_metrics(tmp_path / "a")) == 30
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    assert cli.main(["plot", str(tmp_path / "a")]) == 2


def test_missing_run_is_a_user_error(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, None, 5.0], 2) == [1.0, 2.0, None, 4.0]
