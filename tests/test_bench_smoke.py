"""Smoke test of benchmarks/bench.py: the tiny run completes, writes its outputs and its guard passes.

No timing assertions: only that the figures exist and are finite and positive. main() runs in this process
(no second interpreter start-up, which alone takes half a minute on a loaded 2-core box), on one thread.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tolerance import FORWARD_TERMS, eps, tolerance

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lorta_bench_script", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _record_logit_scale(bench: ModuleType) -> tuple[list[float], Callable[[], None]]:
    """Wrap bench_runs.run_io (the runs bench.py drives) to record max |logits| of each adapted model on the round-trip
    check's ids (the scale of its round-trip difference, which results.json does not hold)."""
    runs = sys.modules["bench_runs"]  # imported by bench.py, from beside it
    scales: list[float] = []
    run_io = runs.run_io

    def recorded(variants, base, check_ids, opts):
        rows = run_io(variants, base, check_ids, opts)
        with torch.no_grad():
            for v in variants:
                if v.method in bench.METHODS:
                    scales.append(float(v.model.eval()(input_ids=check_ids.to(opts.device)).logits.abs().max()))
        return rows

    runs.run_io = recorded

    def restore() -> None:
        runs.run_io = run_io

    return scales, restore


def test_bench_smoke(tmp_path: Path) -> None:
    bench = _load_bench()
    scales, restore = _record_logit_scale(bench)
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--smoke", "--methods", "lora,lorta", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
        restore()
        sys.modules.pop("lorta_bench_script", None)
    assert rc == 0, "a correctness guard failed"
    md = (tmp_path / "results.md").read_text()
    result = json.loads((tmp_path / "results.json").read_text())
    assert "Training step" in md and "| lora |" in md and "| lorta |" in md
    assert "Correctness guard" in md and "FAILED" not in md

    models = [m for m in result["models"] if "train" in m]
    assert {m["name"] for m in models} == {"llama-tiny", "gpt2-tiny"}
    # The smoke models (d = 64, 2 layers, d_ff <= 256, 16 tokens) have a forward path of < 2048 reductions, inside
    # FORWARD_TERMS. The guard runs in float64 with the RMSNorms kept in float64 (bench.exact_float64): its normwise
    # relative errors are float64 rounding of that path; the round trip compares two float32 forwards of the same
    # saved factors at the logits' magnitude.
    guard_bound = FORWARD_TERMS * eps(torch.float64)
    roundtrip_bound = tolerance(torch.zeros(()), FORWARD_TERMS, scale=max(scales), dtype=torch.float32)
    for m in models:
        guard = m["guard"]
        assert guard, f"{m['name']}: the correctness guard did not run"
        for key, g in guard.items():
            assert g["passed"], (m["name"], key, g)
            assert g["rel_err"] <= guard_bound and g["merged_rel_err"] <= guard_bound, (m["name"], key, g)
            # did the update reach the logits at all: init_weights=False moves them by O(1) relative, and 1e-6 is
            # 10^9 float64 units, so no rounding effect passes for an update (the bench's own guard uses it too)
            assert g["effect"] > 1e-6, (m["name"], key, g)
        train = m["train"]
        assert _positive(train["floor"]["step_s"]["median"])
        for method in ("lora", "lorta"):
            row = train[f"{method}/r4"]
            assert row["method"] == method
            assert _positive(row["step_s"]["median"]) and _positive(row["params"])
            assert math.isfinite(row["overhead_s"]["median"])
            assert _positive(row["memory"]["saved_bytes"])
            assert _positive(m["infer"][f"{method}/r4"]["prefill_s"]["median"])
            assert math.isfinite(m["infer"][f"{method}/r4"]["decode_per_token_s"]["median"])
            assert _positive(m["merged"][f"{method}/r4"]["prefill_s"]["median"])
            io = m["io"][f"{method}/r4"]
            assert _positive(io["file_bytes"]) and _positive(io["save_s"]["median"])
            assert _positive(io["load_s"]["median"])
            assert io["roundtrip_max_abs_diff"] <= roundtrip_bound, (m["name"], method, io)
        assert math.isfinite(train["lorta/r4"]["step_ratio_vs_lora"]["median"])
        # the resident state is parameters + two AdamW moments, all float32: 12 bytes per trainable parameter, plus
        # AdamW's 4-byte step counter per parameter tensor
        for method in ("lora", "lorta"):
            mem = train[f"{method}/r4"]["memory"]
            assert 0 <= mem["state_bytes"] - 12 * train[f"{method}/r4"]["params"] <= 4 * 256, (method, mem)
            assert mem["peak_with_state_bytes"] == mem["peak_alloc_bytes"] + mem["state_bytes"]
        assert train["floor"]["memory"]["state_bytes"] == 0
        assert train["lora/r4"]["memory_ratio_vs_lora"] == 1.0
        assert _positive(train["lorta/r4"]["memory_ratio_vs_lora"])
        # LoRTA's parameter count is far below LoRA's at the same rank
        assert train["lorta/r4"]["params"] < train["lora/r4"]["params"]


def test_bench_smoke_over_a_quantised_base(tmp_path: Path) -> None:
    import pytest

    pytest.importorskip("bitsandbytes")
    bench = _load_bench()
    threads = torch.get_num_threads()
    try:
        rc = bench.main(
            [
                "--smoke",
                "--models",
                "llama-tiny",
                "--methods",
                "lora,lorta",
                "--quantize",
                "4bit",
                "--threads",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("lorta_bench_script", None)
    assert rc == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert "base quantised: 4bit" in (tmp_path / "results.md").read_text()
    (model,) = result["models"]
    assert model["quantize"] == "4bit"
    for method in ("lora", "lorta"):
        assert _positive(model["train"][f"{method}/r4"]["step_s"]["median"])
        assert _positive(model["merged"][f"{method}/r4"]["prefill_s"]["median"])
