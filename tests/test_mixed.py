"""Mixed-adapter batches (`adapter_names=`, one adapter per row), the adapter bank and the benchmark's smoke run.

The bar: every row of a mixed batch equals that row run alone with its adapter (to float32 rounding, see
tests/tolerance.py), "__base__" rows equal the
bare model, for every method of the family and for llama (GQA), gpt2 (fused Conv1D) and bert.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_inputs, make_model
from methods import METHODS
from peft import PeftModel, get_peft_model
from tolerance import FORWARD_TERMS, HALF_TERMS, assert_close, assert_differs

import lorta
from lorta.tuner import TensorAdapterLayer
from lorta.tuner.mixed import engine_for

ROOT = Path(__file__).resolve().parents[1]
method_names = pytest.mark.parametrize("method", sorted(METHODS))
mixed_archs = pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])


def many(arch: str, method: str, n: int = 3, **kw):
    """A PeftModel with adapters default, a1 .. a{n-1}, all random (non-zero updates), in eval mode."""
    torch.manual_seed(0)
    model = get_peft_model(make_model(arch), METHODS[method](init_weights=False, **kw))
    for i in range(1, n):
        torch.manual_seed(100 + i)
        model.add_adapter(f"a{i}", METHODS[method](init_weights=False, **kw))
    return model.eval()


def rows_alone(model, inputs: dict, names: list[str], base=None) -> torch.Tensor:
    """Each row run on its own with its adapter (or the bare model for "__base__")."""
    outs = []
    with torch.no_grad():
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            if name == "__base__":
                outs.append(base(**row).logits)
            else:
                model.set_adapter(name)
                outs.append(model(**row).logits)
    model.set_adapter("default")
    return torch.cat(outs)


def mixed(model, inputs: dict, names: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, adapter_names=names).logits


# ------------------------------------------------------------------------------------------ forward
@method_names
@mixed_archs
def test_each_row_equals_its_adapter_alone(arch, method):
    model = many(arch, method)
    names = ["a1", "__base__", "default", "a2", "a1", "__base__"]
    inputs = make_inputs(arch, batch=len(names))
    got = mixed(model, inputs, names)
    want = rows_alone(model, inputs, names, base=make_model(arch))
    assert_close(got, want, FORWARD_TERMS)
    with torch.no_grad():
        base = make_model(arch)(**inputs).logits
    assert torch.equal(got[1], base[1]) and torch.equal(got[5], base[5])  # "__base__" rows: exactly the base
    for i in (0, 2, 3):  # the adapters do change the rows they serve, by more than rounding could
        assert_differs(got[i], base[i], FORWARD_TERMS, msg=f"row {i}")


@pytest.mark.parametrize("method", ["lorta", "tlora"])
def test_single_adapter_batches_and_all_base(method):
    model = many("llama", method)
    inputs = make_inputs("llama", batch=3)
    for names in (["a2"] * 3, ["__base__"] * 3):
        want = rows_alone(model, inputs, names, base=make_model("llama"))
        assert_close(mixed(model, inputs, names), want, FORWARD_TERMS)
    # the normal forward is unaffected by a mixed call before it
    model.set_adapter("a1")
    plain = model(**inputs).logits.detach()
    mixed(model, inputs, ["default"] * 3)
    torch.testing.assert_close(model(**inputs).logits.detach(), plain, atol=0, rtol=0)  # the same computation again


def test_adapters_with_different_shapes_mix_in_one_batch():
    """Adapters of different ranks / modes form separate stacks; rows of both mix in one call."""
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=3, init_weights=False))
    model.add_adapter("r5", lorta.LortaConfig(r=5, lora_alpha=3, init_weights=False))
    model.add_adapter("heads", lorta.LortaConfig(r=2, modes=["heads"], init_weights=False))
    model.add_adapter("qv", lorta.LortaConfig(r=3, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.eval()
    names = ["r5", "default", "heads", "qv", "__base__", "r5"]
    inputs = make_inputs("llama", batch=len(names))
    got = mixed(model, inputs, names)
    assert_close(got, rows_alone(model, inputs, names, base=make_model("llama")), FORWARD_TERMS)
    assert len(engine_for(model.base_model.lorta_state).groups) == 4


def test_half_precision_base():
    """float32 factors over a bfloat16 base, as PEFT's autocast_adapter_dtype makes them."""
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama", dtype=torch.bfloat16), METHODS["lorta"](init_weights=False))
    torch.manual_seed(1)
    model.add_adapter("b", METHODS["lorta"](init_weights=False))
    model.eval()
    names = ["b", "__base__", "default"]
    inputs = make_inputs("llama", batch=3)
    got = mixed(model, inputs, names)
    want = rows_alone(model, inputs, names, base=make_model("llama", dtype=torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert_close(got, want, HALF_TERMS)  # bfloat16 bmm vs plain products


def test_maps_are_not_cached_when_asked():
    model = many("gpt2", "tenslora-tucker", n=4)
    engine_for(model.base_model.lorta_state).cache_maps = False
    names = ["a3", "__base__", "a1", "a3", "default"]
    inputs = make_inputs("gpt2", batch=len(names))
    want = rows_alone(model, inputs, names, base=make_model("gpt2"))
    assert_close(mixed(model, inputs, names), want, FORWARD_TERMS)
    memory = engine_for(model.base_model.lorta_state).memory()
    assert memory["map_bytes"] == 0 and memory["factor_bytes"] > 0


def test_hot_path_does_not_loop_over_adapters():
    """The torch calls of a mixed forward do not depend on how many distinct adapters the batch holds. (The per-call
    check of the used adapters reads each one's tensor metadata, `.shape`, `.data_ptr()`: not counted, no math.)"""
    from torch.overrides import TorchFunctionMode

    metadata = ("getset_descriptor.__get__", "TensorBase.data_ptr")

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += getattr(func, "__qualname__", "") not in metadata
            return func(*args, **(kwargs or {}))

    model = many("llama", "lorta", n=8)
    inputs = make_inputs("llama", batch=16)
    mixed(model, inputs, ["default", "a1"] * 8)  # build the stacks first
    counts = []
    batches = (
        ["default", "a1"] * 8,
        ["default", "a1", "a2", "a3"] * 4,
        ["default", *(f"a{i}" for i in range(1, 8))] * 2,
    )
    for names in batches:
        with Count() as count:
            mixed(model, inputs, names)
        counts.append(count.calls)
    assert len(set(counts)) == 1, counts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cache_follows_factor_changes_and_adapter_set(arch):
    model = many(arch, "lorta")
    names = ["a1", "default", "a2"]
    inputs = make_inputs(arch, batch=3)
    before = mixed(model, inputs, names)
    with torch.no_grad():  # in place, as an optimizer step would
        model.base_model.lorta_factors["a1"].B.mul_(2.0)
    after = mixed(model, inputs, names)
    assert_differs(after[0], before[0], FORWARD_TERMS)
    # the same batch through the same kernels, and only a1's factors changed: the other rows bit for bit
    torch.testing.assert_close(after[1:], before[1:], atol=0, rtol=0)
    base = make_model(arch)
    assert_close(after, rows_alone(model, inputs, names, base=base), FORWARD_TERMS)
    torch.manual_seed(7)
    model.add_adapter("new", METHODS["lorta"](init_weights=False))
    model.delete_adapter("a2")
    names = ["new", "a1", "__base__"]
    assert_close(mixed(model, inputs, names), rows_alone(model, inputs, names, base=base), FORWARD_TERMS)
    with pytest.raises(ValueError, match="non-existing adapter"):
        mixed(model, inputs, ["a2", "a1", "new"])


def test_modules_to_save_heads_follow_the_rows():
    """bert with a per-adapter classifier (modules_to_save): PEFT's wrapper gets the names, lorta the rows."""
    torch.manual_seed(0)
    model = get_peft_model(make_model("bert"), METHODS["lorta"](init_weights=False, modules_to_save=["classifier"]))
    torch.manual_seed(1)
    model.add_adapter("b", METHODS["lorta"](init_weights=False, modules_to_save=["classifier"]))
    with torch.no_grad():
        for p in model.base_model.model.classifier.modules_to_save["b"].parameters():
            p.add_(0.5)
    model.eval()
    names = ["b", "default", "__base__", "b"]
    inputs = make_inputs("bert", batch=4)
    assert_close(mixed(model, inputs, names), rows_alone(model, inputs, names, base=make_model("bert")), FORWARD_TERMS)


# ----------------------------------------------------------------------------------------- generate
def generate_alone(model, inputs: dict, names: list[str], **kw) -> list[torch.Tensor]:
    outs = []
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                outs.append(model.generate(**row, **kw))
        else:
            model.set_adapter(name)
            outs.append(model.generate(**row, **kw))
    model.set_adapter("default")
    return outs


def same_generation(batched: torch.Tensor, alone: torch.Tensor, pad: int = 0) -> bool:
    """A row alone stops at EOS; in the batch it goes on with padding until every row is done."""
    n = alone.shape[-1]
    return torch.equal(batched[..., :n], alone) and bool((batched[..., n:] == pad).all())


@pytest.mark.parametrize("method", ["lorta", "tenslora-tucker", "tlora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_greedy_and_beam_search(arch, method):
    model = many(arch, method)
    names = ["a2", "__base__", "default", "a1"]
    inputs = make_inputs(arch, batch=len(names), length=5)
    common = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    for kw in ({}, {"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}):
        got = model.generate(**inputs, adapter_names=names, **common, **kw)
        want = generate_alone(model, inputs, names, **common, **kw)
        copies = kw.get("num_return_sequences", 1)
        for i, w in enumerate(want):
            assert same_generation(got[i * copies : (i + 1) * copies], w), (kw, i)


def test_generate_with_a_generation_config_object():
    from transformers import GenerationConfig

    model = many("llama", "lorta")
    names = ["a1", "default"]
    inputs = make_inputs("llama", batch=2, length=5)
    config = GenerationConfig(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    got = model.generate(**inputs, adapter_names=names, generation_config=config)
    want = generate_alone(model, inputs, names, generation_config=config)
    assert all(same_generation(got[i : i + 1], w) for i, w in enumerate(want))


# ------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    model = many("llama", "lorta")
    inputs = make_inputs("llama", batch=2)
    with pytest.raises(ValueError, match="non-existing adapter.*nope"):
        mixed(model, inputs, ["default", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names`.*3 adapter names for a batch of 2 rows"):
        mixed(model, inputs, ["default", "a1", "a2"])
    with pytest.raises(TypeError, match="list of adapter names"):
        mixed(model, inputs, "default")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(**inputs, adapter_names=["default", "a1"])
    model.eval()
    model.base_model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        mixed(model, inputs, ["default", "a1"])
    model.base_model.unmerge_adapter()
    mixed(model, inputs, ["default", "a1"])  # fine again
    layer = next(m for m in model.modules() if isinstance(m, TensorAdapterLayer))
    layer.train()
    with pytest.raises(ValueError, match="training mode"):  # a layer called directly checks too
        layer(torch.randn(2, 3, layer.in_features), adapter_names=["default", "a1"])


def test_layer_accepts_a_plain_list():
    model = many("llama", "lorta")
    layer = next(m for m in model.modules() if isinstance(m, TensorAdapterLayer))
    x = torch.randn(3, 4, layer.in_features)
    with torch.no_grad():
        got = layer(x, adapter_names=["a1", "__base__", "default"])
        want = []
        for i, name in enumerate(["a1", None, "default"]):
            if name is None:
                want.append(layer.base_layer(x[i : i + 1]))
            else:
                layer.set_adapter(name)
                want.append(layer(x[i : i + 1]))
    assert_close(got, torch.cat(want), FORWARD_TERMS)


# --------------------------------------------------------------------------------------------- bank
def save_adapters(tmp_path: Path, method: str, n: int, arch: str = "llama") -> Path:
    root = tmp_path / method
    model = get_peft_model(make_model(arch), METHODS[method](init_weights=False))
    factors = model.base_model.lorta_factors["default"]
    for i in range(n):
        torch.manual_seed(50 + i)
        factors.reset(False)
        model.save_pretrained(root / f"ad{i}")
    return root


@pytest.mark.parametrize("method", ["lorta", "tenslora-cp-qkv", "tlora-seed-only"])
def test_bank_loads_a_folder_and_serves_mixed_batches(tmp_path, method):
    root = save_adapters(tmp_path, method, 5)
    model = PeftModel.from_pretrained(make_model("llama"), root / "ad0", adapter_name="ad0")
    base_before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters() if "lorta" not in n}
    bank = lorta.load_adapters(model, [root / f"ad{i}" for i in range(1, 5)])
    assert bank.names == ["ad0", "ad1", "ad2", "ad3", "ad4"]
    assert bank.load_stats["fast_path"] == 4 and bank.load_stats["load_ms_per_adapter"] > 0
    names = ["ad3", "__base__", "ad0", "ad4", "ad1"]
    inputs = make_inputs("llama", batch=len(names))
    got = mixed(model, inputs, names)
    base = make_model("llama")
    for i, name in enumerate(names):
        ref = base if name == "__base__" else PeftModel.from_pretrained(make_model("llama"), root / name)
        with torch.no_grad():
            want = ref(**{k: v[i : i + 1] for k, v in inputs.items()}).logits
        assert_close(got[i : i + 1], want, FORWARD_TERMS)
    memory = bank.memory()
    assert memory["adapters"] == 5 and memory["factor_bytes_per_adapter"] > 0
    # LoRTA's q, k, v, o build their maps per call from the factors (tuner/mixed.py, factored): none are resident
    assert (memory["map_bytes"] == 0) if method == "lorta" else (memory["map_bytes"] > 0)
    assert bank.bytes_per_adapter() == memory["bytes_per_adapter"] > 0
    assert 0 < memory["file_bytes_per_adapter"] < 20_000
    assert not any(p.requires_grad for p in model.parameters())

    bank.remove("ad3")
    assert "ad3" not in bank and "ad3" not in model.peft_config and len(bank) == 4
    with pytest.raises(ValueError, match="non-existing adapter"):
        mixed(model, inputs, names)
    bank.add("again", root / "ad3")
    assert_close(mixed(model, inputs, ["again", *names[1:]]), got, FORWARD_TERMS)
    for n, p in model.named_parameters():  # the base weights were never touched
        if n in base_before:
            assert p.data_ptr() == base_before[n][0] and torch.equal(p, base_before[n][1]), n


def test_bank_sources_and_errors(tmp_path):
    root = save_adapters(tmp_path, "lorta", 3, arch="gpt2")
    model = get_peft_model(make_model("gpt2"), METHODS["lorta"]()).eval()
    bank = lorta.AdapterBank(model)
    assert bank.load([root / "ad1", root / "ad2"]) == ["ad1", "ad2"]  # a list of adapter folders
    assert bank.load({"x": root / "ad0"}) == ["x"] and bank.load_stats["fast_path"] == 1  # a mapping
    bank.remove("ad1", "ad2")
    assert bank.load(root / "ad2") == ["ad2"]  # one adapter folder, named after itself
    bank.remove("ad2")
    assert bank.load(root) == ["ad0", "ad1", "ad2"]  # a folder of adapter folders
    assert bank.names == ["default", "x", "ad0", "ad1", "ad2"]
    with pytest.raises(ValueError, match="already loaded"):
        bank.load({"x": root / "ad1"})
    with pytest.raises(ValueError, match="reserved"):
        bank.load({"__base__": root / "ad1"})
    with pytest.raises(FileNotFoundError, match="no adapter"):
        bank.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="no adapter named"):
        bank.remove("nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((root / "ad0" / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 5}))
    (broken / "adapter_model.safetensors").write_bytes((root / "ad0" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not fit its config"):
        bank.load({"broken": broken})
    assert "broken" not in model.peft_config
    with pytest.raises(TypeError, match="PeftModel holding lorta adapters"):
        lorta.AdapterBank(make_model("gpt2"))
    names = ["ad2", "x", "__base__"]
    inputs = make_inputs("gpt2", batch=3)
    assert_close(mixed(model, inputs, names), rows_alone(model, inputs, names, base=make_model("gpt2")), FORWARD_TERMS)


# ---------------------------------------------------------------------------------------- benchmark
def test_mixed_bench_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mixed_bench.py"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "mixed_results.md").read_text()
    result = json.loads((tmp_path / "mixed_results.json").read_text())
    assert "| distinct adapters |" in md and "FAILED" not in md
    for method in ("lorta", "lora"):
        assert result["guard"][method]["passed"]
        for key in ("single", "k=1", "k=4"):
            value = result["summary"]["seq=8"][method][key]
            assert math.isfinite(value) and value > 0
        load = result["load"][method]
        assert load["load_ms_per_adapter"] > 0 and load["bytes_per_adapter"] > 0
    assert result["load"]["lorta"]["fast_path"] == result["load"]["lorta"]["adapters"]


def test_scale_bench_smoke(tmp_path):
    """benchmarks/mixed_scale.py (reached through mixed_bench.py --bases): a packed file of adapters, a bank, the
    k-table, LoRA beside it, the guard and the profile, on a tiny random base, in this process."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mixed_bench

    torch.set_num_threads(1)
    assert mixed_bench.main(["--smoke", "--bases", "tiny", "--profile", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "scale_results.md").read_text()
    result = json.loads((tmp_path / "scale_results.json").read_text())["results"][0]
    assert "| k distinct |" in md and "FAILED" not in md and result["guard"]["passed"]
    for k in ("1", "4", "16"):
        cell = result["k"][k]
        assert cell["rows"] == int(k)
        for variant in ("lorta mixed", "lorta single", "lora mixed"):
            assert math.isfinite(cell[variant]["rows_per_s"]) and cell[variant]["rows_per_s"] > 0
    load = result["load"]
    assert load["adapters"] == 24 and load["bytes_ratio"] == 1.0  # LoRTA: nothing resident but the factors
    assert load["write_ms_per_adapter"] > 0 and load["load_ms_per_adapter"] > 0
    assert result["profile"] and all(0 <= p["share"] <= 1 for p in result["profile"])
    paging = result["paging"]  # 16 distinct adapters over a cap of 8: every one a miss, half of them evicting
    assert paging["misses"] == 16 and paging["evictions"] == 8 and paging["miss_ms"] > 0
    assert paging["paged_rows_per_s"] > 0 and paging["resident_rows_per_s"] > 0 and "Paging:" in md
    assert mixed_bench.scale_mode(["--distinct", "1,4096"]) and not mixed_bench.scale_mode(["--distinct", "1,64"])


def test_scale_bench_halves_a_batch_that_does_not_fit():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mixed_scale import widest_batch

    def run(rows: int) -> None:
        if rows > 100:
            raise RuntimeError(f"DefaultCPUAllocator: not enough memory: you tried to allocate {rows} GB")

    assert widest_batch(run, 1000) == 62  # 1000 -> 500 -> 250 -> 125 -> 62
    assert widest_batch(run, 80) == 80

    def broken(rows: int) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        widest_batch(broken, 1000)
