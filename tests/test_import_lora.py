"""import-lora: a tensor adapter fitted to a PEFT LoRA's updates. The fit's objective (evaluated from r x r
products) equals the dense float64 error of the papers' formulas; a LoRA that is itself an exported tensor adapter
is recovered at the same rank on every architecture shape; heads and biases carry over; the saved adapter is a
normal lorta adapter; bad input is refused before anything is written."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_inputs, make_model, output_of
from peft import LoraConfig, PeftModel, get_peft_model
from tolerance import FORWARD_TERMS, MAP_TERMS, eps, tolerance

import lorta
from lorta.export import export_lora
from lorta.import_lora import (
    ImportLoraError,
    LoraUpdate,
    Slices,
    best_cp,
    cp_als,
    import_lora,
    lora_updates,
)
from lorta.lora_fit import squared_errors, tensor_slices
from lorta.tuner.layer import TensorAdapterLayer
from lorta.tuner.maps import module_maps

TARGETS = {"bert": ["query", "key", "value"], "gpt2": ["c_attn"]}
# An exact-rank fit converges to the float32 floor of the factors (a fit that fails is off by O(1)): the exported
# lora_B @ lora_A is the float32 maps' product to MAP_TERMS units, and the fitted factors' float32 maps are the fit's
# to MAP_TERMS more, relative to the updates.
RECOVERED = 2 * MAP_TERMS * eps(torch.float32)
# cp_als adds this ridge (relative to the largest diagonal entry) to every Gram it solves with; tensorly does not.
RIDGE = 1e-13


def _random_lora(arch: str, r: int = 3, seed: int = 0, **kwargs) -> PeftModel:
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=TARGETS.get(arch), **kwargs)
    return get_peft_model(make_model(arch), config)


def _lorta_as_lora(arch: str, tmp_path, config) -> tuple[PeftModel, torch.Tensor]:
    tensor_model = get_peft_model(make_model(arch), config).eval()
    want = output_of(tensor_model, make_inputs(arch))
    export_lora(tensor_model, tmp_path / "lora")
    return PeftModel.from_pretrained(make_model(arch), tmp_path / "lora"), want


def _dense_error(model, updates: dict[str, LoraUpdate]) -> dict[str, torch.Tensor]:
    """The papers' formula in float64: || scale * P Q - (s B A)^T ||_F^2 per module, from dense matrices."""
    out = {}
    for path, layer in model.base_model.model.named_modules():
        if isinstance(layer, TensorAdapterLayer):
            factors = layer.adapter_factors("default")
            P, Q, _ = module_maps(factors, layer.lorta_slots["default"], layer.lorta_out_order)
            delta = layer.lorta_scaling["default"] * P @ Q
            out[path] = ((delta - updates[path].U @ updates[path].V) ** 2).sum()
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("method", ["lorta", "tenslora", "tlora"])
def test_fit_objective_is_the_dense_error(arch, method):
    lora = _random_lora(arch)
    updates = lora_updates(lora)
    configs = {
        "lorta": lorta.LortaConfig(r=4, init_weights=False),
        "tlora": lorta.TLoraConfig(r=4, init_weights=False),
        "tenslora": lorta.TensLoraConfig(r=3, init_weights=False),
    }
    config = configs[method]
    config.target_modules = sorted(updates)
    model = get_peft_model(make_model(arch), config)
    model.base_model.lorta_factors["default"].double()
    fast, dense = squared_errors(model.base_model, updates), _dense_error(model, updates)
    assert set(fast) == set(updates)
    for path in fast:
        scale = float(dense[path]) + updates[path].norm2
        assert abs(float(fast[path] - dense[path])) <= MAP_TERMS * eps(torch.float64) * scale, path


def gram_terms(data: Slices) -> int:
    """Roundings of ||T||^2 from the slices' factors per term: a d- and a d_h-long Gram entry, then S r^2 of them."""
    slices, d, r = data.X.shape
    return slices * r * r + d + data.Y.shape[2]


