"""Where PEFT users already work: TRL's trainers, AutoPeftModel, gradient checkpointing and transformers' own
adapter API, each run end to end on a tiny model, offline, for every method.

Each journey trains a few steps (the loss stays finite, every factor moves), saves, and reloads to the same
outputs; a journey that broke would fail here, not in a user's pipeline.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from methods import METHODS
from peft import PeftModel
from tolerance import BACKWARD_TERMS, FORWARD_TERMS, assert_close

import lorta  # noqa: F401  (registers the methods with PEFT)

pytest.importorskip("trl")
warnings.filterwarnings("ignore", category=UserWarning)

JOURNEY_METHODS = ["lorta", "tenslora-tucker", "tlora"]
WORDS = "the a film movie was is good bad great dull fine awful plot actors love hate and but very not".split()


def tiny_tokenizer():
    """A word-level tokenizer over a 25-word vocabulary (no download), with the special tokens TRL expects."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """A tiny Llama saved as a folder, so adapters record it as their base (AutoPeftModel reloads it from there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        )
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def load_base(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


IDS = torch.tensor([[3, 5, 9, 12, 4, 7], [6, 3, 11, 8, 13, 2]])
TINY_BERT = dict(
    vocab_size=32,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def factors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.base_model.lorta_factors["default"].named_parameters()}


def check_trained_and_reloads(trainer, before: dict[str, torch.Tensor], base_dir: str, tmp_path) -> None:
    """Finite losses, every trainable factor moved, and the saved adapter reloads to the trained outputs."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    model = trainer.model.eval()
    after = factors(model)
    trainable = {n for n, p in model.base_model.lorta_factors["default"].named_parameters() if p.requires_grad}
    assert trainable and all(not torch.equal(after[n], before[n]) for n in trainable), "a factor did not train"
    out = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "adapter")
    assert_close(logits(reloaded), out, FORWARD_TERMS)  # the same weights; only the kernels' order may differ


def trainer_args(config_cls, tmp_path, **extra):
    """Float32 training: TRL turns bf16 on by default, and accelerate then leaves the trained model's forward wrapped
    in bf16 autocast, which would compare a bf16 forward against the reloaded float32 one."""
    return config_cls(
        bf16=False,
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        **extra,
    )


@pytest.mark.parametrize("method", JOURNEY_METHODS)
def test_trl_sft_trainer_trains_a_lorta_peft_config(base_dir, method, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = ["the film was good", "a dull plot and bad actors", "great movie", "not fine very awful"] * 2
    trainer = SFTTrainer(
        model=load_base(base_dir),
        args=trainer_args(SFTConfig, tmp_path, max_length=16),
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tiny_tokenizer(),
        peft_config=METHODS[method](init_weights=False),
    )
    assert isinstance(trainer.model, PeftModel) and trainer.model.peft_config["default"].peft_type == (
        METHODS[method]().peft_type
    )
    before = factors(trainer.model)
    trainer.train()
    check_trained_and_reloads(trainer, before, base_dir, tmp_path)


@pytest.mark.parametrize("method", JOURNEY_METHODS)
def test_trl_dpo_trainer_trains_a_lorta_peft_config(base_dir, method, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = {
        "prompt": ["the film was", "the plot is", "actors were", "a movie"] * 2,
        "chosen": [" good", " great", " fine", " very good"] * 2,
        "rejected": [" bad", " dull", " awful", " not good"] * 2,
    }
    trainer = DPOTrainer(
        model=load_base(base_dir),
        args=trainer_args(DPOConfig, tmp_path, max_length=16),
        train_dataset=Dataset.from_dict(rows),
        processing_class=tiny_tokenizer(),
        peft_config=METHODS[method](init_weights=False),
    )
    before = factors(trainer.model)
    trainer.train()
    check_trained_and_reloads(trainer, before, base_dir, tmp_path)


@pytest.mark.parametrize("method", JOURNEY_METHODS)
def test_auto_peft_model_loads_a_lorta_adapter(base_dir, method, tmp_path):
    from peft import AutoPeftModelForCausalLM, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_base(base_dir), METHODS[method](init_weights=False)).eval()
    out = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()  # the base from its record
    assert isinstance(loaded, PeftModel)
    assert_close(logits(loaded), out, FORWARD_TERMS)


def test_auto_peft_model_for_sequence_classification_loads_a_lorta_adapter(tmp_path):
    from peft import AutoPeftModelForSequenceClassification, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(**TINY_BERT, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    base = BertForSequenceClassification.from_pretrained(tmp_path / "bert")
    model = get_peft_model(base, lorta.LortaConfig(r=3, init_weights=False, task_type="SEQ_CLS")).eval()
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")  # the head is in modules_to_save, saved with the adapter
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_close(loaded(input_ids=IDS).logits, out, FORWARD_TERMS)


@pytest.mark.parametrize("method", JOURNEY_METHODS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(base_dir, method, reentrant):
    """transformers' gradient checkpointing (both recomputation styles), with `enable_input_require_grads()` as
    PEFT users call it for a frozen base, reaches every factor with the gradient of a plain backward."""
    from peft import get_peft_model

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        base = load_base(base_dir)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            base.enable_input_require_grads()
        model = get_peft_model(base, METHODS[method](init_weights=False))
        model.train()  # dropout is 0 in these configs: both runs compute the same function
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in model.base_model.lorta_factors["default"].named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, f"{name}: no gradient"
        # the recomputed forward repeats the same ops; a backward path's reductions bound any reordering
        assert_close(checkpointed[name], grad, BACKWARD_TERMS, msg=name)


def test_transformers_add_adapter_and_load_adapter(base_dir, tmp_path):
    """transformers' own PEFT integration (`model.add_adapter` / `model.load_adapter`). transformers 5.25 refuses
    peft 0.21 in add_adapter ("use a version >= 0.22.0"), so this skips, naming the refusal; the day the versions line
    up it runs. (Its load_adapter goes through PEFT's `inject_adapter_in_model`, which refuses every method whose
    factors live on the tuner, VeRA's included; docs/troubleshooting.md.)"""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_base(base_dir), lorta.LortaConfig(r=3, init_weights=False)).eval()
    out = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    try:
        load_base(base_dir).add_adapter(lorta.LortaConfig(r=3))
    except ValueError as error:
        if "version" not in str(error).lower():
            raise
        pytest.skip(f"the installed transformers refuses the installed peft: {error}")
    base = load_base(base_dir)
    base.load_adapter(str(tmp_path / "adapter"))
    assert_close(logits(base.eval()), out, FORWARD_TERMS)


def test_sentence_transformers_trains_saves_and_reloads_a_lorta_adapter(tmp_path):
    """A SentenceTransformer whose transformer is adapted with lorta trains with its own trainer and saves.
    sentence-transformers' own adapter API goes through transformers' (refused, as above), so the adapter is
    attached with get_peft_model and reloaded with PeftModel.from_pretrained onto the module's model."""
    st = pytest.importorskip("sentence_transformers")
    from datasets import Dataset
    from peft import get_peft_model
    from sentence_transformers import losses, models
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(**TINY_BERT)
    BertModel(config).save_pretrained(tmp_path / "bert")
    tiny_tokenizer().save_pretrained(tmp_path / "bert")

    def sentence_model():
        word = models.Transformer(str(tmp_path / "bert"), max_seq_length=16)
        return st.SentenceTransformer(modules=[word, models.Pooling(32)], device="cpu")

    model = sentence_model()
    model[0].model = get_peft_model(model[0].model, lorta.LortaConfig(r=3, init_weights=False))
    bank = model[0].model.base_model.lorta_factors["default"]
    before = {n: p.detach().clone() for n, p in bank.named_parameters()}
    data = Dataset.from_dict(
        {
            "anchor": ["the film was good", "a dull plot", "great movie", "very awful"] * 2,
            "positive": ["a great movie", "bad actors", "love the film", "not fine"] * 2,
        }
    )
    args = st.SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        bf16=False,
        seed=0,
    )
    trainer = st.SentenceTransformerTrainer(
        model=model, args=args, train_dataset=data, loss=losses.MultipleNegativesRankingLoss(model)
    )
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in bank.named_parameters()), "a factor did not train"
    sentences = ["the film was good", "bad actors"]
    embeddings = model.encode(sentences, convert_to_tensor=True)
    model.save(str(tmp_path / "saved"))  # the transformer module saves the adapter folder
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()
    again = sentence_model()
    again[0].model = PeftModel.from_pretrained(again[0].model, tmp_path / "saved")
    assert_close(again.encode(sentences, convert_to_tensor=True), embeddings, FORWARD_TERMS)


