"""Ask a running vLLM server for an answer, with the standard library only (OpenAI-compatible API)."""

from __future__ import annotations

from prunedlora.errors import PrunedLoraError
from prunedlora.serve.http import http_json


class RequestError(PrunedLoraError):
    """The server answered a request with an error."""


def _post(url: str, endpoint: str, payload: dict, timeout: float) -> dict:
    status, body = http_json(url.rstrip("/") + endpoint, payload, timeout=timeout)
    if status != 200 or not isinstance(body, dict):
        message = body.get("error", {}).get("message", body) if isinstance(body, dict) else body
        raise RequestError(f"{endpoint} for model {payload.get('model')!r} failed ({status}): {message}")
    return body


def complete(
    url: str, model: str, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0, timeout: float = 300.0
) -> str:
    """The text a model (the base's served name or an adapter name) continues ``prompt`` with."""
    body = _post(
        url,
        "/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature},
        timeout,
    )
    return body["choices"][0]["text"]


def chat(
    url: str, model: str, message: str, *, max_tokens: int = 64, temperature: float = 0.0, timeout: float = 300.0
) -> str:
    """A model's reply to one user message, through the model's chat template."""
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": message}],
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    body = _post(url, "/v1/chat/completions", payload, timeout)
    return body["choices"][0]["message"]["content"]