def bookkeeping_slack(data: Slices, rank: int, error: float = 0.0) -> float:
    """How far cp_als's error bookkeeping sqrt((||T||^2 - 2 <T, CP> + ||CP||^2) / ||T||^2) may sit from the true error
    `error`: its three terms (of size ~||T||^2 for a fit near T) each sum S max(r^2, R) products after the d-, d_h- and
    r- or R-long inner ones and the mode factors' product (3), so e^2 is off by x = 4 n eps and e by
    min(sqrt(x), x / (2 e))."""
    slices, d, r = data.X.shape
    n = slices * max(r * r, rank) + d + data.Y.shape[2] + max(r, rank) + 3
    x = 4 * n * eps(torch.float64)
    return min(math.sqrt(x), x / (2 * error)) if error > 0 else math.sqrt(x)


def _random_slices(shape, r, observed, seed=0) -> tuple[Slices, torch.Tensor, torch.Tensor]:
    """Random rank-r slices at the `observed` (h, l, m) and the dense tensor and mask they stand for."""
    g = torch.Generator().manual_seed(seed)
    d, d_h = shape[:2]
    index = torch.tensor(observed)
    X = torch.randn(len(index), d, r, generator=g, dtype=torch.float64)
    Y = torch.randn(len(index), r, d_h, generator=g, dtype=torch.float64)
    dense, mask = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    for s, (h, layer, m) in enumerate(observed):
        dense[:, :, h, layer, m], mask[:, :, h, layer, m] = X[s] @ Y[s], 1
    return Slices(shape, X, Y, index), dense, mask


def _cp_dense(factors: list[torch.Tensor]) -> torch.Tensor:
    return torch.einsum("ak,ek,hk,lk,mk->aehlm", *factors)


def test_cp_als_takes_tensorlys_steps_without_the_dense_tensor():
    tensorly = pytest.importorskip("tensorly")  # a test dependency: the reference, not used by lorta
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import parafac

    shape, rank = (12, 4, 3, 2, 2), 5
    observed = [(h, layer, m) for h in range(3) for layer in range(2) for m in range(2)]
    data, dense, _ = _random_slices(shape, 2, observed)
    # the slices' Grams vs a rank-2 product per element, then a sum of numel positive squares
    terms = gram_terms(data) + 2 + dense.numel()
    assert data.norm2 == pytest.approx(float((dense**2).sum()), rel=terms * eps(torch.float64))
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape]
    ours, history = cp_als(data, rank, iterations=3, init=init, tol=0)
    with tensorly.backend_context("pytorch"):
        reference = parafac(
            dense,
            rank=rank,
            init=CPTensor((torch.ones(rank, dtype=torch.float64), init)),
            n_iter_max=3,
            tol=0,
            normalize_factors=False,
        )
    # Three sweeps of five normal-equation solves: each moves its factor, relative to the factor, by the Gram's
    # condition number times its relative perturbation (our ridge, and the roundings of the Gram and the right-hand
    # side, reductions of at most numel products in another order: tensorly's unfolded MTTKRP); to first order these
    # add up.
    kappa = sum(_gram_conditions(data, rank, init, sweeps=3))
    relative = kappa * (RIDGE + dense.numel() * eps(torch.float64))
    for got, want in zip(ours, reference.factors, strict=True):
        assert_close_relative(got, want, relative)
    error = float((_cp_dense(ours) - dense).norm() / dense.norm())
    # its own error bookkeeping is the dense error: the bookkeeping's rounding, and the dense side's (the CP's R + 4
    # products per element, then a norm of numel squares)
    slack = bookkeeping_slack(data, rank, error) + (rank + 4 + dense.numel() * error) * eps(torch.float64)
    assert abs(history[-1] - error) <= slack, (history[-1], error, slack)


def _gram_conditions(data: Slices, rank: int, init: list[torch.Tensor], sweeps: int) -> list[float]:
    """The condition numbers of the Grams cp_als solves with in its first `sweeps` sweeps from `init` (every slice
    observed: a mode's Gram is the Hadamard product of the other factors' Grams, the ones updated before it new)."""
    out, factors = [], [f.clone() for f in init]
    for sweep in range(1, sweeps + 1):
        after, _ = cp_als(data, rank, iterations=sweep, init=init, tol=0)
        for mode in range(5):
            current = after[:mode] + factors[mode:]
            gram = torch.ones(rank, rank, dtype=torch.float64)
            for other in range(5):
                if other != mode:
                    gram = gram * (current[other].t() @ current[other])
            out.append(float(torch.linalg.cond(gram)))
        factors = after
    return out


