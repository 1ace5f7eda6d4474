"""Bad input fails early with a clear lorta error, and leaves the base model (and any saved adapter) untouched.

Every failure test snapshots the base model's weights first and checks afterwards that they are bit-identical.
Errors are ValueErrors (lorta.LayoutError, AdapterConfigError, AdapterFileError) whose message says what was
wrong, what was expected and where (field, module, factor or file).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import peft.peft_model
import pytest
import torch
from conftest import make_inputs, make_model, output_of
from methods import METHODS
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tolerance import FORWARD_TERMS, assert_close
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorta
from lorta import saving
from lorta.tuner import TensorAdapterLayer
from lorta.tuner.config import AdapterConfigError, AdapterFileError

LLAMA_SHAPE = {"num_layers": 3, "hidden_size": 48, "num_heads": 6, "num_kv_heads": 2, "head_dim": 8}
LLAMA = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


# ------------------------------------------------------------------------------------------------- helpers
def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights by their original names (PEFT's '.base_layer' removed), factors excluded."""
    return {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if "lorta_factors" not in n
    }


def injected(model: nn.Module) -> bool:
    return any(isinstance(m, TensorAdapterLayer) for m in model.modules())


class Unchanged:
    """`with Unchanged(model): ...` asserts the block leaves every base weight bit-identical."""

    def __init__(self, model: nn.Module, allow_injection: bool = False) -> None:
        self.model, self.allow_injection = model, allow_injection

    def __enter__(self) -> Unchanged:
        self.before = weights(self.model)
        return self

    def __exit__(self, *exc) -> None:
        after = weights(self.model)
        assert after.keys() == self.before.keys()
        for name, tensor in after.items():
            assert torch.equal(tensor, self.before[name]), f"{name} changed"
        if not self.allow_injection:
            assert not injected(self.model), "lorta layers were injected before the error"


@pytest.fixture
def saved(tmp_path) -> Path:
    """A trained-looking (random, non-zero) LoRTA adapter of the tiny Llama, saved to disk."""
    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=3, lora_alpha=6, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def copy_adapter(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        path = dst / "adapter_config.json"
        data = json.loads(path.read_text())
        data.update(config_changes)
        path.write_text(json.dumps(data))
    return dst


def llama(**changes) -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **changes})).eval()


# ------------------------------------------------------------------------------------------- rank, names
@pytest.mark.parametrize("r", [0, -2, 2.5, "8", True, None])
@pytest.mark.parametrize("config_cls", [lorta.LortaConfig, lorta.TLoraConfig])
def test_rank_must_be_a_positive_integer(config_cls, r):
    model = make_model("llama")
    with Unchanged(model), pytest.raises(AdapterConfigError, match=rf"r must be .*got {r!r}"):
        get_peft_model(model, config_cls(r=r))
    assert issubclass(AdapterConfigError, ValueError) and issubclass(AdapterConfigError, TypeError)


