"""One base for many task adapters: merge a frozen residual into the base, keep only the task rank.

Adapters trained from the same ``sparsify`` folder with ``residual: frozen`` all carry the same first
``residual_rank`` components (E_r). Merging E_r once into the dense base (W = M*W0 + E_r) leaves each
adapter only its task components, so vLLM serves several rank-``task_rank`` adapters over one base
instead of rank ``residual_rank + task_rank`` each. The base is no longer sparse (E_r is dense), so
this trades the compressed base for smaller adapters; the compressed store stays as it was.

PEFT scales by s = lora_alpha / r (rsLoRA: / sqrt(r)); cutting r changes s, so the task adapter gets
lora_alpha' = s * r' (rsLoRA: s * sqrt(r')) and its factors are copied unchanged: s B A is the same.
Everything is checked before the folder is renamed into place: each adapter's residual components
must equal the sparsify adapter's (else the residual was trained and is not shared), and base + task
adapter must give the logits of sparse base + full adapter.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from prunedlora.metadata import write_json_atomic
from prunedlora.modelfacts import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LORA_A_SUFFIX, LORA_B_SUFFIX, PEFT_PREFIX
from prunedlora.salr.errors import SalrError
from prunedlora.salr.materialise import materialise
from prunedlora.staging import staged_directory

_PROBE = [[1, 15, 300, 42, 7, 900, 12, 5, 77, 3]]


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
        tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS_FILE))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise SalrError(f"{adapter_dir} is not a readable PEFT adapter: {err}") from err
    if config.get("peft_type") != "LORA" or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise SalrError(f"{adapter_dir} is not a uniform-rank PEFT LoRA (as sparsify writes it)")
    return config, tensors


def scaling(config: dict, rank: int) -> float:
    return config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)


def split(config: dict, tensors: dict[str, torch.Tensor], r_res: int) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(module -> E_r delta, task adapter config, task adapter tensors) of one adapter."""
    rank = config["r"]
    if not 0 < r_res < rank:
        raise SalrError(f"an adapter of rank {rank} has no task components after {r_res} residual ones")
    s = scaling(config, rank)
    deltas, task = {}, {}
    for key, A in tensors.items():
        if not key.endswith(LORA_A_SUFFIX):
            continue
        module = key[len(PEFT_PREFIX) : -len(LORA_A_SUFFIX)]
        B = tensors[f"{PEFT_PREFIX}{module}{LORA_B_SUFFIX}"]
        deltas[f"{module}.weight"] = s * (B[:, :r_res].double() @ A[:r_res].double())
        task[key] = A[r_res:].contiguous()
        task[f"{PEFT_PREFIX}{module}{LORA_B_SUFFIX}"] = B[:, r_res:].contiguous()
    r_task = rank - r_res
    alpha = s * (math.sqrt(r_task) if config.get("use_rslora") else r_task)
    return deltas, {**config, "r": r_task, "lora_alpha": alpha}, task


def _max_logit_diff(base_a: Path, adapter_a: Path, base_b: Path, adapter_b: Path) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(_PROBE)
    logits = []
    for base, adapter in ((base_a, adapter_a), (base_b, adapter_b)):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    return float((logits[0] - logits[1]).abs().max())


def share_residual(
    salr_dir: str | os.PathLike, adapters: dict[str, str | os.PathLike], out_dir: str | os.PathLike, tolerance=1e-3
) -> Path:
    """Write ``out_dir/base`` (M*W0 + E_r, dense) and ``out_dir/adapters/NAME`` (task components only)
    for each trained adapter in ``adapters`` (name -> folder), all from one ``sparsify`` folder."""
    from safetensors.torch import save_file

    from prunedlora.salr.pipeline import ADAPTER_DIR, BASE_DIR, STORE_DIR
    from prunedlora.salr.training import read_record

    salr_dir, out_dir = Path(salr_dir), Path(out_dir)
    r_res = read_record(salr_dir)["config"]["residual_rank"]
    reference, ref_tensors = read_adapter(salr_dir / ADAPTER_DIR)
    deltas, _, _ = split(reference, ref_tensors, r_res)
    plans = {}
    for name, folder in adapters.items():
        config, tensors = read_adapter(Path(folder))
        if set(tensors) != set(ref_tensors):
            raise SalrError(f"adapter {name} ({folder}) targets other modules than {salr_dir / ADAPTER_DIR}")
        mine, task_config, task = split(config, tensors, r_res)
        worst = max(float((mine[k] - deltas[k]).abs().max()) for k in deltas)
        if worst > 1e-6 * max(1.0, max(float(d.abs().max()) for d in deltas.values())):
            raise SalrError(
                f"adapter {name}: its residual components moved by {worst:.3g}; train it with residual: frozen"
            )
        plans[name] = (Path(folder), task_config, task)
    final = out_dir.resolve()
    with staged_directory(out_dir) as stage:
        materialise(salr_dir / STORE_DIR, stage / "base", add={k: d.float() for k, d in deltas.items()})
        for name, (folder, task_config, task) in plans.items():
            target = stage / "adapters" / name
            target.mkdir(parents=True)
            save_file(task, str(target / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
            write_json_atomic(
                target / ADAPTER_CONFIG_FILE, {**task_config, "base_model_name_or_path": str(final / "base")}
            )
            diff = _max_logit_diff(salr_dir / BASE_DIR, folder, stage / "base", target)
            if diff > tolerance:
                raise SalrError(f"adapter {name}: merged base + task adapter differ from the original by {diff:.3g}")
    return out_dir