def assert_close_relative(got: torch.Tensor, want: torch.Tensor, relative: float) -> None:
    torch.testing.assert_close(got, want, atol=relative * float(want.abs().max()), rtol=0)


def test_cp_als_leaves_unobserved_slices_out_and_recovers_an_exact_cp():
    shape, rank = (10, 4, 4, 3, 2), 3
    g = torch.Generator().manual_seed(2)
    truth = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape]
    dense = _cp_dense(truth)
    # GQA-like: matrix 1 observes every second head only; layer 2 lacks matrix 1
    observed = [
        (h, layer, m) for h in range(4) for layer in range(3) for m in range(2) if m == 0 or (h % 2 == 0 and layer < 2)
    ]
    X, Y = [], []
    for h, layer, m in observed:  # the slices of the exact CP, as rank-`rank` products
        X.append(truth[0] * (truth[2][h] * truth[3][layer] * truth[4][m]))
        Y.append(truth[1].t())
    data = Slices(shape, torch.stack(X), torch.stack(Y), torch.tensor(observed))
    factors, history = best_cp(data, rank, iterations=2000, seed=0)
    # ALS never increases the true error; each bookkeeping value is within its slack of it
    floor = 2 * bookkeeping_slack(data, rank)
    steps = zip(history, history[1:], strict=False)
    assert all(b <= a + floor for a, b in steps), "ALS must not increase the error"
    mask = torch.zeros(shape, dtype=torch.float64)
    for h, layer, m in observed:
        mask[:, :, h, layer, m] = 1
    fitted = _cp_dense(factors)
    # recovered: the bookkeeping reaches its rounding floor, so the true error e has e^2 <= history^2 + floor^2; the
    # dense error adds its own rounding (the CP's R + 4 products per element against the truth's)
    slack = bookkeeping_slack(data, rank)
    assert history[-1] <= slack
    true_error = float(((fitted - dense) * mask).norm() / (dense * mask).norm())
    assert true_error <= math.sqrt(history[-1] ** 2 + slack**2) + 2 * (rank + 4) * eps(torch.float64)
    # from a start that stalls in a swamp (this one does), the restarts are what recovers it: a stalled fit is off by
    # O(0.1), far above the floor (~1e-7)
    _, stalled = cp_als(data, rank, iterations=300, seed=1, tol=0)
    assert stalled[-1] > 1e-2


def test_tensor_slices_are_the_updates_of_every_layout(tmp_path):
    for arch in ("llama", "gpt2", "bert", "gemma3"):  # GQA, fused interleave-free c_attn, o as input heads
        lora = _random_lora(arch)
        updates = lora_updates(lora)
        model = get_peft_model(make_model(arch), lorta.LortaConfig(r=2, target_modules=sorted(updates)))
        data = tensor_slices(model.base_model, updates)
        assert data is not None
        # both sides from r x r Grams: the slices' (gram_terms), the updates' (r^2 + d_in + d_out, then a sum over
        # the modules)
        lora_terms = max(u.U.shape[1] ** 2 + u.U.shape[0] + u.V.shape[1] for u in updates.values()) + len(updates)
        terms = gram_terms(data) + lora_terms
        assert data.norm2 == pytest.approx(sum(u.norm2 for u in updates.values()), rel=terms * eps(torch.float64))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "bert"])
def test_an_exported_lorta_adapter_is_recovered_at_its_rank(arch, tmp_path):
    config = lorta.LortaConfig(r=3, lora_alpha=6, init_weights=False)
    lora, want = _lorta_as_lora(arch, tmp_path, config)
    model, report = import_lora(lora, "lorta", rank=3)
    assert report.overall <= RECOVERED, report.table()
    assert max(report.per_module.values()) <= RECOVERED, report.table()  # the same floor, module by module
    assert report.tensor_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    got = output_of(model, make_inputs(arch))
    # outputs move by the updates' error (<= RECOVERED, relative) times the model's sensitivity, plus two float32
    # forwards' rounding: a sanity bar at 1% of the adapter's effect, which a failed fit (error O(1)) reaches
    base = output_of(make_model(arch), make_inputs(arch))
    bound = 0.01 * float((want - base).abs().max()) + tolerance(want, 2 * FORWARD_TERMS)
    assert float((got - want).abs().max()) <= bound


