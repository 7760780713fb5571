"""The GPU check in one command: ``make gpu-check [WHEELS=folder]``.

    python bench/gpu_check.py --wheels gpu-wheels      # on a GPU machine, offline
    python bench/gpu_check.py --cpu-dry-run            # every stage at a tiny size on the CPU

Runs from the checkout as it is (lacy-fast is not installed: ``lacy_fast/kernels/__init__.py``
finds the modules in ``kernels/``), with nothing but torch, triton and a few common packages
preinstalled (no spaCy, no DeepSpeed), plus the wheels of ``--wheels`` (a folder
bench/gpu_wheels.py prepared where a registry is reached, at most 64 MiB). Stages, each a
subprocess with its own time limit, all within ``--budget`` seconds (default 480, the
issue's 8 minutes):

  setup   check the wheel folder (size, MANIFEST.json sizes and sha256) and unpack each
          wheel whose distribution is not importable yet into <work>/site, a private
          folder put on PYTHONPATH (nothing is installed into the machine's Python).
  tests   the GPU-marked tests: pytest -m gpu tests/test_lacy_ce.py.
  kernel  bench/bench_lacy_ce.py at N=16384, D=1024, V=32064 in bf16, every provider
          (ours per strategy, torch eager and compiled, the PyTorch one-pass yardstick,
          Liger, CCE), each checked against the fp64 reference first; a provider that
          is not installed is a row saying so; one that crashes or disagrees fails the
          stage. Rows: <results>/lacy_ce.jsonl.
  train   the product's Trainer (lacy_fast/train/loop.py: DeepSpeed, one GPU, bf16, ZeRO
          stage 1) on shards written at start from synthetic ids and 25% fact flags
          (``synthetic_data``: no corpus, no spaCy, whose import the stage blocks), 30
          steps of lacy-334m (context 1024, micro-batch 16; the first 5 not timed) for
          strategies none and lacy, with flash-attn and with PyTorch SDPA where flash-attn
          is installed (a row says so where it is not): tokens/s, MFU, peak memory and
          LaCy's overhead over none, from the Trainer's own metrics. The end-of-run
          checkpoint and export are not written (``Timed.save``): their I/O is not timed.
          Rows (``"loop": "Trainer"``, ``"engine": "deepspeed"``, ``zero_stage``):
          <results>/train_step.jsonl.
  determinism
          the Triton op (none and lacy, forward and backward, bf16) in two fresh processes
          on the same seeded inputs: loss, selection and both gradients must be equal bit
          for bit (sha256 of their bytes). Rows: <results>/determinism.jsonl.
``--cpu-dry-run`` runs every stage at a tiny size on the CPU: the Trainer on DeepSpeed's
CPU accelerator with gloo, fp32; the determinism stage under TRITON_INTERPRET=1.
Every stage appends a row (passed / failed / timed out, seconds) to <results>/gpu_check.jsonl;
the exit status is 0 only if every stage passed. Every row carries the device name,
library versions and commit (bench/harness.py). Commit before running so the rows name a
real commit.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from lacy_fast.errors import UserError  # noqa: E402  (a plain package: importable from the checkout)
from lacy_fast.fileio import sha256_of  # noqa: E402

STAGES = ("tests", "kernel", "train", "determinism")
# Of the budget left after setup (kernel: two torch.compile builds; train: four DeepSpeed starts).
SHARES = {"tests": 0.2, "kernel": 0.4, "train": 0.32, "determinism": 0.08}
LIMIT_BYTES = 64 * 2**20
MANIFEST = "MANIFEST.json"


def use_checkout() -> None:
    """Import lacy-fast from this checkout, installed or not (``lacy_fast/kernels/__init__.py``
    finds the modules in ``kernels/``)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import lacy_fast.kernels  # noqa: F401


# ----------------------------------------------------------------------------------------
# setup: the wheel folder
# ----------------------------------------------------------------------------------------


