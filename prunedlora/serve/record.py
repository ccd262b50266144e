"""The record a running ``prunedlora serve`` keeps, so ``prunedlora adapters add --url`` can validate a
new adapter against the base model and slot the server was started with.

It lives under the cache directory keyed by host and port while the server runs, and is removed when
the server that wrote it stops.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prunedlora.models import cache_dir
from prunedlora.serve.config import LOOPBACK_HOSTS
from prunedlora.staging import write_text_atomic


def serve_record_path(host: str, port: int) -> Path:
    """Where a running ``prunedlora serve`` on host:port keeps its record."""
    safe_host = host.replace(":", "_").replace("/", "_")
    return cache_dir() / "serve" / f"{safe_host}-{port}.json"


@dataclass
class ServeRecord:
    """What ``adapters add`` needs to know about a running server."""

    url: str
    model: str
    served_model_name: str
    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int
    pid: int
    log_file: str
    adapters: dict[str, str] = field(default_factory=dict)


def read_serve_record(host: str, port: int) -> ServeRecord | None:
    """The record of a live ``prunedlora serve`` on host:port, or None (a loopback name also finds a
    server on another loopback name or on every interface)."""
    hosts = [host, *LOOPBACK_HOSTS, "0.0.0.0", "::"] if host in LOOPBACK_HOSTS else [host]
    for candidate in dict.fromkeys(hosts):
        path = serve_record_path(candidate, port)
        if not path.is_file():
            continue
        try:
            record = ServeRecord(**json.loads(path.read_text()))
            os.kill(record.pid, 0)
        except (OSError, TypeError, ValueError):
            continue
        return record
    return None


def write_serve_record(host: str, port: int, record: ServeRecord) -> Path:
    """Keep ``record`` for the server on host:port; returns where."""
    return write_text_atomic(serve_record_path(host, port), json.dumps(asdict(record), indent=2) + "\n")


def remove_serve_record(host: str, port: int, pid: int) -> None:
    """Remove the record of host:port if the server with ``pid`` wrote it (a newer server keeps its own)."""
    path = serve_record_path(host, port)
    try:
        if path.is_file() and json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass
