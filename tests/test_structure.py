"""The shape of the package: the library core below the app, no import circles, no method named outside its file,
and a core that imports without the CLI's extras."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lorta"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every lorta module `name` imports, at module level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _is_app(name: str) -> bool:
    return name == "lorta.app" or name.startswith("lorta.app.")


def test_no_core_module_imports_the_app():
    bad = {name: sorted(filter(_is_app, deps)) for name, deps in GRAPH.items() if not _is_app(name)}
    assert not {n: d for n, d in bad.items() if d}


def test_the_import_graph_has_no_circles():
    """Package __init__ files that gather their submodules are left out of the edges into them (a submodule
    importing its sibling through the package is an edge to the sibling, not to the package)."""
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            if MODULES[dep].name == "__init__.py" and node.startswith(dep + "."):
                continue  # a submodule reading its own package's __init__
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles


METHOD_NAME = re.compile(r"(?<![a-z])t(ens)?lora", re.IGNORECASE)
TOKEN = re.compile(r"[\w.\-]+")  # a string that is one name ("tlora", "TLoraConfig"), not prose
# the files that may name a method: its own, the registry's tuple, and the package's explicit lists of public names
NAMING_ALLOWED = {"methods/tlora.py", "methods/tenslora.py", "registry.py", "__init__.py", "methods/__init__.py"}


def _method_names(path: Path) -> list[str]:
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value if TOKEN.fullmatch(node.value) else None
        elif isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Attribute):
            text = node.attr
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            text = node.name
        elif isinstance(node, ast.alias):
            text = node.asname or node.name
        elif isinstance(node, ast.arg):
            text = node.arg
        elif isinstance(node, ast.keyword):
            text = node.arg
        else:
            continue
        if text and METHOD_NAME.search(text):
            hits.append(f"{getattr(node, 'lineno', '?')}: {text}")
    return hits


def test_no_method_is_named_outside_its_own_file_and_the_registry():
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() not in NAMING_ALLOWED:
            hits += [f"{path.relative_to(SRC.parent)}:{hit}" for hit in _method_names(path)]
    for path in sorted((SRC.parent / "benchmarks").glob("*.py")):
        hits += [f"{path.relative_to(SRC.parent)}:{hit}" for hit in _method_names(path)]
    assert not hits


EXTRAS = ("tqdm", "matplotlib", "trl", "gguf")  # lorta[cli]
# transformers and huggingface_hub import tqdm themselves, so it cannot be blocked: the core is checked not to
# import it (test_the_core_imports_no_cli_extra); the others are blocked outright.
BLOCKED = ("matplotlib", "trl", "gguf")


def test_the_core_imports_no_cli_extra():
    found = []
    for name, path in MODULES.items():
        if _is_app(name):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            found += [f"{name}: {n}" for n in names if n.split(".")[0] in EXTRAS]
    # export_gguf reads gguf lazily, inside the function, and says what to install when it is missing
    assert found == ["lorta.export: gguf"]


def _run(code: str) -> subprocess.CompletedProcess:
    blocker = f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", blocker + code], capture_output=True, text=True, timeout=300, env=None, check=False
    )


def test_the_library_works_without_the_cli_extras():
    done = _run(
        "import torch, lorta\n"
        "from peft import get_peft_model\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,\n"
        "    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4))\n"
        "model = get_peft_model(model, lorta.LortaConfig(r=2))\n"
        "model(input_ids=torch.tensor([[1, 2, 3]]))\n"
        f"assert not [m for m in {BLOCKED!r} if sys.modules.get(m) is not None]\n"
        "print('ok')\n"
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_the_cli_runs_without_the_extras_and_names_the_one_a_job_misses():
    done = _run(
        "from lorta.app import cli\n"
        "assert cli.main(['params', 'llama-2-7b', '--method', 'lora', '-r', '4']) == 0\n"
        "from lorta.app.train.options import check_requirements\n"
        "from lorta.extras import MissingDependencyError\n"
        "try:\n"
        "    check_requirements('dpo')\n"
        "except MissingDependencyError as exc:\n"
        "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trl" in done.stdout and "pip install" in done.stdout and "lorta[cli" in done.stdout


_SAVE_LORA = """
import sys, torch
{prelude}
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=4))
model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
model.save_pretrained(sys.argv[1])
"""


def test_a_plain_peft_lora_saves_the_same_bytes_with_and_without_lorta(tmp_path):
    """`import lorta` wraps PeftModel.save_pretrained (lorta.save_hook) for lorta models only."""
    files = {}
    for prelude in ("", "import lorta"):
        out = tmp_path / (prelude or "plain").replace(" ", "_")
        done = subprocess.run(
            [sys.executable, "-c", _SAVE_LORA.format(prelude=prelude), str(out)],
            env={**os.environ, "PYTHONHASHSEED": "0"},  # PEFT writes target_modules, a set, in hash order
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        files[prelude] = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert "adapter_model.safetensors" in files[""]
    assert files[""] == files["import lorta"]
