"""Writes the adapters of tests/test_compat.py: one small adapter per method, saved by the code of the day.

Run once (``PYTHONPATH=src python tests/data/compat/make_adapters.py``) with the code whose file format the test pins;
it writes ``<method>/`` (adapter_config.json, adapter_model.safetensors) and ``expected.json`` (the tiny model's
config and seed, the inputs, the base model's and each adapted model's logits) beside this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lorta

HERE = Path(__file__).parent
MODEL = dict(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)
MODEL_SEED = 0
INPUT_IDS = [[3, 7, 11, 19, 5], [2, 4, 8, 16, 31]]
CONFIGS = {  # init_weights=False: a non-zero update from the start, so the outputs pin the factors' meaning
    "lorta": lambda: lorta.LortaConfig(r=3, lora_alpha=6.0, init_weights=False),
    "tenslora": lambda: lorta.TensLoraConfig(ranks=2, init_weights=False),
    "tlora": lambda: lorta.TLoraConfig(r=3, lora_alpha=6.0, init_weights=False),
}


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(MODEL_SEED)
    return LlamaForCausalLM(LlamaConfig(**MODEL)).eval()


def logits(model: torch.nn.Module) -> list:
    with torch.no_grad():
        return model(input_ids=torch.tensor(INPUT_IDS)).logits[:, -1].tolist()


def main() -> None:
    expected = {"model": MODEL, "model_seed": MODEL_SEED, "input_ids": INPUT_IDS, "base": logits(base_model())}
    for name, make in CONFIGS.items():
        torch.manual_seed(1)
        model = get_peft_model(base_model(), make())
        model.save_pretrained(HERE / name)
        (HERE / name / "README.md").unlink()  # PEFT's model card: not part of the format
        expected[name] = logits(model)
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
