import json

import pytest
import torch

from prunedlora.salr import CompressedStoreError
from prunedlora.salr.storage import (
    MANIFEST_FILE,
    STORE_FILE,
    check_store,
    load_store,
    pack_bitmap,
    save_store,
    unpack_bitmap,
)


def bits(tensor):
    return tensor.contiguous().view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    )


def sample_tensors(dtype=torch.float32):
    torch.manual_seed(0)
    w = torch.randn(13, 37).to(dtype)
    w[torch.rand(13, 37) < 0.5] = 0
    w[0, 0], w[1, 1], w[2, 2] = -0.0, float("nan"), float("inf")  # bit patterns, not values, decide
    return {"a.weight": w, "b.weight": torch.zeros(8, 8, dtype=dtype), "norm.weight": torch.randn(37).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    tensors = sample_tensors(dtype)
    report = save_store(tensors, ["a.weight", "b.weight"], tmp_path)
    back = load_store(tmp_path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(bits(back[name]), bits(t)), name
    assert report.sparse_tensors == 2 and report.dense_tensors == 1


def test_bitmap_packs_one_bit_per_weight_and_unpacks_exactly():
    keep = torch.rand(1001) < 0.3
    packed = pack_bitmap(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(unpack_bitmap(packed, 1001), keep)


def test_bytes_at_half_sparsity_in_fp32_are_about_1_9x_smaller(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    w[torch.rand_like(w) < 0.5] = 0
    report = save_store({"w": w}, ["w"], tmp_path)
    nnz = int((w != 0).sum())
    assert report.sparse_stored_bytes == nnz * 4 + w.numel() // 8 + 257 * 8
    assert 1.8 < report.sparse_ratio < 2.0
    assert report.file_bytes == (tmp_path / STORE_FILE).stat().st_size


@pytest.fixture
def store(tmp_path):
    save_store(sample_tensors(), ["a.weight", "b.weight"], tmp_path / "store")
    return tmp_path / "store"


def test_a_truncated_file_is_refused(store):
    data = (store / STORE_FILE).read_bytes()
    (store / STORE_FILE).write_bytes(data[: len(data) - 10])
    with pytest.raises(CompressedStoreError, match="truncated"):
        load_store(store)
    (store / STORE_FILE).write_bytes(data[:5])
    with pytest.raises(CompressedStoreError, match="truncated or corrupt"):
        load_store(store)


def test_a_flipped_byte_in_the_values_is_refused(store):
    data = bytearray((store / STORE_FILE).read_bytes())
    data[-3] ^= 0xFF
    (store / STORE_FILE).write_bytes(bytes(data))
    with pytest.raises(CompressedStoreError, match="corrupt: its SHA-256"):
        load_store(store)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["tensors"]["a.weight"].update(shape=[37, 13]), "does not match the tensors"),
        (lambda m: m["tensors"]["a.weight"].update(nnz=1), "does not match the tensors"),
        (lambda m: m["tensors"]["norm.weight"].update(dtype="float16"), "does not match the tensors"),
        (lambda m: m["tensors"].pop("b.weight"), "does not match the tensors"),
        (lambda m: m["tensors"].update(extra={"kind": "dense", "shape": [2], "dtype": "float32"}), "does not match"),
        (lambda m: m.pop("sha256"), "lacks or mistypes"),
        (lambda m: m.update(format="other"), "not prunedlora-sparse-bitmap"),
    ],
)
def test_a_manifest_that_does_not_describe_the_file_is_refused(store, edit, match):
    manifest = json.loads((store / MANIFEST_FILE).read_text())
    edit(manifest)
    (store / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CompressedStoreError, match=match):
        check_store(store)


def test_a_damaged_or_missing_manifest_is_refused(store):
    (store / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CompressedStoreError, match="not valid JSON"):
        load_store(store)
    (store / MANIFEST_FILE).unlink()
    with pytest.raises(CompressedStoreError, match="is missing"):
        load_store(store)
