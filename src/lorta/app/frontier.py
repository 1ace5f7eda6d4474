"""Accuracy against trainable parameters (``lorta compare --frontier``): each method at the ranks that land at a
list of parameter budgets, several seeds each, summarised as mean and spread.

A budget is a number of adapter parameters (the classification head, the same for every method, is reported
beside it). Each method's rank for a budget is the largest whose exact count fits (`lorta.params.fit_budget` on a
meta-device copy of the model, on the matrices the run will adapt); a method whose rank 1 is already over the
budget cannot reach it, which is recorded, not hidden (LoRA's smallest adapter is rank 1 on every matrix).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .train import (
    ADAPTER_METHODS,
    PEFT_METHODS,
    Run,
    TrainOptions,
    default_targets,
    for_method,
    resolve_options,
    run_identity,
    target_modules,
)

__all__ = ["DEFAULT_BUDGETS", "DEFAULT_METHODS", "Cell", "Point", "plan", "summarise"]

DEFAULT_BUDGETS = (10_000, 20_000, 30_000)
DEFAULT_METHODS = (TrainOptions.method, "lora", "vera")  # the default method against PEFT's baselines


@dataclass(frozen=True)
class Cell:
    """One (method, rank) to train; ``budgets`` are the budgets it is the method's answer to (None: no rank)."""

    method: str
    rank: int | None
    adapter_params: int
    budgets: tuple[int, ...]

    @property
    def label(self) -> str:
        return self.method if self.rank is None else f"{self.method}-r{self.rank}"


@dataclass(frozen=True)
class Unreachable:
    """A budget a method cannot meet: its rank-1 adapter already has ``smallest`` parameters."""

    method: str
    budget: int
    smallest: int


def _count_options(o: Run) -> tuple[list[str] | None, dict[str, Any]]:
    """The target module names and method options the run will use, as `lorta.params` takes them (a lorta
    method's options are its spec's `params_options`, which the run's options name alike)."""
    from ..registry import method_specs
    from .models import model_type

    kind = model_type(o.model_path)
    if o.targets is not None:
        targets = target_modules(o.targets, kind)
    else:
        targets = default_targets(kind) if o.method in PEFT_METHODS else None
    spec = method_specs().get(o.method)
    names = [n for n in spec.params_options if n != "ranks"] if spec is not None else []
    return targets, {n: list(v) if isinstance(v, tuple) else v for n in names for v in [o.method_options[n]]}


def plan(options: TrainOptions, methods: Sequence[str], budgets: Sequence[int]) -> tuple[list[Cell], list[Unreachable]]:
    """The cells to train: per adapter method, the largest rank within each budget (one cell per distinct rank);
    a method without an adapter (head-only, full) is one cell. Also the budgets each method cannot reach."""
    from ..params import fit_budget
    from .catalogue import model_config

    cells: list[Cell] = []
    unreachable: list[Unreachable] = []
    for method in methods:
        o = resolve_options(dataclasses.replace(for_method(options, method), rank=None, out="-"))
        if method not in ADAPTER_METHODS:
            cells.append(Cell(method, None, 0, ()))
            continue
        config = model_config(str(o.model_path))
        targets, extra = _count_options(o)
        by_rank: dict[int, tuple[int, list[int]]] = {}
        for budget in sorted(budgets):
            fit = fit_budget(budget, config, method, targets=targets, **extra)
            if fit.rank == 0:
                unreachable.append(Unreachable(method, budget, fit.next_trainable))
                continue
            by_rank.setdefault(fit.rank, (int(fit.trainable or 0), []))[1].append(budget)
        cells.extend(Cell(method, r, n, tuple(bs)) for r, (n, bs) in sorted(by_rank.items()))
    return cells, unreachable


@dataclass(frozen=True)
class Point:
    """A cell's results over seeds."""

    method: str
    rank: int | None
    adapter_params: int
    trainable_params: int
    budgets: tuple[int, ...]
    accuracies: dict[int, float]  # seed -> accuracy
    wall_time_s: float  # summed over the seeds

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies.values())

    @property
    def std(self) -> float:
        values = list(self.accuracies.values())
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.accuracies.values()), max(self.accuracies.values())


