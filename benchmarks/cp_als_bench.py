#!/usr/bin/env python
"""import-lora's CP-ALS (lorta.import_lora.cp_als, on the LoRA's own factors) against TensorLy's parafac (on the
dense tensor), from the same start, on a MiniLM-shaped update tensor (d=384, d_h=32, 12 heads, 6 layers, 4
matrices; every slice a rank-8 product, as a LoRA r=8 on q, k, v, o gives).

Reports seconds per ALS sweep and the relative error after `--sweeps` sweeps (equal up to rounding: the same
iteration, computed two ways). Needs tensorly (pip install 'tensorly>=0.8').

Usage: python benchmarks/cp_als_bench.py [--ranks 16,64,256] [--sweeps 5]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    import tensorly
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import parafac

    from lorta.import_lora import Slices, cp_als

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="16,64,256")
    parser.add_argument("--sweeps", type=int, default=5)
    args = parser.parse_args()
    shape, r = (384, 32, 12, 6, 4), 8
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([(h, layer, m) for h in range(12) for layer in range(6) for m in range(4)])
    X = torch.randn(len(index), shape[0], r, generator=g, dtype=torch.float64)
    Y = torch.randn(len(index), r, shape[1], generator=g, dtype=torch.float64)
    data = Slices(shape, X, Y, index)
    dense = torch.zeros(shape, dtype=torch.float64)
    for s, (h, layer, m) in enumerate(index.tolist()):
        dense[:, :, h, layer, m] = X[s] @ Y[s]
    print(
        f"torch {torch.__version__}, tensorly {tensorly.__version__}, {torch.get_num_threads()} threads; "
        f"tensor {'x'.join(map(str, shape))} ({dense.numel():,} entries) from {len(index)} rank-{r} slices\n"
    )
    print("| CP rank | path | s / sweep | rel. error after the sweeps |")
    print("|---:|---|---:|---:|")
    for rank in map(int, args.ranks.split(",")):
        init = [torch.randn(n, rank, generator=g, dtype=torch.float64) / n**0.5 for n in shape]
        start = time.perf_counter()
        _, history = cp_als(data, rank, args.sweeps, init=init, tol=0)
        ours = (time.perf_counter() - start) / args.sweeps
        print(f"| {rank} | lorta cp_als (slices) | {ours:.3f} | {history[-1]:.6f} |", flush=True)
        for backend in ("pytorch", "numpy"):
            with tensorly.backend_context(backend):
                tensor = dense if backend == "pytorch" else dense.numpy()
                factors = [f.clone() if backend == "pytorch" else f.numpy().copy() for f in init]
                weights = torch.ones(rank, dtype=torch.float64)
                start = time.perf_counter()
                cp = parafac(
                    tensor,
                    rank=rank,
                    init=CPTensor((weights if backend == "pytorch" else weights.numpy(), factors)),
                    n_iter_max=args.sweeps,
                    tol=0,
                    normalize_factors=False,
                )
                theirs = (time.perf_counter() - start) / args.sweeps
                rebuilt = torch.as_tensor(tensorly.cp_to_tensor(cp))
            error = float((rebuilt - dense).norm() / dense.norm())
            print(f"| {rank} | TensorLy parafac ({backend} backend, dense) | {theirs:.3f} | {error:.6f} |", flush=True)


if __name__ == "__main__":
    main()