@pytest.mark.parametrize(
    "ranks,match",
    [
        (0, r"ranks\['in'\] must be a positive integer, got 0"),
        ({"in": 4, "out": 4, "att": 2, "qkv": 2, "depth": 2.5}, r"ranks\['depth'\] must be a positive integer"),
        ([4, 4, 2], r"one rank per mode \['in', 'out', 'att', 'qkv', 'depth'\]"),
        ({"in": 4, "out": 4, "heads": 2}, r"unknown \['heads'\], missing \['att', 'qkv', 'depth'\]"),
        ("8", "ranks must be an int, a list or a dict"),
    ],
)
def test_tenslora_ranks_per_mode(ranks, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lorta.TensLoraConfig(ranks=ranks)


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: lorta.LortaConfig(modes=["heads", "depth"]),
            r"unknown LoRTA mode\(s\) \['depth'\]; expected a subset",
        ),
        (lambda: lorta.LortaConfig(modes=3), r"LortaConfig\.modes must be list\[str\], got 3 \(int\)"),
        (lambda: lorta.LortaConfig(mode_factor_init="zeros"), r"mode_factor_init='zeros' is not one of \['signs'"),
        (lambda: lorta.TensLoraConfig(construction="att_layers"), r"unknown construction 'att_layers'; expected one"),
        (lambda: lorta.TensLoraConfig(decomposition="tensor_train"), r"unknown decomposition 'tensor_train'"),
        (lambda: lorta.LortaConfig(lora_dropout=1.5), r"lora_dropout must be in \[0, 1\)"),
        (lambda: lorta.LortaConfig(bias="some"), r"bias='some' is not one of \['none', 'all', 'lorta_only'\]"),
    ],
)
def test_unknown_names_and_bad_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------------------------------- targets
def test_targets_that_match_nothing():
    model = make_model("llama")
    with Unchanged(model), pytest.raises(lorta.LayoutError, match=r"matched no module of LlamaForCausalLM.*q_proj"):
        get_peft_model(model, lorta.LortaConfig(target_modules=["query", "wq_proj"]))


def test_target_whose_output_is_not_whole_heads():
    model = make_model("llama")
    model.model.layers[1].self_attn.q_proj = nn.Linear(48, 44, bias=False)  # 44 is not 6 heads x 8
    with Unchanged(model), pytest.raises(lorta.LayoutError) as info:
        get_peft_model(model, lorta.LortaConfig())
    message = str(info.value)
    assert "model.layers.1.self_attn.q_proj" in message and "Linear 48 -> 44" in message
    assert "expected 48 -> 48" in message and "whole number of heads" in message


class TinyAttention(nn.Module):
    def __init__(self, d: int, out: int) -> None:
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, out), nn.Linear(d, d)

    def forward(self, x):
        return self.q_proj(x).sum(-1, keepdim=True) + self.v_proj(x)


