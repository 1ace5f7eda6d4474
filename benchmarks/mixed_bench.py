#!/usr/bin/env python
"""Mixed-adapter batches: throughput with 1 .. 256 distinct adapters in one batch, lorta vs PEFT LoRA.

Every row of a batch of `--batch` rows names its own adapter (`model(input_ids, adapter_names=[...])`); the k
distinct adapters are spread evenly over the rows (row i uses adapter i mod k). Figures:

  * throughput (rows/s of a no_grad forward, median over `--reps` after `--warmup`) for k in `--distinct`, for a
    lorta method (the bank's vectorised mixed batch) and for PEFT LoRA's own mixed batch with as many LoRA
    adapters (same rank, targets, model); beside them the bare base model and each method's plain
    single-adapter forward (no adapter_names). Variants alternate inside each repeat (order rotated by one per
    repeat), so the machine's drift hits all of them alike;
  * loading: `--adapters` lorta adapters saved to disk and loaded with `lorta.load_adapters` (ms per adapter,
    the stacking / maps build, resident bytes per adapter), and `--load-sample` LoRA adapters loaded with
    PEFT's `PeftModel.load_adapter` for comparison (LoRA's remaining adapters are created in memory: setup only);
  * a correctness guard: some rows of the widest mixed batch against the same row run alone with its adapter.

Usage: ``python benchmarks/mixed_bench.py`` (default CPU run, a few minutes on 2 cores), ``--smoke`` (seconds),
``--distinct 1,64,256,1024,4096`` or ``--bases minilm,smollm2``: thousands of adapters on real bases
(benchmarks/mixed_scale.py),
``--methods lorta,tenslora,tlora,lora``, ``--device cuda``. Writes ``mixed_results.md`` and
``mixed_results.json`` to ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, when loaded by path
import mixed_scale  # noqa: E402
from mixed_scale import environment  # noqa: E402

from lorta.registry import method_specs  # noqa: E402

GUARD_TOL = 1e-4
LORTA_METHODS = (*(n for name in method_specs() for n in (name, f"{name}-nocache")),)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model and batch: a seconds-long run (CI)")
    p.add_argument("--methods", default="lorta,lora", help=f"comma-separated from {', '.join(LORTA_METHODS)}, lora")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256, help="rows per forward")
    p.add_argument("--seq", default="32,1", help="tokens per row; a list times each (32: prefill-like, 1: decode-like)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapters", type=int, default=256, help="adapters resident in each model")
    p.add_argument("--distinct", default="1,8,64,256", help="distinct adapters per batch")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-sample-s", type=float, default=0.3, help="a sample repeats a short forward to last this long")
    p.add_argument("--load-sample", type=int, default=16, help="LoRA adapters timed through PeftModel.load_adapter")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.smoke:
        smoke = dict(
            hidden=64,
            layers=2,
            heads=4,
            kv_heads=2,
            intermediate=128,
            vocab=128,
            batch=16,
            seq="8",
            rank=4,
            adapters=4,
            distinct="1,4",
            reps=1,
            warmup=0,
            load_sample=2,
            min_sample_s=0.0,
        )
        for k, v in smoke.items():
            if f"--{k.replace('_', '-')}" not in (argv if argv is not None else sys.argv):
                setattr(args, k, v)
    args.distinct = [int(k) for k in str(args.distinct).split(",")]
    args.seq = [int(k) for k in str(args.seq).split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in (*LORTA_METHODS, "lora")]
    if unknown:
        p.error(f"unknown method(s) {unknown}")
    if max(args.distinct) > args.adapters:
        p.error(f"--distinct {max(args.distinct)} exceeds --adapters {args.adapters}")
    return args


# ------------------------------------------------------------------------------------------------ models
def base_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(64, *args.seq),
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(args.device).eval()


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lorta_config(method: str, args: argparse.Namespace) -> Any:
    common = {"lora_alpha": 2 * args.rank, "init_weights": False, "target_modules": TARGETS}
    return method_specs()[method.removesuffix("-nocache")].config(args.rank, **common)


def lora_config(args: argparse.Namespace) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights=False)


def names_of(n: int) -> list[str]:
    return [f"a{i:03d}" for i in range(n)]


def save_lorta_adapters(method: str, base: nn.Module, args: argparse.Namespace, root: Path) -> float:
    """Save `--adapters` random adapters of `method` under root/a000, root/a001, ...; returns seconds."""
    from peft import get_peft_model

    start = time.perf_counter()
    model = get_peft_model(copy.deepcopy(base), lorta_config(method, args))
    factors = model.base_model.lorta_factors["default"]
    for i, name in enumerate(names_of(args.adapters)):
        torch.manual_seed(1000 + i)
        factors.reset(False)
        model.save_pretrained(root / name)
    return time.perf_counter() - start


def lorta_model(method: str, base: nn.Module, args: argparse.Namespace, root: Path) -> tuple[nn.Module, dict]:
    """PeftModel.from_pretrained for the first adapter, then lorta.load_adapters for the rest."""
    from peft import PeftModel

    import lorta

    names = names_of(args.adapters)
    start = time.perf_counter()
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / names[0], adapter_name=names[0]).eval()
    first = time.perf_counter() - start
    bank = lorta.AdapterBank(model, cache_maps=not method.endswith("-nocache"))
    bank.load([root / n for n in names[1:]])
    memory = bank.memory()
    stats = dict(bank.load_stats, first_adapter_s=first, **{k: v for k, v in memory.items() if k != "adapters"})
    stats["adapters_total"] = len(bank)
    model.lorta_bank = bank  # type: ignore[attr-defined]
    return model, stats


def lora_model(base: nn.Module, args: argparse.Namespace, root: Path) -> tuple[nn.Module, dict]:
    """PEFT LoRA with `--adapters` adapters; `--load-sample` of them timed through PeftModel.load_adapter."""
    from peft import PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer

    names = names_of(args.adapters)
    sample = max(1, min(args.load_sample, args.adapters))
    saver = get_peft_model(copy.deepcopy(base), lora_config(args))
    for i, name in enumerate(names[:sample]):
        torch.manual_seed(1000 + i)
        for module in saver.modules():
            if isinstance(module, LoraLayer):
                for p in (module.lora_A["default"].weight, module.lora_B["default"].weight):
                    nn.init.uniform_(p, -0.1, 0.1)
        saver.save_pretrained(root / name)
    file_bytes = (root / names[0] / "adapter_model.safetensors").stat().st_size
    del saver
    start = time.perf_counter()
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / names[0], adapter_name=names[0])
    first = time.perf_counter() - start
    start = time.perf_counter()
    for name in names[1:sample]:
        model.load_adapter(str(root / name), adapter_name=name)
    timed = time.perf_counter() - start
    # setup only (not timed): the other adapters are created in place, as PEFT's injection would create them
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for i, name in enumerate(names[sample:], start=sample):
        config = lora_config(args)
        config.inference_mode = True
        model.peft_config[name] = config
        torch.manual_seed(1000 + i)
        for layer in layers:
            layer.update_layer(name, config.r, config.lora_alpha, config=config)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    params = sum(p.numel() for n, p in model.named_parameters() if f".{names[0]}." in n)
    stats = {
        "adapters": sample - 1,
        "first_adapter_s": first,
        "load_s": timed,
        "load_ms_per_adapter": 1e3 * timed / max(1, sample - 1),
        "file_bytes_per_adapter": file_bytes,
        "parameters_per_adapter": params,
        "bytes_per_adapter": params * 4,
        "adapters_total": len(model.peft_config),
    }
    return model, stats


# ---------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rows_for(k: int, batch: int) -> list[str]:
    names = names_of(k)
    return [names[i % k] for i in range(batch)]


def make_variants(models: dict[str, nn.Module], base: nn.Module, args: argparse.Namespace, ids: torch.Tensor):
    variants: dict[str, Any] = {"base": lambda: base(input_ids=ids)}
    for method, model in models.items():
        model.set_adapter("a000")  # outside the timed calls: PEFT's set_adapter walks every adapter of every layer
        variants[f"{method}/single"] = lambda model=model: model(input_ids=ids)
        for k in args.distinct:
            rows = rows_for(k, args.batch)
            variants[f"{method}/k={k}"] = lambda model=model, rows=rows: model(input_ids=ids, adapter_names=rows)
    return variants


def time_variants(variants: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """{variant: {"wall": [s], "cpu": [s]}}: wall clock, and the process's CPU time (all its threads), which a
    busy machine inflates far less than the wall clock."""
    order = list(variants)
    samples: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in order}
    inner = dict.fromkeys(order, 1)  # short forwards are repeated so that one sample lasts ~--min-sample-s
    with torch.no_grad():
        for key in order:
            sync(args.device)
            start = time.perf_counter()
            variants[key]()
            sync(args.device)
            inner[key] = max(1, min(100, round(args.min_sample_s / max(time.perf_counter() - start, 1e-6))))
        for rep in range(args.warmup + args.reps):
            shift = rep % len(order)
            for key in order[shift:] + order[:shift]:
                sync(args.device)
                start, cpu = time.perf_counter(), time.process_time()
                for _ in range(inner[key]):
                    variants[key]()
                sync(args.device)
                if rep >= args.warmup:
                    samples[key]["wall"].append((time.perf_counter() - start) / inner[key])
                    samples[key]["cpu"].append((time.process_time() - cpu) / inner[key])
            gc.collect()
    return samples


def guard(models: dict[str, nn.Module], base: nn.Module, args: argparse.Namespace, ids: torch.Tensor) -> dict:
    """Rows of the widest mixed batch (and a "__base__" row) against the same row run alone."""
    k = max(args.distinct)
    rows = rows_for(k, args.batch)
    rows[1] = "__base__"
    check = sorted({0, 1, 2, args.batch // 2, args.batch - 1})
    out: dict[str, Any] = {}
    with torch.no_grad():
        for method, model in models.items():
            mixed = model(input_ids=ids, adapter_names=rows).logits
            err, effect = 0.0, 0.0
            for i in check:
                if rows[i] == "__base__":
                    want = base(input_ids=ids[i : i + 1]).logits
                else:
                    model.set_adapter(rows[i])
                    want = model(input_ids=ids[i : i + 1]).logits
                    effect = max(effect, (want - base(input_ids=ids[i : i + 1]).logits).abs().max().item())
                err = max(err, (mixed[i : i + 1] - want).abs().max().item())
            model.set_adapter("a000")
            out[method] = {"max_abs_err": err, "adapter_effect": effect, "rows": check, "passed": err <= GUARD_TOL}
    return out


# ---------------------------------------------------------------------------------------------- report
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(args: argparse.Namespace, samples: dict, load: dict, checks: dict, env: dict) -> tuple[str, dict]:
    """samples: {seq: {variant: [seconds]}} -> markdown and the JSON result."""
    methods = list(args.methods)
    lines = [
        "# Mixed-adapter batches: throughput (rows/s of a no_grad forward)",
        "",
        f"Random Llama d={args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} KV), "
        f"intermediate {args.intermediate}, vocab {args.vocab}; batch {args.batch} rows; rank {args.rank}; targets "
        f"q, k, v, o; {args.adapters} adapters resident per model, row i uses adapter i mod k; device {args.device}, "
        f"{env['threads']} threads. Cells: rows/s from the median wall time of {args.reps} alternated repeats (best "
        f"repeat in brackets; a sample repeats a short forward to last ~{args.min_sample_s} s), and the median CPU "
        "time of the process per forward (all threads); ratios use the medians (wall, then CPU).",
    ]
    summary: dict[str, Any] = {}
    for seq, by_variant in samples.items():
        rps = {k: args.batch / median(v["wall"]) for k, v in by_variant.items()}
        best = {k: args.batch / min(v["wall"]) for k, v in by_variant.items()}
        cpu = {k: median(v["cpu"]) for k, v in by_variant.items()}
        lines += [
            "",
            f"## {seq} tokens per row",
            "",
            f"Bare base model: {rps['base']:.1f} rows/s ({best['base']:.1f}), {1e3 * cpu['base']:.0f} CPU ms.",
            "",
        ]
        k1 = f"k={args.distinct[0]}"
        header = "| distinct adapters |" + "".join(
            f" {m} rows/s | {m} CPU ms | {m} vs own {k1} (wall, CPU) |" for m in methods
        )
        others = [m for m in methods if m != "lora"] if "lora" in methods else []
        header += "".join(f" {m} / lora (wall, CPU) |" for m in others)
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for label, key in [("plain single-adapter forward", "single"), *[(str(k), f"k={k}") for k in args.distinct]]:
            cells = [label]
            for m in methods:
                v, c = rps[f"{m}/{key}"], cpu[f"{m}/{key}"]
                ratio = f"{v / rps[f'{m}/{k1}']:.2f}x, {cpu[f'{m}/{k1}'] / c:.2f}x"
                cells += [f"{v:.1f} ({best[f'{m}/{key}']:.1f})", f"{1e3 * c:.0f}", ratio]
            cells += [
                f"{rps[f'{m}/{key}'] / rps[f'lora/{key}']:.2f}x, {cpu[f'lora/{key}'] / cpu[f'{m}/{key}']:.2f}x"
                for m in others
            ]
            lines.append("| " + " | ".join(cells) + " |")
        keys = ["single", *[f"k={k}" for k in args.distinct]]
        summary[f"seq={seq}"] = {
            "base": rps["base"],
            **{
                m: {
                    **{key: rps[f"{m}/{key}"] for key in keys},
                    "best": {key: best[f"{m}/{key}"] for key in keys},
                    "cpu_s": {key: cpu[f"{m}/{key}"] for key in keys},
                    "ratio_vs_k1": {f"k={k}": rps[f"{m}/k={k}"] / rps[f"{m}/{k1}"] for k in args.distinct},
                    "cpu_ratio_vs_k1": {f"k={k}": cpu[f"{m}/{k1}"] / cpu[f"{m}/k={k}"] for k in args.distinct},
                }
                for m in methods
            },
        }
    lines += ["", "## Loading and memory per adapter", ""]
    lines += [
        "| method | loaded | first adapter (PEFT) ms | load ms / adapter | stack + maps s | file bytes | "
        "resident bytes / adapter (factors + maps) | parameters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        s = load[m]
        how = "PeftModel.load_adapter" if m == "lora" else "lorta.load_adapters"
        resident = f"{s['bytes_per_adapter']:,.0f}"
        if m != "lora":
            resident += f" ({s['factor_bytes_per_adapter']:,.0f} + {s['map_bytes_per_adapter']:,.0f})"
        lines.append(
            f"| {m} | {s['adapters']} via {how} | {1e3 * s['first_adapter_s']:.1f} | {s['load_ms_per_adapter']:.2f} | "
            f"{s.get('stack_s', 0.0):.2f} | {s['file_bytes_per_adapter']:,.0f} | {resident} | "
            f"{s['parameters_per_adapter']:,.0f} |"
        )
    lines += ["", "## Correctness guard (mixed row vs the row alone with its adapter)", ""]
    lines += ["| method | max abs err | adapter effect | passed |", "|---|---|---|---|"]
    for m, c in checks.items():
        verdict = "yes" if c["passed"] else "FAILED"
        lines.append(f"| {m} | {c['max_abs_err']:.2e} | {c['adapter_effect']:.2e} | {verdict} |")
    lines += ["", f"Command: `{env['command']}` ({env['total_s']:.0f} s)", ""]
    result = {
        "args": dict(vars(args)),
        "env": env,
        "summary": summary,
        "samples_s": samples,
        "iqr_s": {seq: {k: _iqr(v["wall"]) for k, v in by.items()} for seq, by in samples.items()},
        "load": load,
        "guard": checks,
    }
    return "\n".join(lines), result


def _iqr(xs: list[float]) -> list[float]:
    if len(xs) < 2:
        return [xs[0], xs[0]] if xs else []
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


def ids_for(args: argparse.Namespace, seq: int) -> torch.Tensor:
    ids = torch.randint(0, args.vocab, (args.batch, seq), generator=torch.Generator().manual_seed(seq))
    return ids.to(args.device)


def scale_mode(argv: list[str] | None) -> bool:
    """Real bases and thousands of adapters (benchmarks/mixed_scale.py): --bases, or more than 256 distinct."""
    argv = sys.argv[1:] if argv is None else argv
    if "--smoke" in argv:
        return "--bases" in argv
    given = [a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv) if a.startswith("--distinct")]
    return "--bases" in argv or any(int(k) > 256 for v in given for k in v.split(","))


def main(argv: list[str] | None = None) -> int:
    if scale_mode(argv):
        return mixed_scale.main(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import lorta  # noqa: F401  (registers the methods)

    env = environment(argv)
    start = time.perf_counter()
    base = base_model(args)
    models: dict[str, nn.Module] = {}
    load: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            root = Path(tmp) / method
            if method == "lora":
                models[method], load[method] = lora_model(base, args, root)
            else:
                saved = Path(tmp) / method.split("-")[0]
                save_s = save_lorta_adapters(method, base, args, saved) if not saved.exists() else 0.0
                models[method], load[method] = lorta_model(method, base, args, saved)
                load[method]["save_all_s"] = save_s
            print(f"[setup] {method}: {load[method]}", flush=True)
    setup_s = time.perf_counter() - start
    checks = guard(models, base, args, ids_for(args, args.seq[0]))
    samples = {}
    for seq in args.seq:
        ids = ids_for(args, seq)
        samples[seq] = time_variants(make_variants(models, base, args, ids), args)
        print(f"[timed] {seq} tokens per row", flush=True)
    env["setup_s"] = setup_s
    env["total_s"] = time.perf_counter() - start
    md, result = report(args, samples, load, checks, env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed_results.md").write_text(md)
    (out / "mixed_results.json").write_text(json.dumps(result, indent=1, default=str))
    print(md)
    print(f"[done] {env['total_s']:.1f} s; wrote {out / 'mixed_results.md'} and mixed_results.json")
    return 0 if all(c["passed"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
