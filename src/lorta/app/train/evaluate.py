"""Held-out evaluation: the classifier's accuracy, and the prompt job's label-word log-likelihoods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data import (
    DataError,
    TextSplit,
)

# The prompt job's question per task; the answers are the label names (" positive", " Republican", ...).
PROMPTS = {
    "sentiment": "Review: {text}\nIs this review positive or negative?\nAnswer:",
    "party": "Convention speech: {text}\nWas this said at the Democratic or the Republican convention?\nAnswer:",
}


def classify_features(tokenizer: Any, split: TextSplit, max_length: int) -> list[dict[str, Any]]:
    enc = tokenizer(split.texts, truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": split.labels[i]} for i in range(len(split))]


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, tokenizer: Any, split: TextSplit, max_length: int, batch_size: int = 128, quiet: bool = False
) -> dict[str, float]:
    """Accuracy and mean cross-entropy on a split (examples sorted by length, so batches need little padding)."""
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    model.eval()
    device = next(model.parameters()).device
    features = classify_features(tokenizer, split, max_length)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    collate = DataCollatorWithPadding(tokenizer)
    correct, loss = 0, 0.0
    for start in tqdm(range(0, len(order), batch_size), desc="evaluating", disable=quiet, leave=False):
        batch = collate([features[i] for i in order[start : start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
    n = max(1, len(features))
    return {"accuracy": correct / n, "eval_loss": loss / n}


def answer_ids(tokenizer: Any, label_names: Sequence[str]) -> list[list[int]]:
    ids = [tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in label_names]
    if len({tuple(i) for i in ids}) != len(ids) or any(not i for i in ids):
        raise DataError(f"label names {list(label_names)} do not tokenize to distinct answers for the prompt task")
    return ids


def _prompt_ids(tokenizer: Any, text: str, max_text_tokens: int, template: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_text_tokens:
        text = tokenizer.decode(ids[:max_text_tokens])
    return tokenizer(template.format(text=text))["input_ids"]


def prompt_features(
    tokenizer: Any, split: TextSplit, answers: list[list[int]], max_length: int, template: str
) -> list[dict[str, Any]]:
    """Prompt + answer tokens; labels are -100 on the prompt so the loss is on the answer only."""
    question = len(tokenizer(template.format(text=""))["input_ids"])
    max_text = max(8, max_length - max(24, question + 2) - max(len(a) for a in answers))  # room for the question
    feats = []
    for text, label in zip(split.texts, split.labels, strict=True):
        prompt = _prompt_ids(tokenizer, text, max_text, template)
        answer = answers[label]
        feats.append(
            {
                "input_ids": prompt + answer,
                "attention_mask": [1] * (len(prompt) + len(answer)),
                "labels": [-100] * len(prompt) + answer,
                "prompt_len": len(prompt),
            }
        )
    return feats


def pad_right(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate causal-LM features: right padding; labels padded with -100."""
    width = max(len(f["input_ids"]) for f in features)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        gap = width - len(f["input_ids"])
        out["input_ids"].append(f["input_ids"] + [pad_id] * gap)
        out["attention_mask"].append(f["attention_mask"] + [0] * gap)
        out["labels"].append(f["labels"] + [-100] * gap)
    return {k: torch.tensor(v) for k, v in out.items()}


@torch.no_grad()
def score_answers(
    model: nn.Module,
    prompts: Sequence[list[int]],
    answers: Sequence[list[int]],
    pad_id: int,
    batch_size: int = 16,
    quiet: bool = False,
) -> torch.Tensor:
    """Log-probability of each answer given each prompt: a tensor (len(prompts), len(answers)).

    Sequences are left-padded (with explicit position ids) so every answer ends at the last position and only
    the last few positions' logits are computed. Single-token answers need one forward pass per prompt.
    """
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    single = all(len(a) == 1 for a in answers)
    items = [(p, None) for p in prompts] if single else [(p + a, a) for p in prompts for a in answers]
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    scores = torch.empty(len(items), len(answers) if single else 1)
    for start in tqdm(range(0, len(order), batch_size), desc="evaluating", disable=quiet, leave=False):
        idx = order[start : start + batch_size]
        width = max(len(items[i][0]) for i in idx)
        ids = torch.tensor([[pad_id] * (width - len(items[i][0])) + items[i][0] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(items[i][0])) + [1] * len(items[i][0]) for i in idx], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = 1 if single else 1 + max(len(items[i][1]) for i in idx)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        for row, i in enumerate(idx):
            if single:
                scores[i] = logp[row, -1, [a[0] for a in answers]].cpu()
            else:
                ans = items[i][1]
                picked = logp[row, keep - 1 - len(ans) : keep - 1].gather(-1, torch.tensor(ans, device=device)[:, None])
                scores[i, 0] = picked.sum().cpu()
    return scores if single else scores.view(len(prompts), len(answers))


def evaluate_prompt(
    model: nn.Module,
    tokenizer: Any,
    split: TextSplit,
    answers: list[list[int]],
    max_length: int,
    quiet: bool,
    template: str,
) -> dict[str, float]:
    """Accuracy of the most likely label word, and the mean negative log-likelihood of the true answer."""
    feats = prompt_features(tokenizer, split, answers, max_length, template)
    prompts = [f["input_ids"][: f["prompt_len"]] for f in feats]
    scores = score_answers(model, prompts, answers, tokenizer.pad_token_id, quiet=quiet)
    labels = torch.tensor(split.labels)
    accuracy = (scores.argmax(-1) == labels).float().mean().item()
    nll = -scores.gather(-1, labels[:, None]).mean().item()
    return {"accuracy": accuracy, "eval_loss": nll}