class CustomModel(nn.Module):
    """A model with no transformers config: its shape comes from model_shape."""

    def __init__(self, q_out: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TinyAttention(16, q_out) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_custom_module_whose_shape_does_not_fit_the_tensor():
    shape = {"num_layers": 2, "hidden_size": 16, "num_heads": 2, "head_dim": 8}
    good = CustomModel(q_out=16)
    peft_model = get_peft_model(good, lorta.LortaConfig(r=2, target_modules=["q_proj", "v_proj"], model_shape=shape))
    assert peft_model(torch.randn(3, 16)).shape == (3, 16)
    bad = CustomModel(q_out=12)
    with Unchanged(bad), pytest.raises(lorta.LayoutError, match=r"layers\.0\.q_proj.*Linear 16 -> 12.*16 -> 16"):
        get_peft_model(bad, lorta.LortaConfig(r=2, target_modules=["q_proj", "v_proj"], model_shape=shape))
    # without model_shape nothing tells the heads: every matrix is adapted as a head-less extra matrix
    headless = get_peft_model(bad, lorta.LortaConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert headless(torch.randn(3, 16)).shape == (3, 16)
    assert headless.base_model.lorta_factors["default"].layout.has_head_slots is False


def test_target_of_an_unsupported_module_type():
    model = nn.Sequential()
    model.add_module("layers", nn.ModuleList([nn.Conv1d(4, 4, 1)]))
    shape = {"num_layers": 1, "hidden_size": 4, "num_heads": 1}
    with Unchanged(model), pytest.raises(lorta.LayoutError, match="cannot adapt a Conv1d.*torch.nn.Linear"):
        get_peft_model(model, lorta.LortaConfig(target_modules=["layers.0"], model_shape=shape))


# ------------------------------------------------------------------------------ adapter vs another base
@pytest.mark.parametrize(
    "change,key,values",
    [
        ({"num_hidden_layers": 2}, "num_layers", "adapter 3 vs model 2"),
        ({"hidden_size": 36}, "hidden_size", "adapter 48 vs model 36"),
        ({"num_attention_heads": 4}, "num_heads", "adapter 6 vs model 4"),
        ({"num_key_value_heads": 3}, "num_kv_heads", "adapter 2 vs model 3"),
        ({"head_dim": 6}, "head_dim", "adapter 8 vs model 6"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_adapter_onto_a_base_of_another_shape(saved, change, key, values):
    other = llama(**change)
    with Unchanged(other), pytest.raises(lorta.LayoutError) as info:
        PeftModel.from_pretrained(other, saved)
    message = str(info.value)
    assert f"{key}: {values}" in message and "another shape" in message and str(saved) in message
    assert message.count(" vs model ") == 1  # exactly the one mismatch is reported


def test_adapter_for_other_matrices(saved, tmp_path):
    adapter = copy_adapter(saved, tmp_path / "qv", target_modules=["q_proj", "v_proj"])
    model = make_model("llama")
    with Unchanged(model), pytest.raises(lorta.LayoutError, match=r"trained on matrices \['q', 'k', 'v', 'o'\] but"):
        PeftModel.from_pretrained(model, adapter)


# ------------------------------------------------------------------------------------ another method type
def test_lora_adapter_loaded_as_lorta(tmp_path):
    lora = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(AdapterFileError, match=r"peft_type='LORA' adapter, but LortaConfig loads \['LORTA'\]"):
        lorta.LortaConfig.from_pretrained(tmp_path / "lora")
    model = make_model("llama")  # an explicit lorta config on a LoRA file: its weights hold no lorta factors
    with Unchanged(model, allow_injection=True), pytest.raises(AdapterFileError, match="holds no lorta factors"):
        PeftModel.from_pretrained(model, tmp_path / "lora", config=lorta.LortaConfig(r=2))


@pytest.mark.parametrize(
    "source,edited,field",
    [
        ("lorta", "TLORA", "modes"),
        ("lorta", "TENSLORA", "modes"),
        ("tlora", "LORTA", "projection_seed"),
        ("tenslora-tucker", "LORTA", "construction"),
    ],
)
def test_peft_type_edited_to_another_lorta_method(tmp_path, source, edited, field):
    get_peft_model(make_model("llama"), METHODS[source]()).save_pretrained(tmp_path / "a")
    adapter = copy_adapter(tmp_path / "a", tmp_path / "edited", peft_type=edited)
    model = make_model("llama")
    with Unchanged(model), pytest.raises(AdapterFileError, match=rf"says peft_type='{edited}' but holds .*'{field}'"):
        PeftModel.from_pretrained(model, adapter)


def test_lorta_weights_under_another_lorta_config_are_refused(tmp_path):
    """Even with a consistent config, TLoRA weights cannot fill LoRTA's factors: names are compared first."""
    get_peft_model(make_model("llama"), METHODS["tlora"]()).save_pretrained(tmp_path / "t")
    get_peft_model(make_model("llama"), METHODS["lorta"]()).save_pretrained(tmp_path / "l")
    mixed = copy_adapter(tmp_path / "l", tmp_path / "mixed")
    shutil.copy(tmp_path / "t" / "adapter_model.safetensors", mixed / "adapter_model.safetensors")
    model = make_model("llama")
    with Unchanged(model), pytest.raises(AdapterFileError, match=r"factors \['A', 'B', 'C_H', 'C_L', 'C_M'\] are miss"):
        PeftModel.from_pretrained(model, mixed)


# ----------------------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors(saved, tmp_path, damage):
    adapter = copy_adapter(saved, tmp_path / damage)
    path = adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) * 2 // 3], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    model = make_model("llama")
    with Unchanged(model), pytest.raises(AdapterFileError) as info:
        PeftModel.from_pretrained(model, adapter)
    assert str(path) in str(info.value) and "truncated or corrupted" in str(info.value)


def test_damaged_torch_weights_file(tmp_path):
    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=3, init_weights=False))
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    path = tmp_path / "bin" / "adapter_model.bin"
    path.write_bytes(path.read_bytes()[:300])
    base = make_model("llama")
    with Unchanged(base), pytest.raises(AdapterFileError, match=r"adapter_model\.bin is not a readable torch file"):
        PeftModel.from_pretrained(base, tmp_path / "bin")


@pytest.mark.parametrize(
    ("missing", "error", "match"),
    [
        ("adapter_model.safetensors", AdapterFileError, r"no adapter weights in .*missing.*expected adap"),
        ("adapter_config.json", ValueError, r"Can't find 'adapter_config.json' at .*missing"),
    ],
    ids=["weights", "config"],
)
def test_missing_file(saved, tmp_path, missing, error, match):
    adapter = copy_adapter(saved, tmp_path / "missing")
    (adapter / missing).unlink()
    model = make_model("llama")
    with Unchanged(model), pytest.raises(error, match=match):
        PeftModel.from_pretrained(model, adapter)


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda sd: {k: v[..., :2].contiguous() for k, v in sd.items()},
            r"A has shape \[1, 1, 48, 2\] there but \[1, 1,",
        ),
        (lambda sd: {k: v for k, v in sd.items() if not k.endswith(".C_L")}, r"factors \['C_L'\] are missing"),
        (
            lambda sd: {**sd, "base_model.lorta_factors.D": torch.zeros(3)},
            r"factors \['D'\] are not part of this adapter",
        ),
        (lambda sd: {k: v.to(torch.int32) for k, v in sd.items()}, r"dtype .*expected a floating-point dtype"),
    ],
    ids=["other-rank", "missing-factor", "extra-factor", "int-dtype"],
)
def test_weights_that_do_not_fit(saved, tmp_path, edit, match):
    adapter = copy_adapter(saved, tmp_path / "edited")
    path = adapter / "adapter_model.safetensors"
    save_file(edit(load_file(path)), path)
    model = make_model("llama")
    with Unchanged(model), pytest.raises(AdapterFileError, match=match):
        PeftModel.from_pretrained(model, adapter)
    # the same file under an explicitly passed config is checked before PEFT's load_state_dict writes anything
    other = make_model("llama")
    config = lorta.LortaConfig.from_pretrained(saved)
    with Unchanged(other, allow_injection=True), pytest.raises(AdapterFileError, match=match):
        PeftModel.from_pretrained(other, adapter, config=config)


