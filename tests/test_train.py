"""The training loop on CPU: single rank, exact resume, 2 ranks with ZeRO 1-3, the
equal-budget stopping rule, signals, refusals and bad configs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lacy_fast.model.io import load_export
from helpers import CLI, SMALL, metrics, train


def test_single_rank_run_logs_every_step_and_exports(data, tmp_path):
    out = tmp_path / "run"
    train(out, data, "train.max_steps=12")
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("step", "loss", "call_rate", "loss_gt", "loss_call", "fact_fraction", "lr", "grad_norm", "gt_tokens"):
        assert all(key in r for r in rows), key
    # A logging interval's throughput, MFU, data wait and peak memory: once, on its last row.
    interval = ("tokens_per_s", "mfu", "data_wait", "peak_mem_gb")
    assert [[key in r for key in interval] for r in rows] == [[r["step"] % 2 == 0] * 4 for r in rows]
    assert all(r["tokens_per_s"] > 0 and 0 <= r["data_wait"] <= 1 and r["peak_mem_gb"] > 0 for r in rows[1::2])
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    # LaCy relabels floor(0.6 * facts) of each micro-batch.
    assert all(abs(r["call_rate"] - 0.6 * r["fact_fraction"]) < 0.01 for r in rows)
    assert rows[1]["mfu"] is None  # no known peak for a CPU
    assert all(r["grad_norm"] > 0 for r in rows)
    model, meta = load_export(out / "export")
    assert meta["step"] == 12 and meta["call_id"] == 2 and model.cfg.d_model == 64
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000012"


def test_resume_equals_an_uninterrupted_run(data, tmp_path):
    """2N steps == N steps + resume + N steps (same losses to rounding): model, optimizer,
    scheduler, RNG (dropout on) and data position are all restored."""
    common = ["train.lr_decay_steps=8", "model.dropout=0.1", "train.grad_accum=2"]
    train(tmp_path / "full", data, "train.max_steps=8", *common)
    train(tmp_path / "split", data, "train.max_steps=4", *common)
    proc = train(tmp_path / "split", data, "train.max_steps=8", *common)
    assert "resuming" in proc.stderr
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 9))
    for a, b in zip(full, split):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert a["gt_tokens"] == b["gt_tokens"] and a["lr"] == pytest.approx(b["lr"])


def test_loss_gt_is_the_trained_loss_under_both_objectives(data, tmp_path):
    """loss_gt is the loss the ordinary targets were trained on: the renormalised nll, or with
    objective.renormalize=false plain cross-entropy, so that (lacy, nothing ignored) loss =
    loss_gt (1 - call_rate) + loss_call call_rate holds at every step under both."""
    first = {}
    for renormalize in ("true", "false"):
        out = tmp_path / renormalize
        train(out, data, "train.max_steps=3", "train.log_every=1", f"objective.renormalize={renormalize}")
        rows = metrics(out)
        for r in rows:
            parts = r["loss_gt"] * (1 - r["call_rate"]) + r["loss_call"] * r["call_rate"]
            assert abs(r["loss"] - parts) < 1e-4 * r["loss"], (renormalize, r)
        first[renormalize] = rows[0]
    # Step 1 sees the same initial model and batch: -log p(y) exceeds -log(p(y) / (1 - p(CALL))).
    assert first["false"]["loss_gt"] > first["true"]["loss_gt"]
    assert first["false"]["loss_call"] == pytest.approx(first["true"]["loss_call"], rel=1e-6)


def test_rerun_when_done_trains_nothing(data, trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)  # trained to step 2
    proc = train(out, data, "train.max_steps=2")
    assert "already trained to step 2" in proc.stderr
    assert len(metrics(out)) == 2


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_with_zero(data, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29400 + stage)]
    train(out, data, "train.max_steps=10", f"zero_stage={stage}", launcher=launcher, env=env)
    rows = metrics(out)
    assert len(rows) == 10
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    # Ranks read disjoint samples: two ranks see twice the targets of one.
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2
    assert rows[0]["gt_tokens"] > 2 * 4 * 64 * 0.5
    model, _ = load_export(out / "export")  # gathered from ZeRO shards: full shapes
    assert model.head_weight.shape[1] == 64


@pytest.mark.distributed
def test_deepspeed_launcher_runs_the_same_entry_point(data, tmp_path):
    """`deepspeed --module lacy_fast.cli train ...` (it passes --local_rank=N before the command)."""
    out = tmp_path / "ds"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    deepspeed = Path(sys.executable).with_name("deepspeed")
    launcher = [str(deepspeed), "--num_gpus", "2", "--master_port", "29410", "--module"]
    cmd = launcher + ["lacy_fast.cli", "train", "--config", "tiny", f"data.path={data}", f"out_dir={out}", *SMALL,
                      "train.max_steps=4", "zero_stage=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(metrics(out)) == 4
    assert json.loads((out / "config.json").read_text())["resolved"]["world_size"] == 2


def test_equal_budget_stopping_rule(data, tmp_path):
    """Runs stop once they have trained on max_gt_tokens ground-truth targets, whatever the
    strategy: LaCy spends fewer targets per step on ground truth, so it runs more steps."""
    budget = 4 * 64 * 6
    train(tmp_path / "none", data, "train.max_steps=100", f"train.max_gt_tokens={budget}", "objective.strategy=none")
    train(tmp_path / "lacy", data, "train.max_steps=100", f"train.max_gt_tokens={budget}")
    none, lacy = metrics(tmp_path / "none"), metrics(tmp_path / "lacy")
    assert len(none) == 6 and none[-1]["gt_tokens"] == budget
    assert len(lacy) > len(none)
    assert lacy[-1]["gt_tokens"] >= budget > lacy[-2]["gt_tokens"]
    schedule = json.loads((tmp_path / "lacy" / "config.json").read_text())["train"]["lr_decay_steps"]
    assert abs(schedule - len(lacy)) <= 2  # the cosine schedule spans the budget's steps


def test_sigterm_checkpoints_and_exits_cleanly(data, tmp_path):
    out = tmp_path / "run"
    cmd = CLI + ["train", "--config", "tiny", f"data.path={data}", f"out_dir={out}", *SMALL, "train.max_steps=100000",
                 "train.log_every=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err
    step = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert step >= 1 and metrics(out)[-1]["step"] == step
    proc = train(out, data, f"train.max_steps={step + 2}")
    assert f"resuming {out} from step {step}" in proc.stderr
    assert metrics(out)[-1]["step"] == step + 2


def test_checkpoint_of_another_model_is_refused(data, trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)  # trained to step 2
    proc = train(out, data, "train.max_steps=4", "model.d_model=32", check=False)
    assert proc.returncode == 2
    assert "checkpoint trained with model.d_model=64, but this run has model.d_model=32" in proc.stderr
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("args, words", [
    (["train.lrr=1"], "did you mean 'train.lr'"),
    (["objective.strategy=magic"], "choose one of"),
    (["zero_stage=5"], "choose 0, 1, 2 or 3"),
    (["train.precision=bf16"], "needs a GPU"),
    (["data.path=/nonexistent/x"], "does not exist"),
])
def test_bad_config_is_one_sentence(data, tmp_path, args, words):
    cmd = CLI + ["train", "--config", "tiny", f"data.path={data}", f"out_dir={tmp_path / 'r'}", *SMALL, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_explain_lists_the_contract_keys(capsys, data):
    from lacy_fast import cli

    assert cli.main(["train", "--explain"]) == 0
    out = capsys.readouterr().out
    for key in ("data.path", "out_dir", "train.max_steps", "train.seq_len", "train.micro_batch_size",
                "train.grad_accum", "train.lr", "objective.strategy", "objective.call_fraction",
                "objective.call_rate", "objective.renormalize", "model.shape", "zero_stage"):
        assert key in out
    assert "docs/method.md" in out and "DESIGN.md" not in out
    may_change = out.split("which may change:")[1]
    assert "train.max_steps" in may_change and "objective.strategy" not in may_change
    assert cli.main(["train", "--explain", f"data.path={data}", "objective.strategy=loss"]) == 0
    fact_fraction = json.loads((data / "stats.json").read_text())["fact_fraction"]
    assert f"objective.call_rate for this config: {0.6 * fact_fraction:.4f}" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------
# The online prefetcher
# ----------------------------------------------------------------------------------------


def online_source(data: Path, corpus: Path, workers: int = 2, cache: str = "", queue_depth: int = 8, **kw):
    from lacy_fast.config import DataConfig, LabelConfig
    from lacy_fast.data.prefetch import OnlineBatches

    cfg = DataConfig(source="online", inputs=(str(corpus),), tokenizer=str(data / "tokenizer.model"),
                     workers=workers, path=cache, queue_depth=queue_depth, label=LabelConfig(batch_size=16))
    return OnlineBatches(cfg, **{**dict(seq_len=64, micro_batch=4, grad_accum=1, world=1, rank=0, seed=0), **kw})


def test_online_labels_equal_the_offline_shards(data):
    from lacy_fast.data.shards import ShardSet

    corpus = data.parent / "synth" / "corpus.jsonl"
    offline = ShardSet(data)
    online = list(online_source(data, corpus).documents())
    assert len(online) == offline.n_docs == 200
    for i, (ids, flags) in enumerate(online):
        ref_ids, ref_flags = offline.document(i)
        assert (ids == ref_ids).all() and (flags == ref_flags).all(), i


def test_online_ranks_split_the_documents(data):
    corpus = data.parent / "synth" / "corpus.jsonl"
    from lacy_fast.data.shards import ShardSet

    offline = ShardSet(data)
    rank1 = list(online_source(data, corpus, world=2, rank=1, workers=1).documents(limit=5))
    for j, (ids, _) in enumerate(rank1):
        assert (ids == offline.document(2 * j + 1)[0]).all()


def test_online_resume_from_a_position_continues_the_stream(data):
    corpus = data.parent / "synth" / "corpus.jsonl"
    stream = online_source(data, corpus).batches()
    batches = [next(stream) for _ in range(6)]
    resumed = online_source(data, corpus).batches(0, batches[2].position)
    for want in batches[3:]:
        got = next(resumed)
        assert (got.idx == want.idx).all() and (got.flags == want.flags).all()


def test_online_cache_is_written_and_read_in_the_next_epoch(data, tmp_path):
    corpus = data.parent / "synth" / "corpus.jsonl"
    source = online_source(data, corpus, cache=str(tmp_path / "cache"), workers=1)
    seen = []
    for batch in source.batches():
        seen.append(batch)
        if batch.position["epoch"] == 1:
            break
    cache = tmp_path / "cache" / "rank000-of-001"
    assert (cache / "stats.json").exists()
    from lacy_fast.data.shards import ShardSet

    assert ShardSet(cache).n_docs == 200
    assert source.workers is None  # epoch 1 read the cache: no labeling processes


def test_a_killed_prefetch_worker_is_a_clear_error(data):
    from lacy_fast.errors import UserError

    corpus = data.parent / "synth" / "corpus.jsonl"
    source = online_source(data, corpus, workers=2, queue_depth=1)
    stream = source.batches()
    while next(stream).position["chunk"] < 2:  # until chunk 1 has been read
        pass
    # The worker that labeled chunk 1 has named its lines as its location. A dead worker
    # breaks the pool: at most workers x queue_depth = 2 chunks are in flight, and the
    # stream needs more (it runs epoch after epoch), so it meets the broken pool.
    worker = source.workers.worker
    os.kill(source.workers.pids[worker], signal.SIGKILL)
    with pytest.raises(UserError, match=rf"prefetch worker {worker} died \(exit code -9\) while labeling "
                                        r".*corpus.jsonl:\d+"):
        for _ in range(100):
            next(stream)


def test_online_training_runs_through_the_loop(data, tmp_path):
    corpus = data.parent / "synth" / "corpus.jsonl"
    out = tmp_path / "run"
    proc = subprocess.run(CLI + ["train", "--config", "tiny", "data.source=online", f"data.inputs=[{corpus}]",
                                 f"data.tokenizer={data / 'tokenizer.model'}", "data.workers=1", f"out_dir={out}",
                                 *SMALL, "train.max_steps=4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = metrics(out)
    assert len(rows) == 4 and 0 < rows[0]["fact_fraction"] < 1


def test_a_run_out_dir_loads_as_its_export(data, tmp_path):
    """generate / eval / --big accept a training run's out_dir (it holds a config.json of its own)."""
    from lacy_fast.cascade.big import LacyBig, load_big
    from lacy_fast.cascade.slm import load_model

    out = tmp_path / "run"
    train(out, data, "train.max_steps=1")
    assert (out / "config.json").is_file() and load_model(out).path == out / "export"
    assert isinstance(load_big(str(out)), LacyBig)


