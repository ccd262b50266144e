"""The HTTP side of a running vLLM server, with the standard library only: JSON requests (no
proxies), free ports, and the models it lists. Imported by the server (to wait for /health), the
request client and the runtime adapter calls; it imports none of them.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping

from prunedlora.serve.config import ServeError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_json(url: str, payload: dict | None = None, timeout: float = 30.0) -> tuple[int, object]:
    """GET (or POST ``payload`` as JSON) and return (status, parsed body or text); no proxies."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    text = body.decode(errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def served_models(url: str) -> Mapping[str, dict]:
    """The models a vLLM server lists at /v1/models, by id (the base and every adapter)."""
    status, body = http_json(url.rstrip("/") + "/v1/models")
    if status != 200 or not isinstance(body, dict):
        raise ServeError(f"{url}/v1/models answered {status}: {body}")
    return {card["id"]: card for card in body.get("data", [])}