@pytest.mark.parametrize(
    "field,value,shown",
    [
        ("r", "8", "r must be a positive integer, got '8' (str)"),
        ("r", 8.0, "got 8.0 (float)"),
        ("modes", 3, "modes must be list[str], got 3"),
        ("lora_alpha", "x", "lora_alpha must be float, got 'x'"),
        ("target_modules", 5, "target_modules must be list[str] | str | None, got 5"),
        ("model_shape", "x", "model_shape must be dict[str, Any] | None, got 'x'"),
        ("matrix_names", 3, "matrix_names must be list[str] | None, got 3"),
        ("lora_dropout", "0.1", "lora_dropout must be float, got '0.1'"),
        ("init_weights", "yes", "init_weights must be bool, got 'yes'"),
        ("use_rslora", "no", "got 'no'"),
        ("model_shape", {**LLAMA_SHAPE, "num_heads": "6"}, "model_shape['num_heads'] must be a non-negative integer"),
    ],
    ids=lambda v: None if isinstance(v, (str, dict)) and len(str(v)) > 12 else str(v),
)
def test_config_json_with_wrong_types(saved, tmp_path, field, value, shown):
    adapter = copy_adapter(saved, tmp_path / "wrong", **{field: value})
    model = make_model("llama")
    with Unchanged(model), pytest.raises(AdapterConfigError) as info:
        PeftModel.from_pretrained(model, adapter)
    message = str(info.value)
    assert str(adapter / "adapter_config.json") in message and shown in message