def test_rho_trains_against_a_reference_model(data, tmp_path):
    """Rho-1's excess loss: the reference export runs forward without gradients in the loop."""
    train(tmp_path / "ref", data, "train.max_steps=3", "objective.strategy=none")
    train(tmp_path / "rho", data, "train.max_steps=3", "objective.strategy=rho", "objective.call_rate=0.6",
          f"objective.ref_checkpoint={tmp_path / 'ref' / 'export'}")
    rows = metrics(tmp_path / "rho")
    # rho relabels floor(call_rate * valid targets) of each micro-batch by excess loss.
    assert all(abs(r["call_rate"] - 0.6) < 0.01 for r in rows)
    other = tmp_path / "other-tok"  # a reference on another tokenizer is refused
    import shutil

    shutil.copytree(tmp_path / "ref" / "export", other)
    config = json.loads((other / "config.json").read_text())
    config["lacy_fast"]["tokenizer_sha256"] = "0" * 64  # lacy-fast's fields of the export's config.json
    (other / "config.json").write_text(json.dumps(config))
    from lacy_fast.fileio import write_manifest

    write_manifest(other)  # consistent checksums: the tokenizer check itself speaks
    proc = train(tmp_path / "rho2", data, "train.max_steps=1", "objective.strategy=rho",
                 f"objective.ref_checkpoint={other}", check=False)
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr


