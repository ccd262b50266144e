"""``prunedlora bench latency``: what a pruned adapter's smaller rank buys when vLLM serves it, with
vLLM's stock LoRA ops and with prunedlora's rank-aware ones, side by side.

vLLM pads every adapter to the engine's ``max_lora_rank`` (the slot); its stock CPU ops compute with
the padded slot, the rank-aware ops (``serve.lora_ops``) with each module's live rank. On the same
prompts, in one run, this measures:

- the base model alone (an engine without LoRA): the reference every ratio is taken against;
- adapters at r0 in the r0 slot: the plain LoRA a user would otherwise train;
- each pruned family in the smallest slot that holds it, and in the r0 slot (the cost of padding);
- the uniform-rank pruned adapter in a sweep of slots (the curve of cost against slot rank);
- mixes of 1, 4 and 16 distinct pruned adapters in one batch, in one engine with max_loras = 16;
- a mixed-rank batch: adapters of ranks 4, 8 and 16 (``adapters.mixed_rank_adapters``) together in
  the 16-slot, with each adapter's own TTFT/TPOT/E2E in that batch, and each alone in the same engine.

Every adapter configuration is measured once per LoRA ops mode (``lora_ops``: ``both``, the default,
is stock then rank-aware; ``stock`` or ``rank-aware`` alone). Every engine setting (slot rank,
max_loras, LoRA ops) is a fresh vLLM engine in its own process (``latency_worker``); configurations
that share the settings share the engine, and the base model's engine, which has no LoRA, runs once.
Each row of the results names its ``configuration`` (the same in both modes) and its ``lora_ops``
(asked) and ``lora_ops_in_use`` (what vLLM's workers really ran, read back from the engine: the
rank-aware ops fall back to vLLM's own if their start-up check fails, and CUDA keeps vLLM's kernels).
The numbers are vLLM's per-request statistics over its offline ``LLM.generate`` path (see ``metrics``). Memory
reserved for LoRA slots is read from vLLM's slot tensors and checked against the closed form
``max_loras x max_lora_rank x dtype bytes x (sum over LoRA-wrapped layers of in + out)``, where
vLLM wraps every decoder projection plus the embedding and the logits (vocab + hidden each),
whatever modules the adapters target.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prunedlora.bench.adapters import (
    MIXED_RANK_FAMILY,
    AdapterSet,
    adapter_set_summary,
    adapters_from_runs,
    mixed_rank_adapters,
    synthetic_adapters,
)
from prunedlora.cpu import CpuChoice, machine_record
from prunedlora.errors import PrunedLoraError
from prunedlora.modelfacts import base_weight_shapes, model_facts
from prunedlora.serve.lora_ops import LORA_OPS_MODES, RANK_AWARE, STOCK
from prunedlora.staging import write_text_atomic
from prunedlora.vllm_compat import ALLOWED_MAX_LORA_RANKS, smallest_slot_rank

DEFAULT_RESULTS_DIR = Path("benchmarks/results")
RESULT_FILES = {"json": "latency.json", "markdown": "latency.md", "plot": "latency.png"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# ``--lora-ops both`` (the bench's default): every adapter configuration with vLLM's stock ops, then
# with the rank-aware ones, each in its own engine, against the same base model run.
BOTH_LORA_OPS = "both"
BENCH_LORA_OPS = (*LORA_OPS_MODES, BOTH_LORA_OPS)
DEFAULT_BENCH_LORA_OPS = BOTH_LORA_OPS
# ``bench latency --quick`` and the demo's latency stage: the base model, r0 and each pruned family in
# its smallest slot and the r0 slot, in both LoRA ops modes, on fewer prompts and tokens, without the
# sweep, the mixes and the mixed-rank batch.
QUICK_SETTINGS = {
    "num_prompts": 8,
    "prompt_tokens": 32,
    "output_tokens": 16,
    "sweep_slots": [],
    "mixes": [1],
    "adapters_per_family": 1,
    "mixed_ranks": [],
}


def lora_ops_modes(lora_ops: str) -> tuple[str, ...]:
    """The LoRA ops modes a ``--lora-ops`` value measures, in run order (``both``: stock, rank-aware)."""
    return (STOCK, RANK_AWARE) if lora_ops == BOTH_LORA_OPS else (lora_ops,)


class LatencyBenchError(PrunedLoraError):
    """The latency bench cannot run as asked."""


@dataclass
class LatencyBenchConfig:
    """What ``prunedlora bench latency`` measures and where it writes.

    ``runs`` are finished ``prunedlora train`` runs whose exported adapters are served; empty means
    synthetic adapters with the ranks of real runs (see ``adapters``): ``adapters_per_family`` of the
    mixed family (a mix of more cycles through them under distinct ids), one of each other family.
    ``mixed_ranks`` are the ranks of the mixed-rank batch (synthetic adapters, one per rank, served
    together in the slot of the largest; empty: none). ``lora_ops`` is ``both`` (stock and
    rank-aware, each configuration in each), ``stock`` or ``rank-aware``. ``work_dir`` holds the
    bench adapters and each engine's spec, result and log (default: the prunedlora cache).
    """

    model: str = "default"
    out_dir: str = str(DEFAULT_RESULTS_DIR)
    work_dir: str | None = None
    runs: list[str] = field(default_factory=list)
    r0: int = 32
    target_rank: int = 8
    num_prompts: int = 16
    prompt_tokens: int = 32
    output_tokens: int = 32
    repeats: int = 1
    sweep_slots: list[int] = field(default_factory=lambda: [8, 32, 64])
    mixes: list[int] = field(default_factory=lambda: [1, 4, 16])
    mix_family: str = "pruned-global"
    adapters_per_family: int = 3
    dtype: str = "auto"
    max_model_len: int = 512
    kv_cache_gib: float | None = None
    engine_timeout_s: float = 900.0
    echo: bool = True
    lora_ops: str = DEFAULT_BENCH_LORA_OPS
    mixed_ranks: list[int] = field(default_factory=lambda: [4, 8, 16])

    @classmethod
    def quick(cls, **overrides) -> LatencyBenchConfig:
        """The ``--quick`` configuration (``QUICK_SETTINGS``), with ``overrides`` on top."""
        return cls(**{**QUICK_SETTINGS, **overrides})

    def __post_init__(self) -> None:
        for name in ("num_prompts", "prompt_tokens", "output_tokens", "repeats", "r0", "target_rank"):
            if getattr(self, name) < 1:
                raise LatencyBenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.output_tokens < 2:
            raise LatencyBenchError("--output-tokens must be at least 2 (time per output token needs two tokens)")
        bad = [s for s in self.sweep_slots if s not in ALLOWED_MAX_LORA_RANKS]
        if bad:
            raise LatencyBenchError(
                f"--slots {bad} are not slot ranks vLLM allows; use some of {', '.join(map(str, ALLOWED_MAX_LORA_RANKS))}"
            )
        if self.lora_ops not in BENCH_LORA_OPS:
            raise LatencyBenchError(f"--lora-ops must be one of {', '.join(BENCH_LORA_OPS)}, got {self.lora_ops!r}")
        ranks = list(self.mixed_ranks)
        if ranks and (len(ranks) < 2 or len(set(ranks)) != len(ranks) or min(ranks) < 1):
            raise LatencyBenchError(
                f"--mixed-ranks must be at least two distinct positive ranks (or none), got {ranks}"
            )
        if ranks and max(ranks) > ALLOWED_MAX_LORA_RANKS[-1]:
            raise LatencyBenchError(
                f"--mixed-ranks {max(ranks)} exceeds vLLM's largest slot {ALLOWED_MAX_LORA_RANKS[-1]}"
            )
        if any(m < 1 for m in self.mixes):
            raise LatencyBenchError(f"--mixes must be positive, got {self.mixes}")
        if self.prompt_tokens + self.output_tokens > self.max_model_len:
            raise LatencyBenchError(
                f"--prompt-tokens + --output-tokens ({self.prompt_tokens + self.output_tokens}) exceed "
                f"--max-model-len {self.max_model_len}"
            )


@dataclass
class Configuration:
    """One measured row: a family of adapters (None: the base model) in a slot, N distinct per batch,
    with one LoRA ops mode.

    ``members`` picks the family's adapters by index (empty: the first ``mix``, cycling); ``lora_ops``
    is None until :func:`with_lora_ops` gives an adapter row its mode; ``configuration`` is the name
    without the mode, shared by a configuration's stock and rank-aware rows.
    """

    name: str
    family: str | None
    slot: int | None
    mix: int
    max_loras: int | None
    role: str  # base, r0, smallest, padded, sweep, mix, mixed-rank, mixed-rank-alone
    members: tuple[int, ...] = ()
    lora_ops: str | None = None
    configuration: str = ""

    def __post_init__(self) -> None:
        self.configuration = self.configuration or self.name

    @property
    def engine_key(self) -> tuple:
        return ("base",) if self.family is None else (self.slot, self.max_loras, self.lora_ops)


# -- the plan -----------------------------------------------------------------------------------------


def family_slot(adapters: AdapterSet, family: str) -> int:
    """The smallest slot vLLM allows that holds every adapter of the family."""
    return smallest_slot_rank(max(a.max_rank for a in adapters.families[family]))


def plan_configurations(adapters: AdapterSet, config: LatencyBenchConfig) -> list[Configuration]:
    """The configurations to measure, deduplicated (the same family, slot and mix is measured once),
    without their LoRA ops mode (see :func:`plan_measurements`).

    With a ``mixed-rank`` family in ``adapters``: each of its adapters alone, then all of them in one
    batch, in one engine with the slot of the largest and max_loras = the number of them."""
    r0_slot = family_slot(adapters, "r0") if "r0" in adapters.families else smallest_slot_rank(config.r0)
    plan: list[Configuration] = [Configuration("base", None, None, 1, None, "base")]
    seen: set[tuple] = set()

    def add(family: str, slot: int, mix: int, max_loras: int, role: str) -> None:
        key = (family, slot, mix, max_loras)
        if family not in adapters.families or key in seen:
            return
        if slot < family_slot(adapters, family):
            return  # the family does not fit this slot
        seen.add(key)
        suffix = "" if mix == 1 and max_loras == 1 else f" x{mix} (max_loras {max_loras})"
        plan.append(Configuration(f"{family} @ slot {slot}{suffix}", family, slot, mix, max_loras, role))

    add("r0", r0_slot, 1, 1, "r0")
    for family in adapters.families:
        if family not in ("r0", MIXED_RANK_FAMILY):
            add(family, family_slot(adapters, family), 1, 1, "smallest")
            add(family, r0_slot, 1, 1, "padded")
    sweep_family = "pruned-uniform" if "pruned-uniform" in adapters.families else config.mix_family
    for slot in config.sweep_slots:
        add(sweep_family, slot, 1, 1, "sweep")
    mixes = sorted(set(config.mixes))
    if mixes and mixes != [1]:
        family = (
            config.mix_family
            if config.mix_family in adapters.families
            else next(f for f in adapters.families if f not in ("r0", MIXED_RANK_FAMILY))
        )
        top = max(mixes)
        for mix in mixes:
            add(family, family_slot(adapters, family), mix, top, "mix")
    plan += _mixed_rank_configurations(adapters)
    return plan


def _mixed_rank_configurations(adapters: AdapterSet) -> list[Configuration]:
    members = adapters.families.get(MIXED_RANK_FAMILY) or []
    if len(members) < 2:
        return []
    slot, n = family_slot(adapters, MIXED_RANK_FAMILY), len(members)
    rows = [
        Configuration(
            f"{MIXED_RANK_FAMILY} rank {a.max_rank} alone @ slot {slot} (max_loras {n})",
            MIXED_RANK_FAMILY,
            slot,
            1,
            n,
            "mixed-rank-alone",
            members=(i,),
        )
        for i, a in enumerate(members)
    ]
    ranks = "+".join(str(a.max_rank) for a in members)
    rows.append(
        Configuration(
            f"{MIXED_RANK_FAMILY} {ranks} @ slot {slot} x{n} (max_loras {n})",
            MIXED_RANK_FAMILY,
            slot,
            n,
            n,
            "mixed-rank",
            members=tuple(range(n)),
        )
    )
    return rows


def with_lora_ops(plan: list[Configuration], lora_ops: str) -> list[Configuration]:
    """Each adapter row once per mode of ``lora_ops`` (``both``: stock, then rank-aware, next to each
    other, so the two engines of a setting run one after the other); with two modes the name ends in
    `` [stock]`` or `` [rank-aware]``. The base row, and rows that have a mode already, stay as they are."""
    modes = lora_ops_modes(lora_ops)
    rows: list[Configuration] = []
    for row in plan:
        if row.family is None or row.lora_ops is not None:
            rows.append(row)
            continue
        for mode in modes:
            name = row.name if len(modes) == 1 else f"{row.name} [{mode}]"
            rows.append(replace(row, name=name, lora_ops=mode, configuration=row.configuration))
    return rows


def plan_measurements(adapters: AdapterSet, config: LatencyBenchConfig) -> list[Configuration]:
    """What a run measures: :func:`plan_configurations` in each of ``config.lora_ops``'s modes."""
    return with_lora_ops(plan_configurations(adapters, config), config.lora_ops)