def check_wheels(folder: Path, limit: int = LIMIT_BYTES) -> list[Path]:
    """The wheels of a folder bench/gpu_wheels.py prepared, checked against its manifest."""
    if not folder.is_dir():
        raise UserError(f"the wheel folder {folder} does not exist; prepare it with bench/gpu_wheels.py")
    total = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    if total > limit:
        raise UserError(f"the wheel folder {folder} holds {total / 2**20:.1f} MiB, more than the "
                         f"{limit / 2**20:.0f} MiB allowed")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed = {w["file"]: w for w in manifest["wheels"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder / MANIFEST} is missing or unreadable; prepare the folder with "
                         "bench/gpu_wheels.py") from None
    wheels = sorted(folder.glob("*.whl"))
    for wheel in wheels:
        entry = listed.get(wheel.name)
        if entry is None or entry["bytes"] != wheel.stat().st_size or entry["sha256"] != sha256_of(wheel):
            raise UserError(f"{wheel} does not match {MANIFEST}; prepare the folder again")
    absent = sorted(set(listed) - {w.name for w in wheels})
    if absent:
        raise UserError(f"{', '.join(absent)} listed in {MANIFEST} is missing from {folder}")
    return wheels


def _distribution(wheel: Path) -> str:
    return wheel.name.split("-")[0]


def unpack(wheels: list[Path], site: Path) -> list[dict]:
    """Unpack each wheel whose distribution is not installed into ``site``; one row each."""
    rows = []
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        name = _distribution(wheel)
        try:
            version = importlib.metadata.version(name)
            rows.append({"wheel": wheel.name, "action": f"already installed ({name} {version})"})
            continue
        except importlib.metadata.PackageNotFoundError:
            pass
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
        rows.append({"wheel": wheel.name, "action": f"unpacked into {site}"})
    return rows


# ----------------------------------------------------------------------------------------
# The stages (each runs in its own process: python bench/gpu_check.py --stage NAME ...)
# ----------------------------------------------------------------------------------------


def stage_tests(args) -> int:
    import pytest

    # In this process, without the suite's addopts (pytest-xdist may be absent on a GPU machine).
    return int(pytest.main(["-o", "addopts=", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                            str(ROOT / "tests" / "test_lacy_ce.py")]))


def stage_kernel(args) -> int:
    sys.path.insert(0, str(HERE))
    import bench_lacy_ce

    if args.cpu_dry_run:
        argv = ["--device", "cpu", "--shapes", "64x32x211", "--dtype", "fp32", "--reps", "2", "--warmup", "1",
                "--passes", "fwdbwd", "--verify-rows", "64",
                "--providers", "lacy-triton,lacy-chunked,torch-eager,ce-onepass-torch,liger-flce,cce,cce-exact"]
    else:
        n, d, v = bench_lacy_ce.GPU_SHAPE
        argv = ["--shapes", f"{n}x{d}x{v}", "--dtype", "bf16", "--reps", "10", "--warmup", "3", "--passes", "fwd,fwdbwd"]
    return bench_lacy_ce.main(argv + ["--strategies", "lacy,none", "--results", str(args.results / "lacy_ce.jsonl")])


# The train stage's data: synthetic ids and fact flags, written as a `lacy-fast prepare`
# output (no corpus, no spaCy: the GPU machine has neither).
FACT_SHARE = 0.25