def test_judge_without_judge_labels_is_refused(data, tmp_path):
    """The fixture's data was prepared without --judge: a judge run would train a plain LM."""
    proc = train(tmp_path / "judge", data, "train.max_steps=1", "objective.strategy=judge", check=False)
    assert proc.returncode == 2 and "has no judge labels" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "judge" / "checkpoints").exists()


def test_profiler_window_writes_a_trace(data, tmp_path):
    out = tmp_path / "run"
    train(out, data, "train.max_steps=4", "train.profile_start=1", "train.profile_steps=2")
    traces = list((out / "profile").glob("trace_rank0_step1.json"))
    assert traces and json.loads(traces[0].read_text())["traceEvents"]


def test_in_process_training_leaves_no_distributed_state(data, tmp_path, monkeypatch):
    """The demo trains several models in one process, then other runs start: a plain run
    gives back the world of one it made (process group and environment)."""
    import torch.distributed as dist

    from lacy_fast.config import RunConfig, load_config
    from lacy_fast.train.loop import train as train_in_process

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for run in ("a", "b"):
        cfg = load_config(RunConfig, "tiny", [f"data.path={data}", f"out_dir={tmp_path / run}", *SMALL[:-1],
                                              "train.max_steps=1"])
        assert train_in_process(cfg, progress=False)["step"] == 1
        assert not dist.is_initialized() and "RANK" not in os.environ and "MASTER_PORT" not in os.environ
    train(tmp_path / "c", data, "train.max_steps=1")  # a subprocess after them


