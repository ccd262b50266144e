"""The compressed sparse store: each pruned weight as its nonzero values and a 1-bit-per-weight bitmap.

Layout of a store folder:

    sparse_model.safetensors   NAME.values (the nonzeros in row-major order), NAME.bitmap (uint8,
                               one bit per weight, little-endian bit order), NAME.row_offsets
                               (int64, out+1 cumulative counts: row i's values are
                               values[row_offsets[i]:row_offsets[i+1]], what a sparse kernel needs);
                               every other tensor (embeddings, norms) dense under its own name
    sparse_manifest.json       format, each tensor's kind, shape, dtype and nonzero count, the data
                               file's byte count and SHA-256

"Nonzero" means a nonzero bit pattern, so a stored -0.0 (or NaN) is kept as a value and the round trip
is bit-exact for any tensor. Cost per weight at sparsity p and b bytes per value: (1-p) b + 1/8 bytes
against b dense; at 50% in fp32 that is 2.125 against 4 (1.88x), so a bitmap store can never reach
2x at 50%. Reading checks everything before a tensor is built: a truncated file, a manifest that
does not describe the file's tensors, and a file whose bytes changed are each refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prunedlora.metadata import write_json_atomic
from prunedlora.modelfacts import safetensors_header, tensor_data_end
from prunedlora.salr.errors import CompressedStoreError

STORE_FILE = "sparse_model.safetensors"
MANIFEST_FILE = "sparse_manifest.json"
FORMAT = "prunedlora-sparse-bitmap"
VERSION = 1
_PARTS = ("values", "bitmap", "row_offsets")
# torch dtype name <-> safetensors header dtype
_ST_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class StoreReport:
    """Bytes of a store against the same tensors stored dense."""

    file_bytes: int  # the compressed safetensors file
    dense_bytes: int  # every tensor at numel * itemsize
    sparse_dense_bytes: int  # the sparse tensors alone, dense
    sparse_stored_bytes: int  # the sparse tensors' values, bitmaps and row offsets
    sparse_tensors: int
    dense_tensors: int

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.file_bytes

    @property
    def sparse_ratio(self) -> float:
        return self.sparse_dense_bytes / self.sparse_stored_bytes if self.sparse_stored_bytes else float("nan")

    def summary(self) -> str:
        return (
            f"compressed {self.file_bytes:,} bytes vs {self.dense_bytes:,} dense ({self.ratio:.2f}x smaller); "
            f"{self.sparse_tensors} sparse weights {self.sparse_stored_bytes:,} vs {self.sparse_dense_bytes:,} "
            f"({self.sparse_ratio:.2f}x), {self.dense_tensors} tensors kept dense"
        )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nonzero_bits(tensor: torch.Tensor) -> torch.Tensor:
    """True where the element's bit pattern is not all zeros (so -0.0 counts as a value)."""
    return tensor.contiguous().view(_INT_VIEW[tensor.element_size()]) != 0


def pack_bitmap(keep: torch.Tensor) -> torch.Tensor:
    """One bit per element of ``keep`` (row-major, least significant bit first) as uint8."""
    return torch.from_numpy(np.packbits(keep.reshape(-1).numpy(), bitorder="little"))


def unpack_bitmap(bitmap: torch.Tensor, count: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bitmap.numpy(), count=count, bitorder="little").astype(bool))


def compress(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 2-D tensor as values, bitmap and row offsets."""
    keep = nonzero_bits(tensor)
    counts = keep.sum(dim=1, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return {"values": tensor[keep].contiguous(), "bitmap": pack_bitmap(keep), "row_offsets": offsets}


def decompress(parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    numel = math.prod(shape)
    keep = unpack_bitmap(parts["bitmap"], numel)
    out = torch.zeros(numel, dtype=dtype)
    out[keep] = parts["values"]
    return out.reshape(shape)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_store(tensors: dict[str, torch.Tensor], sparse_names, out_dir: str | os.PathLike) -> StoreReport:
    """Write ``tensors`` into ``out_dir``: the 2-D ones named in ``sparse_names`` compressed, the rest
    dense. The caller stages ``out_dir`` (nothing here is atomic on its own)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sparse_names = set(sparse_names)
    unknown = sorted(sparse_names - set(tensors))
    if unknown:
        raise CompressedStoreError(f"no tensor named {unknown[0]} to store sparse")
    payload: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    sparse_dense = sparse_stored = 0
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        entry = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
        if name in sparse_names:
            if tensor.ndim != 2:
                raise CompressedStoreError(
                    f"{name} has shape {tuple(tensor.shape)}; only 2-D weights are stored sparse"
                )
            parts = compress(tensor)
            payload.update({f"{name}.{part}": value for part, value in parts.items()})
            entry.update(kind="sparse", nnz=int(parts["values"].numel()))
            sparse_dense += tensor.numel() * tensor.element_size()
            sparse_stored += sum(v.numel() * v.element_size() for v in parts.values())
        else:
            payload[name] = tensor
            entry["kind"] = "dense"
        entries[name] = entry
    clash = sorted(set(tensors) & {f"{n}.{p}" for n in sparse_names for p in _PARTS})
    if clash:
        raise CompressedStoreError(f"tensor name {clash[0]} collides with a sparse part's name")
    path = out_dir / STORE_FILE
    save_file(payload, str(path), metadata={"format": FORMAT})
    dense = sum(t.numel() * t.element_size() for t in tensors.values())
    report = StoreReport(
        file_bytes=path.stat().st_size,
        dense_bytes=dense,
        sparse_dense_bytes=sparse_dense,
        sparse_stored_bytes=sparse_stored,
        sparse_tensors=len(sparse_names),
        dense_tensors=len(tensors) - len(sparse_names),
    )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "file": STORE_FILE,
        "file_bytes": report.file_bytes,
        "sha256": _sha256(path),
        "dense_bytes": dense,
        "tensors": entries,
    }
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    return report


