"""The Hugging Face Trainer trains, checkpoints and reloads a lorta adapter as it does a LoRA."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model, output_of
from methods import METHODS
from peft import PeftModel, get_peft_model
from tolerance import FORWARD_TERMS, assert_close
from transformers import Trainer, TrainingArguments


class TinyLM(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 97, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_trainer_trains_and_checkpoints(method, tmp_path):
    model = get_peft_model(make_model("llama"), METHODS[method]())
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        save_steps=6,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    data = TinyLM()
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before
    checkpoint = tmp_path / "checkpoint-6"
    assert (checkpoint / "adapter_model.safetensors").exists()
    inputs = make_inputs("llama")
    reloaded = PeftModel.from_pretrained(make_model("llama"), checkpoint)
    model.eval()
    assert_close(output_of(reloaded, inputs), output_of(model, inputs), FORWARD_TERMS)
