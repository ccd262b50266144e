"""`prunedlora serve` and `prunedlora adapters {add,remove,list}`: parsing, and what they print.

Each handler builds arguments for a public function of ``prunedlora.serve`` and imports it lazily,
so ``prunedlora --help`` does not import torch or vLLM. The console side of serving lives here too:
``serve`` (the command's whole run) and ``serve_and_ask`` (the demo's serving step); the server
module itself prints nothing but vLLM's own log.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from prunedlora.serve.lora_ops import DEFAULT_LORA_OPS, LORA_OPS_MODES

if TYPE_CHECKING:
    from prunedlora.serve.config import ServeConfig

DEFAULT_URL = "http://127.0.0.1:8000"


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a base model and many LoRA adapters with vLLM's OpenAI-compatible server",
        description=(
            "Validate every adapter, choose vLLM's LoRA slot settings from them (printed with their padding "
            "cost), and run vLLM's OpenAI-compatible server until Ctrl-C or SIGTERM."
        ),
    )
    serve.add_argument("--model", default="default", help="base model folder, or 'default' (SmolLM2-135M-Instruct)")
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an adapter folder to serve under NAME (repeatable; a bare PATH is named by its folder)",
    )
    serve.add_argument("--adapters-dir", metavar="DIR", help="serve every adapter folder inside DIR, named by folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default: 8000)")
    serve.add_argument("--max-lora-rank", type=int, help="force vLLM's LoRA slot rank (default: smallest that fits)")
    serve.add_argument("--max-loras", type=int, help="adapters one batch may mix (default: adapters, at most 4)")
    serve.add_argument("--max-cpu-loras", type=int, help="adapters kept in host memory (default: all of them)")
    serve.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: what vLLM here is built for"
    )
    serve.add_argument(
        "--dtype",
        default="auto",
        help="vLLM --dtype (auto, float32, bfloat16, float16); on the CPU auto is bfloat16 only where the CPU "
        "computes it natively, else float32",
    )
    serve.add_argument("--max-model-len", type=int, help="vLLM --max-model-len (smaller needs less KV cache)")
    serve.add_argument("--max-num-seqs", type=int, help="vLLM --max-num-seqs")
    serve.add_argument(
        "--kv-cache-gib", type=float, help="KV cache size in GiB (default: vLLM's on a GPU, 4 on the CPU)"
    )
    serve.add_argument(
        "--lora-ops",
        choices=LORA_OPS_MODES,
        default=DEFAULT_LORA_OPS,
        help="LoRA compute in vLLM's CPU workers: rank-aware (each adapter at its own rank per module; default) "
        "or stock (vLLM's own ops, for comparison)",
    )
    serve.add_argument("--served-model-name", help="name of the base model in requests (default: its folder name)")
    serve.add_argument("--log-file", help="vLLM's log (default: ~/.cache/prunedlora/serve/vllm-HOST-PORT.log)")
    serve.add_argument("--quiet", action="store_true", help="write vLLM's log only to the file, not the console")
    serve.add_argument("--dry-run", action="store_true", help="validate and print the slot choice, start nothing")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: more `vllm serve` arguments")
    serve.set_defaults(handler=_serve)

    adapters = subparsers.add_parser("adapters", help="add, remove or list adapters of a running server")
    actions = adapters.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="validate an adapter and load it into a running server")
    add.add_argument("name")
    add.add_argument("path")
    add.add_argument("--url", default=DEFAULT_URL, help=f"the server (default: {DEFAULT_URL})")
    add.add_argument(
        "--max-lora-rank", type=int, help="the server's slot rank (default: what `prunedlora serve` recorded)"
    )
    add.add_argument("--model", help="the server's base model folder (default: what the server lists)")
    add.set_defaults(handler=_adapters_add)
    remove = actions.add_parser("remove", help="unload an adapter from a running server")
    remove.add_argument("name")
    remove.add_argument("--url", default=DEFAULT_URL, help=f"the server (default: {DEFAULT_URL})")
    remove.set_defaults(handler=_adapters_remove)
    listing = actions.add_parser("list", help="the adapters a running server lists")
    listing.add_argument("--url", default=DEFAULT_URL, help=f"the server (default: {DEFAULT_URL})")
    listing.set_defaults(handler=_adapters_list)


def _serve(args) -> int:
    from prunedlora.serve.config import ServeConfig, adapters_from_specs, lora_ops_env
    from prunedlora.serve.server import VllmServer

    extra = list(args.vllm_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    config = ServeConfig(
        model=args.model,
        adapters=adapters_from_specs(args.adapter),
        adapters_dir=args.adapters_dir,
        host=args.host,
        port=args.port,
        max_lora_rank=args.max_lora_rank,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib,
        served_model_name=args.served_model_name,
        log_file=args.log_file,
        echo=not args.quiet,
        extra_args=extra,
        lora_ops=args.lora_ops,
    )
    if args.dry_run:
        server = VllmServer(config)
        print(server.prepare().describe())
        env = {}
        if server.cpu_choice is not None:
            print(server.cpu_choice.line())
            env = {k: v for k, v in server.cpu_choice.apply({}).items() if k not in os.environ}
        env.update(lora_ops_env(config.lora_ops))
        print("$ " + " ".join([*(f"{k}={v}" for k, v in env.items()), *server.command()]))
        return 0
    return serve(config)


def serve(config: ServeConfig, out=None) -> int:
    """``prunedlora serve``: validate, choose slots, print the choice, serve until stopped.

    SIGTERM is turned into a clean stop like Ctrl-C, so a supervisor stopping this process stops vLLM.
    """
    from prunedlora.serve.config import LOOPBACK_HOSTS
    from prunedlora.serve.server import VllmServer

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
        print(
            f"serving {server.served_model_name} and {len(server.adapters)} adapter(s) at {server.url}/v1 "
            "(Ctrl-C stops)",
            file=out,
            flush=True,
        )
        code = server.wait()
        print(f"vLLM exited with code {code}: {server.last_error()}", file=out)
        return code or 1
    except KeyboardInterrupt:
        print("stopping vLLM", file=out, flush=True)
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


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
    from prunedlora.serve.server import VllmServer

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


def _adapters_add(args) -> int:
    from prunedlora.serve.runtime import add_adapter

    info = add_adapter(args.name, args.path, args.url, base_model=args.model, max_lora_rank=args.max_lora_rank)
    print(f"added {args.name} ({info.path}, max module rank {info.max_rank}) to {args.url}")
    return 0


def _adapters_remove(args) -> int:
    from prunedlora.serve.runtime import remove_adapter

    remove_adapter(args.name, args.url)
    print(f"removed {args.name} from {args.url}")
    return 0


def _adapters_list(args) -> int:
    from prunedlora.serve.runtime import list_adapters

    for name in list_adapters(args.url):
        print(name)
    return 0
