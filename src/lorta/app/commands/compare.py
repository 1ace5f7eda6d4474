"""``lorta compare``: a grid of methods x ranks, or an accuracy-vs-parameters frontier, trained with the options of
``lorta train`` (lorta.app.commands.train) and tabulated.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...registry import method_specs
from ..frontier import DEFAULT_BUDGETS
from ..frontier import DEFAULT_METHODS as DEFAULT_FRONTIER_METHODS
from .train import (
    EXIT_USAGE,
    DefaultsFormatter,
    accuracy_kind,
    expected_errors,
    fmt_time,
    lora_ratio,
    method_label,
    options_from,
    quiet_environment,
    shared_arguments,
    summary,
)

DEFAULT_COMPARE_METHODS = ",".join([*method_specs(), "lora", "head-only"])


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` subcommand."""
    from ..train import METHODS

    compare = subparsers.add_parser(
        "compare",
        help="run a grid of methods x ranks and tabulate parameters vs accuracy",
        description="Train every method at every rank on the same task with the same steps; write a markdown table "
        "and a plot of accuracy against trainable parameters (log x).",
        formatter_class=DefaultsFormatter,
    )
    compare.add_argument("--methods", default=DEFAULT_COMPARE_METHODS, help=f"comma-separated: {','.join(METHODS)}")
    compare.add_argument("--ranks", default=None, help="comma-separated ranks (default: each method's default rank)")
    compare.add_argument(
        "--frontier",
        nargs="?",
        const=",".join(map(str, DEFAULT_BUDGETS)),
        default=None,
        metavar="BUDGETS",
        help="accuracy-vs-parameters frontier instead of a grid: each method at the largest rank within each "
        f"adapter-parameter budget, at every --seeds (default budgets {','.join(map(str, DEFAULT_BUDGETS))}; "
        f"default methods {','.join(DEFAULT_FRONTIER_METHODS)})",
    )
    compare.add_argument("--seeds", default=None, help="--frontier: comma-separated seeds (default 0,1,2)")
    compare.add_argument(
        "--resume", action="store_true", help="reuse every run of the output folder that finished with the same options"
    )
    compare.add_argument(
        "--report",
        action="store_true",
        help="--frontier: write the table and plot from the runs of --out that finished with the "
        "same options, and train nothing (the missing runs are listed)",
    )
    shared_arguments(compare)
    compare.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/compare-<model>-<task>-seed<seed>; "
        "with --frontier runs/frontier-<model>-<task>)",
    )
    compare.set_defaults(func=run_compare)


def _parse_list(text: str, flag: str, cast: type = str) -> list[Any]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{flag} is empty")
    try:
        return [cast(t) for t in items]
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from exc


def grid(methods: Sequence[str], ranks: Sequence[int] | None) -> list[tuple[str, int | None]]:
    """(method, rank) pairs; methods without an adapter run once; None rank = the method's default."""
    from ..train import ADAPTER_METHODS

    cells: list[tuple[str, int | None]] = []
    for method in methods:
        cells.extend((method, rank) for rank in ((ranks or [None]) if method in ADAPTER_METHODS else [None]))
    return cells


def run_compare(args: argparse.Namespace) -> int:
    """``lorta compare``: train every (method, rank), then write compare.md, compare.png and compare.json."""
    quiet_environment()
    from ..train import METHODS, model_label

    try:
        methods = _parse_list(args.methods, "--methods")
        ranks = _parse_list(args.ranks, "--ranks", int) if args.ranks else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return EXIT_USAGE
    if args.frontier is not None:
        return run_frontier(args, methods if args.methods != DEFAULT_COMPARE_METHODS else None, ranks)
    if args.seeds is not None or args.report:
        print(
            f"error: {'--seeds' if args.seeds is not None else '--report'} goes with --frontier; a grid runs at --seed",
            file=sys.stderr,
        )
        return EXIT_USAGE
    model = args.model or ("smollm2" if args.task == "dpo" else "minilm")
    root = Path(args.out or Path("runs") / f"compare-{model_label(model)}-{args.task}-seed{args.seed}")
    rows = []
    start = time.perf_counter()
    command = ("lorta compare " + shlex.join(sys.argv[2:])).strip() if sys.argv[1:2] == ["compare"] else "lorta compare"
    cells = grid(methods, ranks)
    try:
        for i, (method, rank) in enumerate(cells, start=1):
            label = f"{method}-r{rank}" if rank is not None else method
            print(f"== [{i}/{len(cells)}] {label}", flush=True)
            options = options_from(args, method=method, rank=rank, out=str(root / label), resume=False)
            metrics = _run_or_reuse(options, args.resume)
            print(summary(metrics), flush=True)
            rows.append({k: v for k, v in metrics.items() if k != "loss_curve"})
            write_compare(rows, root, command, time.perf_counter() - start)  # the table so far, after every run
    except expected_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _print_outputs(root, "compare")


