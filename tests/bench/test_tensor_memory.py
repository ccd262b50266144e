"""LiveTensorBytes counts live tensor storages: new ones once, views never, freed ones no more."""

from __future__ import annotations

import torch

from prunedlora.bench.tensor_memory import LiveTensorBytes

MIB = 2**20


def test_new_storage_counted_until_freed_and_peak_kept():
    with LiveTensorBytes() as mem:
        start = mem.current
        x = torch.zeros(MIB // 4)  # 1 MiB of float32
        assert mem.current - start == MIB
        del x
        assert mem.current == start
        assert mem.peak - start == MIB


def test_views_and_in_place_ops_add_nothing():
    with LiveTensorBytes() as mem:
        x = torch.ones(1024, 256)
        after = mem.current
        x.view(-1)[:10].add_(1)
        x.t()
        assert mem.current == after


def test_tensors_alive_at_entry_are_the_baseline_and_never_counted_twice():
    weight = torch.nn.Parameter(torch.randn(512, 512))
    with LiveTensorBytes() as mem:
        assert mem.baseline >= weight.numel() * 4
        before = mem.current
        weight.detach()[0].mul_(2)
        weight.t()
        assert mem.current == before


def test_backward_gradients_counted_and_marks_record_them():
    weight = torch.nn.Parameter(torch.randn(256, 1024))
    frozen = torch.randn(256, 1024)
    with LiveTensorBytes() as mem:
        x = torch.randn(8, 256, requires_grad=True)
        (x @ frozen).sum().backward()
        without = mem.mark("frozen")
        (x @ weight).sum().backward()
        with_grad = mem.mark("trainable")
    assert with_grad - without >= weight.numel() * 4  # the gradient buffer stays after backward
    assert mem.marks == {"frozen": without, "trainable": with_grad}
    assert mem.peak >= with_grad


def test_reset_peak_measures_one_phase():
    with LiveTensorBytes() as mem:
        big = torch.zeros(MIB)
        del big
        mem.reset_peak()
        small = torch.zeros(16)
        assert mem.peak - mem.current == 0
        assert small.numel() == 16
