"""`lacy-fast prepare` end to end through the command line: stats, labels, resume, refusals, crashes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lacy_fast.data import synth
from lacy_fast.data.shards import ShardSet, shard_paths
from lacy_fast.data.tokenizer import Tokenizer

CLI = [sys.executable, "-m", "lacy_fast.cli"]
SMALL = ["--vocab-size", "400", "--quiet", "shard_docs=40"]


def prepare(*args, **kw):
    return subprocess.run(CLI + ["prepare", *map(str, args)], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.write(out, 150, seed=0)
    return out


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "out"
    proc = prepare("--input", corpus / "corpus.jsonl", "--out", out, "--workers", 2, *SMALL)
    assert proc.returncode == 0, proc.stderr
    return out


def test_outputs_and_stats(prepared):
    stats = json.loads((prepared / "stats.json").read_text())
    for key in ("documents", "tokens", "fact_tokens", "fact_fraction", "seconds", "tokens_per_second", "workers",
                "fact_tokens_by_pos", "fact_tokens_by_entity", "skipped"):
        assert key in stats
    assert stats["documents"] == 150 and stats["workers"] == 2 and stats["shards"] == 4
    assert 0.15 < stats["fact_fraction"] < 0.5
    assert sum(stats["fact_tokens_by_pos"].values()) == stats["fact_tokens"]
    shards = ShardSet(prepared)
    assert shards.complete and shards.n_docs == 150 and shards.total_tokens == stats["tokens"]
    assert sum(int(np.count_nonzero(s.flags & 1)) for s in shards.shards) == stats["fact_tokens"]
    assert [p.name for p in shard_paths(prepared)] == [f"shard_0000{i}.bin" for i in range(4)]


def test_labels_can_be_checked_by_decoding(prepared, corpus):
    tok = Tokenizer.load(prepared / "tokenizer.model")
    shards = ShardSet(prepared)
    people = [json.loads(line) for line in (corpus / "facts.jsonl").open()]
    texts = [json.loads(line)["text"] for line in (corpus / "corpus.jsonl").open()]
    for i in (0, 77, 149):
        ids, flags = shards.document(i)
        assert ids[-1] == tok.eos_id and flags[-1] == 0
        assert tok.decode(ids[:-1]) == texts[i]
        facts = "".join(p if f else "|" for p, f in zip(tok.decode_pieces(ids), flags))
        surname = people[i]["name"].split()[-1]
        assert surname in facts
        assert people[i]["facts"]["birth_date"].split()[-1] in facts  # the year
    shown = prepare("--show", prepared, "--docs", 2)
    assert shown.returncode == 0 and shown.stdout.count("[[") > 5 and "150 documents" in shown.stdout
    inspect = subprocess.run([sys.executable, "-m", "lacy_fast.data.shards", str(prepared), "--docs", "1"],
                             capture_output=True, text=True)
    assert inspect.returncode == 0 and "[[" in inspect.stdout


def test_rerun_keeps_done_shards_and_refuses_other_settings(prepared, corpus):
    before = {p.name: p.stat().st_mtime_ns for p in shard_paths(prepared)}
    (prepared / "shard_00002.bin").unlink()
    proc = prepare("--input", corpus / "corpus.jsonl", "--out", prepared, "--workers", 1, *SMALL)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["resumed_shards"] == 3 and stats["documents"] == 150 and stats["tokens_this_run"] > 0
    after = {p.name: p.stat().st_mtime_ns for p in shard_paths(prepared)}
    assert all(after[n] == before[n] for n in before if n != "shard_00002.bin")
    refused = prepare("--out", prepared, *SMALL, "--input", corpus / "corpus.jsonl", "label.subwords=first")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "other settings (label differs)" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in shard_paths(prepared)} == after


def test_errors_are_one_line(tmp_path, corpus):
    for args, words in [
        (["--input", corpus / "corpus.jsonl", "--out", tmp_path / "a", "--tokenizer", tmp_path / "no.model"],
         "does not exist"),
        (["--input", corpus / "corpus.jsonl", "--out", tmp_path / "b", "label.subword=first"], "did you mean"),
        (["--input", corpus / "corpus.jsonl"], "--out"),
        (["--input", corpus / "corpus.jsonl", "--out", tmp_path / "c", "--vocab-size", "100"], "at least 320"),
    ]:
        proc = prepare(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and words in proc.stderr and "Traceback" not in proc.stderr


def _wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    out = tmp_path_factory.mktemp("big")
    synth.write(out, 600, seed=1)
    return out / "corpus.jsonl"


def test_killed_run_resumes_to_the_same_shards(tmp_path, big, prepared):
    args = ["--input", big, "--tokenizer", prepared / "tokenizer.model", "--workers", 1, "--quiet",
            "shard_docs=20"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(CLI + ["prepare", *map(str, args), "--out", str(killed)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: killed.exists() and len(shard_paths(killed)) >= 2)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-way
    proc.wait()
    assert not (killed / "stats.json").exists() and len(shard_paths(killed)) < 30
    resumed = prepare(*args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((killed / "stats.json").read_text())["resumed_shards"] >= 2
    clean = tmp_path / "clean"
    assert prepare(*args, "--out", clean).returncode == 0
    names = [p.name for p in shard_paths(clean)]
    assert len(names) == 30 and names == [p.name for p in shard_paths(killed)]
    for name in names:
        assert (killed / name).read_bytes() == (clean / name).read_bytes()
    assert not [p for p in killed.iterdir() if ".tmp" in p.name]


def _workers_of(pid):
    children = Path(f"/proc/{pid}/task/{pid}/children")
    out = []
    for child in children.read_text().split() if children.exists() else []:
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            out.append(int(child))
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find the worker")
def test_a_dead_worker_stops_the_run_with_one_line(tmp_path, big, prepared):
    out = tmp_path / "crash"
    proc = subprocess.Popen(CLI + ["prepare", "--input", str(big), "--out", str(out), "--tokenizer",
                                   str(prepared / "tokenizer.model"), "--workers", "1", "--quiet", "shard_docs=20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: out.exists() and len(shard_paths(out)) >= 1 and _workers_of(proc.pid))
        os.kill(_workers_of(proc.pid)[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)  # must not hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2
    assert err.count("\n") == 1 and "worker process died" in err and "rerun the same command" in err


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find the worker")
def test_workers_die_with_a_killed_prepare(tmp_path, big, prepared):
    """kill -9 of `prepare` alone (not its process group): its workers must not keep writing
    shards (and then hang on a pipe), so a rerun never races them."""
    out = tmp_path / "orphan"
    proc = subprocess.Popen(CLI + ["prepare", "--input", str(big), "--out", str(out), "--tokenizer",
                                   str(prepared / "tokenizer.model"), "--workers", "2", "--quiet", "shard_docs=20"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        assert _wait_for(lambda: out.exists() and len(shard_paths(out)) >= 1 and len(_workers_of(proc.pid)) == 2)
        workers = _workers_of(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _wait_for(lambda: not any(_alive(w) for w in workers), timeout=10), "a worker outlived prepare"
        written = len(shard_paths(out))
        time.sleep(1.0)
        assert len(shard_paths(out)) == written  # nothing writes any more
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    resumed = prepare("--input", big, "--out", out, "--tokenizer", prepared / "tokenizer.model", "--workers", 2,
                      "--quiet", "shard_docs=20")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "stats.json").read_text())["documents"] == 600
