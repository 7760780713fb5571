"""A user's bad day (issue 18): a run never serves a stale export, detects damage, and keeps
its last good state; full disks, locks, hostile inputs and too-large models are one sentence.

A kill between two steps of a save is simulated by making the later step fail (a function
monkeypatched to raise), never by racing a timer. Each test names the case it covers."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lacy_fast import cli
from lacy_fast.config import ModelConfig, PrepareConfig, ReaderConfig, RunConfig, TokenizerConfig, load_config
from lacy_fast.data import synth
from lacy_fast.errors import UserError
from lacy_fast.fileio import MANIFEST, manifest_problem, write_manifest
from lacy_fast.model.io import load_export, read_export_meta
from lacy_fast.train.checkpoint import Checkpointer

from helpers import SMALL, export, metrics, tiny_gpt, train, train_small
from test_factscore_kb import kb_path, source  # noqa: F401  (fixtures)

_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def in_process(monkeypatch, data):
    """Train in this process (so a step can be made to fail): returns run(out, *overrides, fresh=)."""
    from lacy_fast.train.loop import train as train_in_process

    for key in _DIST_ENV:
        monkeypatch.delenv(key, raising=False)

    def run(out: Path, *overrides: str, fresh: bool = False):
        cfg = load_config(RunConfig, "tiny", [f"data.path={data}", f"out_dir={out}", *SMALL[:-1], *overrides])
        return train_in_process(cfg, progress=False, fresh=fresh)
    return run


def cli_train(out: Path, data: Path, *extra: str) -> int:
    return cli.main(["train", "--config", "tiny", f"data.path={data}", f"out_dir={out}", *SMALL, *extra])


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def flip_bytes(path: Path, n: int = 64) -> None:
    """Invert ``n`` bytes in the middle of ``path`` (what a bad disk or a bad copy does)."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + n] = bytes(b ^ 0xFF for b in raw[mid:mid + n])
    path.write_bytes(bytes(raw))


def one_sentence(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------------------
# Case 1: the export is never older than `latest`; a rerun repairs it
# ----------------------------------------------------------------------------------------


def test_case1_a_save_killed_while_writing_the_export_keeps_latest_and_the_export_together(
        in_process, data, tmp_path, monkeypatch, capsys):
    """The final save fails between the export's two renames (the old export moved aside,
    the new one not yet in place): `latest` has not moved, the rerun rewrites the missing
    export from the checkpoint, cleans the temporary exports and trains on."""
    import lacy_fast.fileio as fileio

    out = tmp_path / "run"
    in_process(out, "train.max_steps=2")
    assert latest(out) == "step_00000002" and read_export_meta(out / "export")["step"] == 2

    real_replace = os.replace

    def killed_between_renames(src, dst):
        if Path(src).name.startswith(".export.tmp-"):
            raise KeyboardInterrupt("killed")  # the second rename never happens
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", killed_between_renames)
    with pytest.raises(KeyboardInterrupt):
        in_process(out, "train.max_steps=4")
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    assert latest(out) == "step_00000002"  # not advanced past the export it has
    assert not (out / "export").exists() and list(out.glob(".export.old-*"))
    (out / f".export.tmp-{os.getpid() + 1}").mkdir()  # what a kill -9 leaves beside it

    # generate on the run says what works: rerunning its train command.
    with pytest.raises(UserError, match="rerun its `lacy-fast train` command"):
        read_export_meta(out)
    capsys.readouterr()
    in_process(out, "train.max_steps=4")
    err = capsys.readouterr().err
    assert f"{out / 'export'} is missing; rewrote it from checkpoint step 2" in err
    assert read_export_meta(out / "export")["step"] == 4 and latest(out) == "step_00000004"
    assert not list(out.glob(".export.*"))


def test_case1_a_full_disk_while_writing_the_export_leaves_latest_at_the_export(in_process, data, tmp_path,
                                                                                monkeypatch):
    """Out of disk while the export is written: the older export stays, and so does `latest`."""
    import lacy_fast.model.io as io

    out = tmp_path / "run"
    in_process(out, "train.max_steps=2")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "export"))

    monkeypatch.setattr(io, "save_export", full)
    with pytest.raises(OSError):
        in_process(out, "train.max_steps=4")
    assert latest(out) == "step_00000002" and read_export_meta(out / "export")["step"] == 2


