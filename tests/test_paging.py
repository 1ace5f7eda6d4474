"""A bank larger than memory (lorta.paging): a bounded resident set over a packed file or a folder of adapters.

The bar: every row of every call equals that row run alone with the adapter it names (the adapter's factors
copied into a separate one-adapter model), whatever was evicted and reloaded before; a torn or corrupt adapter
refuses the calls that name it and nothing else.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import make_inputs, make_model
from peft import get_peft_model
from tolerance import FORWARD_TERMS, assert_close, assert_differs

import lorta
from lorta.paging import base_record

ARCH = "llama"


def served_model(method: str = "lorta"):
    """A PeftModel with the pinned adapter "default", in eval mode."""
    torch.manual_seed(0)
    config = lorta.LortaConfig(r=2) if method == "lorta" else lorta.TLoraConfig(r=3)
    return get_peft_model(make_model(ARCH), config).eval()


def random_state(model, seed: int) -> dict[str, torch.Tensor]:
    """Factors of the same shapes as the model's "default" adapter, random: an update smaller than the base weights
    (so the forward's values keep the outputs' scale, as FORWARD_TERMS assumes), yet another adapter's rows differ
    by ~1000 times the tolerance (test_ten_thousand_adapters_on_disk_512_resident checks it)."""
    generator = torch.Generator().manual_seed(seed)
    reference = model.base_model.lorta_factors["default"].state_dict()
    return {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in reference.items()}


def config_dict(model, tmp_path) -> dict:
    model.save_pretrained(tmp_path / "template")
    return (
        json.loads((tmp_path / "template" / "default" / "adapter_config.json").read_text())
        if (tmp_path / "template" / "default").is_dir()
        else json.loads((tmp_path / "template" / "adapter_config.json").read_text())
    )


def packed_file(model, tmp_path, n: int, name: str = "tenants.safetensors"):
    config = config_dict(model, tmp_path)
    adapters = {f"t{i:05d}": (config, random_state(model, i)) for i in range(n)}
    return lorta.write_packed(tmp_path / name, adapters, base_record(model)), adapters


class Alone:
    """Each row run on its own with the adapter it names: that adapter's factors copied into a one-adapter model."""

    def __init__(self, method: str = "lorta") -> None:
        self.model = served_model(method)
        self.factors = self.model.base_model.lorta_factors["default"]
        self.base = make_model(ARCH).eval()

    def __call__(self, inputs: dict, names: list[str], states: dict) -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for i, name in enumerate(names):
                row = {k: v[i : i + 1] for k, v in inputs.items()}
                if name == "__base__":
                    outs.append(self.base(**row).logits)
                    continue
                self.factors.load_state_dict(states[name])
                outs.append(self.model(**row).logits)
        return torch.cat(outs)


def test_ten_thousand_adapters_on_disk_512_resident(tmp_path):
    """The issue's test: 10,000 adapters in one packed file, a resident cap of 512, random request order, every row
    checked against its adapter run alone."""
    model = served_model()
    path, adapters = packed_file(model, tmp_path, 10_000)
    states = {name: state for name, (_, state) in adapters.items()}
    bank = lorta.PagedAdapterBank(model, path, resident_limit=512)
    alone = Alone()
    rng = random.Random(0)
    names = list(adapters)
    for step in range(40):
        rows = [rng.choice(names) for _ in range(48)]
        rows[step % 48] = "__base__"
        inputs = make_inputs(ARCH, batch=len(rows), seed=step)
        got = bank(rows, **inputs).logits
        want = alone(inputs, rows, states)
        assert_close(got, want, FORWARD_TERMS, msg=f"call {step}")
        assert len(bank.resident) <= 512
        if step == 0:  # a row served by any other adapter would fail the comparison above, by far
            shifted = alone(inputs, rows[1:] + rows[:1], states)
            for i in range(len(rows)):
                if rows[i] != rows[(i + 1) % len(rows)]:
                    assert_differs(shifted[i], want[i], 100 * FORWARD_TERMS, scale=float(want.abs().max()))
    assert bank.stats["evictions"] > 0 and bank.stats["hits"] > 0  # the cap was reached and adapters came back
    assert len(bank.bank.engine.index) == len(bank.resident) + 1  # the engine holds the resident ones and "default"
    memory = bank.memory()
    assert memory["slots"] <= 512 + 1 + 512 // 4  # freed slots are reused: the stacks never outgrow the cap


def test_eviction_is_least_recently_used_and_bounded_by_bytes(tmp_path):
    model = served_model()
    path, adapters = packed_file(model, tmp_path, 6)
    per_adapter = sum(t.numel() * t.element_size() for t in next(iter(adapters.values()))[1].values())
    bank = lorta.PagedAdapterBank(model, path, resident_limit=100, resident_bytes=3 * per_adapter)
    inputs = make_inputs(ARCH, batch=2)
    bank(["t00000", "t00001"], **inputs)
    bank(["t00002", "t00000"], **inputs)  # t00000 used again: t00001 is now the least recently used
    bank(["t00003", "__base__"], **inputs)
    assert list(bank.resident) == ["t00000", "t00002", "t00003"]  # least recently used first
    assert "t00001" not in model.peft_config and "t00001" not in model.base_model.lorta_factors
    assert bank.stats["evictions"] == 1 and bank.miss_ms() > 0
    with pytest.raises(ValueError, match="resident_bytes"):
        bank(["t00000", "t00001", "t00002", "t00004"], **make_inputs(ARCH, batch=4))


