"""Shared by the SALR training and sharing tests."""

import torch


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
