"""Export to standard LoRA is exact: plain PEFT, in a process that cannot import lorta, gives the lorta adapter's
outputs for every method x every architecture of the table (GQA, Gemma-3's H*d_h != d, fused and interleaved
q/k/v, T5/Bart, multimodal), MLP extras, several adapters, trained biases and heads, and the serving engines'
variants of the file; the engines' rules refuse before anything is written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_inputs, make_model, output_of
from methods import METHODS as FAMILY
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_architectures import CASE_IDS, _case, build, first_output, inputs_for
from tolerance import FORWARD_TERMS, MAP_TERMS, assert_close, eps, tolerance

import lorta
from lorta.export import ExportError, export_lora, export_merged, lora_export

HERE = Path(__file__).parent
# The bar (1e-5, normwise relative) in rounding units: the independent roundings of two float32 forwards add
# in quadrature, so the difference's norm grows as sqrt(terms) units of the outputs' norm (Higham & Mary's
# probabilistic bound), with an rms of sqrt(terms) * eps / (2 sqrt 3), 3.5 times below this; the elementwise worst
# case (terms units, no cancellation assumed) is assert_close's in _check.
REL_ERROR = math.sqrt(2 * FORWARD_TERMS) * eps(torch.float32)


# test_architectures' configs, with a scale large enough that a dropped adapter fails the comparison tenfold
TABLE_METHODS = {
    "lorta": lambda: lorta.LortaConfig(r=2, lora_alpha=12, init_weights=False),
    "tenslora": lambda: lorta.TensLoraConfig(ranks=[2, 3, 2, 2, 2], lora_alpha=12, init_weights=False),
    "tlora": lambda: lorta.TLoraConfig(r=2, lora_alpha=12, init_weights=False),
}


def _float(inputs: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}


class Cases:
    """Builds lorta models, exports them and records what plain PEFT must reproduce, then runs them all in ONE
    subprocess without lorta (starting Python + transformers + PEFT once, not per case)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cases: dict[str, dict] = {}
        self.expected: dict[str, torch.Tensor] = {}
        self.base_outputs: dict[str, torch.Tensor] = {}

    def add(
        self,
        name: str,
        base: torch.nn.Module,
        peft_model,
        inputs: dict,
        kind: str,
        read,
        engine="peft",
        run=("default",),
    ) -> None:
        folder = self.root / name.replace("/", "_")
        base_dir, lora_dir = folder / "base", folder / "lora"
        peft_model.eval()
        for adapter in run:
            peft_model.set_adapter(adapter)
            self.expected[f"{name}/{adapter}"] = read(peft_model)
        with peft_model.disable_adapter():
            self.base_outputs[name] = read(peft_model)
        export_lora(peft_model, lora_dir, adapter_name=list(run), engine=engine)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(inputs, folder / "inputs.pt")
        self.cases[name] = {
            "class": type(base).__name__,
            "base": str(base_dir),
            "lora": str(lora_dir),
            "inputs": str(folder / "inputs.pt"),
            "kind": kind,
            "run": list(run),
            "extra": {a: str(lora_dir / a) for a in run if a != "default"},
        }

    def run(self) -> dict[str, torch.Tensor]:
        (self.root / "cases.json").write_text(json.dumps(self.cases))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run(
            [
                sys.executable,
                str(HERE / "plain_peft_outputs.py"),
                str(self.root / "cases.json"),
                str(self.root / "out.pt"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        return torch.load(self.root / "out.pt")


def _table_case(cases: Cases, case: str, method: str) -> None:
    model_type, kwargs, kind = _case(case)
    base = build(model_type, kwargs).float()
    inputs = _float(inputs_for(kind, base))
    base.save_pretrained(cases.root / f"{case}-{method}" / "base")
    model = get_peft_model(base, TABLE_METHODS[method]())
    cases.add(f"{case}-{method}", base, model, inputs, kind, lambda m: first_output(m, inputs, kind))


# Beyond the attention defaults: MLP extras, several adapters, the serving variants, trained biases and heads.
EXTRA_CASES = {
    "llama-mlp-extras": (
        "llama",
        lambda: lorta.LortaConfig(
            r=3,
            init_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        "peft",
    ),
    "gpt2-mlp-extras": (
        "gpt2",
        lambda: lorta.LortaConfig(r=3, init_weights=False, target_modules=["c_attn", "c_proj", "c_fc"]),
        "peft",
    ),
    "llama-layers-to-transform": (
        "llama",
        lambda: lorta.LortaConfig(r=3, init_weights=False, layers_to_transform=[1]),
        "peft",
    ),
    "gpt2-bias-all": ("gpt2", lambda: lorta.LortaConfig(r=3, init_weights=False, bias="all"), "peft"),
    "bert-classifier": ("bert", lambda: lorta.LortaConfig(r=3, init_weights=False, task_type="SEQ_CLS"), "peft"),
    "llama-vllm": ("llama", lambda: lorta.TensLoraConfig(ranks=3, init_weights=False), "vllm"),
    "llama-sglang": ("llama", lambda: lorta.TLoraConfig(r=3, init_weights=False), "sglang"),
    "mistral-sglang": ("mistral", lambda: lorta.LortaConfig(r=3, init_weights=False, modes=["heads"]), "sglang"),
    "bert-vllm": ("bert", lambda: lorta.LortaConfig(r=3, init_weights=False, task_type="SEQ_CLS"), "vllm"),
}


def _train_bias_and_head(model, arch: str) -> None:
    """Move the trained biases / head away from the base, so that the file must carry them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lorta_factors" not in name:
                p.add_(0.5)


def _extra_case(cases: Cases, name: str) -> None:
    arch, config, engine = EXTRA_CASES[name]
    base = make_model(arch)
    base.save_pretrained(cases.root / name / "base")
    model = get_peft_model(base, config())
    _train_bias_and_head(model, arch)
    inputs = make_inputs(arch)
    cases.add(name, base, model, inputs, "ids", lambda m: output_of(m, inputs), engine=engine)


def _family_case(cases: Cases, method: str) -> None:
    """Every config of the family (tests/methods.py), two adapters in one model: default and 'other'."""
    base = make_model("llama")
    base.save_pretrained(cases.root / f"family-{method}" / "base")
    model = get_peft_model(base, FAMILY[method](init_weights=False))
    rank = {"tenslora-tucker": {"ranks": [2, 2, 2, 2, 2]}, "tenslora-cp-qkv": {"ranks": 2}}.get(method, {"r": 2})
    model.add_adapter("other", FAMILY[method](init_weights=False, **rank))
    inputs = make_inputs("llama")
    cases.add(f"family-{method}", base, model, inputs, "ids", lambda m: output_of(m, inputs), run=("default", "other"))


@pytest.fixture(scope="module")
def plain_peft(tmp_path_factory):
    cases = Cases(tmp_path_factory.mktemp("export"))
    for case in CASE_IDS:
        for method in TABLE_METHODS:
            _table_case(cases, case, method)
    for name in EXTRA_CASES:
        _extra_case(cases, name)
    for method in FAMILY:
        _family_case(cases, method)
    return cases, cases.run()


def _check(plain_peft, key: str) -> None:
    cases, outputs = plain_peft
    want, got = cases.expected[key], outputs[key]
    base = cases.base_outputs[key.rsplit("/", 1)[0]]
    terms = 2 * FORWARD_TERMS  # two float32 forwards of the same math, differently ordered
    assert (want - base).abs().max() > 10 * tolerance(want, terms), "a dropped adapter must fail the comparison"
    assert_close(got, want, terms=terms)
    assert float((got - want).norm() / want.norm()) <= REL_ERROR


@pytest.mark.parametrize("method", sorted(TABLE_METHODS))
@pytest.mark.parametrize("case", CASE_IDS)
def test_plain_peft_reproduces_every_architecture(plain_peft, case, method):
    _check(plain_peft, f"{case}-{method}/default")


@pytest.mark.parametrize("name", sorted(EXTRA_CASES))
def test_plain_peft_reproduces_extras_biases_heads_and_engine_variants(plain_peft, name):
    _check(plain_peft, f"{name}/default")


@pytest.mark.parametrize("adapter", ["default", "other"])
@pytest.mark.parametrize("method", sorted(FAMILY))
def test_plain_peft_reproduces_every_method_and_several_adapters(plain_peft, method, adapter):
    _check(plain_peft, f"family-{method}/{adapter}")


# ------------------------------------------------------------------------------------ the file, the engines' rules
def test_the_lora_is_exact_factors_not_an_svd():
    """lora_B @ lora_A of every module IS the layer's dense update (float32 products of the same factors)."""
    model = get_peft_model(make_model("gpt2"), lorta.LortaConfig(r=3, init_weights=False, modes=["heads"]))
    export = lora_export(model)
    layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lorta_slots")}
    assert set(export.ranks) == set(layers)
    assert export.ranks["transformer.h.0.attn.c_attn"] == 9  # q, k, v with their own P: block-diagonal, 3 x 3
    assert export.config["rank_pattern"] == {
        r"transformer\.h\.0\.attn\.c_proj": 3,
        r"transformer\.h\.1\.attn\.c_proj": 3,
    }
    for path, layer in layers.items():
        a = export.tensors[f"base_model.model.{path}.lora_A.weight"]
        b = export.tensors[f"base_model.model.{path}.lora_B.weight"]
        delta = layer.delta_weight("default").detach()  # Conv1D: in x out
        assert_close((b @ a).t(), delta, terms=MAP_TERMS)


def test_vllm_ranks_are_uniform_and_allowed_and_the_padding_is_zeros():
    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=3, init_weights=False))
    export = lora_export(model, engine="vllm")
    assert export.config["r"] == export.config["lora_alpha"] == 8 and not export.config["rank_pattern"]
    for key, t in export.tensors.items():
        if key.endswith("lora_A.weight"):
            assert t.shape[0] == 8 and not t[3:].any()
        elif key.endswith("lora_B.weight"):
            assert t.shape[1] == 8 and not t[:, 3:].any()


def test_sglang_gets_the_q_k_v_siblings_it_reads_together_as_zeros():
    model = get_peft_model(make_model("llama"), lorta.TLoraConfig(r=3, init_weights=False))  # q and v only
    tensors = lora_export(model, engine="sglang").tensors
    k = [key for key in tensors if ".k_proj." in key]
    assert k and all(not tensors[key].any() for key in k)
    assert len({t.shape[0] for key, t in tensors.items() if key.endswith("lora_A.weight")}) == 1  # one rank


@pytest.mark.parametrize(
    ("arch", "config", "engine", "rule"),
    [
        ("gpt2", lambda: lorta.LortaConfig(r=2), "vllm", r"vLLM \(0\.33\) serves GPT2LMHeadModel without LoRA support"),
        ("llama", lambda: lorta.LortaConfig(r=2, bias="all"), "vllm", "does not load adapter biases"),
        ("llama", lambda: lorta.LortaConfig(r=2, bias="lorta_only"), "sglang", "does not load adapter biases"),
        ("bert", lambda: lorta.LortaConfig(r=2), "sglang", r"adapts only the modules .* not \['dense', 'key'"),
        (
            "bert",
            lambda: lorta.LortaConfig(r=2, task_type="SEQ_CLS", target_modules=["query"]),
            "sglang",
            r"loads none of the fully trained modules \(modules_to_save\), and this adapter trains \['classifier'\]",
        ),
        (
            "llama",
            lambda: lorta.LortaConfig(r=2, modules_to_save=["lm_head"]),
            "vllm",
            r"loads only \['classifier', 'score'\] of the fully trained modules",
        ),
        ("llama", lambda: lorta.LortaConfig(r=520), "vllm", "serves LoRA ranks up to 512"),
    ],
)
def test_engine_rules_refuse_with_the_rule_named_and_write_nothing(arch, config, engine, rule, tmp_path):
    model = get_peft_model(make_model(arch), config())
    with pytest.raises(ExportError, match=rule):
        export_lora(model, tmp_path / "out", engine=engine)
    assert list(tmp_path.iterdir()) == []
    export_lora(model, tmp_path / "out")  # PEFT itself takes every one of them


def test_bad_input_is_refused(tmp_path):
    from peft import LoraConfig

    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=2))
    with pytest.raises(ExportError, match="engine='tgi' is not one of"):
        export_lora(model, tmp_path / "a", engine="tgi")
    with pytest.raises(ExportError, match=r"no adapter 'nope'; it has \['default'\]"):
        export_lora(model, tmp_path / "a", adapter_name="nope")
    with pytest.raises(ExportError, match="expected a PeftModel"):
        export_lora(make_model("llama"), tmp_path / "a")
    lora = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ExportError, match="is LORA, not a lorta adapter"):
        export_lora(lora, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_kept_unless_overwrite_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=2, init_weights=False))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; .* pass --overwrite"):
        export_lora(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    import lorta.export as export

    def broken(export_, folder):
        (folder / "adapter_config.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_lora", broken)
    with pytest.raises(OSError, match="disk full"):
        export_lora(model, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    export_lora(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ] or sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert set(load_file(out / "adapter_model.safetensors")) == set(lora_export(model).tensors)


# ------------------------------------------------------------------------------------------------- merged
@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("llama", lambda: lorta.LortaConfig(r=3, init_weights=False)),
        ("gpt2", lambda: lorta.TensLoraConfig(ranks=3, init_weights=False, bias="all")),
        ("bert", lambda: lorta.TLoraConfig(r=3, init_weights=False, task_type="SEQ_CLS")),
    ],
)
def test_merged_export_equals_merge_and_unload_and_leaves_the_model_alone(arch, config, tmp_path):
    import transformers

    model = get_peft_model(make_model(arch), config())
    _train_bias_and_head(model, arch)
    inputs = make_inputs(arch)
    adapted = output_of(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_merged(model, tmp_path / "merged")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    cls = getattr(transformers, type(model.get_base_model()).__name__)
    loaded = cls.from_pretrained(tmp_path / "merged").eval()
    want = output_of(model.merge_and_unload(), inputs)
    torch.testing.assert_close(output_of(loaded, inputs), want, atol=0, rtol=0)  # the same weights, the same ops
    assert_close(want, adapted, terms=2 * FORWARD_TERMS)
    assert not any(
        "lora" in k or "base_layer" in k or "modules_to_save" in k
        for k in load_file(tmp_path / "merged" / "model.safetensors")
    )


def test_merged_export_refuses_a_quantised_base_and_a_foreign_merge(tmp_path):
    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=2, init_weights=False))
    model.add_adapter("other", lorta.LortaConfig(r=2, init_weights=False))
    model.base_model.merge_adapter(["other"])
    with pytest.raises(ExportError, match=r"has adapter\(s\) \['other'\] merged into its weight: unmerge\(\) them"):
        export_merged(model, tmp_path / "m")
    model.get_base_model().hf_quantizer = object()
    with pytest.raises(ExportError, match="the base model is quantised"):
        export_merged(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- GGUF
def _read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}


