"""``lorta train`` / ``lorta compare`` end to end, with tiny settings (a few steps on small subsets of the data).

The real jobs (the default 400-step run, SmolLM2 prompt classification and DPO) are marked slow.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import PNG_MAGIC, _only_train_command, lorta, metrics_of  # noqa: F401  (autouse fixture)
from tolerance import MINILM_FORWARD_TERMS, eps, tolerance

from lorta.app import cli

TINY = ["--max-train", "48", "--max-test", "32", "--steps", "3", "--batch-size", "8", "--max-length", "32", "--quiet"]
LORA_R8_MINILM = 6 * 4 * 8 * (384 + 384)  # layers x (q, k, v, o) x r x (d_in + d_out) = 147,456
LORTA_R16_MINILM = (384 + 32 + 12 + 6 + 3) * 16  # (d + d_h + H + L + M) * r on q, k, v = 6,992
HEAD_MINILM = 384 * 2 + 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One tiny default-method run shared by the output tests: (output folder, printed summary)."""
    out = tmp_path_factory.mktemp("tiny") / "lorta"
    mp = pytest.MonkeyPatch()
    mp.setattr(cli, "COMMANDS", ("train",))
    try:
        from contextlib import redirect_stdout
        from io import StringIO

        buffer = StringIO()
        with redirect_stdout(buffer):
            assert cli.main(["train", *TINY, "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out, buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# The default method: outputs, summary, reproducibility, resumption
# --------------------------------------------------------------------------------------------------


def test_summary_reports_params_accuracy_time_and_paths(tiny_run: tuple[Path, str]) -> None:
    out, printed = tiny_run
    assert f"{LORTA_R16_MINILM:,} adapter + {HEAD_MINILM:,} head" in printed
    assert f"LoRA r=8 on q,k,v,o: {LORA_R8_MINILM:,}" in printed and "21.1x fewer" in printed
    assert "adapted matrices      key, query, value" in printed
    assert "held-out accuracy" in printed and "wall time" in printed
    for name in ("adapter", "metrics.json", "loss.png"):
        assert str(out / name) in printed


def test_outputs_metrics_png_and_loadable_adapter(tiny_run: tuple[Path, str]) -> None:
    from peft import PeftModel

    from lorta.app.data import load_rotten_tomatoes
    from lorta.app.models import load_for_classification
    from lorta.app.train import evaluate_classifier

    out, _ = tiny_run
    m = metrics_of(out)
    for key in (
        "method",
        "model",
        "rank",
        "adapter_params",
        "head_params",
        "lora_r8_params",
        "accuracy",
        "eval_loss",
        "train_loss",
        "loss_curve",
        "wall_time_s",
        "train_time_s",
        "n_train",
        "n_test",
        "saved",
    ):
        assert key in m, key
    assert (m["method"], m["model"], m["task"], m["rank"]) == ("lorta", "minilm", "sentiment", 16)
    assert (m["adapter_params"], m["head_params"], m["lora_r8_params"]) == (
        LORTA_R16_MINILM,
        HEAD_MINILM,
        LORA_R8_MINILM,
    )
    assert (m["n_train"], m["n_test"], m["steps"]) == (48, 32, 3)
    assert m["targets"] == ["key", "query", "value"]  # the classify recipe keeps LoRTA off o
    assert len(m["loss_curve"]) == 3 and 0.0 <= m["accuracy"] <= 1.0
    png = (out / "loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 2000

    # The saved adapter (factors + classification head) reproduces the reported accuracy.
    ds = load_rotten_tomatoes(max_train=48, max_test=32)
    base, tokenizer = load_for_classification("minilm", 2, label_names=ds.label_names)
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert model.base_model.num_adapter_parameters() == LORTA_R16_MINILM
    again = evaluate_classifier(model, tokenizer, ds.test, max_length=32, quiet=True)
    # The run's evaluation and this one are two float32 MiniLM forwards of the same weights: their logits agree to
    # dz. The mean cross-entropy moves by <= 2 dz (its gradient in the logits has l1 norm <= 2), plus each side's
    # log-softmax (4 roundings at the logits' magnitude) and its float32 sum of n terms (n units of the loss); an
    # argmax can flip only where the two logits are within 2 dz.
    logits = classifier_logits(model, tokenizer, ds.test, max_length=32)
    dz = tolerance(logits, MINILM_FORWARD_TERMS)
    n = len(ds.test)
    near_ties = int(((logits[:, 0] - logits[:, 1]).abs() <= 2 * dz).sum())
    assert abs(again["accuracy"] - m["accuracy"]) <= near_ties / n
    loss_slack = 2 * dz + tolerance(logits, 2 * 4) + n * eps(torch.float32) * m["eval_loss"]
    assert abs(again["eval_loss"] - m["eval_loss"]) <= loss_slack, (again["eval_loss"], m["eval_loss"], loss_slack)


def classifier_logits(model, tokenizer, split, max_length: int) -> torch.Tensor:
    """The classifier's logits on a split, one padded batch (the scale of evaluate_classifier's logits)."""
    from transformers import DataCollatorWithPadding

    from lorta.app.train.evaluate import classify_features

    batch = DataCollatorWithPadding(tokenizer)(classify_features(tokenizer, split, max_length))
    batch.pop("labels")
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def test_same_command_twice_gives_same_metrics(
    tiny_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = tiny_run
    code, _, err = lorta(["train", *TINY, "--out", str(tmp_path / "again")], capsys)
    assert code == 0, err
    a, b = metrics_of(first), metrics_of(tmp_path / "again")
    for key in ("accuracy", "eval_loss", "train_loss", "loss_curve"):
        assert a[key] == b[key], key


def test_resume_reaches_the_same_factors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    args = ["train", *TINY, "--steps", "4", "--save-steps", "2"]
    code, _, err = lorta([*args, "--out", str(tmp_path / "full")], capsys)
    assert code == 0, err
    # An "interrupted" copy: only the step-2 checkpoint survives.
    checkpoint = Path("checkpoints") / "checkpoint-2"
    shutil.copytree(tmp_path / "full" / checkpoint, tmp_path / "cut" / checkpoint)
    code, out, err = lorta([*args, "--out", str(tmp_path / "cut"), "--resume"], capsys)
    assert code == 0, err
    assert "resuming from" in out
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert bool((a[key] == b[key]).all()), key
    assert metrics_of(tmp_path / "full")["accuracy"] == metrics_of(tmp_path / "cut")["accuracy"]


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = lorta(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "r"), "--resume"], capsys)
    assert code == 0, err
    assert "no checkpoint" in out


# --------------------------------------------------------------------------------------------------
# Every method
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "extra", "adapter", "saved"),
    [
        ("lora", [], LORA_R8_MINILM, "adapter"),
        (
            "tenslora",
            ["--rank", "4", "--decomposition", "cp", "--construction", "att_qkv_depth"],
            4 * (384 + 32 + 12 + 3 + 6),
            "adapter",
        ),
        ("tenslora", ["--rank", "2"], 2 * (384 + 32 + 12 + 3 + 6) + 2**5, "adapter"),
        ("tlora", ["--rank", "4"], 2 * 6 * (4 * 4 + 1), "adapter"),
        ("full", [], None, "model"),
        ("head-only", [], 0, "head.safetensors"),
    ],
)
def test_every_method_runs(
    method: str,
    extra: list[str],
    adapter: int | None,
    saved: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["train", "--method", method, *extra, *TINY, "--steps", "1", "--out", str(tmp_path / method)]
    code, out, err = lorta(args, capsys)
    assert code == 0, err
    m = metrics_of(tmp_path / method)
    assert m["method"] == method and m["head_params"] == HEAD_MINILM
    if adapter is not None:
        assert m["adapter_params"] == adapter
    else:  # full: every weight outside the head
        assert m["adapter_params"] > 20_000_000
    assert Path(m["saved"]).name == saved and Path(m["saved"]).exists()
    assert "held-out accuracy" in out


def test_lorta_modes_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--modes", "layers,matrices", "--rank", "4", *TINY, "--steps", "1", "--out", str(tmp_path / "m")]
    code, out, err = lorta(args, capsys)
    assert code == 0, err
    m = metrics_of(tmp_path / "m")
    assert m["modes"] == ["layers", "matrices"]
    assert m["adapter_params"] == (384 + 384 + 6 + 3) * 4  # no heads mode: the head side is one 384-wide factor
    assert "lorta[layers+matrices] r=4" in out


@pytest.mark.parametrize(
    ("method", "targets", "expected", "adapter"),
    [
        ("lorta", "q,v", ["query", "value"], (384 + 32 + 12 + 6 + 2) * 4),
        ("lorta", "q,k,v,o", ["attention.output.dense", "key", "query", "value"], (384 + 32 + 12 + 6 + 4) * 4),
        ("lorta", "query,o", ["attention.output.dense", "query"], (384 + 32 + 12 + 6 + 2) * 4),
        ("lora", "q,v", ["query", "value"], 6 * 2 * 4 * (384 + 384)),
        ("tlora", "k", ["key"], 6 * (4 * 4 + 1)),
    ],
)
def test_targets_flag(
    method: str, targets: str, expected: list[str], adapter: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "train",
        "--method",
        method,
        "--rank",
        "4",
        "--targets",
        targets,
        *TINY,
        "--steps",
        "1",
        "--out",
        str(tmp_path / "t"),
    ]
    code, out, err = lorta(args, capsys)
    assert code == 0, err
    m = metrics_of(tmp_path / "t")
    assert m["targets"] == expected and m["adapter_params"] == adapter
    assert f"adapted matrices      {', '.join(expected)}" in out


def test_target_modules_roles_and_names() -> None:
    from lorta.app.train import UsageError, target_modules

    assert target_modules(["q", "k", "v"], "bert") == ["query", "key", "value"]
    assert target_modules(["o"], "llama") == ["o_proj"]
    assert target_modules(["q", "v", "up_proj"], "qwen2") == ["q_proj", "v_proj", "up_proj"]
    assert target_modules(["q", "k", "v", "o"], "gpt2") == ["c_attn", "attn.c_proj"]  # fused q/k/v: one module
    assert target_modules(["q_proj", "q"], "llama") == ["q_proj"]  # duplicates once
    assert target_modules(["dense"], "unknown-type") == ["dense"]  # names need no known model type
    assert target_modules(None, "bert") is None
    with pytest.raises(UsageError, match=r"computes q, k and v in one module \(c_attn\)"):
        target_modules(["q", "v"], "gpt2")
    with pytest.raises(UsageError, match="does not know the attention module names of model type 'unknown-type'"):
        target_modules(["q"], "unknown-type")
    with pytest.raises(UsageError, match="--targets is empty"):
        target_modules([], "bert")


def test_default_alpha_is_the_recipes_at_any_rank() -> None:
    """A frontier's ranks keep the recipe's alpha (holding alpha / r = 2 at ranks 22-68 was tried and did not help,
    docs/results.md); an explicit --alpha wins."""
    from lorta.app.train import TrainOptions, resolve_options

    assert resolve_options(TrainOptions()).alpha == 32.0
    assert resolve_options(TrainOptions(rank=45)).alpha == 32.0
    assert resolve_options(TrainOptions(rank=45, alpha=8.0)).alpha == 8.0
    assert resolve_options(TrainOptions(method="lora", rank=1)).alpha == 16.0


def test_lortas_classify_lr_grows_like_the_root_of_its_rank() -> None:
    """lr 3e-3 at the recipe's rank 16 and 3e-3 * sqrt(r / 16) at a frontier's ranks (docs/results.md, "Recipe trials"),
    bit-for-bit, so runs made with that --lr are the frontier's; an explicit --lr wins; the baselines, the prompt
    job and DPO keep one lr at every rank."""
    import math

    from lorta.app.train import TrainOptions, resolve_options

    assert resolve_options(TrainOptions()).lr == 3e-3
    for rank in (22, 45, 68):
        assert resolve_options(TrainOptions(rank=rank)).lr == 3e-3 * math.sqrt(rank / 16)
        assert resolve_options(TrainOptions(rank=rank, task="party")).lr == 3e-3 * math.sqrt(rank / 16)
    assert resolve_options(TrainOptions(rank=68)).lr == 0.006184658438426491  # docs/results.md's r = 68 runs
    assert resolve_options(TrainOptions(rank=68, lr=3e-3)).lr == 3e-3
    assert resolve_options(TrainOptions(method="lora", rank=1)).lr == 1e-3
    assert resolve_options(TrainOptions(method="vera", rank=866)).lr == 2e-2
    assert resolve_options(TrainOptions(model="smollm2", rank=175)).lr == 1e-2
    assert resolve_options(TrainOptions(task="dpo", rank=64)).lr == 1e-3


@pytest.mark.parametrize(("schedule", "warmup"), [("linear", 0.3), ("cosine", 0.0), ("constant", 0.3)])
def test_schedule_and_warmup_set_the_lr_of_every_step(
    schedule: str, warmup: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--warmup raises the lr linearly from 0 over ceil(warmup * steps) steps, then --schedule takes it linearly or
    as a half cosine to 0 at the last step, or holds it; metrics.json's lr_curve is the lr of every step."""
    import math
    import sys

    lr, steps = 1e-2, 10
    code, _, err = lorta(
        [
            "train",
            *TINY,
            "--steps",
            str(steps),
            "--lr",
            str(lr),
            "--schedule",
            schedule,
            "--warmup",
            str(warmup),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 0, err
    metrics = metrics_of(tmp_path / "o")
    assert (metrics["schedule"], metrics["warmup"], metrics["weight_decay"]) == (schedule, warmup, 0.0)
    warm = math.ceil(warmup * steps)

    def expected(t: int) -> float:  # the lr of the step after t steps
        if t < warm:
            return lr * t / warm
        done = (t - warm) / (steps - warm)
        return lr * {"linear": 1 - done, "cosine": 0.5 * (1 + math.cos(math.pi * done)), "constant": 1.0}[schedule]

    curve = metrics["lr_curve"]
    assert [step for step, _ in curve] == list(range(1, steps + 1))  # logged at every step (steps // 20 < 1)
    # both sides evaluate the schedule in float64 in <= 8 roundings each (the division, pi * done, the cosine and its
    # argument's error, the sum, the products with lr), at the magnitude lr: 16 units
    for step, value in curve:
        assert abs(value - expected(step - 1)) <= 16 * sys.float_info.epsilon * lr, (step, value)


def test_weight_decay_shrinks_the_adapter_by_lr_times_decay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """AdamW's decay reaches the adapter's optimizer groups: after one step, in which only the zero-initialised B
    has a gradient, the mode factors are their start times (1 - lr * decay) and B is the run without decay's."""
    from safetensors.torch import load_file

    lr, decay = 1e-2, 0.5
    factors = {}
    for wd in (0.0, decay):
        out = tmp_path / f"wd{wd}"
        code, _, err = lorta(
            [
                "train",
                *TINY,
                "--steps",
                "1",
                "--warmup",
                "0",
                "--lr",
                str(lr),
                "--weight-decay",
                str(wd),
                "--rank",
                "4",
                "--out",
                str(out),
            ],
            capsys,
        )
        assert code == 0, err
        tensors = load_file(out / "adapter" / "adapter_model.safetensors")
        factors[wd] = {k.rsplit(".", 1)[-1]: v for k, v in tensors.items() if "lorta_factors" in k}
    assert metrics_of(tmp_path / f"wd{decay}")["weight_decay"] == decay
    for name in ("C_H", "C_L", "C_M"):
        start, decayed = factors[0.0][name], factors[decay][name]
        assert set(start.unique().tolist()) <= {-1.0, 1.0}, name  # untouched without decay: no gradient yet
        # start * (1 - lr * decay) rounds once in float32 on each side, at |start| = 1: 2 units; 4 leaves a factor 2
        assert (decayed - start * (1 - lr * decay)).abs().max() <= 4 * eps(start.dtype), name
    assert factors[0.0]["B"].abs().max() > 0
    assert torch.equal(factors[0.0]["B"], factors[decay]["B"])  # zero at the start, so nothing to decay


def test_the_prompt_and_dpo_jobs_have_their_own_recipes() -> None:
    from lorta.app.train import TrainOptions, resolve_options

    prompt, dpo = resolve_options(TrainOptions(model="smollm2")), resolve_options(TrainOptions(task="dpo"))
    assert (prompt.job, prompt.lr, prompt.alpha) == ("prompt", 1e-2, 16.0)
    assert (dpo.job, dpo.lr, dpo.alpha) == ("dpo", 1e-3, 16.0)
    assert resolve_options(TrainOptions(method="lora", model="smollm2")).lr == 2e-3
    assert resolve_options(TrainOptions(method="lora", task="dpo")).lr == 5e-4
    assert resolve_options(TrainOptions(method="vera", model="smollm2")).lr == 2e-2
    assert resolve_options(TrainOptions(method="vera", task="dpo")).lr == 5e-3


def test_targets_flag_in_the_default_folder_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = lorta(
        ["train", *TINY, "--steps", "1", "--rank", "2", "--targets", "q,attention.output.dense"], capsys
    )
    assert code == 0, err
    assert (tmp_path / "runs" / "lorta-q+attention_output_dense-minilm-sentiment-r2-seed0" / "metrics.json").is_file()


def test_data_order_is_seeded_grouped_and_exact() -> None:
    from lorta.app.train import grouped_order

    lengths = [(i * 37) % 50 + 1 for i in range(1000)]
    order = grouped_order(lengths, batch_size=8, total=2500, seed=0)
    assert order == grouped_order(lengths, batch_size=8, total=2500, seed=0)
    assert order != grouped_order(lengths, batch_size=8, total=2500, seed=1)
    assert len(order) == 2500 and sorted(order[:1000]) == list(range(1000))  # each epoch is a permutation
    spread = [
        max(lengths[i] for i in order[k : k + 8]) - min(lengths[i] for i in order[k : k + 8]) for k in range(0, 1000, 8)
    ]
    assert sum(spread) / len(spread) < 3  # batches hold examples of similar length


def test_lora_reference_count_is_exact() -> None:
    from lorta.app.models import resolve_model
    from lorta.app.train import lora_reference_parameters

    assert lora_reference_parameters(resolve_model("minilm")) == LORA_R8_MINILM
    assert lora_reference_parameters(resolve_model("minilm"), rank=4) == LORA_R8_MINILM // 2


def test_default_output_folder_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = lorta(["train", *TINY, "--steps", "1", "--method", "lora"], capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "lora-minilm-sentiment-r8-seed0" / "metrics.json").is_file()


# --------------------------------------------------------------------------------------------------
# User data
# --------------------------------------------------------------------------------------------------


def _rows(n: int = 60) -> list[dict]:
    good = ["a wonderful, moving film", "brilliant and funny", "a joy from start to finish", "superb acting"]
    bad = ["a dull, lifeless mess", "tedious and far too long", "a waste of a fine cast", "painfully unfunny"]
    return [
        {
            "review": f"{(good if i % 2 else bad)[i % 4]} (take {i})",
            "stars": "pos" if i % 2 else "neg",
            "group": f"film{i % 12}",
        }
        for i in range(n)
    ]


def test_csv_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["review", "stars", "group"])
        writer.writeheader()
        writer.writerows(_rows())
    args = [
        "train",
        "--data",
        str(path),
        "--text-column",
        "review",
        "--label-column",
        "stars",
        *TINY,
        "--out",
        str(tmp_path / "o"),
    ]
    code, out, err = lorta(args, capsys)
    assert code == 0, err
    m = metrics_of(tmp_path / "o")
    assert m["label_names"] == ["neg", "pos"] and m["data"] == str(path)
    assert m["n_train"] + m["n_test"] == 60


def test_jsonl_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "reviews.jsonl"
    path.write_text(
        "".join(
            json.dumps({"text": r["review"], "label": int(r["stars"] == "pos"), "movie": r["group"]}) + "\n"
            for r in _rows()
        ),
        encoding="utf-8",
    )
    code, _, err = lorta(["train", "--data", str(path), *TINY, "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert metrics_of(tmp_path / "o")["label_names"] == ["0", "1"]


# --------------------------------------------------------------------------------------------------
# Errors: a message and exit code 2, never a traceback
# --------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.csv", "Data file not found"),
        (lambda d: _write(d / "cols.csv", "sentence,label\nnice,1\nbad,0\n"), "lacks required column"),
        (lambda d: _write(d / "empty.csv", "text,label\n"), "holds no examples"),
        (
            lambda d: _write(d / "bad.jsonl", '{"text": "fine", "label": 1}\n{"text": "meh", "label": -3}\n'),
            "labels outside the expected set",
        ),
        (lambda d: _write(d / "one.csv", "text,label\nnice,1\ngreat,1\n"), "only one class"),
        (lambda d: _write(d / "notes.txt", "text,label\n"), "Unsupported file extension"),
    ],
)
def test_bad_data_exits_2_with_message(make, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = lorta(["train", "--data", str(make(tmp_path)), *TINY, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert message in err and err.startswith("error: ")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "dora"], "invalid choice: 'dora'"),
        (["--model", "/no/such/model"], "neither a packaged model"),
        (["--task", "dpo", "--model", "minilm"], "needs a causal language model"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--rank", "-1"], "--rank must be >= 1"),
        (["--decomposition", "svd"], "invalid choice: 'svd'"),
        (["--targets", "q,quary"], "--targets 'quary' matches no linear module of this bert model"),
        (["--targets", "q,v", "--method", "full"], "--method full has none"),
        (["--targets", ","], "--targets is empty"),
        (["--schedule", "step"], "invalid choice: 'step'"),
        (["--warmup", "1"], "--warmup is the fraction of --steps spent warming up, in [0, 1); got 1.0"),
        (["--warmup", "-0.1"], "--warmup is the fraction"),
        (["--weight-decay", "-1"], "--weight-decay must be a non-negative number, got -1.0"),
        (["--weight-decay", "nan"], "--weight-decay must be a non-negative number, got nan"),
    ],
)
def test_bad_options_exit_2_with_message(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = lorta(["train", *TINY, *args, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_entry_point_subprocess(tmp_path: Path) -> None:
    """The installed ``lorta`` script: --help lists the flags; a bad data path is a one-line error, exit 2."""
    exe = shutil.which("lorta") or str(Path(sys.executable).with_name("lorta"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    helped = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert helped.returncode == 0, helped.stderr
    for flag in ("--method", "--rank", "--model", "--data", "--out", "--resume", "--save-steps", "--construction"):
        assert flag in helped.stdout
    bad = subprocess.run(
        [exe, "train", "--data", str(tmp_path / "nope.csv")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert "Data file not found" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------


def test_compare_writes_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "compare",
        "--methods",
        "lorta,head-only",
        "--ranks",
        "2,4",
        *TINY,
        "--steps",
        "1",
        "--out",
        str(tmp_path / "cmp"),
    ]
    code, out, err = lorta(args, capsys)
    assert code == 0, err
    table = (tmp_path / "cmp" / "compare.md").read_text(encoding="utf-8")
    assert "| method | rank |" in table and "vs LoRA r=8" in table
    assert "| lorta | 2 | key, query, value | 874 |" in table and "| lorta | 4 | key, query, value | 1,748 |" in table
    assert "| head-only |  | - | 0 |" in table
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 2000
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [(r["method"], r["rank"]) for r in rows] == [("lorta", 2), ("lorta", 4), ("head-only", None)]
    assert "compare.md" in out


def test_compare_rejects_unknown_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = lorta(["compare", "--methods", "lorta,nope", "--out", str(tmp_path)], capsys)
    assert code == 2 and "unknown method" in err


# --------------------------------------------------------------------------------------------------
# Real models and the real default job (slow)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "words"), [("sentiment", [" negative", " positive"]), ("party", [" Democratic", " Republican"])]
)
def test_smollm2_prompt_tiny(task: str, words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "train",
        "--model",
        "smollm2",
        "--task",
        task,
        "--max-train",
        "16",
        "--max-test",
        "8",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--quiet",
        "--out",
        str(tmp_path / "p"),
    ]
    code, out, err = lorta(args, capsys)
    assert code == 0, err
    m = metrics_of(tmp_path / "p")
    assert m["job"] == "prompt" and m["label_words"] == words
    assert m["adapter_params"] == (576 + 64 + 9 + 30 + 4) * 16 and m["head_params"] == 0
    assert 0.0 <= m["accuracy"] <= 1.0 and m["eval_loss"] > 0
    assert (tmp_path / "p" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_smollm2_dpo_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "train",
        "--task",
        "dpo",
        "--max-train",
        "8",
        "--max-test",
        "4",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "64",
        "--quiet",
        "--out",
        str(tmp_path / "d"),
    ]
    code, out, err = lorta(args, capsys)
    assert code == 0, err
    m = metrics_of(tmp_path / "d")
    assert m["job"] == "dpo" and (m["train_pairs"], m["test_pairs"]) == (8, 4)
    assert m["adapter_params"] == (576 + 64 + 9 + 30 + 4) * 16  # TRL's frozen reference copy is not counted
    assert 0.0 <= m["accuracy"] <= 1.0
    assert "held-out reward accuracy" in out
    saved = tmp_path / "d" / "adapter"
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "ref").exists()


@pytest.mark.slow
def test_default_train_job(tmp_path: Path) -> None:
    """``lorta train`` with no arguments: the main job, for real, under 10 minutes with > 70% accuracy."""
    exe = shutil.which("lorta") or str(Path(sys.executable).with_name("lorta"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([exe, "train", "--quiet"], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = metrics_of(tmp_path / "runs" / "lorta-minilm-sentiment-r16-seed0")
    assert m["accuracy"] > 0.70, m["accuracy"]  # the job's quality bar (chance is 0.5), not a rounding tolerance
    assert m["wall_time_s"] < 600, m["wall_time_s"]
    assert m["n_test"] == 2555 and m["adapter_params"] == LORTA_R16_MINILM


# --------------------------------------------------------------------------------------------------
# Installed without the optional packages (pip install lorta, no extras)
# --------------------------------------------------------------------------------------------------


def test_without_matplotlib_the_run_writes_everything_but_the_plot(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec None, import fails
    out = tmp_path / "run"
    code, printed, _ = lorta(["train", *TINY, "--out", str(out)], capsys)
    assert code == 0
    assert "note: the loss plot (loss.png) will not be written: matplotlib is not installed" in printed
    assert "pip install 'matplotlib'" in printed and "not written (pip install matplotlib)" in printed
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "loss.png").exists()
    assert metrics_of(out)["loss_plot"] is None and metrics_of(out)["accuracy"] >= 0


def test_a_missing_required_package_fails_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    from lorta.app.train import jobs

    def no_data(*args, **kwargs):
        raise AssertionError("the job started working before checking its packages")

    monkeypatch.setattr(jobs, "load_data", no_data)
    monkeypatch.setitem(sys.modules, "trl", None)
    out = tmp_path / "dpo"
    code, _, err = lorta(["train", "--task", "dpo", *TINY, "--out", str(out)], capsys)
    assert code == 2
    assert "needs trl>=0.20 for the DPO trainer" in err and "pip install 'trl>=0.20'" in err
    assert not out.exists()


def test_a_gguf_model_without_the_gguf_package_says_how_to_install_it(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LORTA_CACHE", str(tmp_path / "cache"))  # nothing converted yet
    monkeypatch.setitem(sys.modules, "gguf", None)
    code, _, err = lorta(["train", "--model", "smollm2", *TINY, "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "pip install 'gguf>=0.10'" in err


@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_quantized_base_run(tmp_path, capsys, quantize) -> None:
    pytest.importorskip("bitsandbytes")
    out = tmp_path / quantize
    code, printed, err = lorta(["train", *TINY, "--quantize", quantize, "--out", str(out)], capsys)
    assert code == 0, err
    m = metrics_of(out)
    assert m["quantize"] == quantize and m["peak_rss_mb"] > 0 and 0 < m["base_bytes"] < 90 * 2**20
    assert f"({quantize})" in printed and (out / "adapter" / "adapter_model.safetensors").is_file()
    code, _, err = lorta(["train", *TINY, "--method", "full", "--quantize", quantize, "--out", str(out / "f")], capsys)
    assert code == 2 and "do not train" in err
