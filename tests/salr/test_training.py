import pytest
import torch

from prunedlora.salr import SalrError
from prunedlora.salr.callback import ResidualDampingCallback
from prunedlora.salr.residual import lora_layers
from prunedlora.salr.training import load_for_training
from tests.salr.helpers import scale_residual_gradients, train_two_steps


def components(model, r):
    return {
        n: (l.lora_A["default"].weight[:r].detach().clone(), l.lora_B["default"].weight[:, :r].detach().clone())
        for n, l in lora_layers(model).items()
    }


@pytest.mark.parametrize("mode", ["frozen", "trainable"])
def test_the_trainer_keeps_a_frozen_residual_and_moves_a_trainable_one(tiny_salr, tmp_path, mode):
    model, freeze = load_for_training(tiny_salr.out_dir, residual=mode)
    r = tiny_salr.config.residual_rank
    before = components(model, r)
    train_two_steps(model, [ResidualDampingCallback(freeze)] if freeze else [], tmp_path)
    after = components(model, r)
    same = all(torch.equal(before[n][0], after[n][0]) and torch.equal(before[n][1], after[n][1]) for n in before)
    assert same == (mode == "frozen")
    assert any(l.lora_B["default"].weight[:, r:].any() for l in lora_layers(model).values())  # the task part learned


def test_the_trainer_steps_a_damped_residual_at_its_fraction_of_the_learning_rate(tiny_salr, tmp_path):
    """Through the Trainer's callbacks, damping at 0.3 equals the residual's gradients scaled by 0.3 under
    plain SGD (no weight decay, no clipping, which would see the scaled gradients): exact over two steps,
    so the snapshot runs before each step and the scaled write after it."""
    r = tiny_salr.config.residual_rank
    sgd = dict(optim="sgd", weight_decay=0.0, max_grad_norm=0.0, learning_rate=0.5)
    damped, damping = load_for_training(tiny_salr.out_dir, residual="trainable", residual_lr_scale=0.3)
    assert damping.scale == 0.3
    train_two_steps(damped, [ResidualDampingCallback(damping)], tmp_path / "damped", **sgd)
    reference, none = load_for_training(tiny_salr.out_dir, residual="trainable")
    assert none is None  # a residual trained at the full rate needs no damping
    scale_residual_gradients(reference, r, 0.3)
    train_two_steps(reference, [], tmp_path / "reference", **sgd)
    start, got, want = (
        components(load_for_training(tiny_salr.out_dir)[0], r),
        components(damped, r),
        components(reference, r),
    )
    for name in got:
        for i in (0, 1):
            torch.testing.assert_close(got[name][i], want[name][i], rtol=0, atol=1e-6)
    assert any(not torch.equal(got[n][0], start[n][0]) for n in got)  # the residual moved


@pytest.mark.parametrize(
    "residual, scale, message",
    [
        ("frozen", 0.1, "applies to a trainable residual"),
        ("trainable", 0.0, r"must be a number in \(0, 1\]"),
        ("trainable", 1.5, r"must be a number in \(0, 1\]"),
        ("thawed", None, "residual must be one of frozen, trainable"),
    ],
)
def test_a_residual_mode_and_scale_that_do_not_fit_are_refused(tiny_salr, residual, scale, message):
    with pytest.raises(SalrError, match=message):
        load_for_training(tiny_salr.out_dir, residual=residual, residual_lr_scale=scale)


def test_a_folder_without_a_record_is_refused(tmp_path):
    with pytest.raises(SalrError, match="missing or damaged"):
        load_for_training(tmp_path)