def _rope_half(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """HF's RoPE (rotate_half): pairs (x_j, x_{j+d/2})."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)


def _rope_interleaved(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """GGML's RoPE (llama.cpp's LLAMA rope type): pairs (x_2j, x_2j+1)."""
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()
    return out


def test_the_q_k_row_order_turns_hf_rope_into_ggml_rope():
    """The reason lora_B's q/k rows are reordered: RoPE of the reordered rows (llama.cpp's) equals the reordered
    RoPE of HF's rows, for every head."""
    from lorta.export import _interleaved_rope_rows

    heads, head_dim = 3, 8
    order = _interleaved_rope_rows(heads * head_dim, heads)
    x = torch.randn(5, heads, head_dim, dtype=torch.float64)
    angle = torch.rand(5, 1, head_dim // 2, dtype=torch.float64) * 6
    hf = _rope_half(x, angle).reshape(5, -1)
    ggml = _rope_interleaved(x.reshape(5, -1)[:, order].reshape(5, heads, head_dim), angle).reshape(5, -1)
    assert_close(ggml, hf[:, order], terms=4)  # the same products and sums, per element


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_the_gguf_adapter_holds_the_exact_update_under_llama_cpp_names(arch, tmp_path):
    from lorta.export import GGUF_ARCHITECTURES, _interleaved_rope_rows

    model = get_peft_model(make_model(arch), lorta.LortaConfig(r=3, init_weights=False))
    path = lorta.export.export_gguf(model, tmp_path / "a.gguf")
    fields, tensors = _read_gguf(path)
    config = model.get_base_model().config
    gguf_arch, reorder = GGUF_ARCHITECTURES[config.model_type]
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == gguf_arch and fields["adapter.lora.alpha"] == 3.0
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lorta_slots")}
    assert len(tensors) == 2 * len(layers)
    for path_, layer in layers.items():
        block, leaf = int(path_.split(".")[2]), path_.rsplit(".", 1)[-1]
        a = tensors[f"blk.{block}.{names[leaf]}.weight.lora_a"]
        b = tensors[f"blk.{block}.{names[leaf]}.weight.lora_b"]
        delta = layer.delta_weight("default").detach()  # (out, in), as the base tensor
        if reorder and leaf in ("q_proj", "k_proj"):
            heads = config.num_attention_heads if leaf == "q_proj" else config.num_key_value_heads
            delta = delta[_interleaved_rope_rows(delta.shape[0], heads)]
        assert a.shape == (3, delta.shape[1]) and b.shape == (delta.shape[0], 3)
        assert_close(b @ a, delta, terms=MAP_TERMS)


@pytest.mark.parametrize(
    ("arch", "config", "rule"),
    [
        ("gpt2", lambda: lorta.LortaConfig(r=2), r"takes adapters here for the model types .* not 'gpt2'"),
        ("bert", lambda: lorta.LortaConfig(r=2), "not 'bert'"),
        ("llama", lambda: lorta.LortaConfig(r=2, bias="all"), "llama.cpp .* does not load adapter biases"),
    ],
)
def test_gguf_refuses_what_llama_cpp_cannot_take(arch, config, rule, tmp_path):
    model = get_peft_model(make_model(arch), config())
    with pytest.raises(ExportError, match=rule):
        lorta.export.export_gguf(model, tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def test_gguf_file_is_refused_when_it_exists_and_replaced_with_overwrite(tmp_path):
    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=2, init_weights=False))
    target = tmp_path / "a.gguf"
    target.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="already exists"):
        lorta.export.export_gguf(model, target)
    assert target.read_bytes() == b"mine"
    lorta.export.export_gguf(model, target, overwrite=True)
    assert _read_gguf(target)[0]["adapter.type"] == "lora" and sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]
    folder = lorta.export.export_gguf(model, tmp_path / "out")  # a folder gets adapter_model.gguf
    assert [p.name for p in folder.iterdir()] == ["adapter_model.gguf"]


