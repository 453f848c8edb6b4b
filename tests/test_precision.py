"""Precision of weight edits: the blocked float32 kernel against a float64 reference, and the bound on a
bf16/fp16 edit against the float32 edit of the same model.

Bound (per output vector ``w`` of a writer, i.e. one slice along its residual axis; ``P = I - r r^T``):
a bf16 model holds ``w_b = round(w)``; the edit computes ``P w_b`` in float32 and rounds once, so
``|edit_b(w) - P w| <= |w_b - w| + eps |P w_b|`` (``eps`` = the unit roundoff: 2^-8 bf16, 2^-11 fp16),
i.e. the edit adds at most one rounding to what loading in bf16 already cost, and what is left along
``r`` is at most that one rounding: ``|r . edit_b(w)| <= eps |P w_b|``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import HARMFUL, HARMLESS, tiny_lm

from abliterate import capture, orthogonalize
from abliterate.measure.directions import mean_diff
from abliterate.ops.kernel import project_tensor

HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def orthonormal(hidden: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(hidden, k, generator=g, dtype=torch.float64))[0]
    return q.T.contiguous()


def reference(w: torch.Tensor, axis: int, basis: torch.Tensor, scale: float, norm_preserving: bool) -> torch.Tensor:
    """The edit in float64, written densely: move the residual axis last, x - s (x U^T) U."""
    x = w.double().movedim(axis, -1)
    new = x - scale * (x @ basis.T) @ basis
    if norm_preserving:
        new = new * (x.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True))
    return new.movedim(-1, axis)


CASES = [((64, 50), 0), ((70, 64), 1), ((3, 64, 20), 1), ((3, 20, 64), 2), ((64,), 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("work", [None, 300])
def test_blocked_kernel_equals_float64_reference(dtype, norm_preserving, work):
    """With a 300-element work buffer every tensor spans many row blocks; the result is the float64 edit of
    the stored values, rounded once to the stored dtype."""
    basis = orthonormal(64, 2, seed=9)
    g = torch.Generator().manual_seed(4)
    for shape, axis in CASES:
        if len(shape) == 1 and norm_preserving:
            continue  # biases are never norm-preserved
        weight = (0.1 * torch.randn(shape, generator=g)).to(dtype)
        want = reference(weight, axis, basis, 0.8, norm_preserving)
        buffer = None if work is None else torch.empty(work, dtype=torch.promote_types(dtype, torch.float32))
        project_tensor(weight, axis, basis.float(), 0.8, norm_preserving, work=buffer)
        slack = HALF_ULP[dtype] + (2e-6 if dtype != torch.float64 else 1e-12)  # one rounding + float32 maths
        assert ((weight.double() - want).abs() <= slack * want.abs() + 1e-7).all(), (shape, axis, dtype)


def writer_slices(lm):
    """name -> ([n, hidden] copy of a writer's output vectors, whether a post-norm follows it), for every
    edited weight and bias (embeddings included)."""
    out = {}
    for w in [*lm.anatomy.embeddings, *lm.anatomy.all_writers()]:
        t = w.weight.detach()
        out[w.name] = (t.movedim(w.out_axis, -1).reshape(-1, t.shape[w.out_axis]).double(), w.post_norm is not None)
        if w.bias is not None:
            out[f"{w.name}.bias"] = (
                getattr(w.module, w.bias).detach().reshape(1, -1).double(),
                w.post_norm is not None,
            )
    return out


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "qwen2_moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_edit_is_within_one_rounding_of_the_float32_edit(family, dtype):
    lm32 = tiny_lm(family)
    r = mean_diff(capture(lm32, HARMFUL, HARMLESS))[1, -1]
    lm_low = copy.deepcopy(lm32)
    lm_low.model.to(dtype)
    original, loaded = writer_slices(lm32), writer_slices(lm_low)
    orthogonalize(lm32, r)
    orthogonalize(lm_low, r)
    edited32, edited_low = writer_slices(lm32), writer_slices(lm_low)
    eps, u = HALF_ULP[dtype], r.vector.double() / r.vector.double().norm()
    assert edited32.keys() == original.keys()
    for name, (want, post_norm) in edited32.items():
        got, w, w_low = edited_low[name][0], original[name][0], loaded[name][0]
        if not post_norm:  # the low-precision edit is the exact edit of the loaded values, rounded once
            exact = w_low - (w_low @ u)[:, None] * u
            assert ((got - exact).abs() <= eps * exact.abs() + 1e-6 * exact.norm(dim=-1, keepdim=True)).all(), name
        edit_err = (got - want).norm(dim=-1)
        load_err = (w_low - w).norm(dim=-1)
        assert (edit_err <= load_err + 1.01 * eps * want.norm(dim=-1) + 1e-6).all(), name
        if not post_norm:  # with a post-norm, g*r is what gets removed, not r
            leak = (got @ u).abs()
            assert (leak <= 1.01 * eps * got.norm(dim=-1) + 1e-6).all(), name
