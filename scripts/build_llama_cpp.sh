#!/usr/bin/env bash
# Build llama-cpp-python from its PyPI sdist (CPU, portable: no -march=native) into lorta's cache, outside the repo,
# install the wheel into the ACTIVE environment and keep the sdist's vendored llama.cpp converters beside it.
# Used by the slow tests of `lorta export --format gguf` (tests/test_export_llama_cpp.py). About 10 minutes on 2
# cores the first time; later runs reuse the cached wheel.
set -euo pipefail
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="$(python -c 'from lorta.app.models import cache_dir; print(cache_dir())')/llama-cpp"
mkdir -p "$cache"
sdist="$cache/llama_cpp_python-$version.tar.gz"
wheel="$(ls "$cache"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -1 || true)"
if [ -z "$wheel" ]; then
  [ -f "$sdist" ] || python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python -m pip wheel -q --no-deps "$sdist" -w "$cache"
  wheel="$(ls "$cache"/llama_cpp_python-"$version"-*.whl | head -1)"
fi
python -m pip install -q --no-deps "$wheel"
python -m pip install -q diskcache  # llama_cpp imports it at start-up
if [ ! -d "$cache/llama.cpp" ]; then
  [ -f "$sdist" ] || python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache"
  tmp="$(mktemp -d)"
  tar xzf "$sdist" -C "$tmp" --wildcards "*/vendor/llama.cpp/convert_lora_to_gguf.py" \
    "*/vendor/llama.cpp/convert_hf_to_gguf.py" "*/vendor/llama.cpp/conversion/*" "*/vendor/llama.cpp/gguf-py/*"
  mv "$tmp"/llama_cpp_python-"$version"/vendor/llama.cpp "$cache/llama.cpp"
  rm -rf "$tmp"
fi
echo "llama-cpp-python $version installed; converters in $cache/llama.cpp"
