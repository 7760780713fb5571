"""The GPU check in one command: ``make gpu-check [WHEELS=folder]``.

    python bench/gpu_check.py --wheels gpu-wheels      # on a GPU machine, offline
    python bench/gpu_check.py --cpu-dry-run            # every stage at a tiny size on the CPU

Runs from the checkout as it is (lacy-fast is not installed: ``lacy_fast.kernels`` is
mapped onto ``kernels/`` the way setup.py's package_dir maps it), with nothing but torch
and triton preinstalled, plus the wheels of ``--wheels`` (a folder bench/gpu_wheels.py
prepared where a registry is reached, at most 64 MiB). Stages, each a subprocess with its
own time limit, all within ``--budget`` seconds (default 480, the issue's 8 minutes):

  setup   check the wheel folder (size, MANIFEST.json sizes and sha256) and unpack each
          wheel whose distribution is not importable yet into <work>/site, a private
          folder put on PYTHONPATH (nothing is installed into the machine's Python).
  tests   the GPU-marked tests: pytest -m gpu tests/test_lacy_ce.py.
  kernel  bench/bench_lacy_ce.py at N=16384, D=1024, V=32064 in bf16, every provider
          (ours per strategy, torch eager and compiled, the PyTorch one-pass yardstick,
          Liger, CCE), each checked against the fp64 reference first; a provider that
          is not installed is a row saying so; one that crashes or disagrees fails the
          stage. Rows: <results>/lacy_ce.jsonl.
  train   30 timed steps of lacy-334m (context 1024, micro-batch 16) for strategies none
          and lacy, with flash-attn and with PyTorch SDPA where flash-attn is installed
          (a row says so where it is not): tokens/s, MFU, peak memory. The steps are a
          plain PyTorch step, not the DeepSpeed loop (DeepSpeed is not on that machine):
          the same GPT and LacyLM module, bf16 weights with fp32 master weights in fused
          AdamW, gradient clipping at 1.0 (what DeepSpeed's bf16 optimizer does on one
          GPU), on synthetic tokens with 25% fact flags, pre-generated on the device (no
          data loader). Rows: <results>/train_step.jsonl.
Every stage appends a row (passed / failed / timed out, seconds) to <results>/gpu_check.jsonl;
the exit status is 0 only if every stage passed. Every row carries the device name,
library versions and commit (bench/harness.py). Commit before running so the rows name a
real commit.
"""
from __future__ import annotations

import argparse
import hashlib
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

STAGES = ("tests", "kernel", "train")
SHARES = {"tests": 0.28, "kernel": 0.47, "train": 0.25}  # of the budget left after setup (kernel: two torch.compile builds)
LIMIT_BYTES = 64 * 2**20
MANIFEST = "MANIFEST.json"


