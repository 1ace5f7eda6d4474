"""Register the family with PEFT so that get_peft_model / PeftModel.from_pretrained dispatch to it.

PEFT's `register_peft_method` only accepts names already in its `PeftType` enum; on peft >= 0.21 a plain string
key in the three type mappings works end to end (docs/design.md, "Living inside PEFT"), and that is what we use.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .tuner.model import TensorAdapterModel

PREFIX = TensorAdapterModel.prefix


def register(peft_type: str, config_cls: type, tuner_cls: type) -> None:
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