@pytest.mark.parametrize("damage", ["deleted", "older", "flipped", "manifest deleted"])
def test_case1_rerunning_an_already_trained_run_repairs_its_export(data, trained_run, tmp_path, damage):
    """'already trained' no longer leaves a missing, stale or damaged export as it is."""
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)  # 2 steps, a checkpoint after each
    if damage == "deleted":
        shutil.rmtree(out / "export")
    elif damage == "older":  # what the previous order of writes left after a kill
        config = json.loads((out / "export" / "config.json").read_text())
        config["lacy_fast"]["step"] = 1
        (out / "export" / "config.json").write_text(json.dumps(config))
        write_manifest(out / "export")
    elif damage == "flipped":
        flip_bytes(out / "export" / "model.safetensors", 16)
    else:  # loads unchecked in generate (a transformers re-save has none), but this run wrote one
        (out / "export" / MANIFEST).unlink()
    proc = train(out, data, "train.max_steps=2")
    assert "already trained to step 2" in proc.stderr
    assert "rewrote it from checkpoint step 2" in proc.stderr
    model, meta = load_export(out / "export")  # verifies
    assert meta["step"] == 2


# ----------------------------------------------------------------------------------------
# Cases 2 and 3: checkpoints are verified on load; the newest good one is kept
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(out, data, "train.max_steps=4", "train.ckpt_every=2", "train.keep_last=2")
    return out


def _model_states(step_dir: Path) -> Path:
    return next(step_dir.glob("*model_states.pt"))


