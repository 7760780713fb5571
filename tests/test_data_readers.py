"""Corpus readers: formats, directories, globs, gzip, and every kind of bad input."""
import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lacy_fast.config import ReaderConfig
from lacy_fast.data.readers import SkipReport, read_documents, resolve_inputs
from lacy_fast.errors import UserError


def _read(paths, cfg=None, log=None):
    skips = SkipReport(log)
    docs = list(read_documents([str(p) for p in paths], cfg or ReaderConfig(), skips))
    skips.close()
    return docs, skips


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\nstill first\n\n \n\nsecond doc\n\n\n\nthird\n")
    docs, skips = _read([path])
    assert [d.text for d in docs] == ["first doc\nstill first", "second doc", "third"]
    assert [d.line for d in docs] == [1, 6, 10]
    assert skips.total == 0


def test_jsonl_field_gzip_parquet_directories_and_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    with gzip.open(tmp_path / "sub" / "b.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"body": "from gzip"}) + "\n")
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"body": "plain"}) + "\n")
    pq.write_table(pa.table({"body": ["row one", "row two"]}), tmp_path / "sub" / "d.parquet")
    (tmp_path / "sub" / "ignored.csv").write_text("x")
    cfg = ReaderConfig(text_field="body")
    docs, _ = _read([tmp_path / "sub"], cfg)
    assert [d.text for d in docs] == ["from gzip", "plain", "row one", "row two"]
    assert [p.name for p in resolve_inputs([str(tmp_path / "sub" / "*.jsonl*")])] == ["b.jsonl.gz", "c.jsonl"]


def test_bad_input_is_counted_and_logged_never_fatal(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "unterminated',
        json.dumps({"other": "no text field"}).encode(),
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": "x" * 50}).encode(),
        b'{"text": "bad \xff\xfe bytes"}',
        json.dumps([1, 2]).encode(),
        json.dumps({"text": "good two"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"fine paragraph\n\nbroken \xc3\x28 paragraph\n")
    log = tmp_path / "skipped.log"
    docs, skips = _read([path, txt], ReaderConfig(max_doc_chars=40), log)
    assert [d.text for d in docs] == ["good one", "good two", "fine paragraph"]
    assert dict(skips.counts) == {"malformed_json": 1, "missing_field": 2, "invalid_utf8": 2, "empty": 1,
                                  "too_large": 1}
    logged = log.read_text().splitlines()
    assert len(logged) == 7
    assert logged[0].startswith(f"{path}:2: malformed_json")
    assert f"{txt}:3: invalid_utf8" in log.read_text()


def test_missing_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match="matches nothing"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(UserError, match="not a .txt"):
        resolve_inputs([str(tmp_path / "x.csv")])
    with pytest.raises(UserError, match="no .txt, .jsonl or .parquet files"):
        resolve_inputs([str(tmp_path)])
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match="no column 'text'"):
        _read([tmp_path / "p.parquet"])
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="not a readable gzip"):
        _read([tmp_path / "broken.jsonl.gz"])


def test_cli_missing_input_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lacy_fast.cli", "prepare", "--input", str(tmp_path / "nope.jsonl"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
