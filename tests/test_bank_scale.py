"""The engine behind thousands of resident adapters (tuner/stacks.py, tuner/mixed.py, lorta.bank).

* LoRTA's factored maps ((x @ P0) * w) @ Q0, P0 and Q0 built once per call) are its maps' product P @ Q, to
  float64 rounding;
* rows in any order (the used slots in order: no gather; any permutation; rows of the base and of other groups)
  equal each row run alone;
* adding or evicting one adapter writes one slot: its cost (torch calls) does not grow with the adapters resident,
  and a freed slot is reused;
* an adapter whose tensors do not fit its config is refused and registers nothing.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model
from peft import get_peft_model
from test_mixed import mixed, rows_alone
from tolerance import FORWARD_TERMS, MAP_TERMS, assert_close

import lorta
from lorta.architectures import OUT_HEADS
from lorta.tuner.mixed import engine_for


@pytest.mark.parametrize(
    "modes", [["heads", "layers", "matrices"], ["layers", "matrices"], ["heads", "matrices"], ["heads", "layers"], []]
)
def test_factored_output_is_the_maps_q(modes):
    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=3, modes=modes, init_weights=False)).double()
    factors = model.base_model.lorta_factors["default"]
    checked = 0
    for slots in factors.layout.slots.values():
        for slot in slots:
            if factors.factored_keys(slot) is None:
                continue
            P, Q = factors.maps(slot)
            P0, w, Q0 = factors.input_basis(slot), factors.slot_weights(slot), factors.output_basis(slot).T
            if slot.role == OUT_HEADS:  # q, k, v: P = A, Q = diag(w) Q0
                assert torch.equal(P0, P) and assert_close(w[:, None] * Q0, Q, MAP_TERMS, msg=slot.name) is None
            else:  # o: P = P0 diag(w), Q = A^T
                assert torch.equal(Q0, Q) and assert_close(P0 * w, P, MAP_TERMS, msg=slot.name) is None
            assert_close((P0 * w) @ Q0, P @ Q, MAP_TERMS, msg=slot.name)
            checked += 1
    assert checked == 4 * 3  # q, k, v and o of each of the 3 layers
    every = [slot for slots in factors.layout.slots.values() for slot in slots]
    expected = torch.stack([factors.maps(s)[0].new_ones(3) if not modes else factors.slot_weights(s) for s in every])
    assert torch.equal(factors.slots_weights(every), expected)  # all layers' weights at once (one vmap per call)
    for s in every:  # and each is C_L[l] * C_M[m] of the modes shared, from the factors themselves
        want, (gl, gm) = torch.ones(3, dtype=torch.float64), factors._groups(s)
        if "layers" in modes:
            want = want * factors.C_L[gm, s.layer]
        if "matrices" in modes:
            want = want * factors.C_M[gl, s.matrix]
        assert_close(factors.slot_weights(s), want, MAP_TERMS, msg=s.name)
    keys = {}  # equal keys, on either side, are equal bases
    for slots in factors.layout.slots.values():
        for slot in slots:
            (k_in, k_out), (b_in, b_out) = (
                factors.factored_keys(slot),
                (factors.input_basis(slot), factors.output_basis(slot)),
            )
            for key, basis in ((k_in, b_in), (k_out, b_out)):
                assert torch.equal(keys.setdefault(key, basis), basis), key


def bank_of(n: int, arch: str = "llama", method: str = "lorta"):
    torch.manual_seed(0)
    config = {"lorta": lambda: lorta.LortaConfig(r=2, init_weights=False), "tlora": lambda: lorta.TLoraConfig(r=3)}
    model = get_peft_model(make_model(arch), config[method]()).eval()
    bank = lorta.AdapterBank(model)
    reference = model.base_model.lorta_factors["default"].state_dict()
    for i in range(1, n):
        generator = torch.Generator().manual_seed(i)
        bank.add_state(f"a{i}", model.peft_config["default"].to_dict(), _random_like(reference, generator))
    return model, bank


def _random_like(reference: dict, generator: torch.Generator) -> dict:
    return {k: torch.randn(v.shape, generator=generator) * 0.5 for k, v in reference.items()}


@pytest.mark.parametrize(
    "names",
    [
        ["default", *(f"a{i}" for i in range(1, 8))],  # every slot in order: the rows read the stacks, no gather
        [*(f"a{i}" for i in range(7, 0, -1)), "default"],  # a permutation of them
        ["a5", "__base__", "a2", "a5", "default", "a7", "__base__", "a1"],  # repeats and base rows
    ],
)
def test_rows_in_any_order_equal_each_adapter_alone(names):
    model, _ = bank_of(8)
    inputs = make_inputs("llama", batch=len(names))
    assert_close(mixed(model, inputs, names), rows_alone(model, inputs, names, base=make_model("llama")), FORWARD_TERMS)


def test_a_batch_over_two_groups_of_adapters():
    """Adapters of two ranks in one model: each group serves its rows, the other group's rows get nothing."""
    model, bank = bank_of(3)
    model.add_adapter("t", lorta.LortaConfig(r=3, init_weights=False))
    model.eval()
    names = ["t", "a1", "__base__", "default", "t", "a2"]
    inputs = make_inputs("llama", batch=len(names))
    assert_close(mixed(model, inputs, names), rows_alone(model, inputs, names, base=make_model("llama")), FORWARD_TERMS)
    assert len(engine_for(model.base_model.lorta_state).groups) == 2


