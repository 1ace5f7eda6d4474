"""benchmarks/bench.py, its runs: training, inference, save/load, merged, profile and the r / L / d scaling
sweep, each over the variants of one model."""

from __future__ import annotations

import copy
import gc
import math
import os
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_measure import alternate, correctness_guard, step_memory, summary, sync, timed, train_step  # noqa: E402
from bench_setup import (
    DEFAULT_TARGETS,
    METHODS,
    MODEL_PRESETS,
    ModelSpec,
    Options,
    Variant,
    build_random_model,
    load_smollm2,  # noqa: E402
    make_variants,
    method_shape,
    model_info,
    note,
)
from torch import nn  # noqa: E402


def run_training(variants: list[Variant], ids: torch.Tensor, opts: Options) -> dict[str, dict[str, Any]]:
    """Alternated step timing, then one memory pass per variant; adds overhead and ratio figures."""

    def measure(v: Variant, rep: int) -> dict[str, float]:
        wall, cpu, loss = timed(lambda: train_step(v, ids), opts.device)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{v.key}: non-finite loss {loss}")
        return {"step_s": wall, "step_cpu_s": cpu}

    raw = alternate(variants, opts.reps, opts.warmup, measure)
    rows: dict[str, dict[str, Any]] = {}
    floor = raw["floor"]["step_s"]
    for v in variants:
        steps = raw[v.key]["step_s"]
        row: dict[str, Any] = {
            "method": v.method,
            "rank": v.rank,
            "params": v.params,
            "samples": raw[v.key],
            "step_s": summary(steps),
            "step_cpu_s": summary(raw[v.key]["step_cpu_s"]),
        }
        if v.method != "floor":
            row["overhead_samples_s"] = [s - f for s, f in zip(steps, floor, strict=True)]
            row["overhead_s"] = summary(row["overhead_samples_s"])
        rows[v.key] = row
    for v in variants:  # ratios against LoRA at the same rank, paired by repeat
        lora = rows.get(f"lora/r{v.rank}")
        if v.method in ("floor",) or lora is None:
            continue
        row = rows[v.key]
        ratios = [s / b for s, b in zip(row["samples"]["step_s"], lora["samples"]["step_s"], strict=True)]
        row["step_ratio_vs_lora"] = summary(ratios)
        lo = lora["overhead_s"]["median"]
        row["overhead_ratio_vs_lora"] = row["overhead_s"]["median"] / lo if lo > 0 else math.nan
    for v in variants:
        rows[v.key]["memory"] = step_memory(v, ids, opts.device, opts.profile_memory)
    for v in variants:  # the step's whole memory cost over the frozen base weights, against LoRA's
        lora = rows.get(f"lora/r{v.rank}")
        mine, theirs = rows[v.key]["memory"].get("peak_with_state_bytes"), (lora or {}).get("memory", {})
        if v.method != "floor" and mine is not None and theirs.get("peak_with_state_bytes"):
            rows[v.key]["memory_ratio_vs_lora"] = mine / theirs["peak_with_state_bytes"]
    return rows


