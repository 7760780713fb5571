"""The pinned launch settings of the LaCy loss kernels compile well for real GPUs.

No GPU is needed: Triton compiles for sm_90a (the "hopper" settings) and sm_80 (the
"ampere" settings, which also serve sm_86/sm_89 with 99 KiB of shared memory) on the CPU,
and ptxas reports registers and spills. Checked per kernel and dtype: it compiles; shared
memory fits the smallest device the settings serve; the operand loads are pipelined
(cp.async into at least 2 buffers); Hopper runs 16-bit tiles on wgmma; 16-bit kernels do
not spill registers. What this cannot check is speed: that needs a GPU.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lacy_fast.kernels import lacy_ce as op

HERE = Path(__file__).resolve().parent
SHARED_LIMIT = {"hopper": 227 * 1024, "ampere": 99 * 1024}  # H100/H200; RTX 30xx/40xx (A100 has 163 KiB)

pytestmark = pytest.mark.skipif(not op.HAS_TRITON, reason="needs triton")


@functools.lru_cache(maxsize=None)
def aot_report() -> tuple[dict, ...]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(HERE / "lacy_ce_aot.py")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


KERNELS = ("fwd", "fwd_stats", "dlogits_in", "dlogits_recompute", "gemm_tn")
ELEMENTWISE = ("dlogits_in",)  # no matmul: nothing to pipeline into shared memory
CASES = [(t, d, k) for t in ("hopper", "ampere") for d in ("bf16", "fp32") for k in KERNELS]


@pytest.mark.parametrize("target, dtype, kernel", CASES)
def test_kernel_compiles_for_gpu_with_pinned_settings(target, dtype, kernel):
    [row] = [r for r in aot_report() if (r["target"], r["dtype"], r["kernel"]) == (target, dtype, kernel)]
    assert row["shared_bytes"] <= SHARED_LIMIT[row["target"]], row
    if kernel in ELEMENTWISE:
        assert not row["wgmma"] and row["async_copies"] == 0, row
        return
    assert row["async_copies"] > 0 and row["max_buffers"] >= 2, f"operand loads are not pipelined: {row}"
    if row["target"] == "hopper" and row["dtype"] == "bf16":
        assert row["wgmma"], f"Hopper 16-bit tiles should run on wgmma: {row}"
    if row["dtype"] == "bf16" and "spill_bytes" in row:
        assert row["spill_bytes"] == 0, f"register spills: {row}"
