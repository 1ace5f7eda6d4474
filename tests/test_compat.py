"""Adapters saved by lorta 0.1.0 (tests/data/compat, written by make_adapters.py there) load with today's code
and give the outputs they gave then: the saved-file format and the factors' meaning stay compatible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import lorta  # noqa: F401  (registers the methods with PEFT)

DATA = Path(__file__).parent / "data" / "compat"
EXPECTED = json.loads((DATA / "expected.json").read_text())
METHODS = ("lorta", "tenslora", "tlora")


def _base() -> LlamaForCausalLM:
    torch.manual_seed(EXPECTED["model_seed"])
    return LlamaForCausalLM(LlamaConfig(**EXPECTED["model"])).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(EXPECTED["input_ids"])).logits[:, -1].double()


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_loads_and_gives_the_same_outputs(method: str) -> None:
    base = _base()
    if not torch.allclose(_logits(base), torch.tensor(EXPECTED["base"], dtype=torch.float64), atol=1e-6):
        pytest.skip("this torch/transformers draws a different tiny base model from the recorded seed")
    model = PeftModel.from_pretrained(base, DATA / method)
    assert model.peft_config["default"].peft_type == method.upper()
    got, want = _logits(model), torch.tensor(EXPECTED[method], dtype=torch.float64)
    assert not torch.allclose(want, torch.tensor(EXPECTED["base"], dtype=torch.float64), atol=1e-4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
