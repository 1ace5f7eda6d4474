"""Run exported LoRA adapters with plain PEFT in a process that cannot import lorta (tests/test_export.py).

Usage: python plain_peft_outputs.py CASES.json OUT.pt. Each case names a saved base model folder (and its
transformers class), an exported LoRA folder, extra adapters to load from it, the inputs file, how to read the
output ("ids": the model's logits / last hidden state; "language model": the multimodal model's language model),
and the adapters to run; OUT.pt maps "<case>/<adapter>" to the output.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
import warnings


class _NoLorta(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lorta" or name.startswith("lorta."):
            raise ImportError("this process must run the exported adapters without lorta")
        return None


sys.meta_path.insert(0, _NoLorta())
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402


def output(model, inputs: dict, kind: str) -> torch.Tensor:
    with torch.no_grad():
        if kind == "language model":
            out = model.get_base_model().language_model(**inputs)
        else:
            out = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0]


def main(cases_file: str, out_file: str) -> None:
    with open(cases_file) as handle:
        cases = json.load(handle)
    results = {}
    for name, case in cases.items():
        base = getattr(transformers, case["class"]).from_pretrained(case["base"], dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, case["lora"]).eval()
        for adapter, folder in case.get("extra", {}).items():
            model.load_adapter(folder, adapter_name=adapter)
        inputs = torch.load(case["inputs"])
        for adapter in case["run"]:
            model.set_adapter(adapter)
            results[f"{name}/{adapter}"] = output(model, inputs, case["kind"])
    assert not any(m == "lorta" or m.startswith("lorta.") for m in sys.modules)
    torch.save(results, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
