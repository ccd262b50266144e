"""SALR before training: what sparsity costs in perplexity, what the SVD residual gives back, and bytes.

For the default model (SmolLM2-135M-Instruct, float32) this measures WikiText-2 test perplexity of the
dense base W0, of the pruned base M*W0 and of M*W0 + E_r (E_r: the rank-r truncated SVD of the pruning
residual E = W0 - M*W0) for magnitude and Wanda masks at each unstructured sparsity and at 2:4, on
the seven projections of every layer (SparsifyConfig's default targets). PTB is measured for the key
rows (dense and 50% with and without the largest residual). Bytes on disk come from writing the
compressed bitmap store (prunedlora.salr.storage) of the magnitude-pruned model at each sparsity.
``--fits svd whitened`` adds the rows of the whitened residual fit (``residual_fit: whitened``: the
truncation best for each layer's output on the calibration text; rows ``<base>+E<r>-whitened``).

Masks, Wanda's calibration pass and the residual's SVD are the salr package's own functions; the
residual is added to the weight in place of a PEFT adapter (``sparsify`` checks that its written
adapter equals E_r to 1e-4, so both give the same model up to float rounding). One SVD at the largest
rank serves every rank: the first r components of a rank-R truncation are the rank-r truncation.

Perplexity is over the first ``--windows`` non-overlapping 512-token windows (the cap is recorded):
on a shared 2-core CPU one window costs about 2.7 s at one thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/salr_eval.py [--windows 16] [--ptb-windows 16]
        [--sparsities 0.3 0.5] [--ranks 8 32] [--masks magnitude wanda]

Writes benchmarks/results/salr/perplexity.json (each row as it finishes; a rerun with the same
settings skips rows already there), perplexity.md and perplexity.png.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = Path(__file__).parent / "results" / "salr"


def rel(path: Path) -> str:
    """``path`` relative to the repository where it lies inside or beside it (the shared data folder)."""
    path = Path(path).resolve()
    for root, prefix in ((REPO, ""), (REPO.parent, "../")):
        if path.is_relative_to(root):
            return prefix + str(path.relative_to(root))
    return str(path)


def settings(sparsities: list[float], masks: list[str]) -> list[tuple[str, str, float]]:
    """(mask, pattern, sparsity) for every pruned base: 50% first (the key rows, kept if a run is cut
    short), then 2:4, then the other sparsities from the highest."""
    order = sorted(sparsities, key=lambda s: (s != 0.5, -s))
    rows = [(mask, "unstructured", s) for s in order[:1] for mask in masks if order[0] == 0.5]
    rows += [(mask, "2:4", 0.5) for mask in masks]
    return rows + [(mask, "unstructured", s) for s in order if s != 0.5 for mask in masks]


def row_key(mask: str, pattern: str, sparsity: float, rank: int, fit: str = "svd") -> str:
    base = f"{mask}-2:4" if pattern == "2:4" else f"{mask}{round(sparsity * 100)}"
    return base if rank == 0 else f"{base}+E{rank}" + ("" if fit == "svd" else f"-{fit}")


def target_linears(model, targets: list[str]) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


def calibrate(model, tokenizer, modules: list[str], config, gather) -> dict[str, torch.Tensor]:
    """``gather`` (calibration.input_norms or input_grams) over sparsify's default calibration batch."""
    from prunedlora.salr.calibration import calibration_batch, default_calibration_text

    batch = calibration_batch(
        tokenizer, default_calibration_text(), config.calibration_samples, config.calibration_length
    )
    return gather(model, modules, batch)


@torch.no_grad()
def prune_setting(originals, norms, mask: str, pattern: str, sparsity: float, max_rank: int, grams=None):
    """Per module: (M*W0, residual factors at ``max_rank``, zeros) from the salr package's functions;
    with ``grams``, the whitened fit's factors instead of the plain SVD's."""
    from prunedlora.salr.mask import keep_mask
    from prunedlora.salr.residual import residual_factors, whitened_residual_factors

    out = {}
    for name, weight in originals.items():
        keep = keep_mask(weight, sparsity, pattern, norms[name] if mask == "wanda" else None)
        zero = torch.zeros((), dtype=weight.dtype)
        removed = torch.where(keep, zero, weight)
        if grams is None:
            factors = residual_factors(removed, max_rank)
        else:
            factors = whitened_residual_factors(removed, grams[name], max_rank)
        out[name] = (torch.where(keep, weight, zero), factors, int((~keep).sum()))
    return out