def use_checkout() -> None:
    """Import lacy-fast from this checkout, installed or not."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import lacy_fast

    try:
        import lacy_fast.kernels  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name != "lacy_fast.kernels":
            raise
        lacy_fast.__path__.append(str(ROOT))  # lacy_fast.kernels -> ROOT/kernels, as setup.py maps it
        import lacy_fast.kernels  # noqa: F401


# ----------------------------------------------------------------------------------------
# setup: the wheel folder
# ----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        if entry is None or entry["bytes"] != wheel.stat().st_size or entry["sha256"] != _sha256(wheel):
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

    return int(pytest.main(["-m", "gpu", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
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


def timed_steps(preset: str, strategy: str, attention: str, *, seq_len: int, micro_batch: int, steps: int,
                warmup: int, device, precision: str, vocab: int = 32001) -> dict:
    """Tokens/s, MFU and peak memory of ``steps`` plain PyTorch training steps (module docstring)."""
    import torch

    from lacy_fast.config import ModelConfig, ObjectiveConfig
    from lacy_fast.kernels import selection_bound
    from lacy_fast.model import GPT
    from lacy_fast.method import selected_count
    from lacy_fast.train.metrics import mfu, peak_memory_bytes, peak_tflops
    from lacy_fast.train.objective import LacyLM

    torch.manual_seed(0)
    call_id = vocab - 1
    model = GPT(ModelConfig(shape=preset, vocab_size=vocab, attention=attention)).to(device)
    bf16 = precision == "bf16"
    params = [p for p in model.parameters() if p.requires_grad]
    if bf16:
        model.to(torch.bfloat16)
        master = [p.detach().float().clone().requires_grad_() for p in params]
    else:
        master = params
    opt = torch.optim.AdamW(master, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=device.type == "cuda")
    module = LacyLM(model, ObjectiveConfig(strategy=strategy, call_fraction=0.6), call_id)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, call_id, (micro_batch, seq_len + 1), generator=gen)
    flags = (torch.rand(micro_batch, seq_len, generator=gen) < 0.25).to(torch.uint8)
    n = micro_batch * seq_len
    count = selected_count(strategy, 0.6, n, int((flags & 1).sum()), 0)  # host-side, as the loop has it
    bound = selection_bound(count, n)
    idx, targets, flags = (t.to(device) for t in (tokens[:, :-1], tokens[:, 1:], flags))

    def step():
        loss, _ = module(idx, targets, flags, max_selected=bound)
        loss.backward()
        if bf16:
            for m, p in zip(master, params):
                m.grad = p.grad.float()
                p.grad = None
        torch.nn.utils.clip_grad_norm_(master, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if bf16:
            with torch.no_grad():
                torch._foreach_copy_(params, master)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    final = float(loss.detach())
    if not math.isfinite(final):
        raise RuntimeError(f"the loss is {final} after {warmup + steps} steps ({strategy}, {attention})")
    tokens_per_s = n * steps / elapsed
    return {"tokens_per_s": tokens_per_s, "step_ms": elapsed / steps * 1e3,
            "mfu": mfu(model.estimate_flops_per_token(seq_len), tokens_per_s, peak_tflops(device, precision), 1),
            "peak_mem_gb": peak_memory_bytes(device) / 2**30, "loss": final, "selection_bound": bound,
            "selected": count}


def stage_train(args) -> int:
    import torch

    sys.path.insert(0, str(HERE))
    from harness import env_info, print_table, record

    from lacy_fast.model.attention import flash_available

    if args.cpu_dry_run:
        device, precision = torch.device("cpu"), "fp32"
        shape = dict(preset="tiny", seq_len=64, micro_batch=2, steps=3, warmup=1, vocab=257)
    else:
        device, precision = torch.device("cuda"), "bf16"
        shape = dict(preset="lacy-334m", seq_len=1024, micro_batch=16, steps=30, warmup=5)
    preset = shape.pop("preset")
    backends = ["flash", "sdpa"] if flash_available() and device.type == "cuda" else ["sdpa"]
    common = {"preset": preset, "seq_len": shape["seq_len"], "micro_batch": shape["micro_batch"],
              "steps": shape["steps"], "precision": precision,
              "step_kind": "plain PyTorch step (no DeepSpeed): bf16 weights, fp32 master AdamW, clip 1.0"
              if precision == "bf16" else "plain PyTorch step (no DeepSpeed), fp32, clip 1.0",
              "data": "synthetic tokens, 25% fact flags, on device"}
    rows = []
    if "flash" not in backends:
        rows.append({**common, "attention": "flash", "status": "not run: flash-attn not installed"
                     + ("" if device.type == "cuda" else "; needs CUDA")})
    failed = False
    for attention in backends:
        for strategy in ("none", "lacy"):
            try:
                result = timed_steps(preset, strategy, attention, device=device, precision=precision, **shape)
                rows.append({**common, "strategy": strategy, "attention": attention, "status": "ok", **result})
            except Exception as err:  # noqa: BLE001 - a crash is a row, and fails the stage
                rows.append({**common, "strategy": strategy, "attention": attention, "status": "crashed",
                             "error": f"{type(err).__name__}: {err}"[:500]})
                failed = True
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = {r["attention"]: r["tokens_per_s"] for r in rows if r.get("strategy") == "none" and "tokens_per_s" in r}
    for row in rows:
        if row.get("strategy") == "lacy" and "tokens_per_s" in row and row["attention"] in base:
            row["overhead_vs_none"] = base[row["attention"]] / row["tokens_per_s"] - 1.0
    print_table(rows, ["preset", "strategy", "attention", "tokens_per_s", "step_ms", "mfu", "peak_mem_gb",
                       "overhead_vs_none", "status"])
    record("train_step", rows, env_info(device), out=args.results / "train_step.jsonl")
    return 1 if failed else 0


STAGE_FNS = {"tests": stage_tests, "kernel": stage_kernel, "train": stage_train}


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
