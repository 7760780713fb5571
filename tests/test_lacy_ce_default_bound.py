"""lacy_linear_cross_entropy without ``max_selected``: on CPU tensors the op counts the
selection itself and corrects the same rows as with the hint the training loop passes
(``selection_bound`` of the host-side count), bit for bit; elsewhere it keeps the static
bound (no host synchronisation) and says once which hint saves the extra rows."""
from __future__ import annotations

import contextlib
import functools
import warnings

import pytest
import torch

from lacy_ce_cases import check, make_case
from lacy_ce_cases import run as run_case
from lacy_fast.kernels import lacy_linear_cross_entropy, selection_bound
from lacy_fast.kernels import lacy_ce as op
from lacy_fast.kernels.lacy_ce_reference import RANKED, LossOptions, static_bound, valid_targets
from lacy_fast.method import RANK_FACTS, selected_count

IGNORE = -100
FRACTION = 0.6


def inputs(n, d, v, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)  # call_id = v - 1 among them: not a target
    targets[torch.rand(n, generator=gen) < 0.1] = IGNORE
    flags = (torch.rand(n, generator=gen) < 0.25).to(torch.uint8) | ((torch.rand(n, generator=gen) < 0.3) << 1).to(
        torch.uint8)
    return hidden, weight, targets, flags, torch.rand(n, generator=gen) * 5, v - 1


def host_hint(strategy, targets, flags, vocab, call_id):
    """The bound the training loop passes, from host-side counts."""
    valid = valid_targets(targets, vocab, call_id, IGNORE)
    counts = [int(valid.sum()), int((valid & ((flags & 1) != 0)).sum()), int((valid & ((flags & 2) != 0)).sum())]
    return selection_bound(selected_count(strategy, FRACTION, *counts), targets.numel())


@contextlib.contextmanager
def bounds_seen(bounds: list):
    """Records the bound the public wrapper hands to the op (its 7th argument)."""
    real = op._lacy_ce

    def spy(*args):
        bounds.append(args[6])
        return real(*args)

    op._lacy_ce = spy
    try:
        yield bounds
    finally:
        op._lacy_ce = real


def run(case, strategy, impl, max_selected, bounds):
    hidden, weight, targets, flags, ref_nll, call_id = case
    with bounds_seen(bounds):
        loss, stats = lacy_linear_cross_entropy(hidden, weight, targets, flags, call_id, strategy=strategy,
                                                call_fraction=FRACTION, ref_nll=ref_nll, ignore_index=IGNORE,
                                                impl=impl, max_selected=max_selected)
    grads = torch.autograd.grad(loss, (hidden, weight))
    return [loss.detach(), *grads, stats["is_call"]]


CASES = [(s, "chunked", (300, 24, 97)) for s in sorted(RANKED)] + [(s, "triton", (37, 48, 211))
                                                                    for s in sorted(RANK_FACTS)]


@pytest.mark.parametrize("strategy,impl,shape", CASES)
def test_no_hint_on_cpu_corrects_the_hinted_rows_bit_for_bit(strategy, impl, shape):
    case = inputs(*shape)
    hint = host_hint(strategy, case[2], case[3], shape[2], case[5])
    assert hint < static_bound(strategy, FRACTION, shape[0])  # the case tells the two bounds apart
    bounds = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no message on CPU
        default = run(case, strategy, impl, None, bounds)
    hinted = run(case, strategy, impl, hint, bounds)
    assert bounds == [hint, hint]
    for a, b in zip(default, hinted):
        assert torch.equal(a, b)


def test_no_hint_never_exceeds_the_static_bound():
    """At small N a bucket can round the count above floor(call_fraction N): the default then
    corrects the static bound's rows, and agrees with the fp64 truth (lacy_ce_cases.check)."""
    case = make_case("loss", torch.float32)
    hint = selection_bound(case.host_count(), 37)
    static = static_bound("loss", case.call_fraction, 37)
    assert hint > static
    with bounds_seen([]) as bounds:
        result = run_case(functools.partial(lacy_linear_cross_entropy, impl="chunked"), case.hidden, case.weight,
                          case)
    assert bounds == [static]
    check(result, case)


def test_elsewhere_the_static_bound_and_one_message_naming_the_hint(monkeypatch):
    monkeypatch.setattr(op, "_HINT_NOTED", [])
    targets = torch.zeros(4096, dtype=torch.int64, device="meta")
    flags = torch.zeros(4096, dtype=torch.uint8, device="meta")
    with pytest.warns(UserWarning, match=r"max_selected=selection_bound\(count, N\)") as caught:
        assert op._default_bound(LossOptions("lacy", FRACTION, IGNORE), targets, flags, 100, 99) == 2457
    assert "2457 of 4096 rows" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert op._default_bound(LossOptions("loss", FRACTION, IGNORE), targets, flags, 100, 99) == 2457
        assert op._default_bound(LossOptions("spacy", FRACTION, IGNORE), targets, flags, 100, 99) == 0
