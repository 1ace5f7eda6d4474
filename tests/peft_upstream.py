"""PEFT's own test suite (tests/ of the peft sdist of the INSTALLED version), fetched once into lorta's cache.

Nothing of PEFT's tests is copied into this repository: `scripts/install.sh test` (or the first test run) downloads
the sdist of exactly the installed peft from the package registry, extracts its tests/ folder (with PEFT's
LICENSE) into `<cache>/peft-tests/<version>/peft_upstream_tests/` and imports it from there as a package.

    python tests/peft_upstream.py          # fetch now (what install.sh does); prints the folder
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

PACKAGE = "peft_upstream_tests"


def cache_root() -> Path:
    """lorta's cache folder: $LORTA_CACHE, else $HF_HOME/lorta, else $XDG_CACHE_HOME/lorta or ~/.cache/lorta."""
    if os.environ.get("LORTA_CACHE"):
        return Path(os.environ["LORTA_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "lorta"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorta"


def peft_version() -> str:
    from importlib.metadata import version

    return version("peft")


def tests_root(version: str | None = None) -> Path:
    """The folder that holds the `peft_upstream_tests` package for `version` (default: the installed peft)."""
    return cache_root() / "peft-tests" / (version or peft_version())


def fetch(version: str | None = None) -> Path:
    """Download and unpack PEFT's tests for `version` unless they are there already; returns `tests_root`."""
    version = version or peft_version()
    root = tests_root(version)
    if (root / PACKAGE / "testing_common.py").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"peft=={version}",
            "--dest",
            tmp,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("peft-*.tar.gz"))
        if done.returncode or not archives:
            raise RuntimeError(
                f"could not download the peft {version} sdist to get PEFT's own tests ({' '.join(command)}):\n"
                f"{done.stderr.strip()[-2000:]}\nRun `bash scripts/install.sh test` where the package registry "
                "can be reached, or set LORTA_CACHE to a folder that already holds peft-tests/"
            )
        staging = Path(tmp) / "staging" / PACKAGE
        staging.mkdir(parents=True)
        with tarfile.open(archives[0]) as archive:
            top = f"peft-{version}/"
            for member in archive.getmembers():
                name = member.name
                if not member.isfile():
                    continue
                if name.startswith(top + "tests/") or name == top + "LICENSE":
                    relative = name[len(top + "tests/") :] if "/tests/" in name else "LICENSE"
                    if "/" in relative and not relative.endswith(".py"):
                        continue  # fixture data of tests lorta does not run
                    target = staging / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.extractfile(member) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
        (staging / "__init__.py").write_text(f'"""PEFT {version} tests/, unpacked from its sdist (Apache-2.0)."""\n')
        final = staging.parent
        moved = root.parent / f".{root.name}.{uuid.uuid4().hex[:8]}"
        final.rename(moved)
        try:
            moved.rename(root)  # atomic; another process may have won the race, which is fine
        except OSError:
            shutil.rmtree(moved, ignore_errors=True)
    if not (root / PACKAGE / "testing_common.py").is_file():
        raise RuntimeError(f"PEFT's tests were not unpacked into {root}")
    return root


def import_upstream(module: str):
    """Import `peft_upstream_tests.<module>` from the cache (fetching it first when missing)."""
    import importlib

    root = str(fetch())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{PACKAGE}.{module}")


if __name__ == "__main__":
    print(fetch() / PACKAGE)
