"""``train``: one recipe -> one run directory (see prunedlora.metadata for its files)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from prunedlora import metadata
from prunedlora.method import Method
from prunedlora.modelfacts import base_linear_shapes, model_facts, resolve_targets
from prunedlora.rank.config import PrunedLoraConfig
from prunedlora.tasks import DataError
from prunedlora.train.recipe import TrainRecipe

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainResult:
    """What a finished training gives back (``bench.adalora.AdaLoraResult`` extends it)."""

    run_dir: Path
    ranks: dict[str, int]
    average_rank: float
    train_loss: float
    losses: list[tuple[int, float]]
    global_step: int
    dev_losses: list[tuple[int, float]] = field(default_factory=list)


def lora_config_for(method: PrunedLoraConfig):
    """PEFT's LoraConfig at rank r0 for this method (training always starts at r0)."""
    from peft import LoraConfig

    return LoraConfig(
        r=method.r0,
        lora_alpha=method.lora_alpha,
        use_rslora=method.use_rslora,
        lora_dropout=method.lora_dropout,
        target_modules=list(method.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_peft_model(model_dir: Path, method: PrunedLoraConfig, dtype: str = "float32"):
    """The base model with LoRA at r0 on the target modules; fails clearly on names that match nothing."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    method = replace(method, target_modules=resolve_targets(model_dir, method.target_modules))  # all-linear
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    linear_names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    method.check_modules([n for n, _ in base.named_modules()], linear_names)
    return get_peft_model(base, lora_config_for(method))


def last_checkpoint(run_dir: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name))]
    return max(found)[1] if found else None


def training_arguments(opts, output_dir: str | Path, **overrides):
    """transformers' TrainingArguments from a recipe's ``training`` section, the same for every
    trainer this project runs (PrunedLoRA, plain LoRA, the AdaLoRA baseline) so that their steps,
    learning rate, data order and seed agree; ``overrides`` set what differs (checkpointing)."""
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(output_dir),
        max_steps=opts.max_steps,
        per_device_train_batch_size=opts.per_device_train_batch_size,
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        learning_rate=opts.learning_rate,
        weight_decay=opts.weight_decay,
        warmup_steps=opts.warmup_steps,
        lr_scheduler_type=opts.lr_scheduler_type,
        max_grad_norm=opts.max_grad_norm,
        logging_steps=opts.logging_steps,
        seed=opts.seed,
        data_seed=opts.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def train(recipe: TrainRecipe, resume: bool | str = "auto", callbacks: list | None = None) -> TrainResult:
    """Train the recipe's adapter with the recipe's method and write the run directory.

    The method (``recipe.method_class()``, ``prunedlora.method``) builds the model, gives the Trainer
    callbacks that drive it and writes its own files; this function knows no method by name.
    ``resume="auto"`` continues from the run directory's last checkpoint when there is one, so an
    interrupted command can simply be run again.
    """
    from transformers import AutoTokenizer, Trainer
    from transformers.trainer_callback import ProgressCallback

    from prunedlora.models import resolve_model
    from prunedlora.train.callback import RankLogCallback, RankProgressCallback
    from prunedlora.train.data import build_train_dataset, make_collator

    model_dir = resolve_model(recipe.model, tokenizer=True)
    run_dir = Path(recipe.training.output_dir)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = build_train_dataset(tokenizer, recipe.data)  # before the model: a bad data file fails fast
    dev_dataset = _dev_dataset(tokenizer, recipe)
    recipe = recipe.with_steps(recipe.training.steps_for(len(dataset)))
    # all-linear -> this model's projections (modelfacts), so the run record names the modules trained
    recipe = replace(
        recipe, method=replace(recipe.method, target_modules=resolve_targets(model_dir, recipe.method.target_modules))
    )
    recipe.method.check_modules(list(base_linear_shapes(model_dir)), model_facts(model_dir).module_paths())  # headers
    opts = recipe.training
    torch.manual_seed(opts.seed)
    method: Method = recipe.method_class()(recipe)
    model = method.build_model(model_dir, lambda config: build_peft_model(model_dir, config, opts.dtype))
    recipe = method.recipe  # a method may describe the adapter it built (SALR: the folder's shape)
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()

    method_callbacks = method.start(model, opts.max_steps)
    evaluation = {}
    if dev_dataset is not None:  # the dev loss, a few times a run, beside the training loss
        evaluation = dict(
            eval_strategy="steps",
            eval_steps=opts.eval_steps or max(1, opts.max_steps // 5),
            per_device_eval_batch_size=opts.per_device_train_batch_size,
            prediction_loss_only=True,  # logits of a whole dev split would not fit in memory
        )
    args = training_arguments(
        opts,
        run_dir,
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=opts.save_total_limit,
        ddp_find_unused_parameters=False,
        **evaluation,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dev_dataset,
        data_collator=make_collator(tokenizer),
        callbacks=[*method_callbacks, RankLogCallback(method), *(callbacks or [])],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RankProgressCallback(method))

    checkpoint = None
    if resume:
        checkpoint = Path(resume) if isinstance(resume, str) and resume != "auto" else last_checkpoint(run_dir)
        if checkpoint is not None:
            logger.warning("resuming from %s", checkpoint)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    dev_losses = [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
    if dev_losses:
        logger.info("dev loss: %s", ", ".join(f"step {s} {v:.4f}" for s, v in dev_losses))
    if trainer.is_world_process_zero():
        method.finish(run_dir)  # the method's own files, before the run record (written last)
        write_run_dir(run_dir, model, method, recipe, trainer.state.global_step, dev_losses=dev_losses)
        logger.info("run directory %s; next: prunedlora %s %s OUT", run_dir, method.export_command, run_dir)
    return TrainResult(
        run_dir=run_dir,
        ranks=method.ranks(),
        average_rank=method.average_rank,
        train_loss=float(output.training_loss),
        losses=losses,
        global_step=trainer.state.global_step,
        dev_losses=dev_losses,
    )


def _dev_dataset(tokenizer, recipe: TrainRecipe):
    """The first ``training.eval_examples`` of the dev split, tokenized as training tokenizes, or None
    when the dev loss is off (``training.eval_steps``) or the data has no dev split (a dev split is
    never a part of the training split: ``tasks.split_dev``)."""
    from prunedlora.tasks import has_dev_split
    from prunedlora.train.data import build_train_dataset

    every = recipe.training.eval_steps
    if every == 0 or (every is None and recipe.data.preset is not None) or not has_dev_split(recipe.data):
        return None
    dev = replace(recipe.data, split="dev", max_examples=recipe.training.eval_examples, mix=None)
    try:
        return build_train_dataset(tokenizer, dev)
    except DataError as err:  # too small for a carve, or nothing fits max_length: train without it
        logger.warning("no dev loss during training: %s", err)
        return None


def write_run_dir(
    run_dir: Path,
    model,
    method: Method,
    recipe: TrainRecipe,
    step: int,
    dev_losses: list[tuple[int, float]] | None = None,
) -> None:
    """Adapter at r0 (pruned components exactly 0), masks, rank history, run record, rank heatmap.

    The record's ``training`` holds the recipe and what the method adds (``Method.record``: a SALR
    run's source folder, which export reads to refuse serving the adapter on the dense model); its base
    model is the one the adapter belongs to (``Method.base_model_dir``)."""
    from prunedlora.train.plots import plot_rank_heatmap

    ranks = method.ranks()
    record = metadata.RunRecord(
        base_model=str(method.base_model_dir),
        r0=recipe.method.r0,
        lora_alpha=recipe.method.lora_alpha,
        use_rslora=recipe.method.use_rslora,
        target_modules=list(recipe.method.target_modules),
        ranks=ranks,
        method=recipe.method.to_dict(),
        training={
            **recipe.to_dict(),
            **method.record(),
            **({"dev_losses": [list(x) for x in dev_losses]} if dev_losses else {}),
        },
        global_step=step,
    )
    metadata.write_run(run_dir, record, method.masks, model.save_pretrained, history=method.history)
    plot_rank_heatmap(
        ranks,
        run_dir / metadata.RANKS_PLOT_FILE,
        r0=recipe.method.r0,
        title=f"final ranks (average {sum(ranks.values()) / len(ranks):.2f}, r0={recipe.method.r0})",
    )


def format_rank_table(ranks: dict[str, int]) -> str:
    """Layers x module types as text, for the console (the same grid as the heatmap)."""
    from prunedlora.train.plots import rank_table

    rows, cols, grid = rank_table(ranks)
    width = max(5, *(len(c) for c in cols))
    lines = ["layer " + " ".join(c.rjust(width) for c in cols)]
    for row, values in zip(rows, grid):
        lines.append(f"{row:>5} " + " ".join(("" if v is None else str(v)).rjust(width) for v in values))
    total = sum(ranks.values())
    lines.append(f"average rank {total / len(ranks):.3f} over {len(ranks)} modules ({total} components)")
    return "\n".join(lines)
