"""Float tolerances derived from the dtype's rounding unit and the values' magnitude, never from one run's output.

Two computations of the same math that differ only in the order (or fusion) of their floating-point operations
agree to within `terms * eps * scale`, where eps is the dtype's machine epsilon, scale the magnitude of the values
(max |expected|) and `terms` the number of rounding steps in which they may differ, per element: for one reduction
of n products evaluated in another order, n (the classic worst-case bound of a reordered sum); for a whole forward,
the sum of the reduction lengths along its path. Each call site states its count.
"""

from __future__ import annotations

import torch

# A whole forward of the tiny test models (conftest.py: at most 3 layers, d <= 64, d_ff <= 128, 7 tokens, vocab 97):
# per layer the reductions along the path are q/k/v/o (4 d), the attention scores and mix (d_h + T), the MLP
# (d + d_ff) and two norms (2 d): < 1024 for these sizes; three layers and the LM head stay under 4096.
FORWARD_TERMS = 4096
# A backward pass runs the transposed products of the forward plus the weight-gradient products: twice the path.
BACKWARD_TERMS = 2 * FORWARD_TERMS
# A forward in bfloat16/float16 (a half-precision base or autocast): every product rounds its inputs (2 units) and
# each of the ~10 ops of a layer rounds its output; <= 32 rounding units of the half dtype for these models.
HALF_TERMS = 32
# The thin maps P, Q of one matrix: at most four chained contractions (Tucker core x depth x qkv x att, then the
# head basis) of ranks <= 8 in the tests, i.e. fewer than 32 products per element; 64 leaves a factor 2.
MAP_TERMS = 64
# HF runs some ops of a float64 model in float32 (Llama-family RMSNorms cast to float32, T5's norm its variance, eager
# attention its softmax, MoE routers their d-long logits), so two float64 computations a few eps64 apart can round
# there to float32 values one unit apart. Per layer <= 3 norms and 2 softmaxes of <= 3 roundings each (input,
# variance, output: 15), or in an MoE layer 2 norms, a softmax and a router (d + 1 <= 17, plus its softmax): <= 35;
# <= 4 layers (2 + 2, encoder-decoder) and 2 final norms stay under 128 float32 units (the float64 path adds
# FORWARD_TERMS * eps64, < 1e-5 of one). A float64 forward through HF is compared in these float32 units.
FLOAT32_INSIDE_TERMS = 128
# A forward of all-MiniLM-L6 (6 layers, d = 384, d_ff = 1536, 12 heads of 32, <= 32 tokens) with its 2-way head: per
# layer q/k/v/o (4 d), scores and mix (d_h + T), the MLP (d + d_ff) and two norms (2 d) = 4288; six layers, the
# pooler and the classifier (2 d) make 26496 < 32768.
MINILM_FORWARD_TERMS = 32768


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def tolerance(
    expected: torch.Tensor, terms: int, scale: float | None = None, dtype: torch.dtype | None = None
) -> float:
    """The absolute tolerance for `terms` rounding steps of `dtype` (default: expected's) at the magnitude `scale`
    (default: max |expected|)."""
    if scale is None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    dtype = dtype or expected.dtype
    return terms * eps(dtype) * max(scale, torch.finfo(dtype).tiny)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    terms: int,
    msg: str | None = None,
    scale: float | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """|actual - expected| <= terms * eps(dtype) * scale, elementwise (and equal shapes and dtypes)."""
    atol = tolerance(expected, terms, scale, dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=msg)


def assert_differs(
    actual: torch.Tensor,
    expected: torch.Tensor,
    terms: int,
    msg: str | None = None,
    scale: float | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """max |actual - expected| > terms * eps(dtype) * scale: a change that rounding alone cannot make (the converse of
    assert_close, for "did it move" checks whose comparison afterwards would otherwise be vacuous)."""
    atol = tolerance(expected, terms, scale, dtype)
    moved = float((actual - expected).abs().max())
    assert moved > atol, f"{msg + ': ' if msg else ''}moved by {moved:.3g}, within the rounding bound {atol:.3g}"
