"""Fused LM head + LaCy loss: ``lacy_linear_cross_entropy``.

    loss, stats = lacy_linear_cross_entropy(hidden, weight, targets, flags, call_id,
                                            strategy="lacy", call_fraction=0.6,
                                            max_selected=selection_bound(count, N))

The file reads top to bottom:
  1. Triton kernels: the logit tiles with their row statistics (and, when gradients are
     wanted, the logits themselves, one chunk of rows at a time), d loss / d logits, and
     the fp32-accumulating weight-gradient GEMM.
  2. Host launchers with their launch settings.
  3. The op, registered with ``torch.library`` (custom op + fake + autograd) so
     ``torch.compile(fullgraph=True)`` traces through it with no graph break.
  4. The public function.

The method is in docs/method.md; the semantics, the one-pass algorithm, the passes with
their costs and how ``max_selected`` bounds the correction are in docs/loss-op.md.
"""
import dataclasses
import os
import types
import warnings

import torch

from lacy_fast.errors import UserError
from lacy_fast.method import IMPLS  # the implementation names, defined once

from .lacy_ce_reference import (
    CHUNKED,
    RELABEL_RANKED,
    STRATEGIES,
    LossOptions,
    chunk_rows,
    lacy_ce_one_pass,
    lacy_ce_torch,
    ordinary_coefs,
    selection_bound,
    selection_size,
    static_bound,
    stat_dtype,
    valid_targets,
)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # no triton wheel for this platform: the torch paths still work
    HAS_TRITON = False
    # Just enough for the decorators and annotations below to evaluate; nothing launches.
    triton = types.SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

AUTOTUNE_ENV = "LACY_FAST_AUTOTUNE"  # "1": triton.autotune picks the tiles (never in the interpreter)
# Start of the running max: finite, so exp(m_old - m_new) never sees (-inf) - (-inf).
_NEG_BIG = tl.constexpr(-1.0e30)


