"""The three jobs (classify, prompt, dpo) and `run_job`: train, evaluate, and write the outputs and metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...saving import write_text
from ..data import (
    TextDataset,
    make_preference_pairs,
)
from ..models import (
    load_for_causal_lm,
    load_for_classification,
)
from .adapters import (
    adapted_modules,
    adapter_only,
    base_bytes,
    count_parameters,
    lora_reference_parameters,
    prepare_model,
    save_trained,
    saved_path,
)
from .evaluate import (
    PROMPTS,
    answer_ids,
    classify_features,
    evaluate_classifier,
    evaluate_prompt,
    pad_right,
    prompt_features,
)
from .options import (
    ADAPTER_METHODS,
    Echo,
    TrainOptions,
    check_requirements,
    factor_lrs,
    resolve_options,
    run_identity,
)
from .order import describe_data, load_data, ordered_train_set
from .trainer import (
    checkpoint_to_resume,
    install_progress,
    loss_curve,
    lr_curve,
    plot_loss,
    silence_library_bars,
    trainer_classes,
    training_arguments,
)


def _train(trainer: Any, o: TrainOptions, ckpt_dir: Path, echo: Echo) -> float:
    """Run the Trainer (resuming if asked); return the training wall time in seconds."""
    install_progress(trainer, o.quiet)
    resume = checkpoint_to_resume(o, ckpt_dir, echo)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    return time.perf_counter() - start


def _classify(o: TrainOptions, path: Path, ds: TextDataset, echo: Echo) -> dict[str, Any]:
    from transformers import DataCollatorWithPadding

    trainer_cls, _ = trainer_classes()
    model, tokenizer = load_for_classification(path, ds.num_labels, label_names=ds.label_names, quantize=o.quantize)
    model = prepare_model(model, o, "SEQ_CLS")
    train = ordered_train_set(classify_features(tokenizer, ds.train, o.max_length), o)
    ckpt = Path(o.out) / "checkpoints"
    args = training_arguments(o, ckpt, train_sampling_strategy="sequential")
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainer.head_lr, trainer.factor_lrs = o.head_lr, factor_lrs(o)
    train_s = _train(trainer, o, ckpt, echo)
    start = time.perf_counter()
    result = evaluate_classifier(model, tokenizer, ds.test, o.max_length, quiet=o.quiet)
    result.update(train_time_s=train_s, eval_time_s=time.perf_counter() - start)
    return {**result, "trainer": trainer, "model": model, "tokenizer": tokenizer}


def _prompt(o: TrainOptions, path: Path, ds: TextDataset, echo: Echo) -> dict[str, Any]:
    trainer_cls, _ = trainer_classes()
    model, tokenizer = load_for_causal_lm(path, quantize=o.quantize)
    answers = answer_ids(tokenizer, ds.label_names)
    model = prepare_model(model, o, "CAUSAL_LM")
    template = PROMPTS[o.task]
    train = ordered_train_set(prompt_features(tokenizer, ds.train, answers, o.max_length, template), o)
    ckpt = Path(o.out) / "checkpoints"
    args = training_arguments(o, ckpt, train_sampling_strategy="sequential", remove_unused_columns=False)
    pad_id = tokenizer.pad_token_id
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=lambda f: pad_right(f, pad_id),
        processing_class=tokenizer,
    )
    trainer.factor_lrs = factor_lrs(o)
    train_s = _train(trainer, o, ckpt, echo)
    start = time.perf_counter()
    result = evaluate_prompt(model, tokenizer, ds.test, answers, o.max_length, o.quiet, template)
    result.update(
        train_time_s=train_s,
        eval_time_s=time.perf_counter() - start,
        label_words=[tokenizer.decode(a) for a in answers],
    )
    return {**result, "trainer": trainer, "model": model, "tokenizer": tokenizer}


def _dpo(o: TrainOptions, path: Path, ds: TextDataset, echo: Echo) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    train_pairs = make_preference_pairs(ds, "train", seed=o.seed, max_pairs=o.max_train)
    test_pairs = make_preference_pairs(ds, "test", seed=o.seed, max_pairs=o.max_test)
    model, tokenizer = load_for_causal_lm(path, quantize=o.quantize)
    model = prepare_model(model, o, "CAUSAL_LM")
    ckpt = Path(o.out) / "checkpoints"
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()  # TRL's default bf16 crawls on most CPUs
    args = training_arguments(
        o, ckpt, cls=DPOConfig, beta=o.beta, max_length=o.max_length, bf16=bf16, gradient_checkpointing=False
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(train_pairs),
        eval_dataset=Dataset.from_list(test_pairs),
        processing_class=tokenizer,
    )
    train_s = _train(trainer, o, ckpt, echo)
    start = time.perf_counter()
    metrics = trainer.evaluate()
    return {
        "accuracy": metrics["eval_rewards/accuracies"],
        "eval_loss": metrics["eval_loss"],
        "reward_margin": metrics.get("eval_rewards/margins"),
        "train_pairs": len(train_pairs),
        "test_pairs": len(test_pairs),
        "train_time_s": train_s,
        "eval_time_s": time.perf_counter() - start,
        "trainer": trainer,
        "model": model,
        "tokenizer": tokenizer,
    }


JOB_RUNNERS: dict[str, Callable[[TrainOptions, Path, TextDataset, Echo], dict[str, Any]]] = {
    "classify": _classify,
    "prompt": _prompt,
    "dpo": _dpo,
}


def run_job(options: TrainOptions, echo: Echo = print, started: float | None = None) -> dict[str, Any]:
    """Train, evaluate and write the outputs of one run; return its metrics (also in ``<out>/metrics.json``).

    ``started`` (a ``time.time()`` stamp, e.g. the process start) is where the reported wall time begins; default:
    now."""
    from transformers import set_seed

    start = time.time() if started is None else started
    o = resolve_options(options)
    kind, path = o.job, o.model_path
    skipped = check_requirements(kind, quantize=o.quantize)  # before any work: a missing package fails now
    for note in skipped:
        echo(f"note: {note}")
    if o.quiet:
        silence_library_bars()
    set_seed(o.seed)
    ds = load_data(o, subset=kind != "dpo")
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(o.seed)
    run = JOB_RUNNERS[kind](o, path, ds, echo)
    trainer, model, tokenizer = run.pop("trainer"), run.pop("model"), run.pop("tokenizer")
    metrics = _metrics(o, kind, path, ds, model, loss_curve(trainer), run)
    metrics["lr_curve"] = lr_curve(trainer)  # the schedule it followed (--schedule, --warmup)
    metrics["wall_time_s"] = time.time() - start
    metrics["loss_plot"] = None if skipped else str(out / "loss.png")
    if trainer.is_world_process_zero():  # the adapter and metrics first; the optional plot last
        save_trained(model, tokenizer, out, o)
        write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if not skipped:
            title = f"{o.method} r={o.rank} · {o.model} · {o.task} · acc {run['accuracy']:.3f}"
            plot_loss(metrics["loss_curve"], out / "loss.png", title)
    return metrics


def _metrics(
    o: TrainOptions,
    kind: str,
    path: Path,
    ds: TextDataset,
    model: nn.Module,
    curve: list[list[float]],
    run: dict[str, Any],
) -> dict[str, Any]:
    """Everything metrics.json records about a run (wall time is added last)."""
    adapter, head = count_parameters(model)
    if kind == "dpo":  # TRL adds a frozen "ref" copy of the adapter; count the trained one only
        adapter = adapter_only(model)
    metrics: dict[str, Any] = {
        "method": o.method,
        "model": o.model,
        "task": o.task,
        "job": kind,
        "data": describe_data(o),
        "rank": o.rank,
        "seed": o.seed,
        "steps": o.steps,
        "batch_size": o.batch_size,
        "grad_accum": o.grad_accum,
        "lr": o.lr,
        "head_lr": o.head_lr if kind == "classify" else None,
        "alpha": o.alpha,
        "schedule": o.schedule,
        "warmup": o.warmup,
        "weight_decay": o.weight_decay,
        "adapter_params": adapter,
        "head_params": head,
        "trainable_params": adapter + head,
        "lora_r8_params": lora_reference_parameters(path),
        "n_train": len(ds.train),
        "n_test": len(ds.test),
        "label_names": ds.label_names,
        "majority_baseline": max(ds.test.label_counts(ds.num_labels)) / max(1, len(ds.test)),
        **run,
        "train_loss": curve[-1][1] if curve else None,
        "loss_curve": curve,
        "out": o.out,
        "saved": str(saved_path(Path(o.out), o)),
        "quantize": o.quantize,
        "base_bytes": base_bytes(model),
        "peak_rss_mb": peak_rss_mb(),
        "options": run_identity(o),
    }
    for name, value in o.method_options.items():  # the method's own options, flat, as run_identity has them
        metrics[name] = list(value) if isinstance(value, tuple) else value
    if o.method in ADAPTER_METHODS:
        metrics["targets"] = adapted_modules(model)
    return metrics


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux reports kilobytes, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