def test_tensLoRA_recovers_its_own_export(tmp_path):
    lora, _ = _lorta_as_lora("llama", tmp_path, lorta.TensLoraConfig(r=2, lora_alpha=4, init_weights=False))
    _, report = import_lora(lora, "tenslora", rank=4, seed=0, steps=1000)
    # Adam from the random start (relative error ~1) into a Tucker model that holds the exported one: a convergence
    # bar, 1000 times the float32 floor (RECOVERED), not a rounding tolerance
    assert report.overall <= 1e-2, report.table()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tlora_is_exact_at_the_loras_rank_and_eckart_young_below(arch):
    lora = _random_lora(arch, r=3)
    updates = lora_updates(lora)
    model, report = import_lora(lora, "tlora", rank=3)
    # exact in float64 (closed form); the float32 factors' maps round the fit by < MAP_TERMS units of the update
    assert report.overall <= MAP_TERMS * eps(torch.float32), report.table()
    lora = _random_lora(arch, r=3)
    _, report = import_lora(lora, "tlora", rank=2)
    for path, layer in model.base_model.model.named_modules():  # the optimum: the discarded singular values
        if isinstance(layer, TensorAdapterLayer):
            dense = updates[path].dense()
            slots = layer.lorta_slots["default"]
            order = layer.lorta_out_order
            if order is not None:
                dense = dense[:, torch.argsort(order)]
            optimum = sum(
                float((torch.linalg.svdvals(dense[:, s.out_offset : s.out_offset + s.out_features])[2:] ** 2).sum())
                for s in slots
            )
            want = (optimum / float((dense**2).sum())) ** 0.5
            # the fit's float32 maps move its error by < MAP_TERMS float32 units (triangle inequality), the two float64
            # SVDs (QR, then k x k; dimension <= 128) theirs by ~d eps64
            slack = MAP_TERMS * eps(torch.float32) + 2 * 128 * eps(torch.float64)
            assert abs(report.per_module[path] - want) <= slack, path


def test_fitting_more_rank_fits_a_random_lora_better():
    errors = []
    for rank in (2, 8, 32):
        _, report = import_lora(_random_lora("llama", r=2), "lorta", rank=rank, steps=100)
        errors.append(report.overall)
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] < 1.0  # the fit beats the zero adapter (error 1): a quality check, not a rounding tolerance


def test_heads_and_biases_are_carried_over(tmp_path):
    lora = _random_lora("bert", bias="all")
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    carried = {k: v.clone() for k, v in lora.state_dict().items() if k.endswith(".bias")}
    model, _ = import_lora(lora, "lorta", rank=4, steps=20)
    state = model.state_dict()
    for key, value in carried.items():
        assert torch.equal(state[key.replace(".base_layer", "")] if key not in state else state[key], value), key


def test_classifier_head_is_carried_and_the_saved_adapter_reloads(tmp_path):
    import transformers

    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(make_model("bert").config)
    base.save_pretrained(tmp_path / "base")
    config = LoraConfig(
        r=2,
        init_lora_weights=False,
        target_modules=TARGETS["bert"],
        task_type="SEQ_CLS",
        modules_to_save=["classifier"],
    )
    lora = get_peft_model(base, config)
    with torch.no_grad():
        lora.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    head = lora.base_model.model.classifier.modules_to_save["default"].weight.clone()
    model, report = import_lora(lora, "lorta", rank=4)
    assert torch.equal(model.base_model.model.classifier.modules_to_save["default"].weight, head)
    lorta.save_imported(model, tmp_path / "out", report)
    saved = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert saved["overall"] == report.overall and saved["method"] == "lorta"
    again = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(again, tmp_path / "out").eval()
    inputs = make_inputs("bert")
    assert torch.equal(output_of(loaded, inputs), output_of(model, inputs))  # its factors bit for bit, the same ops


