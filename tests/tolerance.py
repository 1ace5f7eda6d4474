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


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def tolerance(expected: torch.Tensor, terms: int) -> float:
    """The absolute tolerance for `terms` rounding steps at the magnitude of `expected`."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return terms * eps(expected.dtype) * max(scale, torch.finfo(expected.dtype).tiny)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, terms: int, msg: str | None = None) -> None:
    """|actual - expected| <= terms * eps(dtype) * max|expected|, elementwise (and equal shapes and dtypes)."""
    torch.testing.assert_close(actual, expected, atol=tolerance(expected, terms), rtol=0, msg=msg)
