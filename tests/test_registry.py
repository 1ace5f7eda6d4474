"""The method registry: every method of lorta/methods is known everywhere methods are listed, from its spec alone."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import lorta
from lorta import params
from lorta.app import catalogue, train
from lorta.registry import method_spec, method_specs, peft_types

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_registry_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_family_is_discovered_from_its_files():
    names = list(method_specs())
    assert names == ["lorta", "tenslora", "tlora"]
    files = sorted(p.stem for p in Path(lorta.methods.__file__).parent.glob("*.py") if p.stem != "__init__")
    assert sorted(names) == files  # one file, one spec
    with pytest.raises(KeyError, match="unknown lorta method 'dora'; the methods are lorta, tenslora, tlora"):
        method_spec("dora")


@pytest.mark.parametrize("name", list(method_specs()))
def test_every_list_of_methods_is_derived_from_the_spec(name):
    spec = method_spec(name)
    tuner = getattr(lorta, spec.tuner_name)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[spec.peft_type] is spec.config_cls is getattr(lorta, spec.config_cls.__name__)
    assert PEFT_TYPE_TO_TUNER_MAPPING[spec.peft_type] is tuner and tuner.factorization_cls is spec.factors_cls
    assert PEFT_TYPE_TO_PREFIX_MAPPING[spec.peft_type] == "lorta_" and spec.peft_type in peft_types()
    assert {spec.config_cls.__name__, spec.factors_cls.__name__, spec.tuner_name} <= set(lorta.__all__)
    assert spec.config_cls().peft_type == spec.peft_type  # the config says what the spec says
    assert name in params.METHODS and params.METHOD_TITLES[name] == spec.title
    assert name in train.ADAPTER_METHODS and name in train.METHODS
    assert train.CLASSIFY_RECIPES[name] == spec.classify and train.LM_RECIPES[name] == spec.causal_lm
    assert train.DPO_RECIPES[name] == (spec.dpo or spec.causal_lm)
    assert name in _bench_module("bench").METHODS
    assert name in _bench_module("mixed_bench").LORTA_METHODS


@pytest.mark.parametrize("name", list(method_specs()))
def test_the_specs_closed_form_is_the_count(name):
    config = catalogue.model_config("minilm")
    count = params.closed_form(config, name)
    for rank in (1, 3, 8):
        assert count(rank) == params.count_trainable(config, params.method_config(name, rank)), (name, rank)


def test_a_recipes_lr_follows_the_rank_by_its_power():
    """lr * (rank / recipe rank) ** power: the recipe's own lr at its rank and with no rank (full, head-only), and
    bit-for-bit ``lr * sqrt(rank / recipe rank)`` at power 1/2, so a run made with that --lr is the recipe's run."""
    import math

    from lorta.registry import Recipe

    flat, rooted = Recipe(16, 32.0, 3e-3, 1e-2), Recipe(16, 32.0, 3e-3, 1e-2, lr_rank_power=0.5)
    assert flat.lr_at(68) == flat.lr_at(None) == 3e-3
    assert rooted.lr_at(16) == rooted.lr_at(None) == Recipe(None, None, 3e-3, 0.0, lr_rank_power=0.5).lr_at(8) == 3e-3
    for rank in (1, 7, 22, 45, 68, 175):
        assert rooted.lr_at(rank) == 3e-3 * math.sqrt(rank / 16)
    assert rooted.lr_at(64) == 6e-3 and Recipe(8, 16.0, 1e-3, 0.0, lr_rank_power=1.0).lr_at(2) == 2.5e-4
