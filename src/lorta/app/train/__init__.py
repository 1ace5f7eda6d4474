"""The fine-tuning jobs behind ``lorta train`` and ``lorta compare``: data, model, Trainer, evaluation, outputs.

Three jobs, picked from the model and ``--task``:

- ``classify`` (an encoder such as MiniLM, ``--task sentiment`` or ``party``): a sequence classifier with a fresh
  head; the adapter and the head are trained with cross-entropy; accuracy is the argmax on the held-out split.
- ``prompt`` (a causal LM such as SmolLM2, ``--task sentiment`` or ``party``): the prompt asks for the label and
  the loss is on the answer tokens only; accuracy compares the log-likelihoods of the label words
  (" positive" vs " negative", " Democratic" vs " Republican") given the prompt.

Tasks: ``sentiment`` (Rotten Tomatoes snippets, split by movie, or the user's ``--data`` table), ``party`` (the
2012 convention speeches' paragraphs, split by speaker), ``dpo`` (preference pairs from Rotten Tomatoes).
- ``dpo`` (a causal LM, ``--task dpo``): TRL's DPOTrainer on preference pairs; the reference model is the base
  model (TRL's reference for a PeftModel passed with ``ref_model=None``); reports held-out reward accuracy.

Every job uses a ``transformers.Trainer`` (progress bar, checkpoints, gradient accumulation, torchrun) with a
seeded, precomputed data order, so the same command gives the same metrics and a resumed run the same factors.

The package reads top-down: `options` (what a run takes and how it resolves), `order` (its data and their
order), `adapters` (its PEFT adapter), `trainer` (the Trainer plumbing), `evaluate` (held-out metrics) and `jobs`
(the three jobs and `run_job`).
"""

from .adapters import count_parameters, lora_reference_parameters, prepare_model, save_trained, saved_path
from .evaluate import PROMPTS, evaluate_classifier, evaluate_prompt, score_answers
from .jobs import run_job
from .options import (
    ADAPTER_METHODS,
    CLASSIFY_RECIPES,
    DPO_RECIPES,
    JOBS,
    LM_RECIPES,
    METHODS,
    PEFT_METHODS,
    SCHEDULES,
    TASKS,
    Run,
    TrainOptions,
    UsageError,
    default_targets,
    factor_lrs,
    for_method,
    job_kind,
    model_label,
    resolve_options,
    run_identity,
    run_tags,
    target_modules,
)
from .order import grouped_order, load_data, ordered_train_set

__all__ = [
    "ADAPTER_METHODS",
    "CLASSIFY_RECIPES",
    "DPO_RECIPES",
    "JOBS",
    "LM_RECIPES",
    "METHODS",
    "PEFT_METHODS",
    "PROMPTS",
    "SCHEDULES",
    "TASKS",
    "Run",
    "TrainOptions",
    "UsageError",
    "count_parameters",
    "default_targets",
    "factor_lrs",
    "for_method",
    "evaluate_classifier",
    "evaluate_prompt",
    "grouped_order",
    "job_kind",
    "load_data",
    "lora_reference_parameters",
    "model_label",
    "ordered_train_set",
    "prepare_model",
    "resolve_options",
    "run_identity",
    "run_tags",
    "run_job",
    "save_trained",
    "saved_path",
    "score_answers",
    "target_modules",
]
