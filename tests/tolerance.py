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
