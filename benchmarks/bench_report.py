"""benchmarks/bench.py, its report: the Markdown tables and the environment record."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_setup import GUARD_TOL, Options  # noqa: E402


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