@pytest.mark.parametrize("strategy", ["none", "loss", "spacy", "lacy", "rho", "judge", "ignore"])
def test_host_counts_match_the_op(strategy):
    """One rule for a valid target: the loader's counts (make_batch, on numpy), the loop's
    ground-truth budget (ground_truth_count) and the training metrics (_micro_sums, on the
    tensors) agree with the op's own selection for every strategy, on targets that include
    every kind of invalid one (ignore_index, <CALL>, past the vocabulary, negative)."""
    import numpy as np
    import torch

    from lacy_fast.data.loader import make_batch
    from lacy_fast.kernels import lacy_linear_cross_entropy
    from lacy_fast.method import Targets, ground_truth_count, selected_count
    from lacy_fast.train.metrics import micro_sums

    rng = np.random.default_rng(1)
    b, t, d, v, call_id = 4, 25, 16, 53, 2
    tokens = rng.integers(3, v, (b, t + 1))
    for value in (-100, call_id, v, v + 7, -3):  # invalid targets, a few of each
        tokens[rng.integers(0, b, 3), rng.integers(1, t + 1, 3)] = value
    flags = rng.integers(0, 4, (b, t + 1)).astype(np.uint8)  # fact and judge bits
    rule = Targets(v, call_id, -100)
    batch = make_batch(tokens, flags, pin=False, targets=rule)
    assert batch.n_valid < b * t  # the invalid ones are not counted

    gen = torch.Generator().manual_seed(1)
    n = b * t
    hidden, weight = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen)
    targets, f = batch.targets.flatten(), batch.flags.flatten()
    loss, stats = lacy_linear_cross_entropy(hidden, weight, targets, f, call_id, strategy=strategy,
                                            call_fraction=0.37, ref_nll=torch.rand(n, generator=gen),
                                            impl="chunked")
    valid = rule.valid(targets)
    assert batch.n_valid == int(valid.sum())
    assert batch.n_facts == int((valid & ((f & 1) != 0)).sum()) and batch.n_judge == int((valid & ((f & 2) != 0)).sum())
    selected = int(stats["is_call"].sum())
    assert selected_count(strategy, 0.37, batch.n_valid, batch.n_facts, batch.n_judge) == selected
    gt = ground_truth_count(strategy, 0.37, batch.n_valid, batch.n_facts, batch.n_judge)
    sums = micro_sums(loss, stats, batch.targets, strategy, rule)
    assert gt == int(sums[2]) == int((valid & ~stats["is_call"]).sum())  # n_gt of the metrics
    assert int(sums[5]) == batch.n_valid


