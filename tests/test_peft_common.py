"""PEFT's own common test matrix (`PeftCommonTester` and its custom-model, decoder and encoder-decoder testers),
run unchanged against LortaConfig, TensLoraConfig and TLoraConfig.

The test methods are PEFT's (imported from the sdist of the installed peft, see peft_upstream.py); only their
parameter lists are replaced: PEFT's method rows by lorta's, PEFT's hub model ids by tiny local models of the same
architectures (tiny_models.py). A PEFT test that is not parametrized by PEFT's method rows is specific to other
methods (LoRA's DoRA, trainable tokens, prompt learning, ...) and is not collected. The only skips added here are
in `SKIPS`, each with its reason; every other skip is PEFT's own.
"""

from __future__ import annotations

import types

import pytest
import tiny_models
from peft_upstream import import_upstream

import lorta

common = import_upstream("testing_common")
custom = import_upstream("test_custom_models")
decoder = import_upstream("test_decoder_models")
encdec = import_upstream("test_encoder_decoder_models")
encoder = import_upstream("test_feature_extraction_models")

CONFIG_CLASSES = [lorta.LortaConfig, lorta.TensLoraConfig, lorta.TLoraConfig]


def _custom_rows() -> list[tuple[str, str, type, dict]]:
    """PEFT's rows for VeRA (its other shared-factor method), for each lorta method, plus LoRA's dropout row.

    Rows 4 and 5 train both layers of the MLP. PEFT's test_parameters_after_loading_model trains them for 3 SGD
    steps at lr 0.5 on inputs up to 89 (it lowers the lr for VB-LoRA, RandLoRA, UniLoRA and OSF, "otherwise we get
    nan"). There, LoRA's two factors reach 1e20; a product of four or five factors overflows float32 at LoRA's
    default scale alpha / r = 2, so these rows use alpha = 1 (scale 1/8).
    """
    rows = []
    for cls in CONFIG_CLASSES:
        name = cls.__name__.removesuffix("Config")
        both = {"lora_alpha": 1}
        rows += [
            (f"Vanilla MLP 1 {name}", "MLP", cls, {"target_modules": "lin0"}),
            (f"Vanilla MLP 2 {name}", "MLP", cls, {"target_modules": ["lin0"]}),
            (f"Vanilla MLP 3 {name}", "MLP", cls, {"target_modules": ["lin1"]}),
            (f"Vanilla MLP 4 {name}", "MLP", cls, {"target_modules": ["lin0", "lin1"], **both}),
            (f"Vanilla MLP 5 {name}", "MLP", cls, {"target_modules": ["lin0"], "modules_to_save": ["lin1"], **both}),
            (f"Vanilla MLP 6 {name}", "MLP", cls, {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
            (f"Embedding + transformers Conv1D 1 {name}", "EmbConv1D", cls, {"target_modules": ["conv1d"]}),
        ]
    return rows


CUSTOM_ROWS = _custom_rows()
MULTIPLE_ACTIVE_ROWS = [
    (
        f"{cls.__name__.removesuffix('Config')} {kind}",
        "lorta",
        cls,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0" if kind == "Same" else "lin1"], "init_weights": False},
    )
    for cls in CONFIG_CLASSES
    for kind in ("Same", "Different")
]


def _decoder_configs(task_type: str) -> list[tuple[type, dict]]:
    return [
        (lorta.LortaConfig, {"task_type": task_type, "r": 4, "lora_alpha": 8, "target_modules": None}),
        (
            lorta.LortaConfig,
            {
                "task_type": task_type,
                "r": 4,
                "target_modules": None,
                "lora_dropout": 0.05,
                "modes": ["heads", "matrices"],
            },
        ),
        (lorta.TensLoraConfig, {"task_type": task_type, "r": 3, "target_modules": None}),
        (lorta.TLoraConfig, {"task_type": task_type, "r": 4, "target_modules": None, "lora_dropout": 0.05}),
    ]


# PEFT skips its layer-indexing tests for VB-LoRA, VeRA and UniLoRA: "use shared weights, so this generic
# layer-indexing count check is skipped" (it counts parameter TENSORS, and shared factors are one tensor whatever
# the layers). lorta's factors are shared the same way; tests/test_layers.py checks the counts of trainable numbers.
SKIPS = {
    name: "shared factors are one tensor: PEFT's layer-indexing test counts tensors (PEFT skips it for VB-LoRA, "
    "VeRA and UniLoRA alike); the number of trainable values per layer is tested in tests/test_layers.py"
    for name in (
        "test_training_decoders_layer_indexing",
        "test_training_encoder_decoders_layer_indexing",
        "test_training_layer_indexing",
    )
}


def _lorta_supports(skip_helper):
    """PEFT's helper that skips a test for methods it does not know to support something lorta supports."""

    def helper(*args, **kwargs):
        if any(isinstance(a, type) and a in CONFIG_CLASSES for a in args):
            return None
        return skip_helper(*args, **kwargs)

    return helper


@pytest.fixture(autouse=True)
def _lorta_is_supported(monkeypatch):
    """Two of PEFT's skip helpers go by method: transformers' Conv1D (GPT-2) is tested only for LoRA, IA3, LoHa and
    LoKr; and its DeBERTa skip for LoRA's failures matches "lora" inside "tensloraconfig" and "tloraconfig". lorta
    adapts Conv1D and DeBERTa (tests/test_architectures.py), so these tests run for it."""
    monkeypatch.setattr(common, "_skip_if_conv1d_not_supported", _lorta_supports(common._skip_if_conv1d_not_supported))
    monkeypatch.setattr(encoder, "skip_deberta_lora_tests", _lorta_supports(encoder.skip_deberta_lora_tests))


def _ids(values: list) -> list[str] | None:
    if values and isinstance(values[0], str):
        return [tiny_models.short_id(v) for v in values]
    if values and isinstance(values[0], tuple) and len(values[0]) == 2 and isinstance(values[0][0], type):
        return [f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(values)]
    return None


def _reparametrized(cls: type, methods: dict[int, list], models: dict[int, list], name: str) -> type:
    """A subclass of PEFT tester `cls` with PEFT's parametrize lists swapped for lorta's (keyed by the id() of
    PEFT's list): `methods` for the method rows, `models` for the hub models. Tests that are not parametrized by a
    method list are specific to other PEFT methods and are hidden."""
    replacements = {**methods, **models}
    attrs: dict[str, object] = {"__module__": __name__}
    for attr in dir(cls):
        if not attr.startswith("test_"):
            continue
        fn = getattr(cls, attr)
        marks = list(getattr(fn, "pytestmark", []))
        params = [m for m in marks if m.name == "parametrize"]
        if not any(id(m.args[1]) in methods for m in params):
            attrs[attr] = None  # specific to another PEFT method
            continue
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        new.__dict__.update({k: v for k, v in fn.__dict__.items() if k != "pytestmark"})
        new.__qualname__ = f"{name}.{attr}"
        kept = []
        for mark in marks:
            if mark.name == "parametrize" and id(mark.args[1]) in replacements:
                values = replacements[id(mark.args[1])]
                kept.append(pytest.mark.parametrize(mark.args[0], values, ids=_ids(values)).mark)
            else:
                kept.append(mark)
        if attr in SKIPS:
            kept.append(pytest.mark.skip(reason=SKIPS[attr]).mark)
        new.pytestmark = kept
        attrs[attr] = new
    return type(name, (cls,), attrs)


TestLortaCustomModels = _reparametrized(
    custom.TestPeftCustomModel,
    {id(custom.TEST_CASES): CUSTOM_ROWS, id(custom.ALL_PEFT_CONFIG_CLASSES): CONFIG_CLASSES},
    {},
    "TestLortaCustomModels",
)
TestLortaMultipleActiveAdapters = _reparametrized(
    custom.TestMultipleActiveAdapters,
    {id(custom.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES): MULTIPLE_ACTIVE_ROWS},
    {},
    "TestLortaMultipleActiveAdapters",
)
TestLortaDecoderModels = _reparametrized(
    decoder.TestDecoderModels,
    {id(decoder.ALL_CONFIGS): _decoder_configs("CAUSAL_LM")},
    {
        id(decoder.PEFT_DECODER_MODELS_TO_TEST): tiny_models.model_dirs(tiny_models.DECODERS),
        id(decoder.SMALL_GRID_MODELS): tiny_models.model_dirs(tiny_models.SMALL_GRID),
    },
    "TestLortaDecoderModels",
)
TestLortaEncoderDecoderModels = _reparametrized(
    encdec.TestEncoderDecoderModels,
    {id(encdec.ALL_CONFIGS): _decoder_configs("SEQ_2_SEQ_LM")},
    {id(encdec.PEFT_ENCODER_DECODER_MODELS_TO_TEST): tiny_models.model_dirs(tiny_models.ENCODER_DECODERS)},
    "TestLortaEncoderDecoderModels",
)
TestLortaFeatureExtractionModels = _reparametrized(
    encoder.TestPeftFeatureExtractionModel,
    {id(encoder.ALL_CONFIGS): _decoder_configs("FEATURE_EXTRACTION")},
    {id(encoder.PEFT_FEATURE_EXTRACTION_MODELS_TO_TEST): tiny_models.model_dirs(tiny_models.ENCODERS)},
    "TestLortaFeatureExtractionModels",
)