def test_config_json_that_does_not_parse(saved, tmp_path):
    adapter = copy_adapter(saved, tmp_path / "broken")
    (adapter / "adapter_config.json").write_text('{"r": 3, "peft_type": "LORTA",')
    with pytest.raises(AdapterFileError, match=r"broken.adapter_config.json is not a readable JSON file"):
        lorta.LortaConfig.from_pretrained(adapter)
    model = make_model("llama")  # PeftModel reads peft_type itself first: PEFT's own JSON error, nothing changed
    with Unchanged(model), pytest.raises(ValueError):
        PeftModel.from_pretrained(model, adapter)


# ---------------------------------------------------------------------------------------- merge, runtime
@pytest.mark.parametrize("method", ["lorta", "tenslora-tucker", "tlora"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_safe_merge_with_non_finite_factors_changes_nothing(method, value):
    model = get_peft_model(make_model("llama"), METHODS[method](init_weights=False))
    bank = model.base_model.lorta_factors["default"]
    name, param = list(bank.named_parameters())[-1]
    with torch.no_grad():
        param.view(-1)[-1] = value  # touches the last layer only: a layer-by-layer merge would write the others
    with Unchanged(model, allow_injection=True), pytest.raises(ValueError, match=rf"factor '{name}' .*NaN or Inf"):
        model.base_model.merge_adapter(safe_merge=True)
    assert not any(m.merged for m in model.modules() if isinstance(m, TensorAdapterLayer))
    with Unchanged(model, allow_injection=True), pytest.raises(ValueError, match="NaN or Inf"):
        model.merge_and_unload(safe_merge=True)
    assert injected(model)  # nothing was unloaded either


def test_safe_merge_that_would_overflow_the_base_dtype():
    model = get_peft_model(make_model("llama", dtype=torch.float16), lorta.LortaConfig(r=2, init_weights=False))
    bank = model.base_model.lorta_factors["default"]
    with torch.no_grad():
        bank.C_L[0, -1].fill_(1e6)  # finite in float32, but the last layer's merged weight overflows float16
    with Unchanged(model, allow_injection=True), pytest.raises(ValueError, match=r"layers\.2\..*NaN or Inf .*float16"):
        model.base_model.merge_adapter(safe_merge=True)


def test_adapter_dtype_differs_from_the_base_is_cast():
    """Decision: the adapter computes in its own dtype and its output is cast to the base layer's dtype."""
    inputs = make_inputs("llama")
    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=3, init_weights=False))
    want = output_of(model, inputs)
    model.base_model.lorta_factors.double()
    got = output_of(model, inputs)
    assert got.dtype == torch.float32
    assert_close(got, want, FORWARD_TERMS)  # float64 maps cast to float32 vs float32 maps


def test_float64_adapter_file_loads_onto_a_float32_base(saved, tmp_path):
    adapter = copy_adapter(saved, tmp_path / "f64")
    path = adapter / "adapter_model.safetensors"
    save_file({k: v.double() for k, v in load_file(path).items()}, path)
    inputs = make_inputs("llama")
    want = output_of(PeftModel.from_pretrained(make_model("llama"), saved), inputs)
    loaded = PeftModel.from_pretrained(make_model("llama"), adapter)
    assert {p.dtype for p in loaded.base_model.lorta_factors.parameters()} == {torch.float32}
    # float32 -> float64 -> float32 is exact: the same factors, the same computation
    torch.testing.assert_close(output_of(loaded, inputs), want, atol=0, rtol=0)


def test_factors_on_another_device_than_the_base(saved):
    model = PeftModel.from_pretrained(make_model("llama"), saved)
    model.base_model.lorta_factors.to("meta")  # as after moving only peft_model.base_model.model to a GPU
    with Unchanged(model, allow_injection=True), pytest.raises(lorta.LayoutError) as info:
        model(**make_inputs("llama"))
    assert "on meta but the adapted layers' base weights are on cpu" in str(info.value)
    assert "peft_model.to(device)" in str(info.value)


