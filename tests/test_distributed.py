"""Data-parallel training on 2 CPU processes (gloo) through torchrun and accelerate launch.

Every rank trains on its half of one fixed global batch; after 3 steps the factors must equal a single process
trained on the whole batch (the shared factors are registered once, so DDP's reducer and FSDP2 see each once),
and the adapter rank 0 saved must load in this process with the same outputs. Setups that would train the shared
factors with unsynchronised gradients (reentrant checkpointing under DDP, FSDP2 on the layers only) must be
refused. Each launcher runs once per session (tests/dist_scripts/train_factors.py), shared by the tests below
(under pytest-xdist through a file lock).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_inputs, make_model, output_of
from filelock import FileLock
from peft import PeftModel
from safetensors.torch import load_file
from tolerance import BACKWARD_TERMS, FORWARD_TERMS, assert_close, eps

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
import train_factors  # noqa: E402

SCRIPT = Path(__file__).parent / "dist_scripts" / "train_factors.py"

TORCHRUN_SCENARIOS = [
    "ddp-lorta-sgd",
    "ddp-tenslora-tucker-sgd",
    "ddp-tlora-sgd",
    "ddp-lorta-adamw",
    "ddp-gc-lorta-sgd",
    "ddp-gcre-lorta-sgd",
    "ddp-gcre-static-lorta-sgd",
    "fsdp2-lorta-sgd",
    "fsdp2-tenslora-cp-qkv-sgd",
    "fsdp2-layers-lorta-sgd",
]
ACCELERATE_SCENARIOS = ["acc-lorta-adamw", "acc-tlora-seed-only-adamw"]
REFUSED = {"ddp-gcre-lorta-sgd": "use_reentrant", "fsdp2-layers-lorta-sgd": "outside every FSDP unit"}

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONWARNINGS"] = "ignore"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _session_dir(tmp_path_factory) -> Path:
    """This test session's temporary root, shared by its pytest-xdist workers (and only by them)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _launch(name: str, command: list[str], out: Path, tmp_path_factory) -> Path:
    """Run a launcher once per session (xdist workers share it through a lock) and return its output folder."""
    shared = _session_dir(tmp_path_factory)
    with FileLock(str(shared / f"{name}.lock")):
        done = shared / f"{name}.done"
        if done.exists():
            return Path(done.read_text())
        if out.exists():
            shutil.rmtree(out)
        start = time.perf_counter()
        proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
        seconds = time.perf_counter() - start
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        (out / "launch_seconds.txt").write_text(f"{seconds:.1f}\n")
        done.write_text(str(out))
        return out


@pytest.fixture(scope="session")
def torchrun_out(tmp_path_factory) -> Path:
    out = _session_dir(tmp_path_factory) / "torchrun_out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        "--out",
        str(out),
        "--scenarios",
        ",".join(TORCHRUN_SCENARIOS),
    ]
    return _launch("torchrun", command, out, tmp_path_factory)


@pytest.fixture(scope="session")
def accelerate_out(tmp_path_factory) -> Path:
    out = _session_dir(tmp_path_factory) / "accelerate_out"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(SCRIPT),
        "--out",
        str(out),
        "--scenarios",
        ",".join(ACCELERATE_SCENARIOS),
    ]
    return _launch("accelerate", command, out, tmp_path_factory)


_SINGLE: dict[tuple[str, str], torch.nn.Module] = {}


def single(method: str, optim: str) -> torch.nn.Module:
    if (method, optim) not in _SINGLE:
        _SINGLE[(method, optim)] = train_factors.train_single(method, optim).eval()
    return _SINGLE[(method, optim)]