def synthetic_data(folder: Path, vocab: int, n_tokens: int, seed: int = 0) -> Path:
    """A prepare-shaped directory: a SentencePiece tokenizer of ``vocab`` pieces (trained on
    random words, so that its ids are what the Trainer checks against), one shard of random
    documents (ids drawn from the non-special pieces, ~FACT_SHARE fact flags, each document
    ending with EOS), prepare.json and stats.json."""
    import random

    import numpy as np

    from lacy_fast.config import TokenizerConfig
    from lacy_fast.data.shards import shard_name, write_shard
    from lacy_fast.data.tokenizer import Tokenizer
    from lacy_fast.fileio import write_json

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(max(2000, vocab + vocab // 4))]
    texts = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(max(200, vocab // 16))]
    tok = Tokenizer.train(texts, TokenizerConfig(vocab_size=vocab), folder / "tokenizer.model")
    gen = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        length = int(gen.integers(200, 2000))
        ids = gen.integers(tok.call_id + 1, tok.vocab_size, length).astype(np.int64)
        flags = (gen.random(length) < FACT_SHARE).astype(np.uint8)
        ids[-1], flags[-1] = tok.eos_id, 0
        docs.append((ids, flags))
        total += length
    write_shard(folder / shard_name(0), docs, tok.sha256, tok.vocab_size)
    facts = int(sum(int(f.sum()) for _, f in docs))
    write_json(folder / "prepare.json", {"synthetic": "bench/gpu_check.py", "vocab_size": vocab, "seed": seed})
    write_json(folder / "stats.json", {"documents": len(docs), "tokens": total, "fact_tokens": facts,
                                       "fact_fraction": facts / total, "judge_tokens": 0})
    return folder


def run_trainer(data: Path, out: Path, strategy: str, attention: str, shape: dict) -> dict:
    """One run of the product's Trainer (DeepSpeed, one process, ZeRO ``shape['zero_stage']``);
    tokens/s, MFU and peak memory of the steps after the first ``warmup``, from its metrics."""
    import statistics

    import torch

    from lacy_fast.config import RunConfig, load_config
    from lacy_fast.train import loop
    from lacy_fast.train.dist import setup_distributed
    from lacy_fast.train.settings import resolve

    class Timed(loop.Trainer):
        def save(self) -> None:  # the end-of-run checkpoint and export: I/O, not what is timed
            self.log()

    warmup, steps = shape["warmup"], shape["steps"]
    cfg = load_config(RunConfig, shape["run_file"], [
        f"data.path={data}", f"out_dir={out}", f"train.seq_len={shape['seq_len']}",
        f"model.max_seq_len={max(shape['seq_len'], 256)}", f"train.micro_batch_size={shape['micro_batch']}",
        "train.grad_accum=1", f"train.max_steps={warmup + steps}", f"train.log_every={warmup}", "train.ckpt_every=0",
        f"train.precision={shape['precision']}", f"zero_stage={shape['zero_stage']}", f"objective.strategy={strategy}",
        f"model.attention={attention}", "train.compile=false"])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    d = setup_distributed()
    try:
        trainer = Timed(cfg, d, resolve(cfg, d.device, d.world), progress=False)
        try:
            trainer.run()
        finally:
            trainer.close()
    finally:
        d.teardown()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > warmup]
    if not timed or not math.isfinite(timed[-1]["loss"]):
        raise RuntimeError(f"no finite timed step in {out / 'metrics.jsonl'}")
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed if "tokens_per_s" in r)
    return {"tokens_per_s": tokens_per_s, "step_ms": shape["micro_batch"] * shape["seq_len"] / tokens_per_s * 1e3,
            "mfu": timed[-1]["mfu"], "peak_mem_gb": timed[-1]["peak_mem_gb"], "loss": timed[-1]["loss"],
            "call_rate": timed[-1]["call_rate"], "timed_steps": len(timed)}


def _block_spacy() -> None:
    """The GPU machine has no spaCy: the train stage must not import it anywhere (an import
    fails here as it would there)."""
    sys.modules["spacy"] = None  # type: ignore[assignment]


def stage_train(args) -> int:
    import tempfile

    import torch

    sys.path.insert(0, str(HERE))
    from harness import env_info, print_table, record

    from lacy_fast.model.attention import flash_available

    _block_spacy()
    if args.cpu_dry_run:
        device = torch.device("cpu")
        shape = dict(run_file="tiny", seq_len=64, micro_batch=2, steps=2, warmup=1, vocab=400, precision="fp32")
    else:
        device = torch.device("cuda")
        shape = dict(run_file="lacy-334m", seq_len=1024, micro_batch=16, steps=25, warmup=5, vocab=32000,
                     precision="bf16")
    shape["zero_stage"] = 1
    backends = ["flash", "sdpa"] if flash_available() and device.type == "cuda" else ["sdpa"]
    common = {"loop": "Trainer", "engine": "deepspeed", "zero_stage": shape["zero_stage"],
              "run_file": shape["run_file"], "seq_len": shape["seq_len"], "micro_batch": shape["micro_batch"], "steps": shape["steps"],
              "precision": shape["precision"], "world_size": 1,
              "data": f"synthetic shards: random ids, {FACT_SHARE:.0%} fact flags, {shape['vocab']}-piece tokenizer",
              "deepspeed": importlib.metadata.version("deepspeed")}
    rows = []
    if "flash" not in backends:
        rows.append({**common, "attention": "flash", "status": "not run: flash-attn not installed"
                     + ("" if device.type == "cuda" else "; needs CUDA")})
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        need = (shape["steps"] + shape["warmup"]) * shape["micro_batch"] * (shape["seq_len"] + 1)
        data = synthetic_data(Path(tmp) / "data", shape["vocab"], 2 * need)
        for attention in backends:
            for strategy in ("none", "lacy"):
                try:
                    result = run_trainer(data, Path(tmp) / f"{strategy}-{attention}", strategy, attention, shape)
                    rows.append({**common, "strategy": strategy, "attention": attention, "status": "ok", **result})
                except Exception as err:  # noqa: BLE001 - a crash is a row, and fails the stage
                    rows.append({**common, "strategy": strategy, "attention": attention, "status": "crashed",
                                 "error": f"{type(err).__name__}: {err}"[:500]})
                    failed = True
    base = {r["attention"]: r["tokens_per_s"] for r in rows if r.get("strategy") == "none" and "tokens_per_s" in r}
    for row in rows:
        if row.get("strategy") == "lacy" and "tokens_per_s" in row and row["attention"] in base:
            row["overhead_vs_none"] = base[row["attention"]] / row["tokens_per_s"] - 1.0
    print_table(rows, ["run_file", "strategy", "attention", "tokens_per_s", "step_ms", "mfu", "peak_mem_gb",
                       "overhead_vs_none", "status"])
    record("train_step", rows, env_info(device), out=args.results / "train_step.jsonl")
    return 1 if failed else 0


# The determinism stage: the Triton op, fwd + bwd on the same seeded inputs, in two processes.
_DETERMINISM_RUN = """
import hashlib, json, sys
import torch
from lacy_fast.kernels import lacy_linear_cross_entropy
n, d, v, dtype, device = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4]), sys.argv[5]
gen = torch.Generator().manual_seed(0)
h = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
w = (torch.randn(v, d, generator=gen) / d ** 0.5).to(device, dtype).requires_grad_()
t = torch.randint(0, v - 1, (n,), generator=gen)
t[torch.rand(n, generator=gen) < 0.05] = -100
f = (torch.rand(n, generator=gen) < 0.25).to(torch.uint8)
out = {}
for strategy in ("none", "lacy"):
    loss, stats = lacy_linear_cross_entropy(h, w, t.to(device), f.to(device), v - 1, strategy=strategy, impl="triton")
    gh, gw = torch.autograd.grad(loss, (h, w))
    named = (("loss", loss), ("grad_hidden", gh), ("grad_weight", gw), ("is_call", stats["is_call"]))
    out[strategy] = {name: hashlib.sha256(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                     .hexdigest() for name, x in named}
print(json.dumps(out))
"""


def stage_determinism(args) -> int:
    """The Triton op twice, in two fresh processes: loss, selection and both gradients must be
    equal bit for bit (sha256 of their bytes)."""
    sys.path.insert(0, str(HERE))
    from harness import env_info, record

    env = dict(os.environ)
    if args.cpu_dry_run:
        shape, device = ("67", "48", "211", "float32"), "cpu"
        env["TRITON_INTERPRET"] = "1"  # the kernels in the interpreter, as the CPU tests run them
    else:
        shape, device = ("16384", "1024", "32064", "bfloat16"), "cuda"
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _DETERMINISM_RUN, *shape, device], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for strategy in runs[0]:
        differ = [name for name in runs[0][strategy] if runs[0][strategy][name] != runs[1][strategy][name]]
        rows.append({"strategy": strategy, "N": int(shape[0]), "D": int(shape[1]), "V": int(shape[2]),
                     "dtype": shape[3], "impl": "triton", "processes": 2, "identical": not differ, "differ": differ,
                     "sha256": runs[0][strategy]})
        print(f"  {strategy}: " + ("bit for bit equal" if not differ else f"DIFFER in {', '.join(differ)}"))
    record("determinism", rows, env_info(device), out=args.results / "determinism.jsonl")
    return 0 if all(r["identical"] for r in rows) else 1


STAGE_FNS = {"tests": stage_tests, "kernel": stage_kernel, "train": stage_train, "determinism": stage_determinism}


# ----------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------


def _record_stage(results: Path, row: dict, device_kind: str) -> None:
    sys.path.insert(0, str(HERE))
    from harness import env_info, record

    record("gpu_check", [row], env_info(device_kind), out=results / "gpu_check.jsonl")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", type=Path, help="a folder prepared by bench/gpu_wheels.py (optional)")
    parser.add_argument("--work", type=Path, default=ROOT / ".gpu-check", help="scratch folder (the unpacked wheels)")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="folder the rows are appended to")
    parser.add_argument("--budget", type=float, default=480.0, help="wall-clock seconds for all stages")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"a subset of {','.join(STAGES)}")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every stage at a tiny size on the CPU")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage here
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if args.budget <= 0:
        parser.error("--budget must be positive")
    args.stage_list = stages
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.stage:  # a child process: one stage
        use_checkout()
        return STAGE_FNS[args.stage](args)

    start = time.monotonic()
    args.results.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    try:
        setup_rows = []
        if args.wheels is not None:
            setup_rows = unpack(check_wheels(args.wheels), args.work / "site")
            env["PYTHONPATH"] = os.pathsep.join([str(args.work / "site"), str(ROOT)]
                                                + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    except (UserError, OSError, zipfile.BadZipFile) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for row in setup_rows:
        print(f"  {row['wheel']}: {row['action']}")
    if not args.cpu_dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device is visible; run on a GPU machine, or pass --cpu-dry-run", file=sys.stderr)
            return 2
    device_kind = "cpu" if args.cpu_dry_run else "cuda"
    child = [sys.executable, str(Path(__file__).resolve()), "--results", str(args.results)]
    if args.cpu_dry_run:
        child.append("--cpu-dry-run")
    all_passed = True
    for i, name in enumerate(args.stage_list):
        left = args.budget - (time.monotonic() - start)
        later = sum(SHARES[s] for s in args.stage_list[i:])
        limit = max(1.0, left * SHARES[name] / later) if i < len(args.stage_list) - 1 else max(1.0, left)
        print(f"\n== {name} (at most {limit:.0f} s) ==", flush=True)
        t0 = time.monotonic()
        try:
            rc = subprocess.run(child + ["--stage", name], env=env, cwd=ROOT, timeout=limit).returncode
            status = "passed" if rc == 0 else f"failed (exit status {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
        seconds = time.monotonic() - t0
        all_passed &= status == "passed"
        _record_stage(args.results, {"stage": name, "status": status, "seconds": round(seconds, 1),
                                     "dry_run": args.cpu_dry_run}, device_kind)
        print(f"== {name}: {status} in {seconds:.0f} s ==", flush=True)
    total = time.monotonic() - start
    print(f"\ngpu check {'PASSED' if all_passed else 'FAILED'} in {total:.0f} s; rows in {args.results}")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
