"""Shared by the SALR training and sharing tests."""

import torch


def train_two_steps(model, callbacks, tmp_path, **arguments):
    """Two Trainer steps on random tokens (AdamW, lr 1e-2, weight decay 0.1 unless ``arguments`` say otherwise)."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (4, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    settings = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, weight_decay=0.1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        **{**settings, **arguments},
    )
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=callbacks).train()


def scale_residual_gradients(model, rank, scale):
    """Gradient hooks that multiply the residual components' gradients by ``scale``: with plain SGD (no
    momentum, no weight decay) that is exactly SGD at ``scale`` x the learning rate on those components."""
    from prunedlora.salr.residual import lora_layers

    def hook(columns):
        def scale_grad(grad):
            grad = grad.clone()
            if columns:
                grad[:, :rank] *= scale
            else:
                grad[:rank] *= scale
            return grad

        return scale_grad

    for layer in lora_layers(model).values():
        layer.lora_A["default"].weight.register_hook(hook(columns=False))
        layer.lora_B["default"].weight.register_hook(hook(columns=True))