# ----------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    DOT_UPCAST is set only in Triton's interpreter for bfloat16 inputs: the 3.9 interpreter
    multiplies bf16 operands as raw integers, so they are widened to fp32 first (exact).
    """
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logit_tile(h_rows, w_rows, row_ok, col_ok, D, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 logits h @ w.T of the rows at h_rows and the columns at w_rows
    (pointer blocks of shape (BLOCK_N, 1) and (BLOCK_V, 1)), D in steps of BLOCK_D."""
    z = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        h = tl.load(h_rows + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_rows + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        z = _dot(h, tl.trans(w), z, DOT_PRECISION, DOT_UPCAST)
    return z


@triton.jit
def _grouped_tile(M, P, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, GROUP: tl.constexpr):
    """(rows, cols, row_ok, col_ok) of this program's (BLOCK_M, BLOCK_P) tile of an (M, P)
    output, GROUP row tiles sweeping the columns together so the column operand's tiles are
    reused from L2 (the matmul tutorial's order)."""
    pid = tl.program_id(0)
    n_row_tiles = tl.cdiv(M, BLOCK_M)
    per_group = GROUP * tl.cdiv(P, BLOCK_P)
    first_row = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_row_tiles - first_row, GROUP)
    rows = (first_row + (pid % per_group) % group_rows) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = ((pid % per_group) // group_rows) * BLOCK_P + tl.arange(0, BLOCK_P)
    return rows, cols, rows < M, cols < P


@triton.jit
def _lacy_ce_fwd_kernel(
    h_ptr,  # (N, D) hidden states, row stride stride_h, unit column stride
    w_ptr,  # (V, D) output head, row stride stride_w, unit column stride
    tgt_ptr,  # (N,) int64 targets in [0, V); only compared with column ids, never used as an address
    m_ptr,  # (S, N) fp32 out: max of the non-CALL logits in split s (_NEG_BIG if none)
    s_ptr,  # (S, N) fp32 out: sum of exp(z - m) over the non-CALL logits in split s
    zt_ptr,  # (N,) fp32 out: target logit, stored by the one split that holds the target column
    zc_ptr,  # (N,) fp32 out: <CALL> logit, stored by the one split that holds call_id
    z_ptr,  # (N, V) out, input dtype: the logits, row stride stride_z (only with STORE_Z)
    N, V, D, call_id, n_splits, stride_h, stride_w, stride_z,
    STORE_Z: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # Program (row block, vocabulary split). Consecutive programs share a split, so the
    # programs resident at once read the same weight tiles (L2 reuse); hidden is small.
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = pid % n_row_blocks
    pid_s = pid // n_row_blocks
    cols_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits) * BLOCK_V
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h

    m = tl.full((BLOCK_N,), _NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    z_t = tl.zeros((BLOCK_N,), tl.float32)
    z_c = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
        z = _logit_tile(h_rows, w_rows, row_ok, col_ok, D, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST)
        if STORE_Z:  # the statistics keep the fp32 tile; the stored copy is rounded to the input dtype
            z_ptrs = z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :]
            tl.store(z_ptrs, z.to(z_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        z_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        z_c += tl.sum(tl.where(cols[None, :] == call_id, z, 0.0), axis=1)
        z = tl.where(col_ok[None, :] & (cols[None, :] != call_id), z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new

    tl.store(m_ptr + pid_s * N + rows, m, mask=row_ok)
    tl.store(s_ptr + pid_s * N + rows, s, mask=row_ok)
    tl.store(zt_ptr + rows, z_t, mask=row_ok & (tgt >= v_begin) & (tgt < v_end))
    call_col = tl.full((BLOCK_N,), call_id, tl.int64)
    tl.store(zc_ptr + rows, z_c, mask=row_ok & (call_col >= v_begin) & (call_col < v_end))


@triton.jit
def _lacy_ce_dlogits_kernel(
    dz_ptr,  # (C, V) input dtype, row stride stride_dz: out d loss / d logits; in: the logits (LOGITS_IN)
    h_ptr,  # (C, D) hidden states of these rows, row stride stride_h (read unless LOGITS_IN)
    w_ptr,  # (V, D) output head, row stride stride_w (read unless LOGITS_IN)
    lse_ptr,  # (C,) fp32 log-sum-exp of each row over v != CALL
    a_ptr,  # (C,) fp32 row coefficients: dz = a exp(z - lse) [v != CALL] + c [v == CALL] + b [v == y]
    b_ptr,
    c_ptr,
    tgt_ptr,  # (C,) int64 row target y, in [0, V)
    C, V, D, call_id, stride_dz, stride_h, stride_w,
    LOGITS_IN: tl.constexpr,  # True: the chunk's logits are in dz (step 1); False: recompute them (step 3)
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # One (BLOCK_N, BLOCK_V) tile per program, in grouped order (weight tiles shared in L2).
    rows, cols, row_ok, col_ok = _grouped_tile(C, V, BLOCK_N, BLOCK_V, GROUP_N)
    dz_ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if LOGITS_IN:
        z = tl.load(dz_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
        z = _logit_tile(h_rows, w_rows, row_ok, col_ok, D, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST)
        # The rounding step 1's stored logits had, so a correction cancels what step 1 added.
        z = z.to(dz_ptr.dtype.element_ty).to(tl.float32)

    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    b = tl.load(b_ptr + rows, mask=row_ok, other=0.0)
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    is_call = cols[None, :] == call_id
    e = tl.where(is_call, 0.0, tl.exp(z - lse[:, None]))
    dz = a[:, None] * e + tl.where(is_call, c[:, None], 0.0) + tl.where(cols[None, :] == tgt[:, None], b[:, None], 0.0)
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _matmul_tn_acc_kernel(
    a_ptr,  # (K, M) input dtype: the chunk's dz (K = rows, M = V), row stride stride_a
    b_ptr,  # (K, P) input dtype: the chunk's hidden states (P = D), row stride stride_b
    c_ptr,  # (M, P) fp32 in/out: grad_weight accumulator, c += a^T @ b, row stride stride_c
    K, M, P, stride_a, stride_b, stride_c,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # A plain GEMM (a transposed on load) whose epilogue adds into an fp32 buffer: every
    # output tile belongs to one program, so no atomics and a deterministic result.
    offs_m, offs_p, m_ok, p_ok = _grouped_tile(M, P, BLOCK_M, BLOCK_P, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_P), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        k_rows = kk.to(tl.int64)[:, None]
        a = tl.load(a_ptr + k_rows * stride_a + offs_m[None, :], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        b = tl.load(b_ptr + k_rows * stride_b + offs_p[None, :], mask=k_ok[:, None] & p_ok[None, :], other=0.0)
        acc = _dot(tl.trans(a), b, acc, DOT_PRECISION, DOT_UPCAST)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_c + offs_p[None, :]
    c_ok = m_ok[:, None] & p_ok[None, :]
    tl.store(c_ptrs, tl.load(c_ptrs, mask=c_ok, other=0.0) + acc, mask=c_ok)


# ----------------------------------------------------------------------------------------
# 2. Host launchers
# ----------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """True when the kernels above run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_lacy_ce_fwd_kernel, InterpretedFunction)


# Launch settings, pinned per target. Untuned defaults chosen from first principles (no
# GPU was available when they were written); LACY_FAST_AUTOTUNE=1 searches the lists below.
# Logit tiles (forward and dlogits), (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages):
# - a 128 x 128 fp32 accumulator is 64 KiB of registers: 8 warps hold it at 64 registers a
#   thread, leaving room for the exp/max/sum epilogue; 128-wide tiles feed Hopper's wgmma
#   (M = 64 per warpgroup) and Ampere's mma.sync at full rate;
# - shared memory per pipeline stage is (BLOCK_N + BLOCK_V) * BLOCK_D * bytes: 32 KiB for
#   16-bit inputs at BLOCK_D = 64. Hopper (227 KiB) takes 4 stages; A100 (163 KiB) and
#   consumer Ampere/Ada (99 KiB) take BLOCK_D = 32 and 4 stages = 64 KiB;
# - fp32 inputs halve BLOCK_D so a stage stays the same size.
# Checked without a GPU (tests/test_lacy_ce_compile.py compiles for sm_90a and sm_80 and
# reads ptxas -v): 16-bit tiles are pipelined (cp.async, 4 buffers = 128 KiB on sm_90a,
# wgmma), the statistics kernel uses 254-255 registers a thread with or without the logit
# store (one CTA per SM, like a GEMM), the recomputing dlogits kernel 128-176, the one
# reading stored logits ~150 (elementwise), the weight-gradient GEMM 182-186, and nothing
# spills. fp32 tiles run on FMA units ("ieee", torch's default) or TF32 mma and the
# statistics kernel spills up to ~220 bytes: fp32 is for checking, bf16 for training.
# Speed is unmeasured: no GPU was at hand.
# The interpreter runs one program at a time in numpy: small tiles there make the tests
# walk every loop (several row blocks, vocabulary tiles, D steps, splits) at tiny shapes.
_LOGIT_TILES = {
    "hopper": {2: (128, 128, 64, 8, 4), 4: (128, 128, 32, 8, 4)},
    "ampere": {2: (128, 128, 32, 8, 4), 4: (128, 128, 16, 8, 4)},
    "interpreter": {2: (16, 64, 16, 1, 1), 4: (16, 64, 16, 1, 1)},
}
# The fp32-accumulating weight-gradient GEMM, (BLOCK_M, BLOCK_P, BLOCK_K, num_warps,
# num_stages): the classic 128 x 128 output tile, same shared-memory budget per stage.
_GEMM_TILES = {
    "hopper": {2: (128, 128, 64, 8, 4), 4: (128, 128, 32, 8, 4)},
    "ampere": {2: (128, 128, 32, 8, 4), 4: (128, 128, 16, 8, 4)},
    "interpreter": {2: (16, 32, 16, 1, 1), 4: (16, 32, 16, 1, 1)},
}
_GROUP = 8  # row blocks that sweep the vocabulary together (L2 reuse of weight tiles)
_WAVES = 2  # forward programs per SM wanted before splitting the vocabulary further


def _target(device: torch.device) -> str:
    if _interpreted():
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major >= 9 else "ampere"


def _dot_consts(dtype: torch.dtype) -> dict[str, object]:
    """DOT_PRECISION: fp32 inputs honour torch's TF32 switch (16-bit inputs ignore it);
    DOT_UPCAST: see ``_dot``."""
    tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return {"DOT_PRECISION": "tf32" if tf32 else "ieee", "DOT_UPCAST": dtype == torch.bfloat16 and _interpreted()}


def _num_sms(device: torch.device) -> int:
    if _interpreted():
        return 3  # any small number: makes the tests use several vocabulary splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def _autotuning() -> bool:
    return os.environ.get(AUTOTUNE_ENV) == "1" and not _interpreted()


# The candidates LACY_FAST_AUTOTUNE=1 searches, (block, block, block, warps, stages) in the
# order of each kernel's BLOCK_* arguments; configurations that do not fit are skipped by
# the autotuner. Results are cached per (key, dtypes) for the life of the process.
_TUNE_LISTS = {
    "logits": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 8, 5),
               (256, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 32, 8, 4), (128, 128, 16, 8, 4)],
    "gemm": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
             (128, 128, 32, 8, 5), (128, 128, 32, 8, 4), (128, 128, 16, 8, 4)],
}
_TUNED: dict[str, object] = {}


def _launch(kernel, blocks, pinned, grid, args, consts, *, key, tune_list, **tune_kwargs):
    """Launch ``kernel`` with the pinned settings, or through triton.autotune when switched on.

    blocks: the kernel's three BLOCK_* argument names; pinned: their values + warps, stages;
    grid: meta -> grid tuple; consts: the other constexpr arguments.
    """
    if _autotuning():
        name = kernel.fn.__name__
        if name not in _TUNED:
            configs = [triton.Config(dict(zip(blocks, c[:3])), num_warps=c[3], num_stages=c[4])
                       for c in _TUNE_LISTS[tune_list]]
            _TUNED[name] = triton.autotune(configs=configs, key=key, **tune_kwargs)(kernel)
        _TUNED[name][grid](*args, **consts)
        return
    meta = dict(zip(blocks, pinned[:3]))
    kernel[grid(meta)](*args, **consts, **meta, num_warps=pinned[3], num_stages=pinned[4])


def _tiles(table: dict, tensor: torch.Tensor) -> tuple[int, ...]:
    return table[_target(tensor.device)][4 if tensor.element_size() == 4 else 2]



def _fwd_splits(rows: int, vocab: int, tiles: tuple[int, ...], device: torch.device) -> int:
    """Vocabulary splits of the statistics kernel: enough programs for about _WAVES per SM."""
    return max(1, min(triton.cdiv(_WAVES * _num_sms(device), triton.cdiv(rows, tiles[0])),
                      triton.cdiv(vocab, tiles[1])))


def _launch_fwd(h, w, targets, call_id, m, s, z_target, z_call, z, n_splits) -> None:
    """The statistics kernel over the rows of ``h``; also writes their logits into ``z``
    unless it is None. m, s: (n_splits, rows) contiguous fp32."""
    n, d = h.shape
    vocab = w.shape[0]
    store = z is not None
    _launch(_lacy_ce_fwd_kernel, ("BLOCK_N", "BLOCK_V", "BLOCK_D"), _tiles(_LOGIT_TILES, h),
            lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * n_splits,),
            (h, w, targets, m, s, z_target, z_call, z if store else m, n, vocab, d, call_id, n_splits,
             h.stride(0), w.stride(0), z.stride(0) if store else 0),
            {"STORE_Z": store, **_dot_consts(h.dtype)},
            key=["N", "V", "D"], tune_list="logits")


def _launch_dlogits(dz, h, w, lse, a, b, c, targets, call_id) -> None:
    """dz = a exp(z - lse) [v != CALL] + c [v == CALL] + b [v == y], one row per row of dz;
    z is dz's content on entry when ``h`` is None, else recomputed from h and w."""
    rows, vocab = dz.shape
    d = w.shape[1]
    logits_in = h is None
    _launch(_lacy_ce_dlogits_kernel, ("BLOCK_N", "BLOCK_V", "BLOCK_D"), _tiles(_LOGIT_TILES, dz),
            lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]) * triton.cdiv(vocab, meta["BLOCK_V"]),),
            (dz, w if logits_in else h, w, lse, a, b, c, targets, rows, vocab, d, call_id, dz.stride(0),
             w.stride(0) if logits_in else h.stride(0), w.stride(0)),
            {"LOGITS_IN": logits_in, "GROUP_N": _GROUP, **_dot_consts(dz.dtype)},
            key=["V", "D"], tune_list="logits", restore_value=["dz_ptr"])


def _launch_gemm_tn_acc(a, b, c) -> None:
    """c += a^T @ b: a (K, M) and b (K, P) in the input dtype, c (M, P) fp32."""
    k, m = a.shape
    p = b.shape[1]
    _launch(_matmul_tn_acc_kernel, ("BLOCK_M", "BLOCK_P", "BLOCK_K"), _tiles(_GEMM_TILES, a),
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"]),),
            (a, b, c, k, m, p, a.stride(0), b.stride(0), c.stride(0)),
            {"GROUP_M": _GROUP, **_dot_consts(a.dtype)},
            key=["M", "P"], tune_list="gemm", restore_value=["c_ptr"])


def row_stats_triton(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, call_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse_nc, z_call, z_target, z_max), each (N,) fp32, without writing any logits: the
    forward when no gradient is wanted (targets in [0, V); z_max the largest logit but
    <CALL>'s, the max of the splits' maxima).

    Napkin math (N rows, D width, V vocabulary, e bytes per input element):
      FLOPs      2 N V D for the logit tiles (tensor cores) + ~6 N V for the epilogue
                 (compare, select, exp, max, sum on the FMA/SFU units, hidden under the
                 matmul when D >= 256).
      HBM bytes  (N D + V D) e at least (each operand once); every program re-reads its
                 hidden block per vocabulary tile and the weight per row block from L2:
                 N D e V / BLOCK_V + V D e N / BLOCK_N bytes of L2 traffic.
      writes     4 N (2 S + 2) bytes of statistics (S vocabulary splits); no logits.
      intensity  2 N V D / ((N + V) D e) = 2 N V / ((N + V) e) FLOP/B: ~10,800 at N = 16384,
                 V = 32064, bf16 -> compute bound; e.g. N = 16384, D = 1024: 1.08 TFLOP,
                 ~1.6 ms at 700 TFLOP/s of bf16.
    Parallelism: N / BLOCK_N row blocks times S splits, S chosen so the grid fills about
    _WAVES programs per SM: N = 4096 gives 32 row blocks, so 9 splits on 132 SMs.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    h, w = hidden.contiguous(), weight.contiguous()
    # Splits are fixed before autotuning picks tiles (the partial buffers depend on them);
    # the kernel spreads whole vocabulary tiles over them, leaving late splits empty if needed.
    n_splits = _fwd_splits(n, vocab, _tiles(_LOGIT_TILES, h), h.device)
    m = torch.empty((n_splits, n), dtype=torch.float32, device=h.device)
    s = torch.empty_like(m)
    z_target = torch.zeros(n, dtype=torch.float32, device=h.device)
    z_call = torch.zeros_like(z_target)
    if n:
        _launch_fwd(h, w, targets, call_id, m, s, z_target, z_call, None, n_splits)
    lse_nc = torch.logsumexp(m + torch.log(s), dim=0)  # (N,) combine the splits; log(0) = -inf is fine
    return lse_nc, z_call, z_target, m.amax(dim=0)


def ordinary_triton(
    hidden: torch.Tensor,  # (N, D)
    weight: torch.Tensor,  # (V, D)
    targets: torch.Tensor,  # (N,) int64 in [0, V)
    coef: torch.Tensor,  # (N,) fp32 d loss / d row loss (0 for rows without loss)
    call_id: int,
    plain: bool,
    to_call: torch.Tensor | None = None,  # (N,) bool: rows whose target is <CALL> from the start
    plain_ce: bool = False,  # strategy none (the chunked backend's shortcut; the kernels need none)
) -> tuple[torch.Tensor, ...]:
    """(lse_nc, z_call, z_target, z_max, grad_hidden, grad_weight): step 1 of the one-pass
    algorithm (z_max: the largest logit but <CALL>'s, from the splits' maxima).

    Per chunk of C rows: the statistics kernel computes the logit tiles and writes them
    (input dtype) beside the row statistics; the dlogits kernel turns them in place into
    the ordinary dz (``ordinary_coefs``); grad_hidden[chunk] = dz @ W (cuBLAS, fp32
    accumulation, written once, input dtype); grad_weight += dz^T @ h_chunk (Triton, fp32
    accumulator). The statistics use the fp32 tiles; dz sees the logits rounded to the
    input dtype, as a PyTorch LM head's logits are. Why a logits buffer and not a fused
    epilogue: dz needs the row's log-sum-exp over the whole vocabulary, which no tile has
    when it is computed; and fusing both gradient products into one kernel needs fp32
    atomics (~34 GB of L2 traffic at N = 16384, D = 1024, V = 32064) beside plain GEMMs.

    Napkin math (N, D, V, e as in ``row_stats_triton``; C rows per chunk):
      FLOPs      6 N V D: logits, dz @ W, dz^T @ h (3 x 1.08 TFLOP at N = 16384, D = 1024,
                 ~4.6 ms at 700 TFLOP/s of bf16); the two-pass algorithm this replaced
                 recomputed the logits in the backward, 8 N V D.
      HBM bytes  the chunk's logits/dz: 5 N V e (written by the statistics kernel, read and
                 written by the dlogits kernel, read by both products): 5.3 GB at N = 16384
                 in bf16, ~1.6 ms at 3.3 TB/s, partly under the GEMMs of other chunks;
                 grad_weight accumulator: 8 V D per chunk (read + write);
                 operands: (C D + V D) e per chunk and product.
      memory     C V e (the chunk) + 4 V D (fp32 accumulator) + the outputs; C V ~ max(N, V) D
                 (``chunk_rows``), so the extra memory is O(N D + V D), never O(N V).
      launches   5 per chunk (statistics, split combine, dlogits, two products) + a few
                 row-sized torch ops; N / C = 26 chunks at N = 16384, D = 1024.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    h, w = hidden.contiguous(), weight.contiguous()
    device = h.device
    step = chunk_rows(n, d, vocab)
    c_max = min(step, n)
    n_splits = _fwd_splits(c_max, vocab, _tiles(_LOGIT_TILES, h), device)
    split_stats = torch.empty(2 * n_splits * c_max, dtype=torch.float32, device=device)  # one chunk's m and s
    z = torch.empty((c_max, vocab), dtype=h.dtype, device=device)  # one chunk's logits, then its dz
    lse_nc = torch.empty(n, dtype=torch.float32, device=device)
    z_call = torch.zeros_like(lse_nc)
    z_target = torch.zeros_like(lse_nc)
    z_max = torch.empty_like(lse_nc)
    grad_hidden = torch.empty_like(h)
    grad_weight = torch.zeros((vocab, d), dtype=torch.float32, device=device)
    for start in range(0, n, step):
        rows = min(step, n - start)
        part = slice(start, start + rows)
        hc, zc = h[part], z[:rows]
        m = split_stats[:n_splits * rows].view(n_splits, rows)
        s = split_stats[n_splits * c_max:n_splits * (c_max + rows)].view(n_splits, rows)
        _launch_fwd(hc, w, targets[part], call_id, m, s, z_target[part], z_call[part], zc, n_splits)
        lse_nc[part] = torch.logsumexp(m + torch.log(s), dim=0)
        z_max[part] = m.amax(dim=0)
        a, b, c = ordinary_coefs(lse_nc[part], z_call[part], coef[part], plain,
                                 None if to_call is None else to_call[part])
        _launch_dlogits(zc, None, w, lse_nc[part], a, b, c, targets[part], call_id)
        torch.mm(zc, w, out=grad_hidden[part])
        _launch_gemm_tn_acc(zc, hc, grad_weight)
    return lse_nc, z_call, z_target, z_max, grad_hidden, grad_weight


def delta_weight_triton(
    hidden: torch.Tensor,  # (k, D) the selected rows' hidden states
    weight: torch.Tensor,  # (V, D)
    targets: torch.Tensor,  # (k,) int64 in [0, V)
    lse_nc: torch.Tensor,  # (k,) fp32 from step 1
    a: torch.Tensor,  # (k,) fp32 coefficients of dz
    b: torch.Tensor,
    c: torch.Tensor,
    call_id: int,
    grad_weight: torch.Tensor,  # (V, D) fp32 accumulator, updated in place
) -> None:
    """grad_weight += dz^T @ hidden for the selected rows (step 3): the dlogits kernel
    recomputes their logits, one chunk at a time, then the fp32-accumulating GEMM.

    Napkin math: 4 k V D FLOPs (2 k / N GEMM units: k = 2458 of N = 16384 for ``lacy`` at
    25% facts, 0.3 units, ~0.5 ms at 700 TFLOP/s of bf16) and 3 k V e bytes of dz.
    """
    k, d = hidden.shape
    vocab = weight.shape[0]
    h, w = hidden.contiguous(), weight.contiguous()
    step = chunk_rows(k, d, vocab)
    dz = torch.empty((min(step, k), vocab), dtype=h.dtype, device=h.device)
    for start in range(0, k, step):
        rows = min(step, k - start)
        part = slice(start, start + rows)
        hc, dzc = h[part], dz[:rows]
        _launch_dlogits(dzc, hc, w, lse_nc[part], a[part], b[part], c[part], targets[part], call_id)
        _launch_gemm_tn_acc(dzc, hc, grad_weight)


TRITON = types.SimpleNamespace(row_stats=row_stats_triton, ordinary=ordinary_triton, delta_weight=delta_weight_triton)


# ----------------------------------------------------------------------------------------
# 3. The op: a torch.library custom op with a fake implementation and autograd
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("lacy_fast::lacy_ce", mutates_args=())
def _lacy_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    flags: torch.Tensor,
    ref_nll: torch.Tensor | None,
    call_id: int,
    bound: int,
    grads: bool,
    impl: str,
    # LossOptions' fields, in order: the schema takes no structs
    strategy: str,
    call_fraction: float,
    ignore_index: int,
    renormalize: bool,
    call_weight: float,
    weight_by_error: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, nll, is_call, p_call, grad_hidden, grad_weight, grad_scale): the forward, with
    the gradients of the loss when ``grads`` (else empty), see ``lacy_ce_one_pass``. The
    scalar options travel as separate arguments and become one ``LossOptions`` here."""
    opts = LossOptions(strategy, call_fraction, ignore_index, renormalize, call_weight, weight_by_error)
    return lacy_ce_one_pass(TRITON if impl == "triton" else CHUNKED, hidden, weight, targets, flags, ref_nll,
                            call_id, opts, bound, grads)


@_lacy_ce.register_fake
def _(hidden, weight, targets, flags, ref_nll, call_id, bound, grads, impl, *options):
    n = hidden.shape[0]
    sdt = stat_dtype(hidden.dtype)
    row = hidden.new_empty(n, dtype=sdt)
    grad_hidden = hidden.new_empty(hidden.shape if grads else (0,))
    grad_weight = weight.new_empty(weight.shape if grads else (0,))
    return (hidden.new_empty((), dtype=sdt), row, hidden.new_empty(n, dtype=torch.bool), row.clone(),
            grad_hidden, grad_weight, hidden.new_empty((), dtype=sdt))


def _setup_context(ctx, inputs, output):
    _, nll, _, p_call, grad_hidden, grad_weight, grad_scale = output
    ctx.save_for_backward(grad_hidden, grad_weight, grad_scale)
    ctx.mark_non_differentiable(nll, p_call, grad_hidden, grad_weight, grad_scale)
    # The other outputs never get a gradient: without this, autograd would fill a zero
    # tensor the size of each (an (N, D) and a (V, D) fill per step) only to ignore it.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_):
    rest = (None,) * (len(ctx.needs_input_grad) - 2)  # no gradient for any argument but hidden and weight
    if grad_loss is None:  # the loss itself took no part in what was differentiated
        return (None, None, *rest)
    grad_hidden, grad_weight, grad_scale = ctx.saved_tensors
    scale = grad_loss.to(grad_scale.dtype) * grad_scale  # NaN when the selection bound was exceeded
    return (grad_hidden * scale if ctx.needs_input_grad[0] else None,
            grad_weight * scale if ctx.needs_input_grad[1] else None,
            *rest)


_lacy_ce.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# 4. The public function
# ----------------------------------------------------------------------------------------


class LacyLossArgumentError(UserError, ValueError):
    """An argument of lacy_linear_cross_entropy that cannot be used (the message says why)."""


def lacy_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    flags: torch.Tensor,
    call_id: int,
    strategy: str = "lacy",
    call_fraction: float = 0.6,
    ref_nll: torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    renormalize: bool = True,
    max_selected: int | None = None,
    call_weight: float = 1.0,
    weight_by_error: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LM head + LaCy loss without an (N, V) logits buffer (except ``impl="torch"``).

    hidden   (N, D) float32 or bfloat16 (float16 too): final hidden states, flattened.
    weight   (V, D) same dtype: the output head; V includes <CALL>.
    targets  (N,) int64; ignore_index marks a position without a target (so do targets
             outside [0, V) and targets equal to call_id; see docs/loss-op.md).
    flags    (N,) uint8 (any integer dtype): bit 0 fact token, bit 1 judge label.
    call_id  id of <CALL>.
    strategy none | loss | spacy | lacy | rho | judge | ignore (docs/method.md).
    call_fraction  share of the candidates relabeled (lacy, loss, rho, ignore), floor'ed.
    ref_nll  (N,) reference-model nll, required by "rho".
    impl     "triton" (CUDA; CPU only under TRITON_INTERPRET=1), "chunked" (PyTorch, chunked
             over tokens), "torch" (materialised reference), "auto" (triton on CUDA when
             importable, else chunked).
    renormalize  True (the paper): targets that stay are scored on the softmax without
             <CALL>, renormalised; False: by plain cross-entropy over the full vocabulary,
             so every one of them pushes p(CALL) down. ``none`` is plain CE either way.
    max_selected  a host-side upper bound on the number of positions the strategy selects
             in this batch (``selection_bound(count, N)`` when the count is known on the
             host, as in training). Used by the ranked strategies (lacy, loss, rho,
             ignore); if the batch selects more, the loss and gradients are NaN. Ignored by
             ``impl="torch"``. None (the default): on CPU tensors the op counts the
             selection itself (``selection_size``: a sum over N flags, free next to the
             GEMMs) and uses ``selection_bound`` of it, the bound a caller would pass, so
             the default is as fast as the hint. On CUDA that count would cost a host
             synchronisation, which the op never makes (CUDA graphs, torch.compile), and
             the host holds nothing that bounds it, so the op corrects floor(call_fraction
             N) rows (correct; for lacy at 25% fact targets four times the rows it
             selects) and says once per process, with a warning, which hint saves that.
             Under torch.compile the CPU count is skipped too (the same static bound).
    call_weight  lambda in (0, 1]: a selected row's loss is (1 - lambda) x its ordinary
             loss + lambda x -log p(CALL) (soft relabeling: a learnable target keeps a
             ground-truth gradient); 1, the default, is the paper's relabel. Ranked
             strategies that relabel (lacy, loss, rho) only.
    weight_by_error  lambda_i = call_weight x (1 - p(y) / p_max) per selected row, 0 where
             the target is already the most likely real token (the [IDK]-token objective).

    Returns (loss, stats): loss is a float32 scalar, the mean over counted positions (0 with
    zero gradients when none is counted), differentiable w.r.t. hidden and weight; stats
    holds (N,) tensors "nll" (float32, -log(p(y) / (1 - p(CALL))), 0 without a target),
    "is_call" (bool, the selected positions; for "ignore" the dropped ones) and "p_call"
    (float32, p(CALL) under the full softmax), all detached. When a gradient is wanted
    (grad mode on and hidden or weight requiring it) the gradients are computed in the
    forward and kept for the backward. No host synchronisation: the op runs inside CUDA
    graphs and under torch.compile(fullgraph=True).
    """
    opts = _checked_options(LossOptions(strategy, call_fraction, ignore_index, renormalize, call_weight,
                                        weight_by_error))
    impl = _check_args(hidden, weight, targets, flags, call_id, ref_nll, impl, max_selected, opts)
    if impl == "torch":
        return lacy_ce_torch(hidden, weight, targets, flags, call_id, opts, ref_nll)
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    bound = _default_bound(opts, targets, flags, weight.shape[0], call_id) if max_selected is None else max_selected
    loss, nll, is_call, p_call, *_ = _lacy_ce(hidden, weight, targets, flags, ref_nll if strategy == "rho" else None,
                                              call_id, bound, grads, impl, *opts.values())
    return loss, {"nll": nll, "is_call": is_call, "p_call": p_call}


def _checked_options(opts: LossOptions) -> LossOptions:
    """``opts`` with its numbers as Python floats, or a LacyLossArgumentError that says which
    option cannot be used."""
    def fail(message: str):
        raise LacyLossArgumentError(message)

    if opts.strategy not in STRATEGIES:
        fail(f"strategy {opts.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    if not 0.0 <= float(opts.call_fraction) <= 1.0:
        fail(f"call_fraction is {opts.call_fraction!r}; it must lie in [0, 1]")
    if not isinstance(opts.renormalize, bool):
        fail(f"renormalize must be True or False; got {opts.renormalize!r}")
    weight = opts.call_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 < weight <= 1.0:
        fail(f"call_weight is {weight!r}; it must lie in (0, 1] (1: the paper's relabel)")
    if not isinstance(opts.weight_by_error, bool):
        fail(f"weight_by_error must be True or False; got {opts.weight_by_error!r}")
    if opts.soft and opts.strategy not in RELABEL_RANKED:
        fail(f"a soft relabel (call_weight < 1 or weight_by_error) applies to the ranked strategies that relabel "
             f"({', '.join(RELABEL_RANKED)}), not to {opts.strategy!r}")
    return dataclasses.replace(opts, call_fraction=float(opts.call_fraction), call_weight=float(weight))


_HINT_NOTED = []  # the one-time message of _default_bound, once per process


def _default_bound(opts: LossOptions, targets, flags, vocab, call_id) -> int:
    """``max_selected`` of a call that gave none (lacy_linear_cross_entropy's docstring):
    the exact count's ``selection_bound`` on CPU (or the static bound where that is less:
    small N, coarse buckets), else the static bound and a one-time note."""
    n = targets.shape[0]
    bound = static_bound(opts.strategy, opts.call_fraction, n)
    if bound == 0 or torch.compiler.is_compiling():
        return bound
    if targets.device.type == "cpu":
        valid = valid_targets(targets, vocab, call_id, opts.ignore_index)
        return min(bound, selection_bound(int(selection_size(opts.strategy, valid, flags, opts.call_fraction)), n))
    if not _HINT_NOTED:
        _HINT_NOTED.append(True)
        warnings.warn(
            f"lacy_linear_cross_entropy: without max_selected the {opts.strategy!r} correction covers "
            f"floor(call_fraction * N) = {bound} of {n} rows on {targets.device.type}; pass "
            "max_selected=selection_bound(count, N), with count the positions the strategy selects as the host "
            "knows it (lacy_fast.method.selected_count of the batch's valid / fact / judge target counts), to "
            "correct only about that many (a quarter for lacy at 25% fact targets). Shown once.",
            stacklevel=3)
    return bound


def _check_args(hidden, weight, targets, flags, call_id, ref_nll, impl, max_selected, opts: LossOptions) -> str:
    """Host-side checks of the tensors' shapes (never of their data) and of the arguments
    beside the options; returns the resolved impl."""
    def fail(message: str):
        raise LacyLossArgumentError(message)

    if impl not in IMPLS:
        fail(f"impl {impl!r} is unknown; choose one of {', '.join(IMPLS)}")
    if max_selected is not None and (isinstance(max_selected, bool) or not isinstance(max_selected, (int, torch.SymInt))
                                     or (isinstance(max_selected, int) and max_selected < 0)):
        fail(f"max_selected must be None or a host-side int >= 0 (not a tensor); got {max_selected!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        fail(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be (N, D) and (V, D); "
             "flatten the batch and sequence dimensions of hidden")
    n, vocab = hidden.shape[0], weight.shape[0]
    if targets.shape != (n,) or flags.shape != (n,):
        fail(f"targets {tuple(targets.shape)} and flags {tuple(flags.shape)} must both be ({n},), one per row of hidden")
    if targets.dtype != torch.int64 or flags.dtype.is_floating_point or flags.dtype == torch.bool:
        fail(f"targets must be int64 and flags an integer tensor; got {targets.dtype} and {flags.dtype}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16,
                                                            torch.float64):
        fail(f"hidden and weight must share a float dtype (float32, bfloat16); got {hidden.dtype} and {weight.dtype}")
    if not 0 <= call_id < vocab:
        fail(f"call_id {call_id} is outside the vocabulary of {vocab} rows of weight")
    tensors = [hidden, weight, targets, flags]
    if opts.strategy == "rho":
        if ref_nll is None:
            fail('strategy "rho" needs ref_nll, the reference model\'s (N,) nll of every position')
        if ref_nll.shape != (n,) or not ref_nll.dtype.is_floating_point:
            fail(f"ref_nll must be a float tensor of shape ({n},); got {ref_nll.dtype} {tuple(ref_nll.shape)}")
        tensors.append(ref_nll)
    if len({t.device for t in tensors}) != 1:
        fail("hidden, weight, targets, flags (and ref_nll) must be on the same device")
    if impl == "auto":
        return "triton" if hidden.is_cuda and HAS_TRITON else "chunked"
    if impl == "triton":
        if not HAS_TRITON:
            fail('impl="triton" needs the triton package; install it or use impl="chunked"')
        if hidden.dtype == torch.float64:
            fail('impl="triton" takes float32, bfloat16 or float16 inputs; use impl="torch" for float64')
        if not hidden.is_cuda and not _interpreted():
            fail('impl="triton" needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, '
                 'to run the kernels on CPU); use impl="chunked" on CPU')
    return impl
