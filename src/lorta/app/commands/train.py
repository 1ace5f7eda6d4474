"""``lorta train`` (fine-tune one model with one method) and ``lorta compare`` (a grid of methods × ranks).

A thin layer: argument parsing and printing here; the jobs themselves are in :mod:`lorta.app.train`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...registry import method_specs
from ..frontier import DEFAULT_BUDGETS
from ..frontier import DEFAULT_METHODS as DEFAULT_FRONTIER_METHODS
from ..train import SCHEDULES, TrainOptions

EXIT_USAGE = 2
DEFAULT_COMPARE_METHODS = ",".join([*method_specs(), "lora", "head-only"])


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" only where X says something (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` and ``compare`` subcommands."""
    from ..train import METHODS

    train = subparsers.add_parser(
        "train",
        help="fine-tune a model with a (tensor) adapter, offline",
        description="Fine-tune a model on a text task offline and report trainable parameters, held-out accuracy "
        "and wall time. Default: LoRTA on all-MiniLM-L6-v2, Rotten Tomatoes sentiment (a few minutes on a CPU).",
        formatter_class=_DefaultsFormatter,
    )
    train.add_argument("--method", choices=METHODS, default="lorta", help="adapter (full, head-only: none)")
    train.add_argument("--rank", type=int, default=None, help="rank (TensLoRA: every mode's) (default: per method)")
    _shared_arguments(train)
    train.add_argument("--out", default=None, help="output folder (default runs/<method>-<model>-<task>-r<R>-seed<S>)")
    train.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    train.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: 100)")
    train.set_defaults(func=run_train)

    compare = subparsers.add_parser(
        "compare",
        help="run a grid of methods x ranks and tabulate parameters vs accuracy",
        description="Train every method at every rank on the same task with the same steps; write a markdown table "
        "and a plot of accuracy against trainable parameters (log x).",
        formatter_class=_DefaultsFormatter,
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
    _shared_arguments(compare)
    compare.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/compare-<model>-<task>-seed<seed>; "
        "with --frontier runs/frontier-<model>-<task>)",
    )
    compare.set_defaults(func=run_compare)


def _shared_arguments(p: argparse.ArgumentParser) -> None:
    from ..train import TASKS

    def add(flag: str, text: str, **kwargs: Any) -> None:
        p.add_argument(flag, help=text, **kwargs)

    add(
        "--model",
        "catalogue name (minilm, smollm2), a local HF folder or a .gguf file (default: minilm; smollm2 for --task dpo)",
    )
    add(
        "--task",
        "sentiment (Rotten Tomatoes), party (2012 convention speeches, split by speaker) or dpo",
        choices=TASKS,
        default="sentiment",
    )
    add("--data", "a CSV/JSONL table instead of Rotten Tomatoes (split by its group/movie column, else by text)")
    add("--text-column", "text column of --data", default="text")
    add("--label-column", "label column of --data", default="label")
    add("--steps", "optimizer steps (default: 400; prompt 60; dpo 40)", type=int)
    add("--batch-size", "examples per step and device (default: 32; prompt 8; dpo 4)", type=int)
    add("--grad-accum", "gradient accumulation steps", type=int, default=1)
    default = method_specs()[TrainOptions.method]
    recipe = default.classify
    add(
        "--lr",
        f"adapter learning rate (default: per method; {default.title}'s classify lr is {recipe.lr:g} at rank "
        f"{recipe.rank}, times (rank / {recipe.rank}) ** {recipe.lr_rank_power:g} at others)",
        type=float,
    )
    add("--head-lr", "classification head learning rate (default: per method)", type=float)
    add("--alpha", "scale = alpha / rank (default: per method)", type=float)
    add("--dropout", "adapter input dropout", type=float, default=0.0)
    add(
        "--schedule",
        "the lr after warm-up: decays linearly or as a cosine to 0 at the last step, or stays constant",
        choices=tuple(SCHEDULES),
        default=TrainOptions.schedule,
    )
    add(
        "--warmup",
        "fraction of the steps over which the lr rises linearly from 0",
        type=float,
        default=TrainOptions.warmup,
    )
    add(
        "--weight-decay",
        "AdamW's decoupled weight decay on the adapter and the head",
        type=float,
        default=TrainOptions.weight_decay,
    )
    add("--max-train", "class-balanced subset of the training split (DPO: pairs; default: all)", type=int)
    add("--max-test", "class-balanced subset of the held-out split (DPO: pairs; default: all)", type=int)
    add("--max-length", "max tokens per example (default: 64; prompt 96; dpo 128)", type=int)
    add(
        "--targets",
        "adapted matrices, comma-separated: attention roles q,k,v,o and/or module names (default: "
        "q,k,v,o; LoRTA on a classifier: q,k,v)",
        type=_modes,
    )
    add(
        "--quantize",
        "load the base in 8 or 4 bits (bitsandbytes LLM.int8 / nf4 with double quantisation), "
        "QLoRA-style; the adapter trains in float32",
        choices=("8bit", "4bit"),
    )
    add("--seed", "seed of the split, subsets, data order and initialisation", type=int, default=0)
    add("--quiet", "no progress bars", action="store_true")
    for spec in method_specs().values():  # each method's own options (MethodSpec.train_flags)
        for flag in spec.train_flags:
            kwargs = flag.argparse_kwargs()
            kwargs["dest"] = _METHOD_OPTION + flag.dest
            kwargs.setdefault("metavar", None if flag.choices else flag.dest.upper())
            p.add_argument(flag.flag, **kwargs)