def _calls(fn) -> int:
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


@pytest.mark.parametrize("method", ["lorta", "tlora"])
def test_adding_and_evicting_one_adapter_does_not_grow_with_the_bank(method):
    """Adding the 8th or the 200th adapter (and slotting it on the next call) costs the same torch calls; so does
    evicting one. A freed slot is taken by the next adapter, and nothing restacks."""
    model, bank = bank_of(201, method=method)  # both additions below take a freed slot (growing is amortised)
    engine = engine_for(model.base_model.lorta_state)
    inputs = make_inputs("llama", batch=2)
    reference = model.base_model.lorta_factors["default"].state_dict()
    mixed(model, inputs, ["default", "a1"])  # slot all 201
    costs = []
    for n_before, name in ((8, "x8"), (200, "x200")):
        while len(bank) > n_before:
            bank.remove(bank.names[-1])
        mixed(model, inputs, ["default", "a1"])
        state = _random_like(reference, torch.Generator().manual_seed(n_before))
        add = _calls(lambda name=name, state=state: bank.add_state(name, model.peft_config["default"].to_dict(), state))
        slot = _calls(lambda name=name: engine.sync([name]))
        evict = _calls(lambda name=name: (bank.remove(name), engine.sync([])))
        costs.append((add, slot, evict))
    assert costs[0] == costs[1], costs
    group = next(iter(engine.groups.values()))
    capacity = group.capacity
    freed = group.local["a3"]
    bank.remove("a3")
    bank.add_state("new", model.peft_config["default"].to_dict(), _random_like(reference, torch.Generator()))
    names = ["new", "a1", "__base__"]
    inputs = make_inputs("llama", batch=3)
    assert_close(mixed(model, inputs, names), rows_alone(model, inputs, names, base=make_model("llama")), FORWARD_TERMS)
    assert group.local["new"] == freed and group.capacity == capacity
    with pytest.raises(ValueError, match="non-existing adapter.*a3"):
        mixed(model, inputs, ["a3", "a1", "new"])


def test_an_adapter_that_does_not_fit_registers_nothing():
    model, bank = bank_of(3)
    reference = model.base_model.lorta_factors["default"].state_dict()
    layers = model.base_model.lorta_state.book.layers
    before = (list(model.peft_config), list(model.base_model.lorta_factors), [list(m.lorta_slots) for m in layers])
    config = model.peft_config["default"].to_dict()
    bad_shape = {k: torch.zeros(v.shape[0], *v.shape[1:-1], v.shape[-1] + 1) for k, v in reference.items()}
    missing = dict(list(reference.items())[1:])
    for state in (bad_shape, missing, {**reference, "extra": torch.zeros(2)}):
        with pytest.raises(lorta.AdapterFileError, match="'bad'.*does not fit"):
            bank.add_state("bad", config, state)
    with pytest.raises(lorta.AdapterFileError, match="not a registered PEFT method"):
        bank.add_state("bad", {**config, "peft_type": "NOPE"}, reference)
    with pytest.raises(ValueError, match="already loaded"):
        bank.add_state("a1", config, reference)
    after = (list(model.peft_config), list(model.base_model.lorta_factors), [list(m.lorta_slots) for m in layers])
    assert after == before