# ----------------------------------------------------------------------------------------
# Guards: divergence, resume identity, the out_dir lock, rows before checkpoints
# ----------------------------------------------------------------------------------------


def _finite_state(path: Path) -> bool:
    import torch

    state = torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def test_a_diverging_run_stops_and_keeps_the_last_finite_model(data, tmp_path):
    """lr=30 diverges within a few steps: the run stops with one sentence naming the step and
    exit code 2; the checkpoints it kept (pruning included) and the export are finite; a
    rerun with a lower lr resumes from the last finite checkpoint under the new lr."""
    import re

    from lacy_fast.errors import UserError

    out = tmp_path / "run"
    args = ["train.ckpt_every=2", "train.keep_last=2", "train.log_every=5"]
    proc = train(out, data, "train.max_steps=30", "train.lr=30", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "training diverged" in proc.stderr
    bad = int(re.search(r"not finite at step (\d+)", proc.stderr).group(1))
    saved = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert bad - 2 <= saved < bad and f"hold the last finite state (step {saved})" in proc.stderr
    kept = sorted(p for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert len(kept) == 2 and all(int(p.name.split("_")[1]) < bad and _finite_state(p) for p in kept)
    model, meta = load_export(out / "export")  # load_export refuses non-finite weights
    assert meta["step"] == saved
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, bad + 1))
    assert rows[-1]["loss"] is None or rows[-1]["grad_norm"] is None  # null: not finite

    # The rerun resumes from that checkpoint and trains its next step under the new lr. Whether
    # it then recovers depends on how far lr=30 threw the weights and Adam's moments (here
    # they are finite but huge, so it may diverge again: then it stops the same clean way).
    proc = train(out, data, f"train.max_steps={saved + 3}", "train.lr=3e-3", *args, check=False)
    assert f"resuming {out} from step {saved}" in proc.stderr
    assert proc.returncode == 0 or (proc.returncode == 2 and "training diverged" in proc.stderr), proc.stderr[-2000:]
    rows = metrics(out)
    assert [r["step"] for r in rows[:saved + 1]] == list(range(1, saved + 2))  # no step logged twice
    assert rows[saved]["lr"] <= 3e-3

    # A NaN export is refused when loaded (generate / eval would print <unk>s).
    from lacy_fast.model.io import save_export

    model.head_weight.data[0, 0] = float("nan")
    save_export(tmp_path / "nan-export", model)
    with pytest.raises(UserError, match=r"NaN or infinite weights \(wte.weight\)"):
        load_export(tmp_path / "nan-export")