# ------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def saved(tmp_path):
    """A tiny Llama base folder and a lorta adapter saved on it."""
    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, lorta.LortaConfig(r=3, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path, output_of(model.eval(), make_inputs("llama"))


def _cli(*argv: str) -> int:
    from lorta.app.cli import main

    return main(list(argv))


@pytest.mark.parametrize("engine", ["peft", "vllm", "sglang"])
def test_cli_export_lora_loads_in_peft(saved, engine):
    root, want = saved
    assert (
        _cli("export", str(root / "adapter"), str(root / "out"), "--base", str(root / "base"), "--engine", engine) == 0
    )
    got = output_of(PeftModel.from_pretrained(make_model("llama"), root / "out").eval(), make_inputs("llama"))
    assert_close(got, want, terms=2 * FORWARD_TERMS)


def test_cli_export_gguf_and_merged(saved):
    import transformers

    root, want = saved
    assert (
        _cli("export", str(root / "adapter"), str(root / "a.gguf"), "--format", "gguf", "--base", str(root / "base"))
        == 0
    )
    assert _read_gguf(root / "a.gguf")[0]["general.architecture"] == "llama"
    assert (
        _cli("export", str(root / "adapter"), str(root / "merged"), "--format", "merged", "--base", str(root / "base"))
        == 0
    )
    merged = transformers.LlamaForCausalLM.from_pretrained(root / "merged").eval()
    assert_close(output_of(merged, make_inputs("llama")), want, terms=2 * FORWARD_TERMS)


def test_cli_bad_input_says_what_and_writes_nothing(saved, capsys, tmp_path_factory):
    from peft import LoraConfig

    root, _ = saved
    adapter, out, base = str(root / "adapter"), str(root / "out"), str(root / "base")

    def fails(*argv: str, match: str) -> None:
        assert _cli("export", *argv) == 2
        assert match in capsys.readouterr().err
        assert not (root / "out").exists()

    fails(str(root / "nothing"), out, "--base", base, match="holds no adapter_config.json")
    lora = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(root / "lora")
    fails(str(root / "lora"), out, "--base", base, match="holds a LORA adapter; expected one of")
    fails(adapter, out, "--base", str(root / "missing"), match="is neither a packaged model")
    other = tmp_path_factory.mktemp("other")
    make_model("mistral").save_pretrained(other)  # another shape
    fails(
        adapter,
        out,
        "--base",
        str(other),
        match="made for a base model of another shape (num_layers: adapter 3 vs model 2",
    )
    fails(adapter, out, "--base", base, "--format", "gguf", "--engine", "vllm", match="applies to --format lora")
    (root / "out").mkdir()
    assert _cli("export", adapter, out, "--base", base) == 2
    assert "already exists; choose another output path or pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("export", adapter, out, "--format", "onnx")
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
