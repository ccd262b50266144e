"""LoRAPrune evaluation (issue 12): perplexity, size and training memory of each pruning criterion.

For each configuration (criterion lora at ~50% and ~20% of the decoder's prunable linear weights,
grad, magnitude and random at ~50%; same seed, same data, same steps), train the shipped recipe
``smollm2-loraprune`` with its steps, batch and length overridden to fit a small CPU budget, each run in
its own subprocess with one torch thread so its peak resident memory is that run's alone (``os.wait4``
gives the child's own ``ru_maxrss``); export it with :func:`prunedlora.loraprune.export.export_pruned`
(the pruned base, verified against the masked training model); then measure WikiText-2 test and PTB
test perplexity with :mod:`prunedlora.perplexity` (512-token non-overlapping windows, the first
``--max-windows`` of each corpus, exp of the mean NLL of every predicted token) of the dense base (no
adapter) and of each pruned base with its adapter merged, plus parameters and bytes on disk of each pruned base against the dense one.

Data (``--data``): ``gsm8k`` (the default, what the committed results measured: GSM8K, loss on the
response only) or ``mix``, the issue's stand-in for the paper's instruction data and what the shipped
recipe now trains on: GSM8K and CodeAlpaca interleaved, loss on every token (``data.mix`` and
``data.loss_on``). The two are different measurements: ``--data mix`` needs its own ``--out``.

    python benchmarks/loraprune_eval.py [--steps 40] [--batch 4] [--max-length 128] [--max-windows 12]

Training memory. The peak RSS of each training process (``os.wait4``) does not show what the issue
asks (the extra memory a criterion needs to train): on CPU it mixes the step's tensors with the
interpreter, libraries, data and allocator slack, and at this batch x length the step's peak is at
the end of the forward pass, when the activations of all 30 layers and the logits are live, while
``grad``'s base-weight gradients (one per decoder linear weight, 405 MiB in float32) only exist from
backward to the pruner's call, as the activations are being freed. So ``--memory`` measures it
directly, without training: a few steps of each configuration (and of plain LoRA without a pruner, the
reference) in a plain loop with the same model, recipe, AdamW, clipping and pruner call, under
:class:`prunedlora.bench.tensor_memory.LiveTensorBytes` (a TorchDispatchMode that counts the bytes of
every tensor storage an op creates until it is freed). It records per batch size the peak of live
tensor bytes of a step and what is live at the pruner's call (after backward and clipping), each
against the reference: at batch 4 x 128 and at batch 1 x 128 (where activations shrink and the
base-gradient buffers decide the peak). Memory outside tensor storages (Python objects, oneDNN
scratch, allocator slack) is not counted; it is the same for every criterion.

    python benchmarks/loraprune_eval.py --memory [--memory-steps 3] [--memory-batches 4 1]

Writes benchmarks/results/loraprune/eval.json, eval.md and eval.png; each measurement is written as
soon as it is taken, and a rerun skips what the file already holds (``--redo NAME`` measures one
configuration again; ``--adopt NAME`` measures a finished run directory of an earlier invocation with
the same settings instead of training it again, and records it as adopted, without peak RSS or time).
Run directories and pruned models go under runs/loraprune_eval/ (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "loraprune"
WORK = ROOT / "runs" / "loraprune_eval"
SHARED = ROOT.parent / "shared" / "data"
CORPORA = ("wikitext2", "ptb")  # prunedlora.perplexity's names: ../shared/data/wikitext2, ptb test files
PROTOCOL = "prunedlora.perplexity"  # results measured otherwise (an earlier version of this script) are redone
# name -> (criterion, sparsity); in the order they are run, the most telling first.
CONFIGS = {
    "lora-50": ("lora", 0.5),
    "magnitude-50": ("magnitude", 0.5),
    "random-50": ("random", 0.5),
    "grad-50": ("grad", 0.5),
    "lora-20": ("lora", 0.2),
    "lora-act-50": ("lora-act", 0.5),  # not the paper's: lora's score times each input feature's norm
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# --data: the recipe's task data as measured so far (GSM8K, loss on the response), or the issue's
# stand-in for the paper's instruction data (GSM8K + CodeAlpaca interleaved, loss on every token).
DATA = {
    "gsm8k": {"data.mix": "null", "data.loss_on": "response"},
    "mix": {"data.mix": "[codealpaca]", "data.loss_on": "all"},
}
TRAIN_CHILD = (
    "import sys, torch; torch.set_num_threads(1); from prunedlora.cli import main; sys.exit(main(sys.argv[1:]))"
)


# -- measurements ---------------------------------------------------------------------------------


def linear_params(model) -> int:
    return sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in LINEARS and hasattr(m, "weight")
    )


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(model, corpora: dict, max_windows: int) -> dict:
    from prunedlora.perplexity import PerplexityConfig, perplexity_of_ids

    config = PerplexityConfig(window=512, max_windows=max_windows, progress=False)
    out = {name: perplexity_of_ids(model, ids, config, corpus=name).to_dict() for name, ids in corpora.items()}
    out["ppl_protocol"] = PROTOCOL
    out["params"] = sum(p.numel() for p in model.parameters())
    out["linear_params"] = linear_params(model)
    return out


def train(name: str, criterion: str, sparsity: float, args, run_dir: Path) -> dict:
    """One training run in a child process; its own peak RSS from os.wait4."""
    cmd = [
        sys.executable,
        "-c",
        TRAIN_CHILD,
        "train",
        "--config",
        "smollm2-loraprune",
        "--no-resume",
        "--training.output_dir",
        str(run_dir),
        "--training.max_steps",
        str(args.steps),
        "--training.per_device_train_batch_size",
        str(args.batch),
        "--training.gradient_accumulation_steps",
        "1",
        "--training.warmup_steps",
        str(args.warmup),
        "--training.save_steps",
        str(args.steps),
        "--training.logging_steps",
        "5",
        "--training.seed",
        str(args.seed),
        "--data.max_length",
        str(args.max_length),
        "--loraprune.criterion",
        criterion,
        "--loraprune.sparsity",
        str(sparsity),
        "--loraprune.prune_every",
        str(args.prune_every),
        "--loraprune.seed",
        str(args.seed),
        *[part for key, value in DATA[args.data].items() for part in (f"--{key}", value)],
    ]
    log = WORK / f"{name}.train.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"{name}: training failed (exit {proc.returncode}); log {log}:\n{tail}")
    text = log.read_text()
    loss = re.search(r"train_runtime ([\d.]+)s, train_loss ([\d.]+)", text)
    losses = [float(v) for v in re.findall(r"loss=([\d.]+)", text)]
    return {
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB
        "train_wall_s": round(wall, 1),
        "train_runtime_s": float(loss.group(1)) if loss else None,
        "train_loss_mean": float(loss.group(2)) if loss else None,
        "last_logged_loss": losses[-1] if losses else None,
        "command": " ".join(["prunedlora", *cmd[3:]]).replace(f"{ROOT}/", ""),  # no path of this machine
    }


def step_memory(criterion: str | None, sparsity: float, args, batch_sizes: list[int], steps: int) -> dict:
    """Live tensor bytes of a few training steps of one criterion (``None``: plain LoRA, no pruner), per
    batch size: the same model, recipe, optimizer (AdamW), clipping and pruner call as ``prunedlora
    train``, in a plain loop (Trainer adds nothing that differs between criteria) under
    :class:`prunedlora.bench.tensor_memory.LiveTensorBytes`. Every batch is the recipe's first examples
    padded to ``--max-length`` (the protocol's largest batch), the same for every criterion. Steps run
    inside the pruning window (the pruner scores each of them; no event falls among them), so ``grad``
    holds its base-weight gradients from backward to the pruner's call, as it does on every step until
    its last event. Left out: the adapter's rank pruner that ``prunedlora train`` also drives (with
    ``prune: false`` it never fires, and it is the same for every criterion)."""
    import gc

    import torch

    from prunedlora.bench.tensor_memory import LiveTensorBytes
    from prunedlora.loraprune.pruner import LoraPruner
    from prunedlora.models import resolve_model
    from prunedlora.train.data import build_train_dataset, make_collator
    from prunedlora.train.recipe import load_recipe
    from prunedlora.train.runner import build_peft_model

    overrides = {"data.max_length": str(args.max_length), "loraprune.sparsity": str(sparsity), **DATA[args.data]}
    if criterion is not None:
        overrides["loraprune.criterion"] = criterion
    recipe = load_recipe("smollm2-loraprune", overrides)
    from transformers import AutoTokenizer

    model_dir = resolve_model(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = build_train_dataset(tokenizer, recipe.data, progress=False)
    collate = make_collator(tokenizer, pad_to_multiple_of=args.max_length)
    mib = 2**20
    out = {}
    for size in batch_sizes:
        torch.manual_seed(args.seed)
        model = build_peft_model(model_dir, recipe.method, recipe.training.dtype)
        model.train()
        pruner = (
            LoraPruner(model, recipe.sections["loraprune"], total_steps=args.steps) if criterion is not None else None
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=recipe.training.learning_rate)
        phases: dict[str, list[int]] = {"forward_backward": [], "scoring": [], "optimizer": []}
        held = []
        with LiveTensorBytes() as mem:
            baseline = mem.baseline
            for step in range(steps):
                batch = collate([dataset[i] for i in range(step * size, (step + 1) * size)])
                mem.reset_peak()
                model(**batch).loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, recipe.training.max_grad_norm)
                phases["forward_backward"].append(mem.peak)
                held.append(mem.current)  # what the step holds when the pruner is called
                mem.reset_peak()
                if pruner is not None:
                    pruner.before_optimizer_step(step)
                phases["scoring"].append(mem.peak)
                mem.reset_peak()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del batch
                phases["optimizer"].append(mem.peak)
        if pruner is not None:
            pruner.close()
        del model, pruner, optimizer, trainable
        gc.collect()
        # steps after the first: the optimizer's state exists (AdamW allocates it in the first step)
        later = slice(1, None) if steps > 1 else slice(None)
        phase_peaks = {k: max(v[later]) for k, v in phases.items()}
        out[f"batch{size}"] = {
            "batch": size,
            "length": args.max_length,
            "steps": steps,
            "baseline_mib": round(baseline / mib, 1),
            "peak_mib": round(max(phase_peaks.values()) / mib, 1),
            "peak_phase": max(phase_peaks, key=phase_peaks.get),
            "phase_peaks_mib": {k: round(v / mib, 1) for k, v in phase_peaks.items()},
            "held_before_optimizer_mib": round(max(held[later]) / mib, 1),
        }
        print(f"  batch {size}: {out[f'batch{size}']}", flush=True)
    return out


def memory_table(results: dict) -> list[str]:
    """Markdown lines: live tensor memory of a training step per criterion, and its excess over plain
    LoRA (the reference run), at each measured batch size."""
    ref = results.get("memory_reference")
    rows = [(n, r["criterion"], r["train_memory"]) for n, r in results["runs"].items() if "train_memory" in r]
    if not ref or not rows:
        return []
    sizes = list(ref["train_memory"])
    spec = results["memory_settings"]
    lines = [
        "",
        f"Training memory: live tensor storages (`prunedlora.bench.tensor_memory.LiveTensorBytes`, a "
        "TorchDispatchMode that counts every tensor an op creates until it is freed) over "
        f"{spec['steps']} training steps in the pruning window (optimizer state in place from the second), "
        f"batches padded to {spec['length']} tokens; MiB, with the excess over plain LoRA (no pruner, "
        "same model and steps) in parentheses. *Peak*: the step's largest live total (parameters "
        "included); *held at the pruner's call*: what is live after backward and clipping, when the "
        "criterion scores. Rerun: `python benchmarks/loraprune_eval.py --memory` (skips what eval.json holds).",
        "",
        "| run | criterion | "
        + " | ".join(
            f"peak, batch {ref['train_memory'][k]['batch']} | held at the pruner's call, "
            f"batch {ref['train_memory'][k]['batch']}"
            for k in sizes
        )
        + " |",
        "|---|---|" + "---|---|" * len(sizes),
    ]
    for name, criterion, mem in [("plain LoRA", "-", ref["train_memory"]), *rows]:
        cells = []
        for k in sizes:
            m, r = mem[k], ref["train_memory"][k]
            for key in ("peak_mib", "held_before_optimizer_mib"):
                cells.append(f"{m[key]:.0f} ({m[key] - r[key]:+.0f})")
        lines.append(f"| {name} | {criterion} | " + " | ".join(cells) + " |")
    return lines


def adopt(name: str, criterion: str, sparsity: float, args, run_dir: Path) -> dict:
    """A finished run directory left by an earlier invocation of this script (its results were dropped
    when the perplexity protocol changed), taken as this configuration's training when its run record
    shows the same settings; its losses come from the Trainer's log history (logged every 5 of the 40
    steps, so their mean is the run's mean loss). Its peak RSS and wall time were not kept: None."""
    record = json.loads((run_dir / "prunedlora_run.json").read_text())
    recipe = record["training"]
    want = {
        ("loraprune", "criterion"): criterion,
        ("loraprune", "sparsity"): sparsity,
        ("loraprune", "prune_every"): args.prune_every,
        ("loraprune", "seed"): args.seed,
        ("training", "max_steps"): args.steps,
        ("training", "per_device_train_batch_size"): args.batch,
        ("training", "gradient_accumulation_steps"): 1,
        ("training", "warmup_steps"): args.warmup,
        ("training", "seed"): args.seed,
        ("data", "max_length"): args.max_length,
    }
    wrong = {k: recipe[k[0]][k[1]] for k, v in want.items() if recipe[k[0]][k[1]] != v}
    if wrong or record["global_step"] != args.steps:
        raise SystemExit(f"{name}: {run_dir} was trained with other settings ({wrong}); train it again instead")
    state = json.loads((run_dir / f"checkpoint-{args.steps}" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    return {
        "peak_rss_mib": None,
        "train_wall_s": None,
        "train_runtime_s": None,
        "train_loss_mean": round(sum(losses) / len(losses), 4) if losses else None,
        "last_logged_loss": round(losses[-1], 4) if losses else None,
        "command": "(adopted) an earlier run of this script with the same settings; run directory reused",
    }


# -- report ---------------------------------------------------------------------------------------


def _num(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def write_report(results: dict, out_dir: Path) -> None:
    from prunedlora.cpu import machine_line

    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    s = results["settings"]
    dense = results.get("dense")
    lines = [
        "# LoRAPrune on SmolLM2-135M-Instruct: perplexity, size and training memory per criterion",
        "",
        f"Small CPU run: {s['steps']} optimizer steps, batch {s['batch']}, max length {s['max_length']} tokens, "
        f"lr 2e-4 (warmup {s['warmup']}), LoRA r=8 on all 7 projections, pruning event every {s['prune_every']} "
        f"steps on the cubic ramp 10%->90% of the steps, seed {s['seed']}; data: the recipe's GSM8K with loss "
        "on the response only (not the GSM8K + CodeAlpaca all-token mix the issue names: `prunedlora.tasks` "
        "reads one task and the collator masks the prompt). Perplexity: `prunedlora.perplexity` (WikiText-2 "
        "wiki.test.raw rows joined as the HF split is, PTB ptb.test.txt sentences joined by spaces), 512-token "
        f"non-overlapping windows, the first {s['max_windows']} of each, exp of mean NLL, float32, pruned base "
        "with its adapter merged; dense = the base model without adapter. "
        "Peak RSS: each training run's own process (one torch thread), `os.wait4` ru_maxrss; it does not "
        "separate the criteria (see the training-memory table below for what does). "
        "At this scale (tens of steps, a 135M model) the recovery is far from the paper's; the ranking is "
        "what the table can speak to, and only loosely.",
        "",
        "| run | criterion | target | linear weights removed | params | bytes on disk | WikiText-2 ppl | PTB ppl | "
        "peak train RSS (MiB) | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if dense:
        lines.append(
            f"| dense | - | 0 | 0.000 | {dense['params'] / 1e6:.1f}M | {dense['bytes'] / 2**20:.1f} MiB | "
            f"{dense['wikitext2']['ppl']:.2f} | {dense['ptb']['ppl']:.2f} | - | - |"
        )
    for name, run in results["runs"].items():
        if "wikitext2" not in run:
            continue
        rel_b = f" ({run['bytes'] / dense['bytes']:.2f}x)" if dense else ""
        rel_p = f" ({run['params'] / dense['params']:.2f}x)" if dense else ""
        lines.append(
            f"| {name} | {run['criterion']} | {run['sparsity']} | {run['removed']:.3f} | "
            f"{run['params'] / 1e6:.1f}M{rel_p} | {run['bytes'] / 2**20:.1f} MiB{rel_b} | "
            f"{run['wikitext2']['ppl']:.2f} | {run['ptb']['ppl']:.2f} | {_num(run['peak_rss_mib'])} | "
            f"{_num(run['train_wall_s'])} |"
        )
    lines += memory_table(results)
    if results.get("notes"):  # written by hand after a run: what the numbers do and do not show
        lines += ["", "Notes:", "", *(f"- {note}" for note in results["notes"])]
    lines += [
        "",
        "Shapes of the pruned bases (query heads / KV heads / MLP width per layer; dense 9 / 3 / 1536): "
        + ", ".join(f"{n} {r['shape']}" for n, r in results["runs"].items() if "shape" in r),
        "",
        f"Rerun: `{results['rerun']}` (skips what eval.json holds; delete it or pass --redo NAME to measure again).",
        "",
        f"Machine: {machine_line(results.get('machine'))} (shared with another training job; times are "
        "indicative only).",
        "",
    ]
    (out_dir / "eval.md").write_text("\n".join(lines))
    plot(results, out_dir / "eval.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    markers = {"lora": "o", "lora-act": "D", "grad": "s", "magnitude": "^", "random": "x"}
    dense = results.get("dense")
    for ax, corpus, title in zip(axes, ("wikitext2", "ptb"), ("WikiText-2 test", "PTB test")):
        if dense:
            ax.axhline(dense[corpus]["ppl"], color="gray", ls="--", label="dense")
        for criterion, marker in markers.items():
            pts = sorted(
                (r["removed"], r[corpus]["ppl"])
                for r in results["runs"].values()
                if r.get("criterion") == criterion and corpus in r
            )
            if pts:
                ax.plot(*zip(*pts), marker=marker, ls="-", label=criterion)
        ax.set_yscale("log")
        ax.set_xlabel("fraction of decoder linear weights removed")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"{title} ({results['settings']['max_windows']} x 512 tokens)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    s = results["settings"]
    fig.suptitle(f"LoRAPrune, SmolLM2-135M, {s['steps']} steps x batch {s['batch']} x {s['max_length']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--prune-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-windows", type=int, default=12)
    parser.add_argument(
        "--data",
        choices=list(DATA),
        default="gsm8k",
        help="training data: gsm8k (response-only loss, the runs so far) or mix (GSM8K + CodeAlpaca, loss on all tokens)",
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--redo", nargs="*", default=[], help="configurations to measure again")
    parser.add_argument("--report-only", action="store_true", help="rewrite eval.md and eval.png from eval.json")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--memory",
        action="store_true",
        help="measure only the live tensor memory of a few training steps per configuration (no training run)",
    )
    parser.add_argument(
        "--adopt",
        nargs="*",
        default=[],
        help="configurations whose finished run directory (same settings) is measured instead of retrained",
    )
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument(
        "--memory-batches", type=int, nargs="+", default=None, help="batch sizes (default: --batch and 1)"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunedlora.cpu import machine_record
    from prunedlora.loraprune.export import export_pruned
    from prunedlora.models import resolve_model

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    path = out_dir / "eval.json"
    settings = {
        k: getattr(args, k)
        for k in ("steps", "batch", "max_length", "warmup", "prune_every", "seed", "max_windows", "data")
    }
    results = json.loads(path.read_text()) if path.is_file() else {}
    if "settings" in results:
        results["settings"].setdefault("data", "gsm8k")  # measured before --data existed: the recipe's GSM8K
    if args.report_only:
        write_report(results, out_dir)
        return
    if results.get("settings", settings) != settings:
        raise SystemExit(f"{path} was measured with {results['settings']}, not {settings}: use another --out")
    results["settings"] = settings
    results.setdefault("runs", {})
    results["machine"] = machine_record(dtype="float32", threads="1 torch thread")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if v != parser.get_default(k))
    results["rerun"] = f"python benchmarks/loraprune_eval.py {flags}".rstrip()

    if args.memory:
        sizes = args.memory_batches or sorted({args.batch, 1}, reverse=True)
        results["memory_settings"] = {"steps": args.memory_steps, "batches": sizes, "length": args.max_length}
        for name in ["reference", *args.configs]:
            if name != "reference" and name not in args.redo and "train_memory" in results["runs"].get(name, {}):
                print(f"{name}: memory already in {path}, skipped", flush=True)
                continue
            criterion, sparsity = (None, 0.5) if name == "reference" else CONFIGS[name]
            if name == "reference" and "memory_reference" in results and "reference" not in args.redo:
                continue
            print(f"{name}: memory of {args.memory_steps} steps ...", flush=True)
            measured = step_memory(criterion, sparsity, args, sizes, args.memory_steps)
            if name == "reference":
                results["memory_reference"] = {"criterion": None, "train_memory": measured}
            else:
                results["runs"].setdefault(name, {}).update(
                    criterion=criterion, sparsity=sparsity, train_memory=measured
                )
            write_report(results, out_dir)
        return

    model_dir = resolve_model("default")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from prunedlora.perplexity import read_corpus, tokenize_corpus

    corpora = {name: tokenize_corpus(tokenizer, read_corpus(name)) for name in CORPORA}
    if results.get("dense", {}).get("ppl_protocol") != PROTOCOL:
        results.pop("dense", None)
    for run in results["runs"].values():
        if run.get("ppl_protocol") != PROTOCOL:
            for key in ("wikitext2", "ptb"):
                run.pop(key, None)

    if "dense" not in results:
        t0 = time.time()
        dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        results["dense"] = {**measure(dense, corpora, args.max_windows), "bytes": folder_bytes(Path(model_dir))}
        del dense
        print(
            f"dense: {results['dense']['wikitext2']['ppl']:.2f} / {results['dense']['ptb']['ppl']:.2f} "
            f"({time.time() - t0:.0f}s)",
            flush=True,
        )
        write_report(results, out_dir)

    for name in args.configs:
        criterion, sparsity = CONFIGS[name]
        run = results["runs"].get(name, {})
        if name in args.redo:
            run = {k: v for k, v in run.items() if k == "train_memory"}  # measured by --memory, not retrained
        if "wikitext2" in run:
            print(f"{name}: already in {path}, skipped", flush=True)
            continue
        run.update(criterion=criterion, sparsity=sparsity)
        run_dir, pruned_dir = WORK / name, WORK / f"{name}-pruned"
        if "peak_rss_mib" not in run and name in args.adopt:
            run.update(adopt(name, criterion, sparsity, args, run_dir))
            results["runs"][name] = run
            print(f"{name}: adopted the finished run in {run_dir.relative_to(ROOT)}", flush=True)
        if "peak_rss_mib" not in run:
            print(f"{name}: training ...", flush=True)
            run.update(train(name, criterion, sparsity, args, run_dir))
            results["runs"][name] = run
            write_report(results, out_dir)
            print(f"{name}: trained in {run['train_wall_s']:.0f}s, peak RSS {run['peak_rss_mib']:.0f} MiB", flush=True)
        pruned = export_pruned(run_dir, pruned_dir, overwrite=True)
        info = (
            json.loads((pruned_dir / "loraprune.json").read_text()) if (pruned_dir / "loraprune.json").is_file() else {}
        )
        run["export_max_abs_logit_diff"] = pruned.max_abs_logit_diff
        run["shape"] = f"{pruned.num_attention_heads}/{pruned.num_key_value_heads}/{pruned.intermediate_size}"
        run["planned_sparsity"] = info.get("achieved_sparsity", info.get("sparsity"))
        base = AutoModelForCausalLM.from_pretrained(pruned.base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, pruned.adapter).merge_and_unload().eval()
        t0 = time.time()
        run.update(measure(merged, corpora, args.max_windows))
        run["bytes"] = folder_bytes(pruned.base)
        run["removed"] = 1 - run["linear_params"] / results["dense"]["linear_params"]
        del base, merged
        results["runs"][name] = run
        write_report(results, out_dir)
        print(
            f"{name}: shape {run['shape']}, removed {run['removed']:.3f}, ppl {run['wikitext2']['ppl']:.2f} / "
            f"{run['ptb']['ppl']:.2f} ({time.time() - t0:.0f}s)",
            flush=True,
        )
    write_report(results, out_dir)


if __name__ == "__main__":
    main()
