"""What `lacy-fast train` tells a newcomer and what it lets them do: the banner and start-up
lines, the checkpoint size it announces, initialisation from trained weights, a resume
refusal that names data paths, and the optional loggers (TensorBoard, a fake W&B)."""
import importlib.util
import json
import shutil
import sys
import types

import pytest
import torch

from lacy_fast.model.io import load_export
from helpers import CLI, SMALL, metrics, train


def dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_banner_says_what_the_run_does_and_how_big_a_checkpoint_is(data, tmp_path):
    out = tmp_path / "run"
    proc = train(out, data, "train.max_steps=2", "train.grad_accum=3")
    banner = proc.stdout
    params = load_export(out / "export")[0].num_params()
    stats = json.loads((data / "stats.json").read_text())
    assert f"{params / 1e3:.1f}k parameters" in banner
    assert "768 tokens per step = 4 sequences x 64 tokens x 3 accumulation x 1 rank" in banner
    assert f"{stats['documents']:,} documents" in banner and "2 steps read 1.5k tokens" in banner
    assert "cpu, fp32, ZeRO 0" in banner and f"export {out}/export" in banner
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    assert ("TensorBoard on" if tensorboard else "TensorBoard off (not installed") in banner
    # The announced size against the checkpoint written: 12 bytes per parameter (fp32 weights and
    # AdamW's two moments); the file holds a fixed extra ~20 kB of RNG states and pickle headers.
    from lacy_fast.train.banner import checkpoint_bytes, size

    estimate = checkpoint_bytes(params, "fp32", 0)
    assert f"~{size(estimate)} each" in banner
    written = dir_bytes(out / "checkpoints" / "step_00000002")
    assert estimate <= written < estimate + 60e3, (estimate, written)
    assert proc.stderr == ""  # --quiet: no start-up or progress lines


def test_start_up_lines_come_before_the_work(data, tmp_path):
    import subprocess

    cmd = CLI + ["train", "--config", "tiny", f"data.path={data}", f"out_dir={tmp_path / 'run'}",
                 *[a for a in SMALL if a != "--quiet"], "train.max_steps=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = [line for line in proc.stderr.splitlines() if line.startswith("train: ")]
    assert [s.split(" (")[0] for s in stages] == ["train: opening the data", "train: building the model",
                                                 "train: starting DeepSpeed"]


@pytest.mark.slow
def test_init_from_takes_the_weights_and_a_fresh_optimizer(data, tmp_path):
    first = tmp_path / "first"
    train(first, data, "train.max_steps=4")
    trained = load_export(first / "export")[0].state_dict()
    for source in (first, first / "export", first / "checkpoints" / "step_00000004"):
        out = tmp_path / f"ft-{source.name}"
        # lr so small that one step moves no weight measurably: the export is the initial weights.
        proc = train(out, data, "train.max_steps=1", "train.lr=1e-12",
                     f"train.init_from={source}")
        assert f"initialised from {source} (its step 4), fresh optimizer" in proc.stdout
        model, meta = load_export(out / "export")
        assert meta["step"] == 1 and [r["step"] for r in metrics(out)] == [1]
        for name, tensor in model.state_dict().items():
            assert torch.allclose(tensor, trained[name], rtol=0, atol=1e-9), name
    proc = train(tmp_path / "bad", data, "train.max_steps=1", f"train.init_from={first}", "model.d_model=32",
                 check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "has model.d_model=64 but this run has model.d_model=32" in proc.stderr
    proc = train(tmp_path / "bad2", data, "train.max_steps=1", f"train.init_from={tmp_path / 'nope'}", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_resume_refusal_names_the_data_paths(data, tmp_path):
    mine = tmp_path / "data"  # changed below: a copy, never the shared corpus
    shutil.copytree(data, mine)
    other = tmp_path / "other-data"
    shutil.copytree(data, other)
    stats = json.loads((other / "stats.json").read_text())
    (other / "stats.json").write_text(json.dumps({**stats, "documents": stats["documents"] - 1}))
    out = tmp_path / "run"
    train(out, mine, "train.max_steps=2")
    proc = train(out, other, "train.max_steps=4", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"trained on data.path={mine}, but this run has data.path={other}" in proc.stderr
    assert "6a5c" not in proc.stderr and "digest" not in proc.stderr
    (mine / "stats.json").write_text(json.dumps({**stats, "documents": stats["documents"] - 1}))
    proc = train(out, mine, "train.max_steps=4", check=False)
    assert f"trained on data.path={mine}, but {mine} now holds other content" in proc.stderr


def test_wandb_is_opt_in_and_logs_every_row(data, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    from lacy_fast.config import RunConfig, load_config
    from lacy_fast.errors import UserError
    from lacy_fast.train.loop import train as train_in_process

    logged, runs = [], []

    class Run:
        name = "fake-run"

        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            runs.append("finished")

    def init(**kw):
        runs.append(kw)
        return Run()

    def cfg(out, *extra):
        return load_config(RunConfig, "tiny", [f"data.path={data}", f"out_dir={out}", *SMALL[:-1],
                                               "train.max_steps=4", *extra])

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: refused only when asked for
    train_in_process(cfg(tmp_path / "off"), progress=False)
    with pytest.raises(UserError, match="train.wandb=true needs the wandb package"):
        train_in_process(cfg(tmp_path / "on", "train.wandb=true"), progress=False)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    train_in_process(cfg(tmp_path / "on2", "train.wandb=true", "train.wandb_project=p"), progress=False)
    assert runs[0]["project"] == "p" and runs[0]["name"] == "on2" and runs[-1] == "finished"
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert logged[0][1]["train/loss"] == metrics(tmp_path / "on2")[0]["loss"]


def test_log_every_help_says_what_happens(capsys):
    from lacy_fast import cli

    assert cli.main(["train", "--explain"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train.log_every"))
    assert "metrics.jsonl" in line and "every 10 s in a log file" in line
