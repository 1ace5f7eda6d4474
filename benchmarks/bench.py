#!/usr/bin/env python
"""A/B benchmark of PEFT LoRA against the lorta methods (LoRTA, TensLoRA, TLoRA) in one process.

Every figure is taken for every variant of a model in turn, alternated inside each repeat (repeat 1: floor,
LoRA, LoRTA, ...; repeat 2: the same list rotated by one; ...), so slow drift of the machine hits all variants
alike.
Reported: median and inter-quartile range over the repeats that follow the warm-up.

Figures (see benchmarks/README.md for the exact definitions):
  * training step: forward + backward + AdamW step on a causal-LM loss (labels = input_ids);
  * floor: the frozen base with the input embeddings' output requiring grad (no adapter, no weight gradient),
    so that ``overhead = step - floor`` is the adapter's own cost;
  * memory of a step: activation bytes saved for backward, peak torch allocation (CPU: profiler memory events,
    CUDA: max_memory_allocated), the adapter's resident state (trainable parameters + AdamW moments), the peak
    plus that state (the step's whole cost over the frozen base weights) and the peak-RSS delta of the process;
  * unmerged prefill and per-token decode latency, merged prefill latency against the bare base;
  * adapter save/load time, file bytes and trainable parameter count;
  * a float64 correctness guard for every lorta method before anything is timed.

Usage: ``python benchmarks/bench.py`` (default CPU run), ``--smoke`` (seconds), ``--scaling`` (r/L/d sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its modules: bench_*.py beside it

from bench_report import _json_default, _loadavg, environment, render_markdown  # noqa: E402
from bench_runs import bench_model, run_scaling  # noqa: E402
from bench_setup import METHODS, MODEL_PRESETS, PARTS, RUN_PRESETS, Options, available_methods  # noqa: E402


# ------------------------------------------------------------------------------------------------------ cli
def parse_args(argv: list[str]) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--preset",
        choices=sorted(RUN_PRESETS),
        default=None,
        help="run profile setting the defaults below (default: 'default', or 'scaling' with --scaling)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny models, 1 repeat, a few seconds (= --preset smoke)")
    p.add_argument("--scaling", action="store_true", help="sweep rank r, layers L and width d for LoRA and LoRTA")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--ranks", help="comma-separated ranks, e.g. 4,8,64")
    p.add_argument(
        "--methods",
        default="lora,lorta",
        help=f"comma-separated, from {','.join(METHODS)}, or 'all' (every method, batched maps; default: lora,lorta)",
    )
    p.add_argument("--models", help=f"from {','.join(MODEL_PRESETS)}")
    p.add_argument("--targets", help="comma-separated target_modules for every model (default: attention q,k,v,o)")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--reps", type=int, help="measured repeats per figure (after warm-up)")
    p.add_argument("--warmup", type=int, help="warm-up repeats per figure (not reported)")
    p.add_argument("--new-tokens", type=int, help="tokens generated for the decode latency")
    p.add_argument("--alpha-per-rank", type=float, default=2.0, help="lora_alpha = this * r (default 2: 16 at r=8)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-profile-memory", action="store_true", help="skip the torch.profiler peak-allocation pass")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also run torch.profiler over STEPS training steps per variant (op/kernel counts, top ops)",
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"which figures to take, from {','.join(PARTS)}")
    p.add_argument("--quantize", choices=["8bit", "4bit"], help="time every variant over a bitsandbytes-quantised base")
    p.add_argument("--out", default="benchmarks/results", help="output folder for results.json and results.md")
    args = p.parse_args(argv)
    preset = args.preset or ("smoke" if args.smoke else "scaling" if args.scaling else "default")
    defaults = RUN_PRESETS[preset]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODEL_PRESETS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODEL_PRESETS)}")
    every = [m for m, method in METHODS.items() if method.batched_maps]
    opts = Options(
        device=torch.device(args.device),
        dtype=getattr(torch, args.dtype),
        ranks=[int(r) for r in str(args.ranks).split(",") if r],
        methods=every if args.methods == "all" else [m for m in args.methods.split(",") if m],
        models=models,
        targets=[t for t in args.targets.split(",") if t] if args.targets else None,
        batch=args.batch,
        seq=args.seq,
        reps=max(1, args.reps),
        warmup=max(0, args.warmup),
        new_tokens=args.new_tokens,
        alpha_per_rank=args.alpha_per_rank,
        out=Path(args.out),
        profile_memory=not args.no_profile_memory,
        profile_steps=max(0, args.profile),
        parts={x for x in args.parts.split(",") if x},
        quantize=args.quantize,
    )
    return opts, args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 if a correctness guard failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore")
    import lorta  # noqa: F401  (registers the methods with PEFT)

    opts, args = parse_args(argv)
    notes: list[str] = []
    methods = available_methods(opts.methods, notes)
    result: dict[str, Any] = {
        "meta": environment(opts, ["benchmarks/bench.py", *argv]),
        "args": vars(args),
        "models": [],
        "scaling": [],
        "notes": notes,
    }
    t0 = time.perf_counter()
    if args.scaling:
        result["scaling"] = run_scaling(opts, methods, notes)
    else:
        for name in opts.models:
            result["models"].append(bench_model(name, opts, methods, notes))
    result["meta"]["loadavg_end"] = _loadavg()
    result["meta"]["wall_s"] = time.perf_counter() - t0
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "results.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    md = render_markdown(result)
    (opts.out / "results.md").write_text(md)
    print(md, flush=True)
    print(
        f"[bench] wrote {opts.out / 'results.json'} and {opts.out / 'results.md'} in {result['meta']['wall_s']:.0f} s",
        flush=True,
    )
    failed = [k for m in result["models"] for k, g in m.get("guard", {}).items() if not g["passed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
