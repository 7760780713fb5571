import io

from lacy_fast.progress import Progress, duration, human


def test_human_and_duration():
    assert human(999) == "999" and human(1234) == "1.2k" and human(3.4e6) == "3.4M"
    assert duration(3723) == "1:02:03"


def test_progress_line_has_rates_and_eta():
    out = io.StringIO()
    bar = Progress("prepare", total=100, unit="docs", stream=out, log_interval=0.0)
    bar.update(25, tokens=5000)
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("prepare  25/100 docs (25%)")
    assert "docs/s" in line and "tokens/s" in line and "ETA" in line
    bar.close()
    assert "done in" in out.getvalue().splitlines()[-1]