def _heading(kind: str, first: dict[str, Any], command: str) -> str:
    """The title and command lines of a compare table (written while the runs go on)."""
    return f"# lorta {kind}: {first['model']} · {first['task']} · {first['data']}\n\n`{command}`  \n"


def _print_outputs(root: Path, stem: str) -> int:
    """Show the table written to ``root/<stem>.md`` and list the files (the plot only where matplotlib made it)."""
    table, plot = root / f"{stem}.md", root / f"{stem}.png"
    print(f"\n{table.read_text(encoding='utf-8')}")
    print(f"wrote {table}, {f'{plot}, ' if plot.exists() else ''}{root / f'{stem}.json'}")
    return 0


def compare_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: method, rank, adapted matrices, trainable params (adapter + head), ratio vs LoRA r=8,
    accuracy, wall time."""
    header = (
        "| method | rank | adapted matrices | adapter params | head params | vs LoRA r=8 (adapter) | accuracy "
        "| wall time |\n|---|---:|---|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for r in rows:
        rank = "" if r["rank"] is None else str(r["rank"])
        lines.append(
            f"| {method_label(r)} | {rank} | {_targets_cell(r)} | {r['adapter_params']:,} | "
            f"{r['head_params']:,} | "
            f"{lora_ratio(r['adapter_params'], r['lora_r8_params'])} | {r['accuracy']:.2%} | "
            f"{fmt_time(r['wall_time_s'])} |"
        )
    return "\n".join(lines)


def _targets_cell(r: dict[str, Any]) -> str:
    if r.get("targets"):
        return ", ".join(r["targets"])
    return "all" if r["method"] == "full" else "-"


def write_compare(rows: Sequence[dict[str, Any]], root: Path, command: str, total_s: float) -> None:
    root.mkdir(parents=True, exist_ok=True)
    first = rows[0]
    what = accuracy_kind(first)
    text = (
        f"{_heading('compare', first, command)}"
        f"{first['steps']} steps x {first['batch_size'] * first['grad_accum']} per method, "
        f"seed {first['seed']}, {first['n_train']:,} train / {first['n_test']:,} test examples; accuracy = {what}; "
        f"LoRA r=8 on q,k,v,o = {first['lora_r8_params']:,} parameters; total {fmt_time(total_s)}.\n\n"
        f"{compare_table(rows)}\n"
    )
    (root / "compare.md").write_text(text, encoding="utf-8")
    (root / "compare.json").write_text(
        json.dumps({"command": command, "rows": list(rows)}, indent=2) + "\n", encoding="utf-8"
    )
    if first.get("loss_plot") is not None:  # matplotlib is installed (run_job checked it before training)
        plot_compare(rows, root / "compare.png", what)


def plot_compare(rows: Sequence[dict[str, Any]], path: Path, ylabel: str) -> None:
    """Accuracy against trainable parameters (adapter + head, log x), one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for method in dict.fromkeys(method_label(r) for r in rows):
        pts = sorted((r["trainable_params"], r["accuracy"], r["rank"]) for r in rows if method_label(r) == method)
        xs, ys, ranks = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=method)
        for x, y, rank in pts:
            if rank is not None:
                ax.annotate(f"r={rank}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapter + head, log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"{rows[0]['model']} · {rows[0]['task']} · {rows[0]['steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _run_or_reuse(options: Any, resume: bool) -> dict[str, Any]:
    """Train one run, or with --resume reuse its folder's finished run of the same options."""
    from ..frontier import finished_run
    from ..train import run_job

    done = finished_run(Path(options.out), options) if resume else None
    if done is not None:
        print(f"reusing the finished run in {options.out}", flush=True)
        return done
    return run_job(options)


# --------------------------------------------------------------------------------------------------
# compare --frontier
# --------------------------------------------------------------------------------------------------


def run_frontier(args: argparse.Namespace, methods: list[str] | None, ranks: list[int] | None) -> int:
    """``lorta compare --frontier``: plan the ranks per budget, train every (cell, seed) with the seeds outermost
    (so an interrupted frontier is complete for its first seeds), then write frontier.md, .json and .png. With
    --report nothing trains: the tables are written from the finished runs (several machines, or a frontier
    interrupted half-way, fill one folder; this gathers it)."""
    from .. import frontier
    from ..train import model_label

    try:
        budgets = _parse_list(args.frontier, "--frontier", int)
        seeds = _parse_list(args.seeds or "0,1,2", "--seeds", int)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problems = [f"--frontier budgets must be positive, got {b}" for b in budgets if b <= 0]
    problems += ["--ranks does not go with --frontier, which picks the ranks from the budgets"] if ranks else []
    problems += [f"--seeds repeats {s}" for s in sorted({s for s in seeds if seeds.count(s) > 1})]
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        return EXIT_USAGE
    methods = methods or list(DEFAULT_FRONTIER_METHODS)
    model = args.model or ("smollm2" if args.task == "dpo" else "minilm")
    root = Path(args.out or Path("runs") / f"frontier-{model_label(model)}-{args.task}")
    command = ("lorta compare " + shlex.join(sys.argv[2:])).strip() if sys.argv[1:2] == ["compare"] else "lorta compare"
    start = time.perf_counter()
    try:
        cells, unreachable = frontier.plan(options_from(args), methods, budgets)
        for u in unreachable:
            print(f"note: {u.method} cannot reach {u.budget:,} parameters (its rank 1 has {u.smallest:,})")
        rows: list[dict[str, Any]] = []
        total = len(cells) * len(seeds)
        for i, (seed, cell) in enumerate(((s, c) for s in seeds for c in cells), start=1):
            print(f"== [{i}/{total}] {cell.label} seed {seed}", flush=True)
            options = options_from(
                args,
                method=cell.method,
                rank=cell.rank,
                seed=seed,
                out=str(root / f"{cell.label}-seed{seed}"),
                resume=False,
            )
            if args.report:
                metrics = frontier.finished_run(Path(options.out), options)
                if metrics is None:
                    print(f"   missing: no finished run with these options in {options.out}", flush=True)
                    continue
            else:
                metrics = _run_or_reuse(options, args.resume)
            print(
                f"   {metrics['adapter_params']:,} adapter parameters, accuracy {metrics['accuracy']:.2%}", flush=True
            )
            rows.append({k: v for k, v in metrics.items() if k != "loss_curve"})
            write_frontier(rows, cells, unreachable, budgets, seeds, root, command, time.perf_counter() - start)
    except expected_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not rows:
        print(
            f"error: --report found no finished run of this frontier in {root} (the same options made each run; "
            "run it without --report to train them)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return _print_outputs(root, "frontier")


def write_frontier(
    rows: Sequence[dict[str, Any]],
    cells: Sequence[Any],
    unreachable: Sequence[Any],
    budgets: Sequence[int],
    seeds: Sequence[int],
    root: Path,
    command: str,
    total_s: float,
) -> None:
    """The frontier so far: frontier.md (table), frontier.json (plan and runs), frontier.png (when matplotlib is)."""
    import dataclasses

    from ...saving import write_text
    from .. import frontier

    root.mkdir(parents=True, exist_ok=True)
    points = frontier.summarise(cells, rows)
    runs_s = sum(r["wall_time_s"] for r in rows)
    first = rows[0]
    what = accuracy_kind(first)
    text = (
        f"{_heading('compare --frontier', first, command)}"
        f"{first['steps']} steps x {first['batch_size'] * first['grad_accum']} per run, seeds "
        f"{', '.join(map(str, seeds))} ({len(rows)} of {len(cells) * len(seeds)} runs done); accuracy = {what}; "
        f"budgets in adapter parameters, each method at its largest rank within the budget; head "
        f"{first['head_params']:,} parameters; wall time of this command {fmt_time(total_s)}, of the runs "
        f"themselves {fmt_time(runs_s)} (runs reused by --resume or "
        f"--report included).\n\n"
        f"{frontier.table(points, unreachable, budgets, seeds)}\n"
    )
    write_text(root / "frontier.md", text)
    data = {
        "command": command,
        "budgets": list(budgets),
        "seeds": list(seeds),
        "wall_time_s": total_s,
        "runs_wall_time_s": runs_s,
        "cells": [dataclasses.asdict(c) for c in cells],
        "unreachable": [dataclasses.asdict(u) for u in unreachable],
        "runs": list(rows),
    }
    write_text(root / "frontier.json", json.dumps(data, indent=2) + "\n")
    if _has_matplotlib():
        title = f"{first['model']} · {first['task']} · {first['steps']} steps x {first['batch_size']}"
        frontier.plot(points, root / "frontier.png", title, what)


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None