def test_not_a_plain_lora_is_refused():
    with pytest.raises(ImportLoraError, match="use_dora=True"):
        import_lora(_random_lora("llama", use_dora=True))
    tensor = get_peft_model(make_model("llama"), lorta.LortaConfig(r=2))
    with pytest.raises(ImportLoraError, match="takes a LoRA adapter; adapter 'default' is LORTA"):
        import_lora(tensor)
    embedding = get_peft_model(make_model("llama"), LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ImportLoraError, match="embedding LoRA"):
        import_lora(embedding)
    with pytest.raises(ImportLoraError, match="method='loha' is not one of"):
        import_lora(_random_lora("llama"), "loha")


# ----------------------------------------------------------------------------------------------- the CLI
def _cli(*argv: str) -> int:
    from lorta.app.cli import main

    return main(list(argv))


@pytest.fixture
def saved_lora(tmp_path):
    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    tensor_model = get_peft_model(base, lorta.LortaConfig(r=2, lora_alpha=4, init_weights=False)).eval()
    export_lora(tensor_model, tmp_path / "lora")
    return tmp_path


def test_cli_imports_and_reports(saved_lora, capsys):
    root = saved_lora
    assert _cli("import-lora", str(root / "lora"), str(root / "out"), "--rank", "2", "--base", str(root / "base")) == 0
    printed = capsys.readouterr().out
    assert "relative error" in printed and "model.layers.0.self_attn.q_proj" in printed
    report = json.loads((root / "out" / "import_report.json").read_text())
    assert report["overall"] <= RECOVERED
    config = json.loads((root / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORTA" and config["r"] == 2
    # the imported adapter exports again (lorta export defaults to the base it names)
    assert _cli("export", str(root / "out"), str(root / "again")) == 0
    assert (root / "again" / "adapter_model.safetensors").is_file()


def test_cli_bad_input_says_what_and_writes_nothing(saved_lora, capsys, tmp_path_factory):
    root = saved_lora
    lora, out, base = str(root / "lora"), str(root / "out"), str(root / "base")

    def fails(*argv: str, match: str) -> None:
        assert _cli("import-lora", *argv) == 2
        assert match in capsys.readouterr().err
        assert not (root / "out").exists()

    fails(str(root / "nothing"), out, "--base", base, match="holds no adapter_config.json")
    get_peft_model(make_model("llama"), lorta.LortaConfig(r=2)).save_pretrained(root / "tensor")
    fails(str(root / "tensor"), out, "--base", base, match="holds a LORTA adapter; expected one of ['LORA']")
    other = tmp_path_factory.mktemp("other")
    make_model("gpt2").save_pretrained(other)  # another shape, other module names
    fails(lora, out, "--base", str(other), match="does not fit the base model")
    wider = tmp_path_factory.mktemp("wider")
    make_model("mistral").save_pretrained(wider)  # the same module names, other sizes
    fails(lora, out, "--base", str(wider), match="does not fit the base model")
    dora = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(root / "dora")
    fails(str(root / "dora"), out, "--base", base, match="use_dora=True")
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("mine")
    assert _cli("import-lora", lora, out, "--base", base) == 2
    assert "already exists; choose another output folder or pass --overwrite" in capsys.readouterr().err
    assert (root / "out" / "keep.txt").read_text() == "mine"
    for bad, says in (
        (("--method", "loha"), "invalid choice: 'loha'"),
        (("--rank", "0"), "must be a positive"),
        (("--steps", "-1"), "must be an integer >= 0"),
        (("--steps", "many"), "must be an integer >= 0"),
    ):
        with pytest.raises(SystemExit):
            _cli("import-lora", lora, str(root / "x"), *bad)
        assert says in capsys.readouterr().err
    assert not (root / "x").exists()


def test_a_failed_write_leaves_nothing(saved_lora, monkeypatch):
    root = saved_lora

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        _cli("import-lora", str(root / "lora"), str(root / "out"), "--base", str(root / "base"), "--steps", "5")
    assert not (root / "out").exists()
    assert [p.name for p in root.iterdir() if "out" in p.name] == []