DAMAGES = {
    "flipped model states": lambda d: flip_bytes(_model_states(d)),
    "truncated model states": lambda d: os.truncate(_model_states(d), _model_states(d).stat().st_size // 2),
    "deleted rank file": lambda d: (d / "rank0.pt").unlink(),
    "garbled lacy.json": lambda d: (d / "lacy.json").write_text("{not json"),
    "deleted manifest": lambda d: (d / MANIFEST).unlink(),
    "flipped manifest": lambda d: (d / MANIFEST).write_text("[]"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_case2_3_a_damaged_checkpoint_names_the_file_and_falls_back(two_checkpoints, tmp_path, damage, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    newest = out / "checkpoints" / "step_00000004"
    assert manifest_problem(newest) is None
    DAMAGES[damage](newest)
    problem = Checkpointer(out, keep_last=2, rank=0).problem("step_00000004")
    assert problem is not None and str(newest) in problem
    ckpt = Checkpointer(out, keep_last=2, rank=0)
    assert ckpt.resume_tag() == "step_00000002" and ckpt.verified == "step_00000002"
    err = capsys.readouterr().err
    assert f"checkpoint step_00000004 cannot be resumed: {problem}; resuming from step_00000002" in err
    assert one_sentence(err)
    assert latest(out) == "step_00000002" and (out / "checkpoints" / "damaged-step_00000004").is_dir()

    # With no checkpoint left that verifies, one sentence names the file and the way out.
    flip_bytes(_model_states(out / "checkpoints" / "step_00000002"))
    with pytest.raises(UserError, match=r"checkpoint step_00000002 cannot be resumed: .*model_states.pt is damaged.*"
                                        r"no older checkpoint .* verifies; .*--fresh"):
        Checkpointer(out, keep_last=2, rank=0).resume_tag()


def test_case2_flipped_bytes_resume_from_the_good_checkpoint_which_is_kept_until_a_newer_verifies(
        two_checkpoints, data, tmp_path):
    """64 flipped bytes in the newest model states: the run says so, resumes from the older
    checkpoint, and keep_last prunes that one only once a newer checkpoint is written."""
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    flip_bytes(_model_states(out / "checkpoints" / "step_00000004"))
    proc = train(out, data, "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=2")
    assert "cannot be resumed" in proc.stderr and "mp_rank_00_model_states.pt is damaged" in proc.stderr
    assert f"resuming {out} from step 2" in proc.stderr
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["damaged-step_00000004", "step_00000004", "step_00000006"]
    assert all(manifest_problem(out / "checkpoints" / t) is None for t in kept[1:])
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))


def test_case2_the_newest_verified_checkpoint_survives_a_save_that_fails(in_process, tmp_path, monkeypatch):
    """keep_last=1: a save that dies before its manifest is written prunes nothing."""
    import lacy_fast.train.checkpoint as checkpoint

    out = tmp_path / "run"
    in_process(out, "train.max_steps=2", "train.keep_last=1")

    def killed(directory):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        in_process(out, "train.max_steps=4", "train.keep_last=1")
    assert latest(out) == "step_00000002" and manifest_problem(out / "checkpoints" / "step_00000002") is None
    monkeypatch.setattr(checkpoint, "write_manifest", write_manifest)
    in_process(out, "train.max_steps=4", "train.keep_last=1")
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_00000004"]


def test_case3_a_run_whose_only_checkpoint_is_truncated_is_one_sentence(two_checkpoints, data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    for step in ("step_00000002", "step_00000004"):
        path = _model_states(out / "checkpoints" / step)
        os.truncate(path, 100)
    proc = train(out, data, "train.max_steps=6", check=False)
    assert proc.returncode == 2 and one_sentence(proc.stderr), proc.stderr[-2000:]
    assert "step_00000004" in proc.stderr and "mp_rank_00_model_states.pt is truncated" in proc.stderr


# ----------------------------------------------------------------------------------------
# Case 4: a full disk is one sentence naming the folder
# ----------------------------------------------------------------------------------------


def test_case4_a_full_disk_in_train_is_one_sentence_and_a_rerun_recovers(data, tmp_path, monkeypatch, capsys):
    import lacy_fast.train.checkpoint as checkpoint

    for key in _DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "run"

    def full(directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / MANIFEST))

    monkeypatch.setattr(checkpoint, "write_manifest", full)
    assert cli_train(out, data, "train.max_steps=2") == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and f"the disk holding {out} is full" in err and "rerun the same command" in err
    monkeypatch.setattr(checkpoint, "write_manifest", write_manifest)
    assert cli_train(out, data, "train.max_steps=2") == 0  # space freed: the rerun completes
    assert latest(out) == "step_00000002" and load_export(out / "export")[1]["step"] == 2


def _prepare_args(corpus: Path, out: Path, vocab: int = 512) -> list[str]:
    return ["prepare", "--input", str(corpus), "--out", str(out), "--vocab-size", str(vocab), "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    synth.write(root, 120, seed=5)
    return root / "corpus.jsonl"


def test_case4_a_full_disk_in_prepare_is_one_sentence_and_a_rerun_recovers(corpus, tmp_path, monkeypatch, capsys):
    import lacy_fast.data.prepare as prepare

    out = tmp_path / "prep"
    real = prepare.write_json

    def full(path, obj):
        if Path(path).name == "stats.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)

    monkeypatch.setattr(prepare, "write_json", full)
    assert cli.main(_prepare_args(corpus, out)) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and f"the disk holding {out} is full" in err
    monkeypatch.setattr(prepare, "write_json", real)
    assert cli.main(_prepare_args(corpus, out)) == 0
    assert json.loads((out / "stats.json").read_text())["resumed_shards"] >= 1


# ----------------------------------------------------------------------------------------
# Case 5: prepare locks its output folder
# ----------------------------------------------------------------------------------------


def test_case5_prepare_is_refused_while_another_holds_its_folder(corpus, tmp_path, capsys):
    out = tmp_path / "prep"
    # Another process holds the folder as a prepare run does while it works; it says when.
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from lacy_fast.lock import DirLock; "
                               f"lock = DirLock({str(out)!r}, 'prepare run'); lock.acquire(); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(_prepare_args(corpus, out, vocab=400)) == 2
        err = capsys.readouterr().err
        assert one_sentence(err) and f"{out} is in use by another prepare run (held by pid {holder.pid}" in err
        assert not (out / "prepare.json").exists() and not (out / "tokenizer.model").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert cli.main(_prepare_args(corpus, out)) == 0  # released: it runs


# ----------------------------------------------------------------------------------------
# Case 6: factscore's inputs and outputs
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("facts")
    synth.write(root, 4, seed=2)
    return root / "facts.jsonl"


def _generations(facts: Path) -> list[dict]:
    people = [json.loads(line) for line in facts.read_text().splitlines()][:2]
    return [{"title": p["name"], "generation": f"{p['name']} was born in 1950."} for p in people]


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
@pytest.mark.parametrize("which", ["generations", "knowledge"])
def test_case6_factscore_input_that_is_not_utf8_is_one_sentence(facts, tmp_path, capsys, encoding, which):
    gen = tmp_path / "gen.jsonl"
    rows = _generations(facts)
    rows[-1]["generation"] += " Zoë Ærø was her teacher."  # not ASCII: Latin-1 bytes are not UTF-8
    files = {"generations": gen, "knowledge": tmp_path / "facts.jsonl"}
    gen.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    shutil.copyfile(facts, files["knowledge"])
    bad = files[which]
    text = bad.read_text(encoding="utf-8") + ('{"name": "Zoë Ærø"}\n' if which == "knowledge" else "")
    bad.write_bytes(text.encode(encoding))
    code = cli.main(["factscore", "--knowledge", str(files["knowledge"]), "--generations", str(gen), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and one_sentence(err), err
    assert str(bad) in err and ("is UTF-16 text" if encoding == "utf-16" else "is not UTF-8 text") in err


def test_case6_factscore_out_under_a_file_is_refused_before_the_work(facts, tmp_path, capsys, monkeypatch):
    import lacy_fast.eval.factscore_cli as factscore_cli

    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in _generations(facts)))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    scored = []
    real = factscore_cli.score_file
    monkeypatch.setattr(factscore_cli, "score_file", lambda *a, **k: scored.append(1) or real(*a, **k))
    code = cli.main(["factscore", "--knowledge", str(facts), "--generations", str(gen), "--out",
                     str(blocker / "fs.json"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and one_sentence(err) and f"{blocker}, which is a file" in err and not scored

    # Should writing fail after the work after all, the result is already on stdout.
    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(factscore_cli, "write_json", full)
    code = cli.main(["factscore", "--knowledge", str(facts), "--generations", str(gen), "--out",
                     str(tmp_path / "fs.json"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2 and one_sentence(captured.err) and "the result is printed above" in captured.err
    assert json.loads(captured.out)["generations"] == 2 and scored == [1]


def test_case6_a_generation_longer_than_spacys_limit_is_scored_in_pieces(source, nlp, monkeypatch):  # noqa: F811
    """spaCy refuses a text over nlp.max_length (E088); a 5 MB generation is over the default
    1,000,000. The same happens here with the limit lowered to keep the test quick."""
    import lacy_fast.eval.sources as sources

    monkeypatch.setattr(nlp, "max_length", 3000)
    monkeypatch.setattr(sources, "CHUNK_CHARS", 1000)
    text = "Anna Tolk was born on 12 March 1950 in Tolmere. " * 200  # 9,600 characters
    with pytest.raises(ValueError, match="E088"):
        nlp(text)  # what scoring it in one piece did
    [item] = source.score([("Anna Tolk", text)])
    assert [(f["text"], f["supported"]) for f in item.facts] == [("12 March 1950", True), ("Tolmere", True)]
    pieces = sources.text_pieces(text)
    assert "".join(p for _, p in pieces) == text and all(len(p) <= 1000 for _, p in pieces)
    assert all(text[off:off + len(p)] == p for off, p in pieces)


# ----------------------------------------------------------------------------------------
# Case 7: a model too large for memory is refused before allocation
# ----------------------------------------------------------------------------------------


def test_case7_a_model_too_large_for_memory_is_one_sentence(data, tmp_path, monkeypatch, capsys):
    for key in _DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    assert cli_train(tmp_path / "run", data, "model.d_model=65536", "train.max_steps=1") == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and "GiB of host memory to train" in err and "model.d_model=65536" in err


def test_case7_the_estimate_counts_every_parameter_and_zero_partitions(monkeypatch):
    import torch

    from lacy_fast.model.gpt import GPT
    from lacy_fast.train import memory

    for kw in (dict(n_layer=2, n_head=2, d_model=64, vocab_size=515), dict(n_layer=1, n_head=2, d_model=32,
                                                                              vocab_size=300, bias=False)):
        cfg = ModelConfig(shape="tiny", **kw)
        assert memory.estimate_params(cfg) == GPT(cfg).num_params()
    big = ModelConfig(shape="lacy-1.3b", vocab_size=32000)
    params = memory.estimate_params(big)
    assert memory.training_bytes(params, 0, 1) == 16 * params
    assert memory.training_bytes(params, 3, 8) == 2 * params
    monkeypatch.setattr(memory, "available_bytes", lambda device: 80 * memory.GIB)
    memory.check_fits(big, 0, 1, torch.device("cpu"))  # about 21 GiB: fits
    monkeypatch.setattr(memory, "available_bytes", lambda device: 16 * memory.GIB)
    with pytest.raises(UserError, match=f"needs at least {16 * params / memory.GIB:,.1f} GiB of host memory"):
        memory.check_fits(big, 0, 1, torch.device("cpu"))
    memory.check_fits(big, 3, 8, torch.device("cpu"))  # ZeRO-3 over 8 ranks: 2 bytes a parameter


# ----------------------------------------------------------------------------------------
# Case 8: smaller tracebacks
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tok) -> Path:
    return export(tmp_path_factory.mktemp("export") / "export", tiny_gpt(tok), tok)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_case8_temperature_nan_is_one_sentence(tiny_export, facts, command, capsys):
    extra = ["--prompt", "Anna"] if command == "generate" else ["--facts", str(facts)]
    assert cli.main([command, "--slm", str(tiny_export), "--temperature", "nan", *extra]) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and "--temperature expects a finite number, got nan" in err


def test_case8_eval_out_under_a_file_is_refused_before_the_work(tiny_export, facts, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli.main(["eval", "--slm", str(tiny_export), "--facts", str(facts), "--out", str(blocker / "ev")]) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and f"{blocker}, which is a file" in err


def test_case8_plot_of_a_metrics_file_with_bytes_that_are_not_utf8(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [json.dumps({"step": s, "loss": 5.0 - s, "loss_gt": 4.0, "loss_call": 1.0, "call_rate": 0.1}).encode()
            for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_bytes(b"\n".join([rows[0], b"\xff\xfe garbage", rows[1], rows[2]]) + b"\n")
    assert cli.main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and f"{run / 'metrics.jsonl'}:2 is not UTF-8 text" in err
    (run / "metrics.jsonl").write_bytes(b"\n".join(rows) + b"\n\xff\xfe{\"st")  # a torn last line is tolerated
    assert cli.main(["plot", str(run)]) == 0 and (run / "curves.png").is_file()


# ----------------------------------------------------------------------------------------
# Case 9: starting over is explicit and never mixes runs
# ----------------------------------------------------------------------------------------


def test_case9_a_deleted_latest_is_refused_and_fresh_starts_over(data, tmp_path):
    out = tmp_path / "run"
    train(out, data, "train.max_steps=4", "train.ckpt_every=2", "train.keep_last=2")
    (out / "checkpoints" / "latest").unlink()
    before = (out / "metrics.jsonl").read_bytes()
    proc = train(out, data, "train.max_steps=3", check=False)
    assert proc.returncode == 2 and one_sentence(proc.stderr)
    assert "holds checkpoints of an earlier run (newest step_00000004)" in proc.stderr and "--fresh" in proc.stderr
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing rewritten

    proc = train(out, data, "train.max_steps=3", "--fresh")
    assert "--fresh: deleted the earlier run's checkpoints, export, metrics.jsonl, config.json" in proc.stderr
    assert "resuming" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_00000003"]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert load_export(out / "export")[1]["step"] == 3


# ----------------------------------------------------------------------------------------
# Case 10: a tokenizer that failed to train commits nothing
# ----------------------------------------------------------------------------------------


def test_case10_a_failed_tokenizer_leaves_the_folder_open_to_a_smaller_vocabulary(corpus, tmp_path, capsys):
    out = tmp_path / "prep"
    assert cli.main(_prepare_args(corpus, out, vocab=100000)) == 2
    err = capsys.readouterr().err
    assert one_sentence(err) and "lower --vocab-size" in err
    assert not (out / "prepare.json").exists() and not (out / "tokenizer.model").exists()
    assert cli.main(_prepare_args(corpus, out, vocab=512)) == 0  # the fix the message suggests
    assert json.loads((out / "prepare.json").read_text())["tokenizer"]["vocab_size"] == 512


def test_case10_a_folder_left_by_an_earlier_version_with_only_prepare_json_is_accepted(corpus, tmp_path):
    """Earlier versions wrote prepare.json before training the tokenizer."""
    out = tmp_path / "prep"
    out.mkdir()
    (out / "prepare.json").write_text(json.dumps({"tokenizer": {"vocab_size": 100000}}))
    assert cli.main(_prepare_args(corpus, out, vocab=512)) == 0
    # Once something was made under its settings, other settings are refused as before.
    with pytest.raises(UserError, match="was prepared with other settings"):
        from lacy_fast.data.prepare import prepare

        prepare(PrepareConfig(inputs=(str(corpus),), out=str(out), tokenizer=TokenizerConfig(vocab_size=400),
                              reader=ReaderConfig()), progress=False)


def test_case10_a_tokenizer_without_prepare_json_is_a_leftover_and_is_trained_again(corpus, tmp_path):
    """A kill between the tokenizer and prepare.json: the next run, whatever its settings,
    does not take that tokenizer for its own."""
    from lacy_fast.data.tokenizer import Tokenizer

    out = tmp_path / "prep"
    out.mkdir()
    shutil.copyfile(train_small(tmp_path, seed=0).path, out / "tokenizer.model")  # 400 pieces
    assert cli.main(_prepare_args(corpus, out, vocab=512)) == 0
    assert Tokenizer.load(out / "tokenizer.model").vocab_size == 512


# ----------------------------------------------------------------------------------------
# Case 11: the export carries checksums that generate and eval verify
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flipped", "truncated", "garbled manifest"])
def test_case11_a_damaged_export_is_one_sentence_in_generate_and_eval(tiny_export, facts, tmp_path, capsys,
                                                                      damage):
    broken = tmp_path / "export"
    shutil.copytree(tiny_export, broken)
    weights = broken / "model.safetensors"
    if damage == "flipped":  # finite bit flips in the weights: the file still parses
        flip_bytes(weights, 8)
        import torch
        from safetensors.torch import load_file

        assert all(bool(torch.isfinite(t).all()) for t in load_file(str(weights)).values())
    elif damage == "truncated":
        os.truncate(weights, weights.stat().st_size - 10)
    else:
        (broken / MANIFEST).write_text('{"files": 3}')
    words = {"flipped": f"{weights} is damaged", "truncated": f"{weights} is truncated",
             "garbled manifest": f"{broken / MANIFEST} is damaged"}[damage]
    for command, extra in (("generate", ["--prompt", "Anna"]), ("eval", ["--facts", str(facts)])):
        assert cli.main([command, "--slm", str(broken), *extra]) == 2
        err = capsys.readouterr().err
        assert one_sentence(err) and f"model export {broken} is damaged: {words}" in err, err
    assert manifest_problem(tiny_export) is None
    load_export(tiny_export)  # the intact one loads


def test_case11_transformers_still_opens_an_export_with_a_manifest(tiny_export):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_export))
    assert model.config.n_layer == 1


def test_case11_manifest_lists_every_file_and_nothing_hidden(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"abc")
    (d / "sub" / "b.json").write_text("{}")
    (d / ".lock").write_text("pid")
    manifest = write_manifest(d)
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.json"] and manifest_problem(d) is None
    (d / "a.bin").write_bytes(b"abd")
    assert manifest_problem(d) == f"{d / 'a.bin'} is damaged (its sha256 differs from the one recorded)"