def test_resuming_under_other_settings_is_refused_with_the_key(data, trained_run, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)  # trained to step 2
    proc = train(out, data, "train.max_steps=4", "objective.strategy=none", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "trained with objective.strategy='lacy', but this run has objective.strategy='none'" in proc.stderr
    assert json.loads((out / "config.json").read_text())["objective"]["strategy"] == "lacy"  # not overwritten

    from lacy_fast.config import RunConfig, load_config
    from lacy_fast.errors import UserError
    from lacy_fast.train.loop import train as train_in_process

    def again(*overrides):
        cfg = load_config(RunConfig, "tiny", [f"data.path={data}", f"out_dir={out}", *SMALL[:-1],
                                              "train.max_steps=4", *overrides])
        return train_in_process(cfg, progress=False)

    for override, key in [("objective.call_fraction=0.5", "objective.call_fraction"),
                          ("train.micro_batch_size=2", "train.micro_batch_size"),
                          ("data.seed=7", "data.seed"), ("objective.ignore_index=-1", "objective.ignore_index")]:
        with pytest.raises(UserError, match=f"trained with {key}="):
            again(override)
    # What may change does: the run's length, logging, checkpoint cadence, the learning rate.
    assert again("train.log_every=1", "train.keep_last=3", "train.lr=1e-3")["step"] == 4


def test_second_run_is_refused_and_a_killed_run_loses_no_rows(data, tmp_path):
    """A run holds its out_dir: a second one is refused in one sentence. Killed with -9 (its
    lock dies with it), the run's rows are on disk up to its last checkpoint even though
    log_every was never reached, and a rerun resumes."""
    out = tmp_path / "run"
    cmd = CLI + ["train", "--config", "tiny", f"data.path={data}", f"out_dir={out}", *SMALL, "train.max_steps=100000",
                 "train.log_every=1000", "train.ckpt_every=2"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (out / "checkpoints" / "latest").exists():
            assert time.time() < deadline and first.poll() is None, first.stderr.read() if first.poll() else "timeout"
            time.sleep(0.2)
        second = train(out, data, "train.max_steps=4", check=False)
        assert second.returncode == 2 and second.stderr.count("\n") == 1
        assert f"{out} is in use by another training run (held by pid {first.pid}" in second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    step = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    steps = [r["step"] for r in metrics(out)]
    assert steps[:step] == list(range(1, step + 1)), (step, steps)
    proc = train(out, data, f"train.max_steps={step + 2}")
    assert f"resuming {out} from step {step}" in proc.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 3))


