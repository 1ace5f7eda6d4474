"""The quality-per-parameter tools: PEFT's VeRA as a baseline, the party task, ``lorta compare --frontier``.

End to end on tiny subsets (a few steps); the real frontiers are in docs/results.md, from the commands it gives.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
from cli_helpers import PNG_MAGIC, _only_train_command, lorta, metrics_of  # noqa: F401  (autouse fixture)

from lorta.app import frontier
from lorta.app.commands.train import fmt_time
from lorta.app.train import TrainOptions

TINY = ["--max-train", "48", "--max-test", "32", "--steps", "2", "--batch-size", "8", "--max-length", "32", "--quiet"]
MINILM_LORTA_QKV = 384 + 32 + 12 + 6 + 3  # LoRTA's parameters per rank on MiniLM's q, k, v
MINILM_VERA = 6 * 4  # VeRA's parameters per rank (one d entry per adapted matrix), plus 384 per matrix (b)


# --------------------------------------------------------------------------------------------------
# VeRA (PEFT's own) and the party task through lorta train
# --------------------------------------------------------------------------------------------------


def test_vera_trains_and_saves_a_peft_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import peft
    from transformers import AutoModelForSequenceClassification

    from lorta.app.models import resolve_model

    code, out, err = lorta(["train", "--method", "vera", "--rank", "16", *TINY, "--out", str(tmp_path / "v")], capsys)
    assert code == 0, err
    m = metrics_of(tmp_path / "v")
    assert m["method"] == "vera" and m["rank"] == 16 and m["alpha"] is None
    assert m["lr"] == 2e-2 and m["head_lr"] == 1e-2  # the recipe: VeRA's vectors need a higher lr than LoRA
    assert m["adapter_params"] == 6 * 4 * (16 + 384)
    assert m["targets"] == ["attention.output.dense", "key", "query", "value"]
    config = json.loads((tmp_path / "v" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is True
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=2)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "v" / "adapter")  # plain PEFT loads it
    assert loaded.peft_config["default"].r == 16
    assert "vera r=16" in out


def test_party_task_classifies_convention_paragraphs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = lorta(["train", "--task", "party", *TINY, "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err
    m = metrics_of(tmp_path / "p")
    assert m["task"] == "party" and m["job"] == "classify"
    assert m["label_names"] == ["Democratic", "Republican"] and (m["n_train"], m["n_test"]) == (48, 32)
    assert m["majority_baseline"] == 0.5 and "convention speech" in m["data"]
    assert "party (classify)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "vera", "--alpha", "8"], "VeRA has no alpha"),
        (["--task", "party", "--data", "x.csv"], "--task party reads the 2012 convention speeches"),
    ],
)
def test_bad_combinations_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = lorta(["train", *TINY, *args, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# The frontier plan and its arithmetic
# --------------------------------------------------------------------------------------------------


def test_plan_picks_the_largest_rank_within_each_budget() -> None:
    cells, unreachable = frontier.plan(TrainOptions(), ["lorta", "lora", "vera", "head-only"], [5_000, 10_000, 30_000])
    by = {(c.method, c.rank): c for c in cells}
    r5, r10, r30 = 5_000 // MINILM_LORTA_QKV, 10_000 // MINILM_LORTA_QKV, 30_000 // MINILM_LORTA_QKV
    assert by[("lorta", r5)].adapter_params == r5 * MINILM_LORTA_QKV and by[("lorta", r5)].budgets == (5_000,)
    assert by[("lorta", r10)].budgets == (10_000,) and by[("lorta", r30)].budgets == (30_000,)
    assert (r30 + 1) * MINILM_LORTA_QKV > 30_000
    assert by[("lora", 1)].adapter_params == 6 * 4 * 768 and by[("lora", 1)].budgets == (30_000,)
    vera_r10 = (10_000 - 6 * 4 * 384) // MINILM_VERA
    assert by[("vera", vera_r10)].adapter_params == MINILM_VERA * (vera_r10 + 384)
    assert by[("head-only", None)].adapter_params == 0
    assert {(u.method, u.budget, u.smallest) for u in unreachable} == {
        ("lora", 5_000, 18_432),
        ("lora", 10_000, 18_432),
        ("vera", 5_000, MINILM_VERA * 385),
    }


def test_plan_merges_budgets_that_land_on_one_rank() -> None:
    cells, _ = frontier.plan(TrainOptions(), ["lora"], [20_000, 30_000])
    assert [(c.rank, c.budgets) for c in cells] == [(1, (20_000, 30_000))]


def _row(method: str, rank: int | None, seed: int, accuracy: float, params: int) -> dict:
    return {
        "method": method,
        "rank": rank,
        "seed": seed,
        "accuracy": accuracy,
        "adapter_params": params,
        "trainable_params": params + 770,
        "wall_time_s": 1.0,
    }


def test_summary_mean_std_and_table() -> None:
    cells = [frontier.Cell("lorta", 4, 1_748, (2_000,)), frontier.Cell("vera", 8, 2_000, (2_000,))]
    rows = [
        _row("lorta", 4, 0, 0.80, 1_748),
        _row("lorta", 4, 1, 0.70, 1_748),
        _row("lorta", 4, 2, 0.75, 1_748),
        _row("vera", 8, 0, 0.60, 2_000),
    ]
    points = frontier.summarise(cells, rows)
    lorta_point = points[0]
    # fmean = fsum / n: the decimal inputs' binary rounding (< 0.7 units of the mean), fsum's and the division's (0.5
    # each) stay under 2 units
    assert math.isclose(lorta_point.mean, 0.75, rel_tol=2 * sys.float_info.epsilon)
    assert lorta_point.std == statistics.stdev([0.80, 0.70, 0.75])  # the same function of the same floats, in order
    assert lorta_point.spread == (0.70, 0.80) and points[1].std == 0.0
    unreachable = [frontier.Unreachable("lora", 2_000, 18_432)]
    text = frontier.table(points, unreachable, [2_000], [0, 1, 2])
    # three seeds against one: the means do not rank, nothing is bold
    assert "| 2,000 | lorta | 4 | 1,748 | 2,518 | 80.00% | 70.00% | 75.00% | 75.00% ± 5.00% |" in text
    assert "| 2,000 | vera | 8 | 2,000 | 2,770 | 60.00% |  |  | 60.00% (1 seed) |" in text and "**" not in text
    assert "| 2,000 | lora | - | rank 1 has 18,432 |" in text and "cannot reach" in text
    same = frontier.table(frontier.summarise(cells, [r for r in rows if r["seed"] == 0]), [], [2_000], [0])
    assert "| 80.00% | **80.00% (1 seed)** |" in same and "| 60.00% | 60.00% (1 seed) |" in same


# --------------------------------------------------------------------------------------------------
# lorta compare --frontier, end to end
# --------------------------------------------------------------------------------------------------


def test_frontier_end_to_end_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "f"
    args = [
        "compare",
        "--frontier",
        "3000,20000",
        "--methods",
        "lorta,lora",
        "--seeds",
        "0,1",
        *TINY,
        "--out",
        str(root),
    ]
    code, out, err = lorta(args, capsys)
    assert code == 0, err
    assert "note: lora cannot reach 3,000 parameters (its rank 1 has 18,432)" in out
    data = json.loads((root / "frontier.json").read_text(encoding="utf-8"))
    assert data["budgets"] == [3000, 20000] and data["seeds"] == [0, 1]
    r_small, r_big = 3_000 // MINILM_LORTA_QKV, 20_000 // MINILM_LORTA_QKV
    assert [(c["method"], c["rank"]) for c in data["cells"]] == [("lorta", r_small), ("lorta", r_big), ("lora", 1)]
    assert [(r["method"], r["rank"], r["seed"]) for r in data["runs"]] == [
        ("lorta", r_small, 0),
        ("lorta", r_big, 0),
        ("lora", 1, 0),
        ("lorta", r_small, 1),
        ("lorta", r_big, 1),
        ("lora", 1, 1),
    ]
    for run in data["runs"]:  # every run made with the same job settings, its own seed
        assert run["steps"] == 2 and run["n_train"] == 48 and run["options"]["seed"] == run["seed"]
    table = (root / "frontier.md").read_text(encoding="utf-8")
    assert f"| 3,000 | lorta | {r_small} | {r_small * MINILM_LORTA_QKV:,} |" in table
    assert "| 20,000 | lora | 1 | 18,432 | 19,202 |" in table and "6 of 6 runs done" in table
    png = (root / "frontier.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 2000

    before = {p: p.stat().st_mtime_ns for p in root.glob("*/metrics.json")}
    code, out, err = lorta([*args, "--resume"], capsys)
    assert code == 0, err
    assert out.count("reusing the finished run") == 6
    data = json.loads((root / "frontier.json").read_text(encoding="utf-8"))
    runs_s = sum(r["wall_time_s"] for r in data["runs"])
    assert data["runs_wall_time_s"] == runs_s and data["wall_time_s"] < runs_s  # reused runs cost this command ~0
    assert f"of the runs themselves {fmt_time(runs_s)}" in (root / "frontier.md").read_text(encoding="utf-8")
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/metrics.json")} == before  # nothing retrained
    code, out, err = lorta([*args[:-2], "--lr", "5e-3", "--out", str(root), "--resume"], capsys)
    assert code == 0, err
    assert "reusing" not in out  # other options: nothing reused


def test_frontier_report_gathers_finished_runs_and_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "f"
    args = ["compare", "--frontier", "20000", "--methods", "lorta,lora", "--seeds", "0,1", *TINY, "--out", str(root)]
    code, _, err = lorta(args, capsys)
    assert code == 0, err
    (root / "lora-r1-seed1" / "metrics.json").unlink()  # an unfinished run
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/metrics.json")}
    code, out, err = lorta([*args, "--report"], capsys)
    assert code == 0, err
    assert out.count("missing: no finished run") == 1 and "reusing" not in out
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/metrics.json")} == before  # nothing trained
    assert not (root / "lora-r1-seed1" / "metrics.json").exists()
    table = (root / "frontier.md").read_text(encoding="utf-8")
    assert "3 of 4 runs done" in table and "(1 seed)" in table  # lora has seed 0 only
    data = json.loads((root / "frontier.json").read_text(encoding="utf-8"))
    assert sorted((r["method"], r["seed"]) for r in data["runs"]) == [("lora", 0), ("lorta", 0), ("lorta", 1)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frontier", "0,10"], "--frontier budgets must be positive, got 0"),
        (["--frontier", "10,x"], "--frontier: invalid literal"),
        (["--frontier", "100", "--ranks", "4"], "--ranks does not go with --frontier"),
        (["--frontier", "100", "--seeds", "1,1"], "--seeds repeats 1"),
        (["--seeds", "0,1"], "--seeds goes with --frontier"),
        (["--report"], "--report goes with --frontier"),
        (["--frontier", "100", "--report"], "--report found no finished run of this frontier"),
        (["--frontier", "100", "--methods", "lorta,nope"], "unknown method"),
    ],
)
def test_frontier_bad_input_exits_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = lorta(["compare", *args, *TINY, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_resume_fills_options_added_since_a_run_with_their_defaults(tmp_path: Path) -> None:
    from lorta.app.train import resolve_options, run_identity

    o = TrainOptions(max_train=48, max_test=32, steps=2, out=str(tmp_path))
    identity = run_identity(resolve_options(o))
    added = {"mode_lr", "schedule", "warmup", "weight_decay"}  # a run made before these options existed
    older = {k: v for k, v in identity.items() if k not in added}
    (tmp_path / "metrics.json").write_text(json.dumps({"options": older, "accuracy": 0.5}), encoding="utf-8")
    assert frontier.finished_run(tmp_path, o) == {"options": older, "accuracy": 0.5}
    for changed in (
        {"method_options": {"mode_lr": 1e-2}},
        {"schedule": "cosine"},
        {"warmup": 0.1},
        {"weight_decay": 0.01},
    ):
        other = TrainOptions(max_train=48, max_test=32, steps=2, **changed)
        assert frontier.finished_run(tmp_path, other) is None, changed
    (tmp_path / "metrics.json").write_text("{not json", encoding="utf-8")
    assert frontier.finished_run(tmp_path, o) is None


def test_mode_lr_zero_freezes_the_mode_factors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--mode-lr puts C_H, C_L, C_M in their own optimizer group: at 0 they keep their initial random signs while
    A and B train."""
    from safetensors.torch import load_file

    code, _, err = lorta(["train", "--mode-lr", "0", "--rank", "4", *TINY, "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    assert metrics_of(tmp_path / "m")["mode_lr"] == 0.0
    tensors = load_file(tmp_path / "m" / "adapter" / "adapter_model.safetensors")
    by_factor = {k.rsplit(".", 1)[-1]: v for k, v in tensors.items() if "lorta_factors" in k}
    for name in ("C_H", "C_L", "C_M"):
        assert set(by_factor[name].unique().tolist()) <= {-1.0, 1.0}, name
    assert by_factor["B"].abs().max() > 0  # B starts at zero and trained
    code, _, err = lorta(
        ["train", "--method", "lora", "--mode-lr", "1e-2", *TINY, "--out", str(tmp_path / "x")], capsys
    )
    assert code == 2 and "--method lora has none" in err
