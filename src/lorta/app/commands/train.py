"""``lorta train`` (fine-tune one model with one method) and ``lorta compare`` (a grid of methods × ranks).

A thin layer: argument parsing and printing here; the jobs themselves are in :mod:`lorta.app.train`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ...registry import method_specs
from ..train import SCHEDULES, TrainOptions

EXIT_USAGE = 2
DEFAULT_COMPARE_METHODS = ",".join([*method_specs(), "lora", "head-only"])


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" only where X says something (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand (``compare``, which shares its options, is lorta.app.commands.compare)."""
    from ..train import METHODS

    train = subparsers.add_parser(
        "train",
        help="fine-tune a model with a (tensor) adapter, offline",
        description="Fine-tune a model on a text task offline and report trainable parameters, held-out accuracy "
        "and wall time. Default: LoRTA on all-MiniLM-L6-v2, Rotten Tomatoes sentiment (a few minutes on a CPU).",
        formatter_class=DefaultsFormatter,
    )
    train.add_argument("--method", choices=METHODS, default="lorta", help="adapter (full, head-only: none)")
    train.add_argument("--rank", type=int, default=None, help="rank (TensLoRA: every mode's) (default: per method)")
    shared_arguments(train)
    train.add_argument("--out", default=None, help="output folder (default runs/<method>-<model>-<task>-r<R>-seed<S>)")
    train.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    train.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: 100)")
    train.set_defaults(func=run_train)


def shared_arguments(p: argparse.ArgumentParser) -> None:
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


def expected_errors() -> tuple[type[BaseException], ...]:
    from ...layout import LayoutError
    from ..data import DataError
    from ..models import MissingDependencyError, ModelNotFoundError
    from ..train import UsageError

    return (DataError, ModelNotFoundError, UsageError, LayoutError, MissingDependencyError)


def quiet_environment() -> None:
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
    quiet_environment()
    from ..train import run_job

    try:
        metrics = run_job(options_from(args), started=_process_start())
    except expected_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(summary(metrics))
    return 0


def fmt_time(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def lora_ratio(adapter: int, reference: int) -> str:
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


def accuracy_kind(run: dict[str, Any]) -> str:
    return "held-out reward accuracy" if run["job"] == "dpo" else "held-out accuracy"


def summary(m: dict[str, Any]) -> str:
    """The block printed at the end of ``lorta train``."""
    rank = f" r={m['rank']}" if m.get("rank") is not None else ""
    what = accuracy_kind(m)
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
        f"   (LoRA r=8 on q,k,v,o: {m['lora_r8_params']:,}; {lora_ratio(m['adapter_params'], m['lora_r8_params'])})",
        *([f"adapted matrices      {', '.join(m['targets'])}"] if m.get("targets") else []),
        f"{what:<21} {m['accuracy']:.2%}  on {examples} never seen in training{baseline}",
        f"wall time             {fmt_time(m['wall_time_s'])}  (training {fmt_time(m['train_time_s'])}, "
        f"evaluation {fmt_time(m['eval_time_s'])})",
        f"memory                peak RSS {m['peak_rss_mb']:,.0f} MB; frozen base weights "
        f"{m['base_bytes'] / 2**20:,.1f} MB{' (' + m['quantize'] + ')' if m.get('quantize') else ''}",
        f"{kind:<21} {saved}",
        f"metrics               {out / 'metrics.json'}",
        f"loss curve            {m.get('loss_plot') or 'not written (pip install matplotlib)'}",
    ]
    return "\n".join(lines)
