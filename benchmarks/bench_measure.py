"""benchmarks/bench.py, its measurements: statistics, timing (alternated repeats), the memory of a step and
the float64 correctness guard."""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import resource
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_setup import GUARD_TOL, Variant  # noqa: E402
from torch import nn  # noqa: E402


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