def results(out: Path, scenario: str) -> list[dict]:
    return [json.loads((out / scenario / f"rank{r}.json").read_text()) for r in range(2)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def check_matches_single_process(out: Path, scenario: str) -> None:
    _, method, optim = train_factors.parse(scenario)
    ranks = results(out, scenario)
    assert all(r["status"] == "ok" and r["world"] == 2 for r in ranks), [r.get("traceback") for r in ranks]
    reference = single(method, optim)
    want = train_factors.factors_of(reference)
    got = [load_file(out / scenario / f"factors-rank{r}.safetensors") for r in range(2)]
    assert max_diff(got[0], got[1]) == 0, "the ranks ended with different factors"  # one all-reduced gradient
    start = train_factors.factors_of(train_factors.build(method))
    moved = max((want[k] - start[k]).abs().max().item() for k in want)
    # a sanity bar, 10^4 float32 units of the O(1) factors: a real update, which the comparison below scales with
    assert moved > 1e-3, "training did not move the factors: the comparison would be vacuous"
    # DDP's gradient is the mean of two half-batch gradients, the single process's one full-batch gradient: the
    # same sums in another order (BACKWARD_TERMS rounding units), so every update, and the total movement, agrees
    # to that relative precision (for AdamW too: m / sqrt(v) is scale-free); plus the rounding of the factors.
    magnitude = max(float(v.abs().max()) for v in want.values())
    tol = BACKWARD_TERMS * eps(torch.float32) * moved + 4 * eps(torch.float32) * magnitude
    diff = max_diff(got[0], want)
    assert diff <= tol, f"{scenario}: DDP vs single process {diff:.3g} > {tol:.3g}"
    # the mean of the ranks' losses is the single process's loss at every step (same parameters each step)
    losses = torch.tensor([r["losses"] for r in ranks]).mean(0)
    ids = train_factors.global_batch()
    first = train_factors.build(method)(input_ids=ids, labels=ids).loss.detach()
    assert_close(losses[0], first, FORWARD_TERMS)
    # the adapter rank 0 saved loads anywhere: exactly its factors, hence exactly the outputs of a model holding them
    loaded = PeftModel.from_pretrained(make_model("llama"), out / scenario / "adapter")
    assert max_diff(train_factors.factors_of(loaded), got[0]) == 0
    holder = train_factors.build(method)
    holder.base_model.lorta_factors["default"].load_state_dict(
        {k.removeprefix("base_model.lorta_factors.default."): v for k, v in got[0].items()}, strict=False
    )
    holder.eval()
    inputs = make_inputs("llama")
    torch.testing.assert_close(output_of(loaded, inputs), output_of(holder, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("scenario", ["ddp-lorta-sgd", "ddp-tenslora-tucker-sgd", "ddp-tlora-sgd", "ddp-lorta-adamw"])
def test_torchrun_ddp_equals_single_process(torchrun_out, scenario):
    check_matches_single_process(torchrun_out, scenario)


@pytest.mark.parametrize("scenario", ["ddp-gc-lorta-sgd", "ddp-gcre-static-lorta-sgd"])
def test_ddp_with_gradient_checkpointing_equals_single_process(torchrun_out, scenario):
    check_matches_single_process(torchrun_out, scenario)


@pytest.mark.parametrize("scenario", ["fsdp2-lorta-sgd", "fsdp2-tenslora-cp-qkv-sgd"])
def test_fsdp2_fully_shard_equals_single_process(torchrun_out, scenario):
    ranks = results(torchrun_out, scenario)
    assert all(r.get("status") == "ok" for r in ranks), [r.get("traceback") for r in ranks]
    check_matches_single_process(torchrun_out, scenario)


def test_fsdp2_and_ddp_give_the_same_factors(torchrun_out):
    ddp = load_file(torchrun_out / "ddp-lorta-sgd" / "factors-rank0.safetensors")
    fsdp = load_file(torchrun_out / "fsdp2-lorta-sgd" / "factors-rank0.safetensors")
    start = train_factors.factors_of(train_factors.build("lorta"))
    moved = max((ddp[k] - start[k]).abs().max().item() for k in ddp)
    magnitude = max(float(v.abs().max()) for v in ddp.values())
    # two reductions of the same gradients in other orders (see check_matches_single_process)
    assert max_diff(ddp, fsdp) <= BACKWARD_TERMS * eps(torch.float32) * moved + 4 * eps(torch.float32) * magnitude


@pytest.mark.parametrize("scenario", sorted(REFUSED))
def test_unsynchronised_setups_are_refused_on_every_rank(torchrun_out, scenario):
    for rank in results(torchrun_out, scenario):
        assert rank["status"] == "error" and rank["error_type"] == "DistributedSetupError", rank
        assert REFUSED[scenario] in rank["message"] and rank["losses"] == []
        assert not (torchrun_out / scenario / "adapter").exists()


@pytest.mark.parametrize("scenario", ACCELERATE_SCENARIOS)
def test_accelerate_launch_ddp_equals_single_process(accelerate_out, scenario):
    ranks = results(accelerate_out, scenario)
    assert {r.get("distributed_type") for r in ranks} == {"DistributedType.MULTI_CPU"}
    assert {r.get("wrapper") for r in ranks} == {"DistributedDataParallel"}
    check_matches_single_process(accelerate_out, scenario)


def test_rank0_save_is_complete_and_atomic(torchrun_out, accelerate_out):
    for out in (torchrun_out, accelerate_out):
        leftovers = [p.name for p in out.rglob(".adapter.*")]
        assert not leftovers, f"temporary save directories left behind: {leftovers}"
        for adapter in out.glob("*/adapter"):
            assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}


def _has_train_command() -> bool:
    try:
        from lorta.app.commands import train  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_train_command(), reason="lorta train is not available")
def test_lorta_train_under_torchrun(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "lorta.app.cli", "train", "--help"], env=_env(), capture_output=True, text=True
    ).stdout
    flags = ["--steps", "--out", "--max-train", "--max-test", "--batch-size", "--quiet"]
    if not all(f in help_text for f in flags):
        pytest.skip(f"lorta train lacks some of {flags}")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lorta.app.cli",
        "train",
        "--steps",
        "2",
        "--max-train",
        "32",
        "--max-test",
        "16",
        "--batch-size",
        "4",
        "--quiet",
        "--out",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list((tmp_path / "run").rglob("adapter_model.safetensors"))