def summarise(cells: Sequence[Cell], rows: Sequence[dict[str, Any]]) -> list[Point]:
    """One Point per cell that has at least one finished run (rows: the runs' metrics)."""
    points = []
    for cell in cells:
        runs = [r for r in rows if r["method"] == cell.method and r["rank"] == cell.rank]
        if runs:
            points.append(
                Point(
                    cell.method,
                    cell.rank,
                    runs[0]["adapter_params"],
                    runs[0]["trainable_params"],
                    cell.budgets,
                    {int(r["seed"]): float(r["accuracy"]) for r in runs},
                    sum(r["wall_time_s"] for r in runs),
                )
            )
    return points


def table(
    points: Sequence[Point], unreachable: Sequence[Unreachable], budgets: Sequence[int], seeds: Sequence[int]
) -> str:
    """Markdown: per budget, every method's point (mean ± sample std over seeds, each seed's accuracy), the best
    mean in bold when the budget's points share their seeds (means over different seeds do not rank); a method
    that cannot reach the budget says so; a point of one seed has no spread to show."""
    seed_cols = " | ".join(f"seed {s}" for s in seeds)
    lines = [
        f"| budget | method | rank | adapter params | trainable (+ head) | {seed_cols} | mean ± std |",
        "|---:|---|---:|---:|---:|" + "---:|" * len(seeds) + "---:|",
    ]
    for budget in sorted(budgets):
        here = [p for p in points if budget in p.budgets or not p.budgets]
        same_seeds = len({frozenset(p.accuracies) for p in here}) == 1
        best = max((p.mean for p in here), default=math.nan) if same_seeds else math.nan
        for p in sorted(here, key=lambda p: (p.adapter_params, p.method)):
            accs = " | ".join(f"{p.accuracies[s]:.2%}" if s in p.accuracies else "" for s in seeds)
            mean = f"{p.mean:.2%} ± {p.std:.2%}" if len(p.accuracies) > 1 else f"{p.mean:.2%} (1 seed)"
            mean = f"**{mean}**" if p.mean == best and len(here) > 1 else mean
            rank = "" if p.rank is None else str(p.rank)
            lines.append(
                f"| {budget:,} | {p.method} | {rank} | {p.adapter_params:,} | {p.trainable_params:,} | "
                f"{accs} | {mean} |"
            )
        for u in unreachable:
            if u.budget == budget:
                blank = " | ".join("" for _ in seeds)
                lines.append(f"| {budget:,} | {u.method} | - | rank 1 has {u.smallest:,} | | {blank} | cannot reach |")
    return "\n".join(lines)


LABEL_OFFSETS = ((4, -11), (-24, 4), (4, 4))  # points: below right, above left, above right


def plot(points: Sequence[Point], path: Path, title: str, ylabel: str) -> None:
    """Mean accuracy against trainable parameters (log x), one line per method, error bars = sample std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for i, method in enumerate(dict.fromkeys(p.method for p in points)):
        mine = sorted((p for p in points if p.method == method), key=lambda p: p.trainable_params)
        xs = [p.trainable_params for p in mine]
        ax.errorbar(xs, [p.mean for p in mine], yerr=[p.std for p in mine], marker="o", capsize=3, label=method)
        for p in mine:  # each method's labels on its own side: the points of one budget sit close together
            if p.rank is not None:
                ax.annotate(
                    f"r={p.rank}",
                    (p.trainable_params, p.mean),
                    textcoords="offset points",
                    xytext=LABEL_OFFSETS[i % len(LABEL_OFFSETS)],
                    fontsize=7,
                )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapter + head, log scale)")
    ax.set_ylabel(f"{ylabel} (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finished_run(out: Path, o: TrainOptions) -> dict[str, Any] | None:
    """The metrics of a finished run in ``out`` made with exactly the options of ``o`` (for --resume), else None."""
    path = out / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    resolved = resolve_options(o)
    stored = metrics.get("options")
    if not isinstance(stored, dict):
        return None
    # An option added since that run was made has its default there (a new option's default keeps old behaviour).
    defaults = run_identity(TrainOptions())
    stored = {**{k: v for k, v in defaults.items() if k not in stored}, **stored}
    return metrics if stored == run_identity(resolved) else None
