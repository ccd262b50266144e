import pytest
import torch

from prunedlora.salr import SalrError
from prunedlora.salr.calibration import calibration_batch, input_norms, read_calibration_text


def test_input_norms_are_the_l2_norm_of_each_input_feature_over_all_tokens():
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=128))
    ids = torch.randint(0, 128, (3, 10))
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    norms = input_norms(model, ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"], ids, batch_size=2)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    assert x.shape == (30, 128)
    assert torch.allclose(norms["model.layers.1.mlp.down_proj"], x.norm(dim=0), rtol=1e-5)
    assert norms["model.layers.0.self_attn.q_proj"].shape == (64,)


def test_calibration_text_that_cannot_serve_is_refused(tmp_path, tiny_model_path):
    from transformers import AutoTokenizer

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SalrError, match="is empty"):
        read_calibration_text(empty)
    with pytest.raises(SalrError, match="unreadable"):
        read_calibration_text(tmp_path / "missing.txt")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    with pytest.raises(SalrError, match="fewer than one window"):
        calibration_batch(tokenizer, "a short text", samples=4, length=128)
    batch = calibration_batch(tokenizer, read_calibration_text(None), samples=3, length=16)
    assert batch.shape == (3, 16)


def test_input_grams_are_x_transpose_x_over_all_tokens_and_their_diagonal_is_the_squared_norm():
    from transformers import LlamaForCausalLM

    from prunedlora.salr.calibration import input_grams
    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=128))
    ids = torch.randint(0, 128, (3, 10))
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    name = "model.layers.1.mlp.down_proj"
    gram = input_grams(model, [name], ids, batch_size=2)[name]
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    assert gram.dtype == torch.float64 and gram.shape == (128, 128)
    torch.testing.assert_close(gram, x.T @ x, rtol=1e-9, atol=1e-9)
    norms = input_norms(model, [name], ids, batch_size=2)[name]
    torch.testing.assert_close(gram.diagonal().sqrt().float(), norms, rtol=1e-5, atol=1e-6)
