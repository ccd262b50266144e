"""Live tensor bytes on any device, CPU included: what a training step really holds, not the process's RSS.

On CPU, a process's peak resident memory mixes the tensors a step needs with everything else (the
interpreter, libraries, the tokenised data, pages the allocator keeps after a free), so two criteria
whose tensors differ by hundreds of MiB can show the same peak RSS. ``LiveTensorBytes`` counts tensor
storages instead: a ``TorchDispatchMode`` sees every ATen op (forward, backward, optimizer, the
pruner's scoring) and records each new output storage's bytes until Python drops its last reference
(a weak reference's callback), so ``current`` is the bytes of live tensor storages and ``peak`` their
maximum. Storages alive when the mode starts (parameters, buffers, anything already allocated) are
counted once, as ``baseline``, and are never counted again when an op returns a view of them.

What it does not see: memory outside tensor storages (the Python heap, library workspaces such as
oneDNN's scratch buffers, allocator slack), and tensors created by code that bypasses the dispatcher
(``torch.load`` of a file, ``torch.from_numpy``) while the mode is on; both are the same for every
criterion of a comparison, which is what it is meant for.

    with LiveTensorBytes() as mem:
        loss = model(**batch).loss
        loss.backward()
        mem.mark("after backward")
    mem.peak, mem.marks["after backward"]
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, sparse, a subclass)
        return None


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages while the mode is on: ``baseline`` (alive at entry), ``current``,
    ``peak`` (both include the baseline), ``marks`` (``current`` at named points) and ``reset_peak()``
    to measure one phase at a time."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[int, weakref.ref]] = {}  # data_ptr -> (bytes, weak ref to storage)
        self.baseline = 0
        self.current = 0
        self.peak = 0
        self.marks: dict[str, int] = {}

    def __enter__(self):
        self._live.clear()
        self.current = 0
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # type(): no lazy module's __getattr__ is woken
                self._track(obj)
        self.baseline = self.peak = self.current
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        st = _storage(t)
        if st is None:
            return
        key, nbytes = st.data_ptr(), st.nbytes()
        if not nbytes or key in self._live:
            return
        ref = weakref.ref(st, lambda _ref, key=key: self._free(key, _ref))
        self._live[key] = (nbytes, ref)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _free(self, key: int, ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[1] is ref:  # not a newer storage at the same address
            del self._live[key]
            self.current -= entry[0]

    def mark(self, name: str) -> int:
        """Record (and return) the live bytes now under ``name``."""
        self.marks[name] = self.current
        return self.current

    def reset_peak(self) -> None:
        self.peak = self.current
