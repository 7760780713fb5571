"""Compile the LaCy loss kernels for real GPUs on a machine without one; print a JSON report.

    python tests/lacy_ce_aot.py        # must run without TRITON_INTERPRET (the test does that)

For each target in the launchers' tables (hopper -> sm_90a, ampere -> sm_80), dtype and
kernel, with the pinned launch settings: shared memory, whether the operand loads are
software-pipelined (cp.async into multi-buffered shared memory), whether Hopper's wgmma is
used, and ptxas's register and spill counts. Pointers and the int arguments that are
multiples of 16 at real shapes (strides, D, V) get the divisibility hints Triton adds at
launch; without them no load could be vectorised or pipelined.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lacy_fast.kernels import lacy_ce as op

ALIGNED = ("stride_h", "stride_w", "stride_z", "stride_dz", "stride_a", "stride_b", "stride_c", "D", "V", "P", "M")
CAPABILITY = {"hopper": 90, "ampere": 80}
ARCH = {90: "sm_90a", 80: "sm_80"}


def compile_kernel(kernel, types, consts, capability, warps, stages):
    names = kernel.arg_names
    runtime = [n for n in names if n not in consts]
    signature = dict(zip(runtime, types))
    signature.update({n: "constexpr" for n in consts})
    signature = {n: signature[n] for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or n in ALIGNED}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": warps, "num_stages": stages})


def ptxas_info(ptx: str, arch: str) -> dict:
    """Registers and spill bytes from ptxas -v (the newest bundled ptxas), or {} if none runs."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        ptxas = os.path.join(bin_dir, name)
        if not os.path.exists(ptxas):
            continue
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lacy_ce_{os.getpid()}.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.devnull], capture_output=True,
                             text=True)
        os.unlink(path)
        regs = re.search(r"Used (\d+) registers", out.stderr)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
        if out.returncode == 0 and regs and spills:
            return {"registers": int(regs.group(1)), "spill_bytes": int(spills.group(1)) + int(spills.group(2))}
    return {}


def report() -> list[dict]:
    rows = []
    for target, capability in CAPABILITY.items():
        for esize, dt in ((2, "bf16"), (4, "fp32")):
            ptr = f"*{dt}"
            dot = {"DOT_PRECISION": "ieee" if dt == "fp32" else "tf32", "DOT_UPCAST": False}
            bn, bv, bd, warps, stages = op._LOGIT_TILES[target][esize]
            bm, bp, bk, gwarps, gstages = op._GEMM_TILES[target][esize]
            logit_tiles = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, **dot)
            fwd_types = [ptr, ptr, "*i64"] + ["*fp32"] * 4 + [ptr] + ["i32"] * 8
            dlogits_types = [ptr, ptr, ptr] + ["*fp32"] * 4 + ["*i64"] + ["i32"] * 7
            kernels = {
                "fwd": (op._lacy_ce_fwd_kernel, fwd_types, dict(STORE_Z=True, **logit_tiles), warps, stages),
                "fwd_stats": (op._lacy_ce_fwd_kernel, fwd_types, dict(STORE_Z=False, **logit_tiles), warps, stages),
                "dlogits_in": (op._lacy_ce_dlogits_kernel, dlogits_types,
                               dict(LOGITS_IN=True, GROUP_N=op._GROUP, **logit_tiles), warps, stages),
                "dlogits_recompute": (op._lacy_ce_dlogits_kernel, dlogits_types,
                                      dict(LOGITS_IN=False, GROUP_N=op._GROUP, **logit_tiles), warps, stages),
                "gemm_tn": (op._matmul_tn_acc_kernel, [ptr, ptr, "*fp32"] + ["i32"] * 6,
                            dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_K=bk, GROUP_M=op._GROUP, **dot), gwarps, gstages),
            }
            for name, (kernel, types, consts, w, s) in kernels.items():
                compiled = compile_kernel(kernel, types, consts, capability, w, s)
                ttgir = compiled.asm["ttgir"]
                buffers = [int(m) for m in re.findall(r"memdesc<(\d+)x\d+x\d+x", ttgir)]
                rows.append({
                    "target": target, "capability": capability, "dtype": dt, "kernel": name,
                    "shared_bytes": compiled.metadata.shared,
                    "async_copies": ttgir.count("async_copy_global_to_local"),
                    "max_buffers": max(buffers, default=1),
                    "wgmma": "warp_group_dot " in ttgir,
                    **ptxas_info(compiled.asm["ptx"], ARCH[capability]),
                })
    return rows


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    print(json.dumps(report()))