def compile_check(method: str, base_dir: str, backend: str) -> None:
    """torch.compile (fullgraph=False) of an adapted model: no graph break in inference or in a training step, the
    compiled forward and gradients match eager, and a merged model compiles into as many graphs as the bare base."""
    from peft import get_peft_model

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = get_peft_model(load_base(base_dir), METHODS[method](init_weights=False)).eval()
    bare_graphs = torch._dynamo.explain(load_base(base_dir))(input_ids=IDS).graph_count
    inference = torch._dynamo.explain(model)(input_ids=IDS)
    assert inference.graph_break_count == 0, [b.reason for b in inference.break_reasons]
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        assert_close(compiled(input_ids=IDS).logits, logits(model), FORWARD_TERMS)  # fused or reordered ops only

    model.train()
    step = torch._dynamo.explain(model)(input_ids=IDS, labels=IDS)
    assert step.graph_break_count == 0, [b.reason for b in step.break_reasons]
    bank = model.base_model.lorta_factors["default"]

    def grads(fn) -> dict[str, torch.Tensor]:
        model.zero_grad()
        fn(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in bank.named_parameters() if p.requires_grad}

    eager = grads(model)
    for name, grad in grads(torch.compile(model, backend=backend)).items():
        assert grad.abs().sum() > 0, name
        assert_close(grad, eager[name], BACKWARD_TERMS, msg=name)

    merged = model.eval().merge_and_unload()
    assert torch._dynamo.explain(merged)(input_ids=IDS).graph_count == bare_graphs


@pytest.mark.parametrize("method", JOURNEY_METHODS)
def test_torch_compile_traces_without_graph_breaks_and_matches_eager(base_dir, method):
    compile_check(method, base_dir, backend="aot_eager")  # dynamo + AOT autograd, no code generation: seconds


@pytest.mark.slow
@pytest.mark.parametrize("method", JOURNEY_METHODS)
def test_torch_compile_with_inductor_matches_eager(base_dir, method):
    compile_check(method, base_dir, backend="inductor")  # generated kernels: about a minute a method on 2 cores
