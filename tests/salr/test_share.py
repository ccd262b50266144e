import json

import pytest

from prunedlora.salr import SalrError
from prunedlora.salr.callback import ResidualDampingCallback
from prunedlora.salr.pipeline import ADAPTER_DIR
from prunedlora.salr.share import share_residual
from prunedlora.salr.training import load_for_training
from tests.salr.helpers import train_two_steps


def trained(tiny_salr, tmp_path, mode):
    model, freeze = load_for_training(tiny_salr.out_dir, residual=mode)
    train_two_steps(model, [ResidualDampingCallback(freeze)] if freeze else [], tmp_path)
    model.save_pretrained(tmp_path / mode)
    return tmp_path / mode


def test_frozen_residual_adapters_share_one_merged_base(tiny_salr, tmp_path):
    adapter = trained(tiny_salr, tmp_path, "frozen")
    out = share_residual(
        tiny_salr.out_dir, {"task": adapter, "fresh": tiny_salr.out_dir / ADAPTER_DIR}, tmp_path / "shared"
    )
    config = json.loads((out / "adapters" / "task" / "adapter_config.json").read_text())
    assert config["r"] == tiny_salr.config.task_rank
    assert config["lora_alpha"] == pytest.approx(16.0 / 8 * 4)  # the scaling of rank 8 kept at rank 4
    assert (out / "base" / "model.safetensors").is_file() and (out / "adapters" / "fresh").is_dir()
    # share_residual itself compared the logits of merged base + task adapter with the originals


def test_an_adapter_whose_residual_was_trained_is_refused(tiny_salr, tmp_path):
    adapter = trained(tiny_salr, tmp_path, "trainable")
    with pytest.raises(SalrError, match="residual components moved"):
        share_residual(tiny_salr.out_dir, {"task": adapter}, tmp_path / "shared")
    assert not (tmp_path / "shared").exists()