def test_the_pinned_adapter_is_served_and_never_evicted(tmp_path):
    model = served_model()
    path, adapters = packed_file(model, tmp_path, 4)
    bank = lorta.PagedAdapterBank(model, path, resident_limit=1)
    inputs = make_inputs(ARCH, batch=2)
    pinned = model.base_model.lorta_factors["default"].state_dict()
    for name in adapters:
        got = bank(["default", name], **inputs).logits
        want = Alone()(inputs, ["default", name], {"default": pinned, name: adapters[name][1]})
        assert_close(got, want, FORWARD_TERMS)
    assert "default" in model.peft_config and list(bank.resident) == ["t00003"]


def test_a_corrupt_adapter_refuses_only_its_calls(tmp_path):
    model = served_model()
    path, adapters = packed_file(model, tmp_path, 5)
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    begin, _ = (
        header["t00002/A"]["data_offsets"]
        if "t00002/A" in header
        else next(v["data_offsets"] for k, v in header.items() if k.startswith("t00002/"))
    )
    data = bytearray(path.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + begin] ^= 0xFF
    path.write_bytes(bytes(data))
    bank = lorta.PagedAdapterBank(model, path, resident_limit=8)
    states = {n: s for n, (_, s) in adapters.items()}
    inputs = make_inputs(ARCH, batch=3)
    with pytest.raises(lorta.PackedFileError, match="t00002"):
        bank(["t00001", "t00002", "t00003"], **inputs)
    assert "t00002" not in model.peft_config and "t00002" not in bank.resident
    rows = ["t00001", "t00003", "t00004"]
    assert_close(bank(rows, **inputs).logits, Alone()(inputs, rows, states), FORWARD_TERMS)


def test_folder_source_with_a_torn_adapter_file(tmp_path):
    model = served_model()
    root = tmp_path / "adapters"
    states = {}
    for i in range(4):
        states[f"u{i}"] = random_state(model, 50 + i)
        model.base_model.lorta_factors["default"].load_state_dict(states[f"u{i}"])
        model.save_pretrained(root / f"u{i}")
    weights = root / "u2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-9])  # cut short, as a crash during a non-atomic copy leaves it
    served = served_model()
    bank = lorta.PagedAdapterBank(served, root, resident_limit=2)
    inputs = make_inputs(ARCH, batch=2)
    with pytest.raises(lorta.AdapterFileError, match="'u2'.*cut short"):
        bank(["u2", "u0"], **inputs)
    for rows in (["u0", "u1"], ["u3", "u0"], ["u1", "__base__"]):
        assert_close(bank(rows, **inputs).logits, Alone()(inputs, rows, states), FORWARD_TERMS)


def test_pack_adapters_gives_the_folders_outputs(tmp_path):
    model = served_model("tlora")
    root = tmp_path / "adapters"
    factors = model.base_model.lorta_factors["default"]
    for i in range(3):
        torch.manual_seed(10 + i)
        factors.reset(False)
        model.save_pretrained(root / f"w{i}")
    inputs = make_inputs(ARCH, batch=2)
    calls = (["w2", "w0"], ["w1", "__base__"], ["w0", "w2"])  # three adapters over a cap of 2: one is evicted
    from_folders = lorta.PagedAdapterBank(served_model("tlora"), root, resident_limit=2)
    packed = lorta.pack_adapters(tmp_path / "w.safetensors", root, served_model("tlora"))
    from_file = lorta.PagedAdapterBank(served_model("tlora"), packed, resident_limit=2)
    for rows in calls:
        assert torch.equal(from_file(rows, **inputs).logits, from_folders(rows, **inputs).logits)
    assert from_file.stats["evictions"] == from_folders.stats["evictions"] == 2
    with pytest.raises(FileExistsError):
        lorta.pack_adapters(packed, root, served_model("tlora"))
    lorta.pack_adapters(packed, {"extra": root / "w0"}, served_model("tlora"), append=True)
    assert lorta.PackedAdapters(packed).names == ["w0", "w1", "w2", "extra"]


def test_refusals_name_the_fix(tmp_path):
    model = served_model()
    path, _ = packed_file(model, tmp_path, 3)
    bank = lorta.PagedAdapterBank(model, path, resident_limit=2)
    inputs = make_inputs(ARCH, batch=3)
    with pytest.raises(ValueError, match="split the batch"):
        bank(["t00000", "t00001", "t00002"], **inputs)
    with pytest.raises(ValueError, match="non-existing adapter.*nobody"):
        bank(["t00000", "nobody", "t00001"], **inputs)
    with pytest.raises(TypeError, match="one per row"):
        bank("t00000", **inputs)
    with pytest.raises(ValueError, match="resident_limit"):
        lorta.PagedAdapterBank(model, path, resident_limit=0)
    other = get_peft_model(make_model("mistral"), lorta.LortaConfig(r=2)).eval()
    with pytest.raises(lorta.PackedFileError, match="model_shape"):
        lorta.PagedAdapterBank(other, path)
    with pytest.raises(FileNotFoundError, match="no packed adapter file"):
        lorta.PagedAdapterBank(model, tmp_path / "missing.safetensors")


def test_generate_pages_its_adapters_in(tmp_path):
    """Greedy generate through the paged bank equals each row generated alone with its adapter."""
    model = served_model()
    path, adapters = packed_file(model, tmp_path, 3)
    bank = lorta.PagedAdapterBank(model, path, resident_limit=2)
    ids = make_inputs(ARCH, batch=2)["input_ids"]
    rows = ["t00002", "t00000"]
    out = bank.generate(rows, input_ids=ids, max_new_tokens=4, do_sample=False)
    alone = Alone()
    for i, name in enumerate(rows):
        alone.factors.load_state_dict(adapters[name][1])
        want = alone.model.generate(input_ids=ids[i : i + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(out[i : i + 1], want), name
    assert list(bank.resident) == ["t00002", "t00000"]