def run_inference(variants: list[Variant], ids: torch.Tensor, opts: Options, gen: bool) -> dict[str, Any]:
    """Alternated no-grad prefill latency and (if `gen`) per-token greedy decode latency."""
    mask = torch.ones_like(ids)
    for v in variants:
        v.model.eval()
    n = opts.new_tokens

    def measure(v: Variant, rep: int) -> dict[str, float]:
        with torch.no_grad():
            prefill, _, _ = timed(lambda: v.model(input_ids=ids, attention_mask=mask), opts.device)
            out = {"prefill_s": prefill}
            if gen and n >= 2:
                kwargs = dict(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
                total, _, seqs = timed(lambda: v.model.generate(**kwargs), opts.device)
                if seqs.shape[1] != ids.shape[1] + n:
                    raise RuntimeError(f"{v.key}: generate returned {seqs.shape[1] - ids.shape[1]} tokens, not {n}")
                out["generate_s"] = total
                # generate(n) = 1 prefill forward (yields token 1) + (n - 1) one-token decode forwards
                out["decode_per_token_s"] = (total - prefill) / (n - 1)
        return out

    raw = alternate(variants, opts.reps, opts.warmup, measure)
    rows = {}
    for v in variants:
        rows[v.key] = {
            "method": v.method,
            "rank": v.rank,
            "samples": raw[v.key],
            **{k: summary(vals) for k, vals in raw[v.key].items() if not k.startswith("warmup_")},
        }
    return rows


def run_io(variants: list[Variant], base: nn.Module, check_ids: torch.Tensor, opts: Options) -> dict[str, Any]:
    """Alternated save_pretrained / PeftModel.from_pretrained timing, adapter file bytes, round-trip check."""
    from peft import PeftModel

    rows: dict[str, Any] = {}
    adapters = [v for v in variants if v.method in METHODS]
    tmp = tempfile.TemporaryDirectory(prefix="lorta-bench-")
    check_ids = check_ids.to(opts.device)

    def measure(v: Variant, rep: int) -> dict[str, float]:
        folder = Path(tmp.name) / f"{v.key.replace('/', '_')}_{rep}"
        save, _, _ = timed(lambda: v.model.save_pretrained(folder), opts.device)
        fresh = copy.deepcopy(base).to(opts.device)  # the copy is not timed
        load, _, loaded = timed(partial(PeftModel.from_pretrained, fresh, folder), opts.device)
        size = (folder / "adapter_model.safetensors").stat().st_size
        figures = {"save_s": save, "load_s": load, "file_bytes": float(size)}
        if rep == 0:
            v.model.eval()
            loaded.eval()
            with torch.no_grad():
                a = v.model(input_ids=check_ids).logits
                b = loaded(input_ids=check_ids).logits
            figures["roundtrip_max_abs_diff"] = (a - b).abs().max().item()
        return figures

    try:
        raw = alternate(adapters, opts.reps, min(opts.warmup, 1), measure)
    finally:
        tmp.cleanup()
    for v in adapters:
        r = raw[v.key]
        rows[v.key] = {
            "method": v.method,
            "rank": v.rank,
            "params": v.params,
            "samples": r,
            "save_s": summary(r["save_s"]),
            "load_s": summary(r["load_s"]),
            "file_bytes": int(r["file_bytes"][0]),
            "roundtrip_max_abs_diff": (
                r.get("roundtrip_max_abs_diff") or r.get("warmup_roundtrip_max_abs_diff") or [math.nan]
            )[0],
        }
    return rows


def run_merged(variants: list[Variant], base: nn.Module, ids: torch.Tensor, opts: Options) -> dict[str, Any]:
    """merge_and_unload every PEFT model, then alternated prefill latency against the bare base."""
    merged = [Variant("base", "base", None, base)]
    for v in variants:
        if v.method in METHODS:
            merged.append(Variant(v.key, v.method, v.rank, v.model.merge_and_unload()))
    rows = run_inference(merged, ids, opts, gen=False)
    base_samples = rows["base"]["samples"]["prefill_s"]
    for key, row in rows.items():
        if key != "base":
            ratios = [a / b for a, b in zip(row["samples"]["prefill_s"], base_samples, strict=True)]
            row["prefill_ratio_vs_base"] = summary(ratios)
    return rows


def quantized_base(base: nn.Module, opts: Options) -> nn.Module:
    """The float base saved and loaded back through bitsandbytes (8-bit LLM.int8, or nf4 computing in --dtype)."""
    from lorta.app.models import quantization_config

    config = quantization_config(opts.quantize)
    if opts.quantize == "4bit":
        config.bnb_4bit_compute_dtype = opts.dtype
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        quantized = type(base).from_pretrained(tmp, quantization_config=config, device_map=str(opts.device))
    quantized.requires_grad_(False)
    return quantized.eval()


def bench_model(name: str, opts: Options, methods: list[str], notes: list[str]) -> dict[str, Any]:
    """Every figure for one model: guard, training, memory, inference, I/O, merged inference."""
    spec = MODEL_PRESETS[name]
    entry: dict[str, Any] = {"name": name, "spec": asdict(spec), "batch": opts.batch, "seq": opts.seq}
    t0 = time.perf_counter()
    if spec.family == "smollm2":
        try:
            base, source = load_smollm2()
        except Exception as exc:
            note(notes, f"skipping smollm2: {type(exc).__name__}: {exc}")
            entry["skipped"] = str(exc)
            return entry
        family = "smollm2"
    else:
        base, source = build_random_model(spec), "random init (seed 0)"
        family = spec.family
    base = base.to(dtype=opts.dtype).eval()
    base.requires_grad_(False)
    entry.update(
        source=source,
        info=model_info(base),
        load_s=time.perf_counter() - t0,
        targets=opts.targets or DEFAULT_TARGETS[family],
    )
    print(f"[bench] {name}: {entry['info']} from {source}", flush=True)
    vocab = entry["info"]["vocab"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (opts.batch, opts.seq), generator=g).to(opts.device)
    guard_ids = ids[:1, : min(opts.seq, 32)].cpu()

    # 1. correctness guard, before anything is timed; a failing (method, rank) is dropped from the tables.
    entry["guard"] = {}
    targets = opts.targets or DEFAULT_TARGETS[family]
    shape = method_shape(base, family, targets)
    for r in opts.ranks:
        for m in methods:
            if m == "lora":
                continue
            key = f"{m}/r{r}"
            try:
                config = METHODS[m].build(r, opts.alpha_per_rank * r, targets, shape)
                res = correctness_guard(base, config, guard_ids, opts.device)
            except Exception as exc:
                res = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
            entry["guard"][key] = res
            status = "passed" if res["passed"] else "FAILED"
            print(
                f"[bench] {name} guard {key}: {status} rel_err={res.get('rel_err')} "
                f"merged={res.get('merged_rel_err')} effect={res.get('effect')} {res.get('error', '')}",
                flush=True,
            )
            if not res["passed"]:
                note(notes, f"{name}: {key} failed the correctness guard; its rows are dropped")
                opts.skip.add(f"{name}:{key}")
    gc.collect()

    # the guard ran on the float base (the same math); the timed variants sit on the quantised one
    if opts.quantize:
        base = quantized_base(base, opts)
        entry["quantize"] = opts.quantize
        print(f"[bench] {name}: base quantised to {opts.quantize} (bitsandbytes)", flush=True)

    # 2. training step + memory
    variants = make_variants(base, family, opts, methods, opts.ranks, notes, name)
    variants = [v for v in variants if f"{name}:{v.key}" not in opts.skip]
    print(
        f"[bench] {name}: timing {len(variants)} variants x {opts.warmup}+{opts.reps} training steps",
        flush=True,
    )
    if "train" in opts.parts:
        entry["train"] = run_training(variants, ids, opts)
    if opts.profile_steps > 0:
        print(f"[bench] {name}: profiling {opts.profile_steps} steps per variant", flush=True)
        entry["profile"] = run_profile(variants, ids, opts)

    # 3. unmerged inference (the bare base, not the floor, is the reference)
    base_dev = base.to(opts.device)
    for v in variants:  # free the optimiser state before timing inference
        v.optimizer = None
    if "infer" in opts.parts:
        infer_variants = [Variant("base", "base", None, base_dev)] + [v for v in variants if v.method in METHODS]
        print(f"[bench] {name}: inference", flush=True)
        entry["infer"] = run_inference(infer_variants, ids, opts, gen=True)

    # 4. adapter I/O, 5. merged inference (merge_and_unload consumes the PEFT models, so it comes last)
    if "io" in opts.parts:
        entry["io"] = run_io(variants, base_dev, guard_ids, opts)
    if "merged" in opts.parts:
        entry["merged"] = run_merged(variants, base_dev, ids, opts)
    entry["wall_s"] = time.perf_counter() - t0
    del variants
    gc.collect()
    return entry


def run_profile(variants: list[Variant], ids: torch.Tensor, opts: Options) -> dict[str, Any]:
    """torch.profiler over `opts.profile_steps` training steps of every variant: per-step op and kernel
    counts, self CPU / device time, and the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if opts.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    n = opts.profile_steps
    out: dict[str, Any] = {}
    for v in variants:
        train_step(v, ids)
        with profile(activities=activities) as prof:
            for _ in range(n):
                train_step(v, ids)
            sync(opts.device)
        cpu_ops, kernels, cpu_us, dev_us = 0.0, 0.0, 0.0, 0.0
        top = []
        for e in prof.key_averages():
            self_dev = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
            if str(e.device_type).endswith("CUDA"):
                kernels += e.count
                dev_us += self_dev
                continue
            cpu_ops += e.count
            cpu_us += e.self_cpu_time_total
            dev_us += self_dev
            top.append((e.self_cpu_time_total / n / 1e3, e.count / n, e.key))
        top.sort(reverse=True)
        out[v.key] = {
            "ops_per_step": cpu_ops / n,
            "self_cpu_ms_per_step": cpu_us / n / 1e3,
            "kernels_per_step": kernels / n,
            "device_ms_per_step": dev_us / n / 1e3,
            "top_ops": [{"op": k, "self_cpu_ms": t, "calls": c} for t, c, k in top],
        }
    return out


# ------------------------------------------------------------------------------------------------- scaling
SCALING_RANKS = [4, 8, 16, 32, 64, 128, 256]
SCALING_LAYERS = [2, 4, 8, 16]
SCALING_WIDTHS = [128, 256, 512, 1024]


def run_scaling(opts: Options, methods: list[str], notes: list[str]) -> list[dict[str, Any]]:
    """Step time, saved activations, adapter bytes and params against rank r, layers L and width d."""
    from dataclasses import replace

    base_spec = MODEL_PRESETS["llama-small"]
    groups: list[tuple[str, int, ModelSpec, list[int]]] = [("r", 0, base_spec, opts.ranks)]
    groups += [("L", L, replace(base_spec, layers=L), [8]) for L in SCALING_LAYERS]
    groups += [
        ("d", d, replace(base_spec, hidden=d, heads=d // 64, kv_heads=d // 64, ffn=d * 11 // 4), [8])
        for d in SCALING_WIDTHS
    ]
    rows: list[dict[str, Any]] = []
    from lorta.registry import METHODS as SPECS

    sc_methods = [m for m in methods if m in ("lora", SPECS[0].name)] or methods  # LoRA and the family's first
    for axis, value, spec, ranks in groups:
        base = build_random_model(spec).to(dtype=opts.dtype).eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, spec.vocab, (opts.batch, opts.seq), generator=g).to(opts.device)
        variants = make_variants(base, spec.family, opts, sc_methods, ranks, notes, f"scaling {axis}={value}")
        print(f"[bench] scaling {axis}={value or ranks}: {len(variants)} variants", flush=True)
        train = run_training(variants, ids, opts)
        io = run_io(variants, base.to(opts.device), ids[:1, :8].cpu(), replace(opts, reps=1, warmup=0))
        for v in variants:
            if v.method == "floor":
                continue
            t = train[v.key]
            rows.append(
                {
                    "axis": axis,
                    "value": value if axis != "r" else v.rank,
                    "rank": v.rank,
                    "method": v.method,
                    "hidden": spec.hidden,
                    "layers": spec.layers,
                    "params": v.params,
                    "file_bytes": io[v.key]["file_bytes"],
                    "step_s": t["step_s"],
                    "overhead_s": t["overhead_s"],
                    "floor_s": train["floor"]["step_s"],
                    "memory": t["memory"],
                    "floor_memory": train["floor"]["memory"],
                }
            )
        del variants, base
        gc.collect()
    return rows
