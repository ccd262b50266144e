"""Runs inside the separate ONNX environment (optimum-onnx, onnxruntime, transformers<4.58).

Standalone on purpose: it imports nothing from prunedlora (which is not installed there). Called
as ``python -I _onnx_worker.py MODEL_DIR ONNX_DIR WORK_DIR``: exports MODEL_DIR (a merged Hugging
Face folder written by transformers 5) with optimum, then runs onnxruntime on
``WORK_DIR/ids_<i>.npy`` and writes ``WORK_DIR/onnx_logits_<i>.npy``. The comparison with the
reference logits happens in the main environment, never here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Files of a Hugging Face folder that are not weights or config and belong next to the ONNX model.
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def legacy_config(config: dict) -> dict:
    """A transformers-5 config as transformers 4.57 reads it.

    Transformers 5 writes ``rope_parameters`` ({"rope_theta", "rope_type", ...}) where 4.57 reads
    ``rope_theta`` and ``rope_scaling``; 4.57 silently ignores the new key and uses its default
    rope_theta (10000 instead of SmolLM2's 100000), which changes every logit.
    """
    config = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in config:
        rope = dict(rope)
        config["rope_theta"] = rope.pop("rope_theta", 10000.0)
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
    return config


def main(model_dir: Path, onnx_dir: Path, work_dir: Path) -> None:
    import numpy as np
    import torch
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForCausalLM

    with tempfile.TemporaryDirectory(dir=work_dir) as compat:
        compat = Path(compat)
        for item in model_dir.iterdir():
            if item.name != "config.json" and item.is_file():
                os.symlink(item.resolve(), compat / item.name)
        config = json.loads((model_dir / "config.json").read_text())
        (compat / "config.json").write_text(json.dumps(legacy_config(config), indent=2))
        # optimum's own validation would compare against transformers 4.57 in this environment, which
        # can misread the config in the same way as the export: the check runs in the main env instead.
        main_export(
            str(compat), output=str(onnx_dir), task="text-generation-with-past", device="cpu", do_validation=False
        )
    for name in _SIDE_FILES:
        if (model_dir / name).is_file() and not (onnx_dir / name).exists():
            shutil.copy2(model_dir / name, onnx_dir / name)

    model = ORTModelForCausalLM.from_pretrained(str(onnx_dir))
    index = 0
    while (work_dir / f"ids_{index}.npy").is_file():
        ids = torch.from_numpy(np.load(work_dir / f"ids_{index}.npy"))
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        np.save(work_dir / f"onnx_logits_{index}.npy", logits.detach().float().numpy())
        index += 1
    print(f"onnx worker: exported {onnx_dir} and ran {index} prompt(s)", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: _onnx_worker.py MODEL_DIR ONNX_DIR WORK_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