# ------------------------------------------------------------------------------------- crash-safe saving
def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(path: Path) -> list[str]:
    return [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


def _partial_write(tensors, filename, metadata=None):
    with open(filename, "wb") as handle:
        handle.write(b"\x00" * 64)  # half a file, then the "disk" fails
    raise OSError(28, "No space left on device (simulated)")


@pytest.mark.parametrize("fail_in", ["weights", "config"])
def test_failed_save_leaves_the_earlier_adapter_intact(saved, monkeypatch, fail_in):
    before = _files(saved)
    inputs = make_inputs("llama")
    want = output_of(PeftModel.from_pretrained(make_model("llama"), saved), inputs)
    other = get_peft_model(make_model("llama", seed=3), lorta.LortaConfig(r=2, init_weights=False))
    if fail_in == "weights":
        monkeypatch.setattr(peft.peft_model, "safe_save_file", _partial_write)
    else:

        def fail(self, *args, **kwargs):
            raise RuntimeError("crash while writing adapter_config.json (simulated)")

        monkeypatch.setattr(lorta.LortaConfig, "save_pretrained", fail)
    with pytest.raises((OSError, RuntimeError), match="simulated"):
        other.save_pretrained(saved)
    assert _files(saved) == before and not _leftovers(saved)
    monkeypatch.undo()
    # the same bytes loaded the same way (asserted above): the same computation, bit for bit
    again = output_of(PeftModel.from_pretrained(make_model("llama"), saved), inputs)
    torch.testing.assert_close(again, want, atol=0, rtol=0)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=2))
    monkeypatch.setattr(peft.peft_model, "safe_save_file", _partial_write)
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists() and not _leftovers(tmp_path / "new")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_save_replaces_an_adapter_and_keeps_other_files(saved, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    (saved / "notes.txt").write_text("kept")
    model = get_peft_model(make_model("llama", seed=3), lorta.LortaConfig(r=2, init_weights=False))
    model.add_adapter("second", lorta.LortaConfig(r=2, init_weights=False))
    model.save_pretrained(saved)
    assert (saved / "notes.txt").read_text() == "kept" and not _leftovers(saved)
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 2
    assert (saved / "second" / "adapter_model.safetensors").exists()
    second = _files(saved / "second")
    model.save_pretrained(saved, selected_adapters=["default"])  # PEFT keeps other adapters' subfolders
    assert _files(saved / "second") == second
    inputs = make_inputs("llama")
    loaded = PeftModel.from_pretrained(make_model("llama", seed=3), saved)
    # the same factors; the saving model also holds "second", so its maps may be batched otherwise
    assert_close(output_of(loaded, inputs), output_of(model, inputs), FORWARD_TERMS)


def test_save_into_the_working_directory(saved, monkeypatch):
    model = get_peft_model(make_model("llama", seed=3), lorta.LortaConfig(r=2, init_weights=False))
    monkeypatch.chdir(saved)
    model.save_pretrained(".")
    assert Path.cwd() == saved.resolve() and json.loads(Path("adapter_config.json").read_text())["r"] == 2
    assert not _leftovers(saved)


def test_save_through_a_symlink_keeps_the_link(saved, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(saved, target_is_directory=True)
    get_peft_model(make_model("llama"), lorta.LortaConfig(r=2)).save_pretrained(link)
    assert link.is_symlink() and json.loads((saved / "adapter_config.json").read_text())["r"] == 2


def test_other_models_and_ranks_go_straight_to_peft(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("atomic_save must not be used here")

    monkeypatch.setattr(saving, "atomic_save", refuse)
    lora = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=2))
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)  # PEFT: only main writes files
    assert not (tmp_path / "rank1" / "adapter_model.safetensors").exists()