@torch.no_grad()
def set_weights(modules, pruned, rank: int) -> float:
    """Load M*W0 (+ E_r) into the model; return the mean relative residual error ||E - E_r|| / ||E|| (the
    whitened fit's: in its output norm). Both fits have B = U sqrt(S), so ||B_j||^4 is the j-th s_j^2."""
    errors = []
    for name, (sparse, f, _) in pruned.items():
        weight = sparse.clone()
        if rank:
            weight += f.B[:, :rank] @ f.A[:rank]
        modules[name].weight.copy_(weight)
        missing = f.total_sq - float((f.B[:, :rank].double().square().sum(0) ** 2).sum())
        errors.append((max(missing, 0.0) / f.total_sq) ** 0.5 if f.total_sq > 0 else 0.0)
    return sum(errors) / len(errors)


def store_bytes(model_dir: Path, names: list[str], originals, pruned) -> dict:
    """Write the compressed store of the pruned model to a temporary folder and report its bytes."""
    from prunedlora.salr.materialise import read_model_tensors
    from prunedlora.salr.storage import save_store

    tensors = read_model_tensors(model_dir)
    sparse = {f"{name}.weight": pruned[name][0] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        report = save_store({**tensors, **sparse}, list(sparse), Path(tmp) / "store")
    dense_file = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return {
        "compressed_file": report.file_bytes,
        "dense_tensors": report.dense_bytes,
        "dense_file": dense_file,
        "ratio_model": report.ratio,
        "sparse_weights_dense": report.sparse_dense_bytes,
        "sparse_weights_stored": report.sparse_stored_bytes,
        "ratio_linear": report.sparse_ratio,
    }


def adapter_bytes(originals, rank: int) -> int:
    """fp32 bytes of a rank-``rank`` residual adapter on every target module (B and A)."""
    return sum(rank * (w.shape[0] + w.shape[1]) * 4 for w in originals.values())


def write_results(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 512-token windows (0: all)")
    parser.add_argument("--ptb-windows", type=int, default=16, help="PTB windows for the key rows (0: skip PTB)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--masks", nargs="+", default=["magnitude", "wanda"], choices=["magnitude", "wanda"])
    parser.add_argument("--fits", nargs="+", default=["svd"], choices=["svd", "whitened"], help="residual fits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(OUT_DIR))
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the .json")
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((Path(args.out) / "perplexity.json").read_text()), Path(args.out))
        return

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunedlora.cpu import machine_line, machine_record
    from prunedlora.models import resolve_model
    from prunedlora.perplexity import PerplexityConfig, corpus_path, perplexity_of_ids, read_corpus, tokenize_corpus
    from prunedlora.salr.config import SparsifyConfig

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "perplexity.json"
    model_dir = resolve_model(None if args.model == "default" else args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = SparsifyConfig()
    modules = target_linears(model, config.target_modules)
    names = sorted(modules)
    originals = {name: modules[name].weight.detach().clone() for name in names}
    max_rank = max(args.ranks)
    ranks = [0, *sorted(args.ranks)]

    wiki = PerplexityConfig(window=512, max_windows=args.windows or None)
    ptb = PerplexityConfig(window=512, max_windows=args.ptb_windows or None)
    ids = {"wikitext2": tokenize_corpus(tokenizer, read_corpus("wikitext2"))}
    if args.ptb_windows:
        ids["ptb"] = tokenize_corpus(tokenizer, read_corpus("ptb"))
    protocol = {
        "model": rel(model_dir)
        if args.model != "default"
        else "default (SmolLM2-135M-Instruct, dequantized Q4_1 GGUF)",
        "dtype": "float32",
        "torch_threads": torch.get_num_threads(),
        "window": 512,
        "max_windows": {"wikitext2": wiki.max_windows, "ptb": ptb.max_windows if args.ptb_windows else None},
        "corpora": {name: rel(corpus_path(name)) for name in ids},
        "corpus_tokens": {name: int(t.numel()) for name, t in ids.items()},
        "targets": list(config.target_modules),
        "target_modules": len(names),
        "wanda_calibration": f"{config.calibration_samples} x {config.calibration_length} tokens of the packaged CodeAlpaca slice",
        "ranks": ranks,
    }
    data = json.loads(results_path.read_text()) if results_path.exists() else {}
    if data.get("protocol", {}).get("max_windows") != protocol["max_windows"]:
        data = {}  # a different cap: the old rows do not compare
    data["protocol"] = protocol
    here = machine_record(dtype="float32", threads=str(torch.get_num_threads()))
    # rows kept from another machine keep the file's machine; rows measured here say where, if it differs
    elsewhere = "machine" in data and machine_line(data["machine"]) != machine_line(here)
    data.setdefault("machine", here)
    data.setdefault("rows", {})
    data.setdefault("bytes", {})
    data["rerun"] = (
        "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/salr_eval.py "
        f"--windows {args.windows} --ptb-windows {args.ptb_windows} "
        f"--sparsities {' '.join(map(str, args.sparsities))} --ranks {' '.join(map(str, args.ranks))} "
        f"--masks {' '.join(args.masks)}" + ("" if args.fits == ["svd"] else f" --fits {' '.join(args.fits)}")
    )

    def measure(key: str, row: dict, with_ptb: bool) -> None:
        done = data["rows"].get(key, {})
        if "wikitext2" in done and (not with_ptb or "ptb" in done or "ptb" not in ids):
            print(f"{key}: kept from {results_path.name}", flush=True)
            return
        start = time.time()
        row["wikitext2"] = perplexity_of_ids(model, ids["wikitext2"], wiki, corpus="wikitext2").to_dict()
        if with_ptb and "ptb" in ids:
            row["ptb"] = perplexity_of_ids(model, ids["ptb"], ptb, corpus="ptb").to_dict()
        row["seconds"] = round(time.time() - start, 1)
        if elsewhere:
            row["machine"] = machine_line(here)
        data["rows"][key] = row
        write_results(results_path, data)
        ptb_text = f", PTB {row['ptb']['ppl']:.2f}" if "ptb" in row else ""
        print(f"{key}: WikiText-2 {row['wikitext2']['ppl']:.2f}{ptb_text} ({row['seconds']} s)", flush=True)

    measure("dense", {"mask": "dense", "pattern": None, "sparsity": 0.0, "rank": 0}, with_ptb=True)
    from prunedlora.salr.calibration import input_grams, input_norms

    norms = calibrate(model, tokenizer, names, config, input_norms) if "wanda" in args.masks else {}
    grams = calibrate(model, tokenizer, names, config, input_grams) if "whitened" in args.fits else None
    if grams is not None:
        protocol["whitened_calibration"] = protocol["wanda_calibration"]
    for (mask, pattern, sparsity), fit in (
        (setting, fit) for setting in settings(args.sparsities, args.masks) for fit in args.fits
    ):
        # rank 0 (no residual) is one row whatever the fit; the svd fit measures it
        fit_ranks = ranks if fit == "svd" else ranks[1:]
        keys = [row_key(mask, pattern, sparsity, r, fit) for r in fit_ranks]
        bytes_key = row_key("magnitude", pattern, sparsity, 0)
        need_bytes = fit == "svd" and mask == "magnitude" and bytes_key not in data["bytes"]
        if all(k in data["rows"] for k in keys) and not need_bytes:
            print(f"{', '.join(keys)}: kept", flush=True)
            continue
        t0 = time.time()
        pruned = prune_setting(
            originals, norms, mask, pattern, sparsity, max_rank, grams if fit == "whitened" else None
        )
        print(f"{mask} {pattern} {sparsity} ({fit}): masks and fits in {time.time() - t0:.0f} s", flush=True)
        if need_bytes:
            data["bytes"][bytes_key] = {
                "sparsity": sparsity,
                "pattern": pattern,
                **store_bytes(model_dir, names, originals, pruned),
            }
            write_results(results_path, data)
        zeros = sum(p[2] for p in pruned.values()) / sum(w.numel() for w in originals.values())
        for rank, key in zip(fit_ranks, keys):
            error = set_weights(modules, pruned, rank)
            row = {
                "mask": mask,
                "pattern": pattern,
                "sparsity": sparsity,
                "zero_fraction": zeros,
                "rank": rank,
                **({} if fit == "svd" else {"fit": fit}),
                "residual_relative_error_mean": error,
                "adapter_bytes_fp32": adapter_bytes(originals, rank),
            }
            key_row = pattern == "unstructured" and sparsity == 0.5 and rank in (0, max_rank)
            measure(key, row, with_ptb=key_row)
    with torch.no_grad():
        for name in names:
            modules[name].weight.copy_(originals[name])
    write_report(data, out)


def write_report(data: dict, out: Path) -> None:
    """perplexity.md (table, bytes, rerun command) and perplexity.png from the results file."""
    from prunedlora.cpu import machine_line

    rows, proto = data["rows"], data["protocol"]
    dense = rows.get("dense", {}).get("wikitext2", {}).get("ppl")
    wiki_cap, ptb_cap = proto["max_windows"]["wikitext2"], proto["max_windows"]["ptb"]
    lines = [
        "### SALR before training: perplexity of the sparse base and what the residual gives back",
        "",
        f"SmolLM2-135M-Instruct ({proto['dtype']}), {proto['target_modules']} projections pruned "
        f"({', '.join(proto['targets'])} of every layer), one mask per module; WikiText-2 test perplexity over the first {wiki_cap} "
        f"non-overlapping {proto['window']}-token windows ({wiki_cap * (proto['window'] - 1):,} predicted tokens"
        f" of {proto['corpus_tokens']['wikitext2']:,})"
        + (f", PTB test over the first {ptb_cap} windows" if ptb_cap else "")
        + '. E_r is the rank-r truncated SVD of the pruning residual (rows "-whitened": the rank-r truncation '
        "best for each layer's output on the calibration text; their error column is in that output norm, "
        '‖(E−E_r)L‖/‖EL‖), no training; "gap closed" is the share '
        "of the sparse base's log-perplexity increase over dense that E_r removes. "
        f"Wanda (and the whitened fit) calibrate on {proto['wanda_calibration']}. Machine: "
        f"{machine_line(data['machine'])} (rows marked † on another: below), "
        f"{proto['torch_threads']} torch thread(s).",
        "",
        "| base | sparsity | residual rank | mean ‖E−E_r‖/‖E‖ | WikiText-2 ppl | vs dense | gap closed | PTB ppl "
        "| adapter MB (fp32) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        ppl = row["wikitext2"]["ppl"]
        ptb = f"{row['ptb']['ppl']:.2f}" if "ptb" in row else ""
        err = f"{row['residual_relative_error_mean']:.3f}" if row.get("rank") else ""
        sparsity = "2:4" if row["pattern"] == "2:4" else f"{row['sparsity']:.0%}"
        ratio = f"{ppl / dense:.2f}x" if dense else ""
        mb = f"{row.get('adapter_bytes_fp32', 0) / 1e6:.1f}" if row.get("rank") else ""
        sparse = rows.get(key.split("+")[0], {}).get("wikitext2", {}).get("ppl")
        closed = ""
        if row.get("rank") and sparse and dense and sparse > dense:
            closed = f"{(math.log(sparse) - math.log(ppl)) / (math.log(sparse) - math.log(dense)):.0%}"
        mark = " †" if "machine" in row else ""
        lines.append(
            f"| {key}{mark} | {sparsity} | {row['rank'] or '—'} | {err} | {ppl:.2f} | {ratio} | {closed} | {ptb} | {mb} |"
        )
    other = sorted({row["machine"] for row in rows.values() if "machine" in row})
    if other:
        lines += [
            "",
            "† measured on " + "; ".join(other) + ".",
        ]
    if data["bytes"]:
        lines += [
            "",
            "Bytes on disk (bitmap store of the pruned model, fp32; embeddings and norms dense):",
            "",
            "| sparsity | compressed file | dense file | whole model | pruned linear weights |",
            "|---|---|---|---|---|",
        ]
        for key, b in data["bytes"].items():
            sparsity = "2:4" if b["pattern"] == "2:4" else f"{b['sparsity']:.0%}"
            lines.append(
                f"| {sparsity} | {b['compressed_file'] / 1e6:.1f} MB | {b['dense_file'] / 1e6:.1f} MB | "
                f"{b['dense_file'] / b['compressed_file']:.2f}x smaller | {b['ratio_linear']:.2f}x smaller |"
            )
    lines += ["", *reading(rows, dense)]
    lines += [
        "",
        "Rerun (3-4 s per window per model and about 70 s of SVDs per mask on a shared 2-core CPU):",
        "",
        f"    {data['rerun']}",
        "",
    ]
    (out / "perplexity.md").write_text("\n".join(lines))
    plot(data, out / "perplexity.png")


def reading(rows: dict, dense: float | None) -> list[str]:
    """How to read the table: the 50% rows in one line each, and what the numbers are not."""
    out = []
    for base in ("magnitude50", "wanda50", "magnitude-2:4", "wanda-2:4"):
        if base not in rows or not dense:
            continue
        sparse = rows[base]["wikitext2"]["ppl"]
        gap = math.log(sparse) - math.log(dense)
        parts = [
            f"{k.split('+')[1].replace('E', 'E_')} {r['wikitext2']['ppl']:.1f} "
            f"({(math.log(sparse) - math.log(r['wikitext2']['ppl'])) / gap:.0%} of the gap)"
            for k, r in rows.items()
            if k.startswith(base + "+E")
        ]
        out.append(f"- {base}: dense {dense:.1f} -> sparse {sparse:.1f}; with " + ", ".join(parts) + ".")
    out += [
        "- These are the adapter's starting points, before any training: the task LoRA components start at "
        "zero and SALR trains them with the residual (or keeps the residual frozen); task metrics after "
        "training are a separate measurement.",
        "- Bytes are on disk only: vLLM serves the materialised dense base (zeros written out) with dense GEMMs, "
        "so the zeros buy no speed there; the paper's speed-up needs a sparse GPU kernel.",
        "- The model is dequantized from the Q4_1 GGUF, so its dense perplexity is not the fp16 release's.",
    ]
    return out


def plot(data: dict, path: Path) -> None:
    from prunedlora.figures import new_figure, save_figure

    rows = data["rows"]
    fig = new_figure(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    dense = rows.get("dense", {}).get("wikitext2", {}).get("ppl")
    colors = {"magnitude": "tab:blue", "wanda": "tab:orange"}
    styles = {0: ("-", "o"), 8: ("--", "s"), 32: (":", "^")}
    for mask in ("magnitude", "wanda"):
        curves = sorted({(r["rank"], r.get("fit", "svd")) for r in rows.values() if r["mask"] == mask})
        for rank, fit in curves:
            mine = [r for r in rows.values() if r["mask"] == mask and r["rank"] == rank and r.get("fit", "svd") == fit]
            points = sorted((r["sparsity"], r["wikitext2"]["ppl"]) for r in mine if r["pattern"] == "unstructured")
            if not points:
                continue
            if dense:
                points = [(0.0, dense), *points]
            line, marker = styles.get(rank, ("-.", "d"))
            if fit != "svd":  # the whitened fit: same rank's marker, hollow, on a dash-dot line
                line = "-."
            label = f"{mask}" + (f" + E_{rank}" if rank else " (no residual)") + ("" if fit == "svd" else f" {fit}")
            face = "white" if fit != "svd" else colors[mask]
            ax.plot(*zip(*points), line, marker=marker, color=colors[mask], markerfacecolor=face, label=label)
            for r in (r for r in mine if r["pattern"] == "2:4"):
                ax.plot(
                    [0.52], [r["wikitext2"]["ppl"]], marker="*", markersize=11, color=colors[mask], linestyle="none"
                )
    if dense:
        ax.axhline(dense, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the seven projections (stars: 2:4, drawn just right of 0.5)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    cap = data["protocol"]["max_windows"]["wikitext2"]
    ax.set_title(f"SmolLM2-135M: sparse base with and without its residual (first {cap} x 512 tokens)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