# -- memory ---------------------------------------------------------------------------------------------


def lora_slot_bytes_estimate(model_dir: str | os.PathLike, max_lora_rank: int, max_loras: int, dtype_bytes: int) -> int:
    """Bytes vLLM reserves for LoRA slots: A (rank x in) and B (out x rank) per slot for every decoder
    projection, plus the embedding's and the logits' LoRA (vocab + hidden each), from the base
    model's weight shapes (safetensors headers)."""
    shapes = base_weight_shapes(model_dir)
    projections = set(model_facts(model_dir).projections)
    per_rank = 0
    hidden = vocab = None
    for name, shape in shapes.items():
        if len(shape) != 2 or not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")].rsplit(".", 1)[-1]
        if module in projections:  # the decoder projections vLLM wraps with LoRA layers (the family's)
            per_rank += shape[0] + shape[1]
        elif module == "embed_tokens":
            vocab, hidden = shape
    if vocab is None:
        raise LatencyBenchError(f"{model_dir} has no embed_tokens weight; cannot size the embedding and logits LoRA")
    per_rank += 2 * (vocab + hidden)
    return per_rank * max_lora_rank * max_loras * dtype_bytes


# -- prompts --------------------------------------------------------------------------------------------


def bench_prompts(model_dir: str | os.PathLike, num_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """``num_prompts`` distinct chat-rendered prompts of exactly ``prompt_tokens`` tokens (the last ones,
    so each ends with the assistant header), cycling through the vendored GSM8K, CodeAlpaca and SST-2
    slices. The engines run without prefix caching, so every prompt is prefilled in full."""
    from transformers import AutoTokenizer

    from prunedlora.tasks import DataConfig, load_examples
    from prunedlora.train.data import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pools = [iter(load_examples(DataConfig(task=task))) for task in ("gsm8k", "codealpaca", "sst2")]
    prompts: list[list[int]] = []
    while len(prompts) < num_prompts and pools:
        for pool in list(pools):
            example = next(pool, None)
            if example is None:
                pools.remove(pool)
                continue
            ids = tokenizer(chat_prompt(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
            if len(ids) >= prompt_tokens and list(ids[-prompt_tokens:]) not in prompts:
                prompts.append(list(ids[-prompt_tokens:]))
                if len(prompts) == num_prompts:
                    break
    if len(prompts) < num_prompts:
        raise LatencyBenchError(
            f"only {len(prompts)} vendored prompts have {prompt_tokens} tokens; lower --prompt-tokens"
        )
    return prompts


# -- running ---------------------------------------------------------------------------------------------


def _engine_specs(
    plan: list[Configuration],
    adapters: AdapterSet,
    config: LatencyBenchConfig,
    model_dir: Path,
    prompts: list[list[int]],
    dtype: str | None = None,
) -> list[dict]:
    """One worker spec per engine key, in plan order; ``dtype`` (default ``config.dtype``) is what the
    engines get, resolved from the CPU when the config says auto. Rows without a LoRA ops mode get
    ``config.lora_ops``'s (:func:`with_lora_ops`), so each mode has its own engines."""
    plan = with_lora_ops(plan, config.lora_ops)
    kv_bytes = None
    if config.kv_cache_gib is not None:
        kv_bytes = int(config.kv_cache_gib * 2**30)
    elif not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kv_bytes = 2**30
    specs: dict[tuple, dict] = {}
    for row in plan:
        spec = specs.get(row.engine_key)
        if spec is None:
            engine = {
                "lora": row.family is not None,
                "dtype": dtype or config.dtype,
                "max_model_len": config.max_model_len,
                "enforce_eager": True,
                "seed": 0,
                "kv_cache_bytes": kv_bytes,
                "max_num_seqs": max(config.num_prompts, 1),
            }
            if row.family is not None:
                engine.update(max_lora_rank=row.slot, max_loras=row.max_loras, lora_ops=row.lora_ops)
            spec = specs[row.engine_key] = {
                "model": str(model_dir),
                "engine": engine,
                "adapters": {},
                "prompts": prompts,
                "output_tokens": config.output_tokens,
                "warmup_tokens": 4,
                "repeats": config.repeats,
                "measurements": [],
            }
        names = []
        if row.family is not None:
            family = adapters.families[row.family]
            for i in row.members or range(row.mix):
                adapter = family[i % len(family)]
                # A mix of more adapters than the family has reuses folders under distinct names and
                # ids: vLLM loads each id into its own slot, as its own throughput bench does.
                name = adapter.name if i < len(family) else f"{adapter.name}-copy{i // len(family)}"
                spec["adapters"][name] = str(adapter.path)
                names.append(name)
        measurement = {"name": row.name, "adapters": names}
        if row.role == "mixed-rank":
            measurement["per_adapter"] = True  # each adapter's own requests summarised too
        spec["measurements"].append(measurement)
    return list(specs.values())


def _run_worker(spec: dict, engine_dir: Path, timeout_s: float, echo: bool, choice: CpuChoice | None = None) -> dict:
    engine_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = engine_dir / "spec.json", engine_dir / "result.json", engine_dir / "vllm.log"
    write_text_atomic(spec_path, json.dumps(spec, indent=2) + "\n")
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "prunedlora.bench.latency_worker", str(spec_path), str(result_path)]
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if choice is not None:
        choice.apply(env)  # vLLM reads its thread binding when the worker's engine starts
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            code = None
        except BaseException:
            _kill_group(process)
            raise
    result = json.loads(result_path.read_text()) if result_path.is_file() else {"engine": spec["engine"], "results": {}}
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.is_file() else []
        why = f"timed out after {timeout_s:.0f} s" if code is None else f"exited with code {code}"
        result["error"] = f"engine {why}: {tail[0] if tail else ''} (log: {log_path})"
        for measurement in spec["measurements"]:
            result["results"].setdefault(measurement["name"], {"error": result["error"]})
    return result


def _kill_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def _engine_dir_name(spec: dict) -> str:
    engine = spec["engine"]
    if not engine["lora"]:
        return "base"
    ops = f"-{engine['lora_ops']}" if engine.get("lora_ops") else ""
    return f"slot{engine['max_lora_rank']}-loras{engine['max_loras']}{ops}"


def run_latency_bench(config: LatencyBenchConfig) -> dict:
    """Measure every configuration, write latency.json, latency.md and latency.png; return the report.

    Returns the JSON payload: ``rows`` (one per configuration and LoRA ops mode, with p50/p99 TTFT,
    TPOT and E2E, output tokens per second, LoRA slot bytes, ratios against the base model, for a
    rank-aware row ratios against the same configuration's stock row, and for the mixed-rank batch
    ``per_adapter``: each adapter's own summary and ratios), ``adapters``, ``engines``, ``machine`` and
    ``files``.
    """
    from prunedlora.bench.report import latency_markdown, plot_latency, portable_path, write_result_files
    from prunedlora.models import cache_dir, resolve_model
    from prunedlora.serve.config import cpu_choice, resolve_device

    started = time.perf_counter()
    model_dir = resolve_model(config.model)
    work_dir = Path(config.work_dir) if config.work_dir else cache_dir() / "bench" / "latency"
    out_dir = Path(config.out_dir)
    say = (lambda text: print(text, flush=True)) if config.echo else (lambda text: None)
    choice = cpu_choice(resolve_device("auto"), config.dtype)
    if choice is not None:
        say(choice.line())

    say(f"bench latency: preparing adapters in {work_dir / 'adapters'}")
    if config.runs:  # separate folders: the same names mean different adapters in the two sets
        adapters = adapters_from_runs(config.runs, work_dir / "adapters" / "from-runs")
    else:
        adapters = synthetic_adapters(
            model_dir,
            work_dir / "adapters" / "synthetic",
            r0=config.r0,
            target_rank=config.target_rank,
            per_family={config.mix_family: config.adapters_per_family},
        )
    if config.mixed_ranks:  # synthetic whatever the other families are: only the ranks matter here
        adapters.families[MIXED_RANK_FAMILY] = mixed_rank_adapters(
            model_dir, work_dir / "adapters" / "synthetic", config.mixed_ranks, r0=config.r0
        )
    plan = plan_measurements(adapters, config)
    prompts = bench_prompts(model_dir, config.num_prompts, config.prompt_tokens)
    specs = _engine_specs(plan, adapters, config, model_dir, prompts, choice.dtype if choice else None)
    say(
        f"bench latency: {len({row.configuration for row in plan})} configurations x LoRA ops "
        f"{' and '.join(lora_ops_modes(config.lora_ops))} = {len(plan)} measurements on {len(specs)} engines, "
        f"{config.num_prompts} prompts x {config.prompt_tokens} prompt tokens -> {config.output_tokens} output tokens"
    )

    measured: dict[str, dict] = {}
    engines: dict[str, dict] = {}
    from tqdm.auto import tqdm

    for spec in tqdm(specs, desc="engines", disable=not config.echo):
        name = _engine_dir_name(spec)
        t0 = time.perf_counter()
        result = _run_worker(spec, work_dir / "engines" / name, config.engine_timeout_s, config.echo, choice)
        engine = dict(result.get("engine", {}))
        engine["wall_s"] = time.perf_counter() - t0
        if "error" in result:
            engine["error"] = result["error"]
            say(f"  {name}: {result['error']}")
        engines[name] = engine
        for row_name, values in result.get("results", {}).items():
            measured[row_name] = {"engine": name, **values}

    rows = _rows(plan, measured, engines, model_dir, adapters)
    payload = {
        "bench": "latency",
        "model": portable_path(model_dir),
        "machine": machine_record(choice) if choice else machine_record(dtype=config.dtype, threads="vLLM (GPU)"),
        "vllm": _version("vllm-cpu") or _version("vllm"),
        "settings": {k: v for k, v in asdict(config).items() if k not in ("echo",)},
        "adapters": adapter_set_summary(adapters),
        "rows": rows,
        "engines": engines,
        "elapsed_s": time.perf_counter() - started,
    }
    return write_result_files(out_dir, RESULT_FILES, payload, plot_latency, latency_markdown)


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


RATIO_KEYS = {
    "ttft_p50_s": "ttft_p50_x_base",
    "tpot_p50_s": "tpot_p50_x_base",
    "e2e_p50_s": "e2e_p50_x_base",
    "e2e_p99_s": "e2e_p99_x_base",
}


STOCK_RATIO_KEYS = {
    "tpot_p50_s": "tpot_p50_x_stock",
    "e2e_p50_s": "e2e_p50_x_stock",
    "output_tokens_per_s": "throughput_x_stock",
}


def _ratios_to_base(entry: dict, base: dict) -> None:
    for key, ratio in RATIO_KEYS.items():
        if entry.get(key) is not None and base.get(key):
            entry[ratio] = entry[key] / base[key]
    if entry.get("output_tokens_per_s") is not None and base.get("output_tokens_per_s"):
        entry["throughput_x_base"] = entry["output_tokens_per_s"] / base["output_tokens_per_s"]


def _rows(
    plan: list[Configuration],
    measured: dict[str, dict],
    engines: dict[str, dict],
    model_dir: Path,
    adapters: AdapterSet | None = None,
) -> list[dict]:
    base = measured.get("base", {})
    ranks = {a.name: a.max_rank for f in (adapters.families.values() if adapters else ()) for a in f}
    rows = []
    for row in plan:
        values = dict(measured.get(row.name, {"error": "not measured"}))
        entry = {
            "name": row.name,
            "configuration": row.configuration,
            "family": row.family,
            "slot": row.slot,
            "mix": row.mix,
            "max_loras": row.max_loras,
            "role": row.role,
            "lora_ops": row.lora_ops,
            **values,
        }
        if row.members and adapters is not None:  # the mixed-rank rows: which adapters, by name
            family = adapters.families[row.family]
            entry["adapters"] = [family[i % len(family)].name for i in row.members]
        if row.family is not None:
            engine = engines.get(values.get("engine", ""), {})
            entry["lora_ops_in_use"] = engine.get("lora_ops_in_use")
            dtype = engine.get("model_dtype") or "bfloat16"
            entry["lora_slot_bytes_estimate"] = lora_slot_bytes_estimate(
                model_dir, row.slot, row.max_loras, DTYPE_BYTES.get(dtype, 2)
            )
            slot_memory = engine.get("slot_memory") or {}
            entry["lora_slot_bytes"] = slot_memory.get("total_bytes")
        else:
            entry["lora_slot_bytes_estimate"] = entry["lora_slot_bytes"] = 0
        if "error" not in values and "error" not in base:
            _ratios_to_base(entry, base)
            for name, own in (entry.get("per_adapter") or {}).items():
                if name in ranks:
                    own["rank"] = ranks[name]
                _ratios_to_base(own, base)
        rows.append(entry)
    stock = {r["configuration"]: r for r in rows if r["lora_ops"] == STOCK and "error" not in r}
    for entry in rows:
        reference = stock.get(entry["configuration"])
        if entry["lora_ops"] == RANK_AWARE and reference is not None and "error" not in entry:
            for key, ratio in STOCK_RATIO_KEYS.items():
                if entry.get(key) is not None and reference.get(key):
                    entry[ratio] = entry[key] / reference[key]
    return rows


def demo_latency(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike = "runs/demo/latency", model: str = "default", **overrides
) -> dict:
    """The short comparison ``make demo`` ends with: the base model, the run's adapter at r0 and its
    pruned export (smallest slot, and the r0 slot if that differs), each adapter row with vLLM's stock
    LoRA ops and with the rank-aware ones, with ``bench latency --quick``'s settings and measurement
    path (the same worker, dtype and thread binding), so its figures are the bench's for the same
    configuration. Prints one line per measurement, the stock and rank-aware ratios side by side, and
    the plot's path; returns the latency payload."""
    config = LatencyBenchConfig.quick(model=model, out_dir=str(out_dir), runs=[str(run_dir)], **overrides)
    payload = run_latency_bench(config)
    print(format_headline(payload))
    comparison = format_comparison(payload)
    if comparison:
        print(comparison)
    print(f"plot: {payload['files']['plot']}")
    return payload


def format_headline(payload: dict) -> str:
    """One line per measurement: decode and end-to-end latency as multiples of the base model."""
    rows = payload["rows"]
    width = max([40, *(len(row["name"]) for row in rows)])
    lines = []
    for row in rows:
        if "error" in row:
            lines.append(f"{row['name']:<{width}} error: {row['error']}")
            continue
        lines.append(
            f"{row['name']:<{width}} TPOT {row['tpot_p50_s'] * 1000:7.1f} ms ({row.get('tpot_p50_x_base', float('nan')):5.2f}x base)"
            f"  E2E p50 {row['e2e_p50_s']:6.2f} s ({row.get('e2e_p50_x_base', float('nan')):5.2f}x)"
            f"  {row['output_tokens_per_s']:7.1f} tok/s"
        )
    return "\n".join(lines)


def format_comparison(payload: dict) -> str:
    """Stock and rank-aware LoRA ops side by side, one line per configuration (TPOT and E2E p50 as
    multiples of the base model, and rank-aware over stock), each adapter of the mixed-rank batch
    under it; empty when the run measured one mode only."""
    from prunedlora.bench.report import paired_rows

    configurations, modes = paired_rows(payload["rows"])
    if len(modes) < 2:
        return ""

    def ratio(row: dict | None, key: str) -> str:
        value = None if row is None or "error" in row else row.get(key)
        return "    -" if value is None else f"{value:5.2f}x"

    width = max([40, *(len(name) for name, _ in configurations)])
    head = "  ".join(f"{m:>10}" for m in modes)
    lines = [
        f"{'LoRA ops side by side (x base model)':<{width}}  TPOT p50: {head}   E2E p50: {head}   {modes[-1]} / {modes[0]} TPOT",
    ]
    for name, by_mode in configurations:
        tpot = "  ".join(f"{ratio(by_mode.get(m), 'tpot_p50_x_base'):>10}" for m in modes)
        e2e = "  ".join(f"{ratio(by_mode.get(m), 'e2e_p50_x_base'):>10}" for m in modes)
        last = by_mode.get(modes[-1])
        lines.append(f"{name:<{width}}            {tpot}            {e2e}   {ratio(last, 'tpot_p50_x_stock')}")
        adapters = dict.fromkeys(a for row in by_mode.values() for a in (row.get("per_adapter") or {}))
        for adapter in adapters:
            own = {m: (by_mode.get(m) or {}).get("per_adapter", {}).get(adapter) for m in modes}
            label = f"  {adapter} in the batch"
            tpot = "  ".join(f"{ratio(own[m], 'tpot_p50_x_base'):>10}" for m in modes)
            e2e = "  ".join(f"{ratio(own[m], 'e2e_p50_x_base'):>10}" for m in modes)
            lines.append(f"{label:<{width}}            {tpot}            {e2e}")
    return "\n".join(lines)