_METHOD_OPTION = "method_option:"  # argparse dest prefix of the methods' own options


def _modes(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def options_from(args: argparse.Namespace, **overrides: Any) -> Any:
    """TrainOptions from parsed arguments (unknown attributes ignored). The methods' options given on the command
    line go to ``method_options``; ``lorta compare`` (which names ``method`` in `overrides`) passes each method
    its own and drops the others', since one command line serves every method of the grid."""
    import dataclasses

    from ..train import TrainOptions, for_method

    names = {f.name for f in dataclasses.fields(TrainOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    given = {
        k.removeprefix(_METHOD_OPTION): v
        for k, v in vars(args).items()
        if k.startswith(_METHOD_OPTION) and v is not None
    }
    values.update(overrides)
    options = TrainOptions(**values, method_options=given)
    return for_method(options, overrides["method"]) if "method" in overrides else options


def _expected_errors() -> tuple[type[BaseException], ...]:
    from ...layout import LayoutError
    from ..data import DataError
    from ..models import MissingDependencyError, ModelNotFoundError
    from ..train import UsageError

    return (DataError, ModelNotFoundError, UsageError, LayoutError, MissingDependencyError)


def _quiet_environment() -> None:
    """Offline and without transformers' advisory warnings; the user's own settings win."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(peft|transformers|trl|torch)\b")


def _process_start() -> float | None:
    """When the ``lorta`` process started, so the reported wall time includes Python's imports; None (time from
    the run's start) when called in-process from other code, or if unknown."""
    if Path(sys.argv[0]).name not in ("lorta", "cli.py"):
        return None
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # psutil missing or /proc unreadable
        return None


def run_train(args: argparse.Namespace) -> int:
    """``lorta train``: one run; prints the summary; exit 2 with the message on bad data or options."""
    _quiet_environment()
    from ..train import run_job

    try:
        metrics = run_job(options_from(args), started=_process_start())
    except _expected_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(summary(metrics))
    return 0


def _fmt_time(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def _ratio(adapter: int, reference: int) -> str:
    if adapter == 0:
        return "no adapter"
    if adapter <= reference:
        return f"{reference / adapter:.1f}x fewer"
    return f"{adapter / reference:.1f}x more"


def method_label(m: dict[str, Any]) -> str:
    """The method, with its options where they are not the defaults (e.g. ``lorta[layers+matrices]``); `m` is a
    run's metrics, which hold the method's options flat."""
    spec = method_specs().get(m["method"])
    if spec is None:
        return m["method"]
    values = spec.train_values({k: tuple(v) if isinstance(v, list) else v for k, v in m.items()})
    tags = spec.run_tags(values)
    return f"{m['method']}[{', '.join(tags)}]" if tags else m["method"]


def summary(m: dict[str, Any]) -> str:
    """The block printed at the end of ``lorta train``."""
    rank = f" r={m['rank']}" if m.get("rank") is not None else ""
    what = _accuracy_kind(m)
    examples = f"{m['test_pairs']:,} preference pairs" if m["job"] == "dpo" else f"{m['n_test']:,} examples"
    baseline = "" if m["job"] == "dpo" else f", majority class {m['majority_baseline']:.1%}"
    saved = Path(m["saved"])
    kind = "adapter" if saved.name == "adapter" else ("model" if saved.name == "model" else "head")
    out = Path(m["out"])
    lines = [
        "-" * 78,
        f"{method_label(m)}{rank} on {m['model']} · {m['task']} ({m['job']}) · {m['data']} · "
        f"{m['steps']} steps x {m['batch_size'] * m['grad_accum']} · seed {m['seed']}",
        f"trainable parameters  {m['adapter_params']:,} adapter + {m['head_params']:,} head"
        f"   (LoRA r=8 on q,k,v,o: {m['lora_r8_params']:,}; {_ratio(m['adapter_params'], m['lora_r8_params'])})",
        *([f"adapted matrices      {', '.join(m['targets'])}"] if m.get("targets") else []),
        f"{what:<21} {m['accuracy']:.2%}  on {examples} never seen in training{baseline}",
        f"wall time             {_fmt_time(m['wall_time_s'])}  (training {_fmt_time(m['train_time_s'])}, "
        f"evaluation {_fmt_time(m['eval_time_s'])})",
        f"memory                peak RSS {m['peak_rss_mb']:,.0f} MB; frozen base weights "
        f"{m['base_bytes'] / 2**20:,.1f} MB{' (' + m['quantize'] + ')' if m.get('quantize') else ''}",
        f"{kind:<21} {saved}",
        f"metrics               {out / 'metrics.json'}",
        f"loss curve            {m.get('loss_plot') or 'not written (pip install matplotlib)'}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------


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
    _quiet_environment()
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
    except _expected_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _print_outputs(root, "compare")


def _accuracy_kind(run: dict[str, Any]) -> str:
    return "held-out reward accuracy" if run["job"] == "dpo" else "held-out accuracy"


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
            f"{_ratio(r['adapter_params'], r['lora_r8_params'])} | {r['accuracy']:.2%} | "
            f"{_fmt_time(r['wall_time_s'])} |"
        )
    return "\n".join(lines)


def _targets_cell(r: dict[str, Any]) -> str:
    if r.get("targets"):
        return ", ".join(r["targets"])
    return "all" if r["method"] == "full" else "-"


def write_compare(rows: Sequence[dict[str, Any]], root: Path, command: str, total_s: float) -> None:
    root.mkdir(parents=True, exist_ok=True)
    first = rows[0]
    what = _accuracy_kind(first)
    text = (
        f"{_heading('compare', first, command)}"
        f"{first['steps']} steps x {first['batch_size'] * first['grad_accum']} per method, "
        f"seed {first['seed']}, {first['n_train']:,} train / {first['n_test']:,} test examples; accuracy = {what}; "
        f"LoRA r=8 on q,k,v,o = {first['lora_r8_params']:,} parameters; total {_fmt_time(total_s)}.\n\n"
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
    except _expected_errors() as exc:
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

    from .. import frontier
    from ..train import write_atomically

    root.mkdir(parents=True, exist_ok=True)
    points = frontier.summarise(cells, rows)
    runs_s = sum(r["wall_time_s"] for r in rows)
    first = rows[0]
    what = _accuracy_kind(first)
    text = (
        f"{_heading('compare --frontier', first, command)}"
        f"{first['steps']} steps x {first['batch_size'] * first['grad_accum']} per run, seeds "
        f"{', '.join(map(str, seeds))} ({len(rows)} of {len(cells) * len(seeds)} runs done); accuracy = {what}; "
        f"budgets in adapter parameters, each method at its largest rank within the budget; head "
        f"{first['head_params']:,} parameters; wall time of this command {_fmt_time(total_s)}, of the runs "
        f"themselves {_fmt_time(runs_s)} (runs reused by --resume or "
        f"--report included).\n\n"
        f"{frontier.table(points, unreachable, budgets, seeds)}\n"
    )
    write_atomically(root / "frontier.md", text)
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
    write_atomically(root / "frontier.json", json.dumps(data, indent=2) + "\n")
    if _has_matplotlib():
        title = f"{first['model']} · {first['task']} · {first['steps']} steps x {first['batch_size']}"
        frontier.plot(points, root / "frontier.png", title, what)


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None
