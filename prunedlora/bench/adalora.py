"""PEFT's AdaLoRA as a quality baseline, trained exactly like a ``prunedlora train`` run otherwise.

Same base model, data (tokenization, order), optimizer settings, seed and steps as the recipe; only
the adapter differs: ``AdaLoraConfig(init_r=r0, target_r=target rank, total_step=max_steps)`` with its
budget schedule mapped onto the recipe's pruning window (``tinit`` = first pruning step, budget at the
target from the last pruning step on, ``deltaT`` = pruning interval), so both methods spend the same
steps at full rank, shrinking and at the final budget. AdaLoRA needs
``model.base_model.update_and_allocate(step)`` after every optimizer step while the gradients still
exist: :class:`AdaLoraCallback` calls it from the Trainer's ``on_optimizer_step``.

AdaLoRA's importance statistics live only in memory, so an interrupted AdaLoRA run starts over
(no checkpoints are written).
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from prunedlora.errors import PrunedLoraError
from prunedlora.modelfacts import resolve_targets
from prunedlora.staging import write_text_atomic
from prunedlora.train.recipe import TrainRecipe
from prunedlora.train.runner import TrainResult

ADAPTER_DIR = "adapter"
DONE_FILE = "adalora_done.json"


class AdaLoraBenchError(PrunedLoraError):
    """The recipe cannot be mapped onto an AdaLoRA schedule."""


class AdaLoraCallback(TrainerCallback):
    """Calls AdaLoRA's budget allocator after each optimizer step (before the Trainer zeroes grads)."""

    def __init__(self, model) -> None:
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)


@dataclass
class AdaLoraResult(TrainResult):
    """``train``'s result for a PEFT AdaLoRA run (``run_dir`` is OUT_DIR), plus where its adapter is."""

    adapter_dir: Path | None = None
    seconds: float = 0.0
    model: object = None  # the trained PeftModel, only with keep_model=True


def schedule_window(recipe: TrainRecipe, num_modules: int) -> tuple[int, int, int]:
    """(tinit, tfinal, deltaT) matching the recipe's pruning schedule (its first and last events)."""
    from prunedlora.rank.schedule import PruningSchedule

    events = PruningSchedule.build(recipe.method, num_modules).events
    if not events:
        raise AdaLoraBenchError("the recipe's schedule has no pruning event, so there is no budget to match")
    first, last = events[0].step, events[-1].step
    total = recipe.training.max_steps
    if last >= total:
        raise AdaLoraBenchError(f"the last pruning event (step {last}) is not before max_steps ({total})")
    tinit, tfinal = first, total - last
    if tinit >= total - tfinal:  # a single event: give AdaLoRA one step of budgeting before it
        tinit = max(0, total - tfinal - 1)
    return tinit, tfinal, max(1, recipe.method.prune_every)


def adalora_config(recipe: TrainRecipe, num_modules: int):
    from peft import AdaLoraConfig

    method = recipe.method
    target = method.target_rank
    if target is None or not float(target).is_integer():
        raise AdaLoraBenchError(f"AdaLoRA's target_r is an integer average rank; got target_rank={target}")
    tinit, tfinal, delta = schedule_window(recipe, num_modules)
    return AdaLoraConfig(
        init_r=method.r0,
        target_r=int(target),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta,
        total_step=recipe.training.max_steps,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules=list(method.target_modules),
        task_type="CAUSAL_LM",
    )


_E_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_E(?:\.[^.]+)?$")


def ranks_from_pattern(
    rank_pattern: dict[str, list[bool]] | None, module_names: list[str], init_r: int
) -> dict[str, int]:
    """Per-module rank from AdaLoRA's saved rank_pattern ({``...<module>.lora_E[.adapter]``: bools})."""
    if not rank_pattern:
        return dict.fromkeys(module_names, init_r)
    ranks = {}
    for key, kept in rank_pattern.items():
        match = _E_KEY.match(key)
        if match:
            ranks[match["module"]] = int(sum(bool(k) for k in kept))
    return {name: ranks.get(name, init_r) for name in module_names}


def train_adalora(recipe: TrainRecipe, out_dir: str | Path, keep_model: bool = False) -> AdaLoraResult:
    """Train PEFT AdaLoRA with the recipe's data and settings; write ``out_dir/adapter``.

    A finished run (``out_dir/adalora_done.json``) is not trained again. ``keep_model`` returns the
    trained PeftModel in the result (to check the saved adapter against it).
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from prunedlora.models import resolve_model
    from prunedlora.train.data import build_train_dataset, make_collator
    from prunedlora.train.runner import training_arguments

    out_dir = Path(out_dir)
    done = out_dir / DONE_FILE
    if done.is_file() and not keep_model:
        payload = json.loads(done.read_text())
        return AdaLoraResult(
            run_dir=out_dir,
            adapter_dir=out_dir / ADAPTER_DIR,
            ranks=payload["ranks"],
            average_rank=payload["average_rank"],
            train_loss=payload["train_loss"],
            losses=[tuple(x) for x in payload["losses"]],
            global_step=payload["global_step"],
            seconds=payload["seconds"],
        )
    start = time.perf_counter()
    opts = recipe.training
    model_dir = resolve_model(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(opts.seed)  # as the runner: the seed before the adapter is initialised
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, opts.dtype))
    # all-linear -> the family's projections (modelfacts), as the runner resolves them
    recipe = replace(
        recipe, method=replace(recipe.method, target_modules=resolve_targets(model_dir, recipe.method.target_modules))
    )
    targets = set(recipe.method.target_modules)
    module_names = [
        n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets
    ]
    if not module_names:
        raise AdaLoraBenchError(f"no linear module of {model_dir} is named {sorted(targets)}")
    model = get_peft_model(base, adalora_config(recipe, len(module_names)))
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    dataset = build_train_dataset(tokenizer, recipe.data)
    # the runner's arguments, without checkpoints (see the module docstring)
    args = training_arguments(opts, out_dir / "trainer", save_strategy="no", disable_tqdm=False)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=make_collator(tokenizer),
        callbacks=[AdaLoraCallback(model)],
    )
    output = trainer.train()
    config = model.peft_config["default"]
    ranks = ranks_from_pattern(config.rank_pattern, module_names, config.init_r)
    with warnings.catch_warnings():
        # Modules AdaLoRA pruned to rank 0 are saved as 0-sized tensors, by design; PEFT warns about them
        # as if they were unsharded ZeRO-3 weights.
        warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape")
        model.save_pretrained(str(out_dir / ADAPTER_DIR))
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    result = AdaLoraResult(
        run_dir=out_dir,
        adapter_dir=out_dir / ADAPTER_DIR,
        ranks=ranks,
        average_rank=sum(ranks.values()) / len(ranks),
        train_loss=float(output.training_loss),
        losses=losses,
        global_step=trainer.state.global_step,
        seconds=time.perf_counter() - start,
        model=model if keep_model else None,
    )
    write_text_atomic(
        done,
        json.dumps(
            {
                "ranks": ranks,
                "average_rank": result.average_rank,
                "train_loss": result.train_loss,
                "losses": losses,
                "global_step": result.global_step,
                "seconds": result.seconds,
            },
            indent=2,
        )
        + "\n",
    )
    return result
