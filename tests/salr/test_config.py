import pytest

from prunedlora.salr import SalrError, SparsifyConfig


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_the_open_interval_is_refused(sparsity):
    with pytest.raises(SalrError, match="strictly between 0 and 1"):
        SparsifyConfig(sparsity=sparsity)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"pattern": "2:4", "sparsity": 0.3}, "use sparsity 0.5"),
        ({"pattern": "4:8"}, "pattern must be"),
        ({"mask": "random"}, "mask must be"),
        ({"residual": "merged"}, "residual must be"),
        ({"residual_fit": "qr"}, "residual_fit must be"),
        ({"residual_rank": 0, "task_rank": 0}, "positive sum"),
        ({"residual_rank": -1}, "positive sum"),
        ({"sparsity": "half"}, "sparsity must be a finite number"),
        ({"target_modules": []}, "target_modules is empty"),
    ],
)
def test_settings_that_cannot_work_are_refused(fields, match):
    with pytest.raises(SalrError, match=match):
        SparsifyConfig(**fields)


def test_the_lora_rank_is_residual_then_task():
    assert SparsifyConfig(residual_rank=16, task_rank=8).rank == 24
