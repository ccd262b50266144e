"""``adapters add`` refusals, against a stand-in for vLLM's HTTP server (no vLLM here): each refusal
happens before anything is posted to /v1/load_lora_adapter, and the control adds a good adapter
through the same stand-in (so the refusals do not come from a stand-in that cannot work).

Break, made once for each: drop the check in prunedlora/serve/runtime.py -> add_adapter posts the
load request (or fails later with another message) and the test goes red.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from prunedlora.serve.runtime import RuntimeAdapterError, add_adapter
from prunedlora.serve.validate import AdapterValidationError
from tests.serve.helpers import make_adapter


class FakeVllm:
    """Lists a base model (``root`` is its folder) and the given adapters; records load requests."""

    def __init__(self, root: str, adapters=()):
        self.root, self.adapters, self.loads = root, list(adapters), []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                cards = [{"id": "base", "root": fake.root, "parent": None}]
                cards += [{"id": name, "root": f"/adapters/{name}", "parent": "base"} for name in fake.adapters]
                self._send(200, {"object": "list", "data": cards})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                fake.loads.append((self.path, json.loads(self.rfile.read(length) or b"{}")))
                self._send(200, b"Success")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def no_serve_records(tmp_path, monkeypatch):
    """An empty cache: no ``prunedlora serve`` record exists for the stand-in's port unless a test writes one."""
    monkeypatch.setenv("PRUNEDLORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def adapter(vllm_tiny_model_path, tmp_path_factory) -> Path:
    return make_adapter(vllm_tiny_model_path, tmp_path_factory.mktemp("late") / "late", r=4)


def test_control_a_good_adapter_is_validated_then_posted(vllm_tiny_model_path, adapter):
    with FakeVllm(str(vllm_tiny_model_path)) as server:
        info = add_adapter("late", adapter, server.url, max_lora_rank=8)
    assert info.max_rank == 4
    assert server.loads == [("/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(info.path)})]


def test_a_name_already_served_is_refused(vllm_tiny_model_path, adapter):
    with FakeVllm(str(vllm_tiny_model_path), adapters=["late"]) as server:
        with pytest.raises(RuntimeAdapterError, match=r"already serves 'late'; remove it first or pick another name"):
            add_adapter("late", adapter, server.url, max_lora_rank=8)
    assert server.loads == []


def test_without_a_serve_record_the_slot_must_be_given(vllm_tiny_model_path, adapter):
    with FakeVllm(str(vllm_tiny_model_path)) as server:
        with pytest.raises(RuntimeAdapterError, match=r"no `prunedlora serve` record for .*pass --max-lora-rank"):
            add_adapter("late", adapter, server.url)
    assert server.loads == []


def test_a_base_folder_that_is_not_here_is_refused(tmp_path, adapter):
    missing = tmp_path / "gone"
    with FakeVllm(str(missing)) as server:
        with pytest.raises(RuntimeAdapterError, match=r"base model folder .*gone' is not here; pass --model"):
            add_adapter("late", adapter, server.url, max_lora_rank=8)
    assert server.loads == []


def test_the_serve_record_gives_the_slot_and_an_adapter_above_it_is_refused(vllm_tiny_model_path, tmp_path):
    from prunedlora.serve.record import ServeRecord, write_serve_record

    wide = make_adapter(vllm_tiny_model_path, tmp_path / "wide", r=16, target_modules=["q_proj"])
    with FakeVllm("/not/used/when/a/record/exists") as server:
        port = int(server.url.rsplit(":", 1)[1])
        write_serve_record(
            "127.0.0.1",
            port,
            ServeRecord(
                url=server.url,
                model=str(vllm_tiny_model_path),
                served_model_name="base",
                max_lora_rank=8,
                max_loras=1,
                max_cpu_loras=1,
                pid=os.getpid(),
                log_file=str(tmp_path / "log"),
            ),
        )
        with pytest.raises(AdapterValidationError, match=r"needs rank 16 .*above"):
            add_adapter("wide", wide, server.url)
    assert server.loads == []
