import pytest
import torch

from prunedlora.salr import SalrError
from prunedlora.salr.residual import lora_layers
from prunedlora.salr.training import FrozenResidualCallback, load_for_training
from tests.salr.helpers import train_two_steps


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
    train_two_steps(model, [FrozenResidualCallback(freeze)] if freeze else [], tmp_path)
    after = components(model, r)
    same = all(torch.equal(before[n][0], after[n][0]) and torch.equal(before[n][1], after[n][1]) for n in before)
    assert same == (mode == "frozen")
    assert any(l.lora_B["default"].weight[:, r:].any() for l in lora_layers(model).values())  # the task part learned


def test_a_folder_without_a_record_is_refused(tmp_path):
    with pytest.raises(SalrError, match="missing or damaged"):
        load_for_training(tmp_path)
