"""One vLLM engine of the latency bench, in its own process: start, warm up, measure, exit.

``max_lora_rank`` and ``max_loras`` are engine settings, so every slot configuration needs a fresh
engine; a process per engine also returns all of its memory to the machine when it exits and keeps a
dead engine from taking the rest of the bench with it. Run as::

    python -m prunedlora.bench.latency_worker SPEC.json RESULT.json

SPEC (written by ``prunedlora.bench.latency``) names the model, the engine settings (with the LoRA
ops mode, ``stock`` or ``rank-aware``), the adapters, the prompts (token ids) and the measurements;
RESULT is rewritten after every measurement, so what was measured survives a timeout. RESULT's
engine record says which LoRA ops vLLM's workers really built (``lora_ops_in_use``), and a
measurement marked ``per_adapter`` (the mixed-rank batch) also has each adapter's own summary.

The measured call is vLLM's offline throughput path (``vllm bench throughput``'s ``LLM.generate``
over all prompts at once, ``ignore_eos`` and a fixed output length) with vLLM's per-request
statistics switched on for TTFT/TPOT/E2E.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from prunedlora.metadata import write_json_atomic


def _engine(spec: dict):
    """(engine-like object with .llm and .lora_request, description) for the spec's settings."""
    from prunedlora.bench.slot_memory import BENCH_WORKER_EXTENSION

    settings = spec["engine"]
    common = dict(
        dtype=settings.get("dtype", "auto"),
        enforce_eager=settings.get("enforce_eager", True),
        max_model_len=settings.get("max_model_len"),
        seed=settings.get("seed", 0),
        disable_log_stats=False,  # per-request metrics (RequestOutput.metrics) need stats on
        # The warm-up runs the same prompts: with prefix caching the measured batch would skip its prefill.
        enable_prefix_caching=False,
        worker_extension_cls=BENCH_WORKER_EXTENSION,
    )
    if settings.get("kv_cache_bytes"):
        common["kv_cache_memory_bytes"] = int(settings["kv_cache_bytes"])
    if settings.get("max_num_seqs"):
        common["max_num_seqs"] = int(settings["max_num_seqs"])
    if not settings.get("lora"):
        from vllm import LLM

        class _Base:
            def __init__(self):
                self.llm = LLM(model=spec["model"], **common)

            def lora_request(self, name):
                if name is not None:
                    raise ValueError("the base engine has no adapters")
                return None

        return _Base()
    from prunedlora.serve.engine import OfflineEngine
    from prunedlora.serve.lora_ops import DEFAULT_LORA_OPS

    kv_bytes = common.pop("kv_cache_memory_bytes", None)
    return OfflineEngine(
        spec["model"],
        kv_cache_gib=None if kv_bytes is None else kv_bytes / 2**30,
        adapters=spec["adapters"],
        max_lora_rank=settings["max_lora_rank"],
        max_loras=settings["max_loras"],
        max_cpu_loras=max(settings["max_loras"], len(spec["adapters"])),
        lora_ops=settings.get("lora_ops", DEFAULT_LORA_OPS),
        **common,
    )


def _generate(engine, prompts, names, max_tokens: int):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    loras = [engine.lora_request(name) for name in names]
    requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
    start = time.perf_counter()
    outputs = engine.llm.generate(requests, params, lora_request=loras, use_tqdm=False)
    return outputs, time.perf_counter() - start


def _measure(engine, spec: dict, measurement: dict) -> dict:
    from prunedlora.bench.metrics import summarize, timing_from_stats

    prompts = spec["prompts"]
    adapters = measurement["adapters"] or [None]
    names = [adapters[i % len(adapters)] for i in range(len(prompts))]
    # Warm-up with the same batch: loads every adapter into its slot and runs the kernels once.
    _generate(engine, prompts, names, spec.get("warmup_tokens", 4))
    timings, wall, missing = [], 0.0, 0
    by_adapter: dict[str, list] = {}
    for _ in range(spec.get("repeats", 1)):
        outputs, seconds = _generate(engine, prompts, names, spec["output_tokens"])
        wall += seconds
        for name, output in zip(names, outputs):  # vLLM returns the outputs in request order
            tokens = len(output.outputs[0].token_ids)
            if output.metrics is None:
                missing += 1
                continue
            timing = timing_from_stats(output.metrics, tokens)
            timings.append(timing)
            by_adapter.setdefault(name or "base", []).append(timing)
    if not timings:
        raise RuntimeError("vLLM returned no per-request metrics (RequestOutput.metrics is None)")
    summary = summarize(timings, wall)
    summary["repeats"] = spec.get("repeats", 1)
    summary["distinct_adapters"] = len({n for n in names if n is not None})
    if missing:
        summary["requests_without_metrics"] = missing
    if measurement.get("per_adapter"):
        # each adapter's own requests of the same batch; its tok/s is its tokens over the batch's wall
        # time, so the adapters' figures add up to the batch's
        summary["per_adapter"] = {name: summarize(own, wall) for name, own in by_adapter.items()}
    return summary


def run(spec_path: str | Path, result_path: str | Path) -> dict:
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(result_path)
    result: dict = {"engine": dict(spec["engine"]), "results": {}}
    start = time.perf_counter()
    engine = _engine(spec)
    result["engine"]["start_s"] = time.perf_counter() - start
    model_config = engine.llm.llm_engine.model_config
    result["engine"]["model_dtype"] = str(model_config.dtype).replace("torch.", "")
    if spec["engine"].get("lora"):
        try:
            result["engine"]["slot_memory"] = engine.llm.collective_rpc("lora_slot_bytes")[0]
        except Exception as err:  # a vLLM without collective_rpc: the estimate still stands
            result["engine"]["slot_memory"] = {"error": f"{type(err).__name__}: {err}"}
        try:  # what the workers built, which the rows report next to the mode asked for
            in_use = engine.llm.collective_rpc("lora_ops_in_use")[0]
            result["engine"]["lora_ops_in_use"] = in_use["mode"]
            result["engine"]["punica_wrappers"] = in_use["wrappers"]
        except Exception as err:
            result["engine"]["lora_ops_in_use"] = f"unknown ({type(err).__name__}: {err})"
    write_json_atomic(result_path, result)
    for measurement in spec["measurements"]:
        try:
            result["results"][measurement["name"]] = _measure(engine, spec, measurement)
        except Exception as err:
            result["results"][measurement["name"]] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=5),
            }
        write_json_atomic(result_path, result)
    close = getattr(engine, "close", None)
    if close is not None:
        close()
    return result


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m prunedlora.bench.latency_worker SPEC.json RESULT.json")
    run(sys.argv[1], sys.argv[2])
