"""Train tiny lorta adapters data-parallel on CPU (gloo); launched by tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/dist_scripts/train_factors.py --out DIR --scenarios ddp-lorta-sgd
    accelerate launch --cpu --num_processes 2 tests/dist_scripts/train_factors.py --out DIR --scenarios acc-lorta-adamw

Every rank trains on its slice of one fixed global batch (GLOBAL_BATCH rows, split evenly), so after STEPS steps
the factors must equal a single process trained on the whole batch (`train_single`, which the test runs in its
own process). Scenarios, run one after another in the same process group:

    ddp-<method>-<optim>        DistributedDataParallel
    ddp-gc-<method>-<optim>     DDP + non-reentrant gradient checkpointing
    ddp-gcre-<method>-<optim>   DDP + reentrant checkpointing: must be refused (DistributedSetupError)
    ddp-gcre-static-...         the same with DDP(static_graph=True): allowed, and correct
    fsdp2-<method>-<optim>      FSDP2: fully_shard on every decoder layer, then on the root (the PeftModel)
    fsdp2-layers-<method>-...   fully_shard on the decoder layers only: must be refused
    acc-<method>-<optim>        Accelerate (Accelerator(cpu=True).prepare), saved through accelerator.get_state_dict

For each scenario every rank writes <out>/<scenario>/rank<r>.json (status, error message, losses) and
factors-rank<r>.safetensors (the full factors); rank 0 also saves the adapter with save_pretrained to
<out>/<scenario>/adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest, methods

import torch  # noqa: E402
from conftest import make_model  # noqa: E402
from methods import METHODS  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import lorta  # noqa: E402, F401  (registers the methods, installs the crash-safe save)

GLOBAL_BATCH, LENGTH, STEPS = 4, 10, 3
LR = {"sgd": 0.1, "adamw": 1e-2}


def global_batch() -> torch.Tensor:
    return torch.randint(3, 97, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(5))


def build(method: str):
    """The same adapter on every rank and in the test process (init_weights=False: every factor gets a gradient)."""
    model = get_peft_model(make_model("llama"), METHODS[method](init_weights=False))
    model.train()
    return model


def make_optimizer(model: torch.nn.Module, optim: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=LR[optim]) if optim == "sgd" else torch.optim.AdamW(params, lr=LR[optim])


def factors_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's full factors (a DTensor is gathered: every rank must call this)."""
    bank = model.base_model.lorta_factors["default"]
    out = {}
    for name, tensor in bank.state_dict().items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        out[name] = full.detach().clone().contiguous()
    return out


def train_single(method: str, optim: str, steps: int = STEPS):
    """The single-process run over the whole global batch that every distributed run must reproduce."""
    model = build(method)
    opt = make_optimizer(model, optim)
    ids = global_batch()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def parse(scenario: str) -> tuple[str, str, str]:
    """'ddp-gcre-static-lorta-sgd' -> ('ddp-gcre-static', 'lorta', 'sgd'); method names may hold dashes."""
    kind, _, rest = scenario.partition("-")
    while rest.split("-")[0] in ("gc", "gcre", "static", "layers"):
        flag, _, rest = rest.partition("-")
        kind += "-" + flag
    method, _, optim = rest.rpartition("-")
    return kind, method, optim


def run(scenario: str, out: str, accelerator=None) -> None:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    kind, method, optim = parse(scenario)
    folder = os.path.join(out, scenario)
    os.makedirs(folder, exist_ok=True)
    ids = global_batch()
    per_rank = GLOBAL_BATCH // world
    mine = ids[rank * per_rank : (rank + 1) * per_rank]
    model = build(method)
    if "gc" in kind:
        reentrant = "gcre" in kind
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    result: dict = {"scenario": scenario, "rank": rank, "world": world, "losses": []}
    try:
        if kind.startswith("ddp"):
            wrapped = torch.nn.parallel.DistributedDataParallel(model, static_graph="static" in kind)
            opt = make_optimizer(model, optim)
        elif kind.startswith("fsdp2"):
            from torch.distributed.fsdp import fully_shard

            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            if "layers" not in kind:
                fully_shard(model)
            wrapped, opt = model, make_optimizer(model, optim)
        elif kind == "acc":
            wrapped, opt = accelerator.prepare(model, make_optimizer(model, optim))
        else:
            raise ValueError(f"unknown scenario kind {kind!r}")
        result["wrapper"] = type(wrapped).__name__
        if accelerator is not None:
            result["distributed_type"] = str(accelerator.distributed_type)
        for _ in range(STEPS):
            loss = wrapped(input_ids=mine, labels=mine).loss
            accelerator.backward(loss) if accelerator is not None else loss.backward()
            opt.step()
            opt.zero_grad()
            result["losses"].append(loss.item())
        factors = factors_of(model)
        save_file(factors, os.path.join(folder, f"factors-rank{rank}.safetensors"))
        adapter = os.path.join(folder, "adapter")
        if kind.startswith("fsdp2"):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                model.save_pretrained(adapter, state_dict=full)
        elif accelerator is not None:
            state = accelerator.get_state_dict(wrapped)
            accelerator.unwrap_model(wrapped).save_pretrained(
                adapter, is_main_process=accelerator.is_main_process, state_dict=state
            )
        else:
            model.save_pretrained(adapter, is_main_process=rank == 0)
        result["status"] = "ok"
    except Exception as exc:  # recorded for the test to check; the other scenarios still run
        result.update(status="error", error_type=type(exc).__name__, message=str(exc), traceback=traceback.format_exc())
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", required=True, help="comma-separated, see the module docstring")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scenarios = args.scenarios.split(",")
    accelerator = None
    if any(s.startswith("acc-") for s in scenarios):
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    for scenario in scenarios:
        run(scenario, args.out, accelerator)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
