"""The calibration pass: what the inputs of every target linear layer look like.

One forward pass of the dense model over a few fixed-length token windows; a forward hook on each
target module adds up x_j^2 over all tokens (Wanda's ||X_j||_2 = sqrt(sum)), or the whole Gram matrix
X^T X (the whitened residual fit's metric, see ``residual.whitened_residual_factors``). The default text is the
CodeAlpaca slice shipped with the package (no task SALR is evaluated on, so no evaluation text leaks
into the mask); pass a plain text file to calibrate on something else.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from prunedlora.salr.errors import SalrError


def default_calibration_text() -> str:
    from prunedlora.tasks import vendored_data_path

    records = json.loads(vendored_data_path("codealpaca").read_text())
    return "\n\n".join(f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in records)


def read_calibration_text(path: str | os.PathLike | None) -> str:
    if path is None:
        return default_calibration_text()
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise SalrError(f"calibration file {path} is unreadable as text: {err}") from err
    if not text.strip():
        raise SalrError(f"calibration file {path} is empty")
    return text


def text_digest(text: str) -> str:
    """The SHA-256 of a calibration text as read: sparsify records it, and a recipe reusing a folder
    compares it with its own text's, since the mask and the whitened fit depend on the text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def calibration_batch(tokenizer, text: str, samples: int, length: int) -> torch.Tensor:
    """``samples`` consecutive windows of ``length`` tokens from the start of ``text`` (fewer when the
    text is short), so the same text always gives the same batch."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    windows = min(samples, len(ids) // length)
    if windows < 1:
        raise SalrError(f"the calibration text has {len(ids)} tokens, fewer than one window of {length}")
    return ids[: windows * length].reshape(windows, length)


def input_norms(
    model, module_names: list[str], input_ids: torch.Tensor, batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """Module name -> ||X_j||_2 over every calibration token, for each input feature j."""
    sums = _sum_over_inputs(model, module_names, input_ids, batch_size, lambda x: (x * x).sum(dim=0), torch.float32)
    return {name: total.sqrt() for name, total in sums.items()}


def input_grams(
    model, module_names: list[str], input_ids: torch.Tensor, batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """Module name -> X^T X (in x in, float64) over every calibration token; its diagonal is ||X_j||^2."""
    return _sum_over_inputs(model, module_names, input_ids, batch_size, lambda x: x.T @ x, torch.float64)


@torch.no_grad()
def _sum_over_inputs(model, module_names, input_ids, batch_size, statistic, dtype) -> dict[str, torch.Tensor]:
    """Module name -> the sum over calibration batches of ``statistic(X)``, X the (tokens x in) input."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def accumulate(module, args):
            x = args[0].detach().to(dtype).reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + statistic(x)

        return accumulate

    for name in module_names:
        handles.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        model.eval()
        for start in range(0, input_ids.shape[0], batch_size):
            model(input_ids=input_ids[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] for name in module_names}