def test_loss_and_lacy_train_at_the_same_call_rate(data, tmp_path, monkeypatch):
    """objective.call_rate=auto: loss relabels call_fraction x the data's fact fraction of
    all targets, so its realised CALL rate matches lacy's (which relabels call_fraction of
    each micro-batch's facts) up to the floor per micro-batch and the batches' fact share."""
    from lacy_fast.config import RunConfig, load_config
    from lacy_fast.train.loop import train as train_in_process

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    rows = {}
    for strategy in ("loss", "lacy"):
        cfg = load_config(RunConfig, "tiny", [f"data.path={data}", f"out_dir={tmp_path / strategy}", *SMALL[:-1],
                                              "train.max_steps=8", f"objective.strategy={strategy}"])
        train_in_process(cfg, progress=False)
        rows[strategy] = metrics(tmp_path / strategy)
    fact_fraction = json.loads((data / "stats.json").read_text())["fact_fraction"]
    rate = json.loads((tmp_path / "loss" / "config.json").read_text())["resolved"]["call_rate"]
    assert rate == pytest.approx(0.6 * fact_fraction)
    assert json.loads((tmp_path / "lacy" / "config.json").read_text())["resolved"]["call_rate"] is None
    n = 4 * 64  # targets per micro-batch: floor() loses less than one of them
    for row in rows["loss"]:
        assert rate - 1 / n < row["call_rate"] <= rate
    for row in rows["lacy"]:
        assert 0.6 * row["fact_fraction"] - 1 / n < row["call_rate"] <= 0.6 * row["fact_fraction"]
    loss_mean = sum(r["call_rate"] for r in rows["loss"]) / len(rows["loss"])
    lacy_mean = sum(r["call_rate"] for r in rows["lacy"]) / len(rows["lacy"])
    seen = sum(r["fact_fraction"] for r in rows["lacy"]) / len(rows["lacy"])  # the batches' own fact share
    assert abs(loss_mean - lacy_mean) <= 0.6 * abs(fact_fraction - seen) + 1 / n
    assert abs(loss_mean - lacy_mean) < 0.03  # and before, loss relabeled 60% of all targets


def test_corrupt_shard_payloads_are_one_sentence_naming_the_file(data, tmp_path):
    """A token id past the vocabulary (found when a batch reads it) and a negative document
    length (found when the shards open) in a prepared directory."""
    import shutil

    import numpy as np

    from lacy_fast.data import shards as S
    from lacy_fast.data.loader import ShardBatches
    from lacy_fast.errors import UserError

    bad = tmp_path / "bad-ids"
    shutil.copytree(data, bad)
    shard = bad / S.shard_name(0)
    raw = bytearray(shard.read_bytes())
    n_tokens = S.read_header(shard).n_tokens
    ids = np.frombuffer(raw, dtype=np.uint16, count=n_tokens, offset=S.HEADER.size).copy()
    ids[:] = 60000  # every token: whichever sample comes first reads one
    raw[S.HEADER.size:S.HEADER.size + 2 * n_tokens] = ids.tobytes()
    shard.write_bytes(bytes(raw))
    proc = train(tmp_path / "run", bad, "train.max_steps=2", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert f"shard {shard} is corrupt (token" in proc.stderr and "past its vocabulary of 512" in proc.stderr

    negative = tmp_path / "negative"
    shutil.copytree(data, negative)
    shard = negative / S.shard_name(0)
    header = S.read_header(shard)
    raw = bytearray(shard.read_bytes())
    offsets = np.frombuffer(raw, dtype=np.int64, count=header.n_docs + 1, offset=header.offsets_offset).copy()
    offsets[2] = offsets[1] - 5
    raw[header.offsets_offset:] = offsets.tobytes()
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"shard {shard} is corrupt \\(document 1 has a negative length\\)"):
        ShardBatches(str(negative), seq_len=64, micro_batch=4, grad_accum=1, world=1, rank=0, seed=0)


def test_importing_the_loop_changes_no_environment():
    code = ("import os; before = dict(os.environ); import lacy_fast.train.loop; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_warmup_starts_at_the_full_rate(data, tmp_path):
    """train.warmup_steps=0: DeepSpeed's schedule needs one warm-up step, which then runs at
    the full rate, so the first step's lr is train.lr."""
    out = tmp_path / "run"
    train(out, data, "train.max_steps=3", "train.warmup_steps=0", "train.log_every=1")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["lr"] == pytest.approx(3e-3)
