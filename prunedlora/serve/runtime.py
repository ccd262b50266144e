"""Add and remove adapters on a running vLLM server through its own endpoints.

vLLM's ``/v1/load_lora_adapter`` loads whatever path it is given inside the engine, and in vLLM 0.32 a
bad adapter can leave the engine dead for every later request. So an adapter is validated here
first, against the server's base model (its /v1/models entry) and slot rank (the record
``prunedlora serve`` keeps, or ``max_lora_rank`` given by the caller); a refused adapter never
reaches vLLM and the server keeps serving the others.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
from pathlib import Path

from prunedlora.errors import PrunedLoraError
from prunedlora.serve.config import check_adapter_name
from prunedlora.serve.http import http_json, served_models
from prunedlora.serve.record import read_serve_record
from prunedlora.serve.validate import AdapterInfo, validate_adapter


class RuntimeAdapterError(PrunedLoraError):
    """The server refused or could not be asked to add or remove an adapter."""


def _base_card(models: dict[str, dict]) -> dict:
    bases = [card for card in models.values() if not card.get("parent")]
    if not bases:
        raise RuntimeAdapterError("the server lists no base model at /v1/models")
    return bases[0]


def _post(url: str, endpoint: str, payload: dict) -> str:
    try:
        status, body = http_json(url.rstrip("/") + endpoint, payload)
    except (OSError, urllib.error.URLError) as err:
        raise RuntimeAdapterError(f"cannot reach {url}: {err}") from err
    if status == 404 and not isinstance(body, dict):
        raise RuntimeAdapterError(
            f"{url} has no {endpoint}; start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (`prunedlora serve` does)"
        )
    if status != 200:
        message = body.get("error", {}).get("message", body) if isinstance(body, dict) else body
        raise RuntimeAdapterError(f"{url}{endpoint} refused it ({status}): {message}")
    return body if isinstance(body, str) else str(body)


def add_adapter(
    name: str,
    path: str | os.PathLike,
    url: str,
    *,
    base_model: str | os.PathLike | None = None,
    max_lora_rank: int | None = None,
) -> AdapterInfo:
    """Validate an adapter against the running server's base model and slot, then load it there.

    ``base_model`` defaults to the folder the server lists for its base model; ``max_lora_rank`` to
    the one ``prunedlora serve`` recorded for this URL. For a server started otherwise, pass it.
    """
    check_adapter_name(name)
    try:
        models = served_models(url)
    except (OSError, urllib.error.URLError) as err:
        raise RuntimeAdapterError(f"cannot reach {url}: {err}") from err
    if name in models:
        raise RuntimeAdapterError(f"{url} already serves {name!r}; remove it first or pick another name")
    parsed = urllib.parse.urlparse(url)
    record = read_serve_record(parsed.hostname or "127.0.0.1", parsed.port or 80)
    if max_lora_rank is None:
        if record is None:
            raise RuntimeAdapterError(
                f"no `prunedlora serve` record for {url}, so its max_lora_rank is unknown; pass --max-lora-rank"
            )
        max_lora_rank = record.max_lora_rank
    if base_model is None:
        base_model = record.model if record is not None else _base_card(models).get("root")
    if not base_model or not Path(base_model).is_dir():
        raise RuntimeAdapterError(f"the server's base model folder {base_model!r} is not here; pass --model")
    info = validate_adapter(path, base_model, name=name, max_lora_rank=max_lora_rank)
    _post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(info.path)})
    return info


def remove_adapter(name: str, url: str) -> None:
    """Unload an adapter from a running server."""
    _post(url, "/v1/unload_lora_adapter", {"lora_name": name})


def list_adapters(url: str) -> list[str]:
    """The adapter names a running server lists (the base model excluded)."""
    try:
        models = served_models(url)
    except (OSError, urllib.error.URLError) as err:
        raise RuntimeAdapterError(f"cannot reach {url}: {err}") from err
    return [model_id for model_id, card in models.items() if card.get("parent")]
