"""Trainer plumbing: separate head and mode-factor learning rates, the arguments, progress, checkpoints and the
loss curve.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import is_head
from .options import SCHEDULES, Echo, TrainOptions


def trainer_classes() -> tuple[type, type]:
    """A Trainer with a separate head learning rate, and a compact progress callback (imported lazily)."""
    from transformers import Trainer
    from transformers.trainer_callback import ProgressCallback

    class HeadLrTrainer(Trainer):
        """AdamW with a group per learning rate: the adapter (args.learning_rate), the classification head
        (head_lr) and factors a method's options give their own lr (factor_lrs, e.g. LoRTA's --mode-lr)."""

        head_lr: float | None = None
        factor_lrs: dict[str, float] = {}  # factor name -> lr (MethodSpec.factor_groups)

        def _lr_of(self, name: str) -> float:
            if is_head(name) and self.head_lr is not None:
                return self.head_lr
            factor = name.rsplit(".", 1)[-1]
            if factor in self.factor_lrs:
                return self.factor_lrs[factor]
            return self.args.learning_rate

        def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                groups: dict[float, list[nn.Parameter]] = {self.args.learning_rate: []}  # logged lr = adapter's
                for name, param in opt_model.named_parameters():
                    if param.requires_grad:
                        groups.setdefault(self._lr_of(name), []).append(param)
                groups = {lr: ps for lr, ps in groups.items() if ps}
                decay = self.args.weight_decay
                param_groups = [{"params": ps, "lr": lr, "weight_decay": decay} for lr, ps in groups.items()]
                self.optimizer = optimizer_cls(param_groups, **kwargs)
            return self.optimizer

    class CompactProgress(ProgressCallback):
        """The Trainer's progress bar, with one short line per logging step instead of a dict."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not (state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs):
                return
            line = f"step {state.global_step:>5}/{state.max_steps}  loss {logs['loss']:.4f}"
            if "rewards/accuracies" in logs:
                line += f"  reward acc {logs['rewards/accuracies']:.2f}"
            if "learning_rate" in logs:
                line += f"  lr {logs['learning_rate']:.2e}"
            self.training_bar.write(line)

    return HeadLrTrainer, CompactProgress


def training_arguments(o: TrainOptions, output_dir: Path, cls: type | None = None, **extra: Any) -> Any:
    """TrainingArguments shared by all jobs: CPU unless CUDA, no reporting, seeded, --schedule after --warmup (a
    fraction of the steps), checkpoints."""
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    save_steps = o.save_steps or min(100, o.steps)
    return cls(
        output_dir=str(output_dir),
        max_steps=o.steps,
        per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.batch_size * 2,
        gradient_accumulation_steps=o.grad_accum,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        lr_scheduler_type=SCHEDULES[o.schedule],
        warmup_steps=o.warmup,
        logging_steps=max(1, o.steps // 20),
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        seed=o.seed,
        data_seed=o.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        disable_tqdm=o.quiet,
        dataloader_num_workers=0,
        **extra,
    )


def install_progress(trainer: Any, quiet: bool) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    _, compact = trainer_classes()
    trainer.pop_callback(ProgressCallback)
    trainer.pop_callback(PrinterCallback)
    if not quiet:
        trainer.add_callback(compact)


def checkpoint_to_resume(o: TrainOptions, ckpt_dir: Path, echo: Echo) -> str | None:
    """The last checkpoint when --resume (None, with a note, when there is none); without --resume, old checkpoints
    of this output folder are removed so they cannot mix with the new run's."""
    from transformers.trainer_utils import get_last_checkpoint

    if not o.resume:
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        return None
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last is None:
        echo(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
    else:
        echo(f"resuming from {last}")
    return last


def loss_curve(trainer: Any) -> list[list[float]]:
    return [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry]


def lr_curve(trainer: Any) -> list[list[float]]:
    """The adapter's lr at each logging step (the schedule the run really followed)."""
    return [[e["step"], e["learning_rate"]] for e in trainer.state.log_history if "learning_rate" in e]


def plot_loss(curve: Sequence[Sequence[float]], path: Path, title: str) -> None:
    """A PNG of the training loss against the step (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    if curve:
        steps, losses = zip(*curve, strict=True)
        ax.plot(steps, losses, marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def silence_library_bars() -> None:
    """--quiet: also no progress bars from transformers (checkpoint writing) and datasets (TRL's tokenisation)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
