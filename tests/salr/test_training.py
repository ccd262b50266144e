import pytest
import torch

from prunedlora.salr import SalrError
from prunedlora.salr.residual import lora_layers
from prunedlora.salr.training import FrozenResidualCallback, load_for_training


def components(model, r):
    return {
        n: (l.lora_A["default"].weight[:r].detach().clone(), l.lora_B["default"].weight[:, :r].detach().clone())
        for n, l in lora_layers(model).items()
    }


def train_two_steps(model, callbacks, tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (4, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=callbacks).train()


@pytest.mark.parametrize("mode", ["frozen", "trainable"])
def test_the_trainer_keeps_a_frozen_residual_and_moves_a_trainable_one(tiny_salr, tmp_path, mode):
    model, freeze = load_for_training(tiny_salr.out_dir, residual=mode)
    r = tiny_salr.config.residual_rank
    before = components(model, r)
    train_two_steps(model, [FrozenResidualCallback(freeze)] if freeze else [], tmp_path)
    after = components(model, r)
    same = all(torch.equal(before[n][0], after[n][0]) and torch.equal(before[n][1], after[n][1]) for n in before)
    assert same == (mode == "frozen")
    assert any(l.lora_B["default"].weight[:, r:].any() for l in lora_layers(model).values())  # the task part learned


def test_a_folder_without_a_record_is_refused(tmp_path):
    with pytest.raises(SalrError, match="missing or damaged"):
        load_for_training(tmp_path)
