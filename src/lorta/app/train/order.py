"""The data of a run: which dataset, and the seeded, length-grouped order the Trainer reads it in."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import torch

from ..data import (
    TextDataset,
    load_convention_speeches,
    load_rotten_tomatoes,
)
from ..tables import load_table
from .options import TrainOptions


def load_data(o: TrainOptions, subset: bool = True) -> TextDataset:
    """Rotten Tomatoes (default) or the user's CSV/JSONL table, split by group; with ``subset``, --max-train and
    --max-test take seeded class-balanced subsets (DPO applies them to the pairs instead)."""
    limits = {"max_train": o.max_train, "max_test": o.max_test} if subset else {}
    if o.task == "party":
        return load_convention_speeches(seed=o.seed, **limits)
    if o.data is None:
        return load_rotten_tomatoes(seed=o.seed, **limits)
    return load_table(o.data, text_column=o.text_column, label_column=o.label_column, seed=o.seed, **limits)


def describe_data(o: TrainOptions) -> str:
    if o.task == "party":
        return "2012 convention speech paragraphs (Democratic/Republican)"
    return "Rotten Tomatoes snippets (fresh/rotten)" if o.data is None else str(o.data)


def grouped_order(lengths: Sequence[int], batch_size: int, total: int, seed: int) -> list[int]:
    """A seeded order of ``total`` example indices (epochs concatenated) whose consecutive ``batch_size`` blocks
    hold examples of similar length, so dynamic padding wastes little; batch order is shuffled.

    Each epoch is a seeded permutation cut into chunks of 64 batches, each chunk sorted by length, cut into
    batches, and the batches shuffled. Fixed here (not drawn by the Trainer) so runs and resumed runs agree.
    """
    order: list[int] = []
    epoch = 0
    while len(order) < total:
        rng = random.Random(f"lorta-order:{seed}:{epoch}")
        perm = list(range(len(lengths)))
        rng.shuffle(perm)
        chunk = 64 * batch_size
        batches = []
        for start in range(0, len(perm), chunk):
            part = sorted(perm[start : start + chunk], key=lambda i: lengths[i])
            batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
        rng.shuffle(batches)
        order.extend(i for b in batches for i in b)
        epoch += 1
    return order[:total]


class ListDataset(torch.utils.data.Dataset):
    """Feature dicts in a fixed order (``indices`` into ``features``)."""

    def __init__(self, features: Sequence[dict[str, Any]], indices: Sequence[int] | None = None) -> None:
        self.features = features
        self.indices = list(range(len(features))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[self.indices[i]]


def ordered_train_set(features: Sequence[dict[str, Any]], o: TrainOptions) -> ListDataset:
    """Exactly steps × batch × grad-accum × world-size examples, in the seeded length-grouped order."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = o.batch_size * o.grad_accum * world
    lengths = [len(f["input_ids"]) for f in features]
    return ListDataset(features, grouped_order(lengths, o.batch_size * world, o.steps * per_step, o.seed))
