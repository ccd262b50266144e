import pytest
import torch

from prunedlora.salr.mask import dropped_count, keep_mask, two_four_mask, wanda_scores


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.37])
def test_unstructured_magnitude_removes_exactly_its_share_of_the_smallest(sparsity):
    torch.manual_seed(0)
    weight = torch.randn(48, 80)
    keep = keep_mask(weight, sparsity)
    assert int((~keep).sum()) == dropped_count(weight.numel(), sparsity)
    assert weight[~keep].abs().max() <= weight[keep].abs().min()


def test_ties_are_broken_by_position_the_same_way_every_time():
    weight = torch.ones(4, 8)
    keep = keep_mask(weight, 0.25)
    expected = torch.ones(32, dtype=torch.bool)
    expected[:8] = False  # equal scores: the earliest weights go first
    assert torch.equal(keep.reshape(-1), expected)
    assert torch.equal(keep_mask(weight, 0.25), keep)
    assert torch.equal(keep_mask(torch.ones(2, 8), 0.5, "2:4"), torch.tensor([[0, 0, 1, 1] * 2] * 2).bool())


def test_two_four_keeps_the_two_largest_of_every_four_inputs():
    torch.manual_seed(1)
    weight = torch.randn(16, 32)
    keep = two_four_mask(weight.abs())
    groups = keep.reshape(16, 8, 4)
    assert torch.equal(groups.sum(-1), torch.full((16, 8), 2))
    w = weight.abs().reshape(16, 8, 4)
    assert (w.masked_fill(~groups, float("inf")).amin(-1) >= w.masked_fill(groups, -1.0).amax(-1)).all()


def test_two_four_needs_inputs_in_fours():
    from prunedlora.salr import SalrError

    with pytest.raises(SalrError, match="divisible by 4"):
        keep_mask(torch.randn(4, 6), 0.5, "2:4")


def test_wanda_weighs_by_input_norm_and_compares_within_rows():
    torch.manual_seed(2)
    weight = torch.randn(8, 16)
    norms = torch.ones(16)
    norms[3] = 0.0  # an input that never fires: its weights go first, whatever their size
    weight[:, 3] = 100.0
    keep = keep_mask(weight, 0.25, input_norm=norms)
    assert not keep[:, 3].any()
    assert torch.equal((~keep).sum(1), torch.full((8,), dropped_count(16, 0.25)))
    assert torch.equal(wanda_scores(weight, norms), weight.abs() * norms)


def test_real_weights_zero_fraction_and_two_four_are_exact(real_weights):
    for name, weight in real_weights.items():
        keep = keep_mask(weight, 0.5)
        sparse = torch.where(keep, weight, torch.zeros(()))
        assert int((~keep).sum()) == weight.numel() // 2, name
        assert (sparse == 0).sum() >= weight.numel() // 2
        keep24 = keep_mask(weight, 0.5, "2:4")
        assert torch.equal(
            keep24.reshape(weight.shape[0], -1, 4).sum(-1), torch.full((weight.shape[0], weight.shape[1] // 4), 2)
        )