def _expected_layout(name: str, entry: dict) -> dict[str, tuple[str, list[int]]]:
    """Safetensors key -> (header dtype, shape) that a manifest entry promises."""
    shape, dtype = entry["shape"], _ST_DTYPES.get(entry["dtype"], entry["dtype"])
    if entry["kind"] == "dense":
        return {name: (dtype, shape)}
    numel = math.prod(shape)
    return {
        f"{name}.values": (dtype, [entry["nnz"]]),
        f"{name}.bitmap": ("U8", [(numel + 7) // 8]),
        f"{name}.row_offsets": ("I64", [shape[0] + 1]),
    }


def read_manifest(store_dir: str | os.PathLike) -> dict:
    path = Path(store_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CompressedStoreError(f"{path} is missing; {store_dir} is not a compressed store")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CompressedStoreError(f"{path} is not valid JSON ({err}); the manifest is damaged") from err
    try:
        if manifest["format"] != FORMAT or manifest["version"] != VERSION:
            raise CompressedStoreError(
                f"{path} is format {manifest['format']!r} v{manifest['version']}, not {FORMAT} v{VERSION}"
            )
        for name, entry in manifest["tensors"].items():
            if entry["kind"] not in ("dense", "sparse") or not all(
                isinstance(d, int) and d >= 0 for d in entry["shape"]
            ):
                raise CompressedStoreError(f"{path}: the entry for {name} is malformed")
            if entry["kind"] == "sparse" and (len(entry["shape"]) != 2 or not isinstance(entry["nnz"], int)):
                raise CompressedStoreError(f"{path}: the sparse entry for {name} needs a 2-D shape and an nnz count")
        int(manifest["file_bytes"]), str(manifest["sha256"])
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise CompressedStoreError(f"{path} lacks or mistypes a field ({err}); the manifest is damaged") from err
    return manifest


def check_store(store_dir: str | os.PathLike) -> dict:
    """Everything that can be checked without building a tensor; returns the manifest.

    In order: the manifest parses; the data file is whole (its safetensors header fits and its size is
    the manifest's); the header's tensors are exactly the ones the manifest describes; the bytes hash
    to the manifest's SHA-256 (a flipped byte anywhere, values included).
    """
    store_dir = Path(store_dir)
    manifest = read_manifest(store_dir)
    path = store_dir / manifest["file"]
    if not path.is_file():
        raise CompressedStoreError(f"{path} is missing")
    size = path.stat().st_size
    try:
        header_len, header = safetensors_header(path)
    except (OSError, ValueError) as err:
        raise CompressedStoreError(f"{path} is truncated or corrupt: {err}") from err
    if size != manifest["file_bytes"] or 8 + header_len + tensor_data_end(header) > size:
        raise CompressedStoreError(
            f"{path} is truncated or padded: {size:,} bytes, the manifest records {manifest['file_bytes']:,}"
        )
    expected: dict[str, tuple[str, list[int]]] = {}
    for name, entry in manifest["tensors"].items():
        expected.update(_expected_layout(name, entry))
    found = {k: (v["dtype"], list(v["shape"])) for k, v in header.items() if k != "__metadata__"}
    if found != expected:
        extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
        differ = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        detail = (
            f"{len(missing)} missing (e.g. {missing[0]})"
            if missing
            else f"{len(extra)} unexpected (e.g. {extra[0]})"
            if extra
            else f"{differ[0]} is {found[differ[0]]} but the manifest says {expected[differ[0]]}"
        )
        raise CompressedStoreError(f"{store_dir / MANIFEST_FILE} does not match the tensors of {path}: {detail}")
    if _sha256(path) != manifest["sha256"]:
        raise CompressedStoreError(f"{path} is corrupt: its SHA-256 differs from the manifest's")
    return manifest


def load_store(store_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a store, dense and bit-identical to what was saved."""
    from safetensors.torch import load_file

    manifest = check_store(store_dir)
    raw = load_file(str(Path(store_dir) / manifest["file"]))
    tensors = {}
    for name, entry in manifest["tensors"].items():
        dtype = getattr(torch, entry["dtype"])
        if entry["kind"] == "dense":
            tensors[name] = raw[name]
            continue
        parts = {part: raw[f"{name}.{part}"] for part in _PARTS}
        bits = int(unpack_bitmap(parts["bitmap"], math.prod(entry["shape"])).sum())
        if bits != entry["nnz"] or int(parts["row_offsets"][-1]) != entry["nnz"]:
            raise CompressedStoreError(f"{name}: the bitmap marks {bits} values but the store holds {entry['nnz']}")
        tensors[name] = decompress(parts, tuple(entry["shape"]), dtype)
    return tensors
