"""Hugging Face interop.

Export needs no code: a native checkpoint *is* a `transformers` Llama directory (see checkpoint.py), so
`AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)` load it as it is.

Import: a local Llama-family checkpoint saved by `transformers` (config.json plus model.safetensors, sharded
safetensors with an index, or pytorch_model.bin) becomes a native `Transformer` with identical logits.
Nothing is downloaded: the path must be a local directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmforge.checkpoint import from_hf_config, from_hf_state_dict
from lmforge.errors import BadFileError
from lmforge.model import Transformer

LLAMA_FAMILY = ("llama", "mistral")  # same tensors and maths when biases and rope scaling are absent


def load_hf_llama(directory: str | Path) -> Transformer:
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise BadFileError(f"{config_path}: missing (expected a local Hugging Face model directory)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadFileError(f"{config_path}: corrupt JSON at line {e.lineno}") from None
    if config.get("model_type") not in LLAMA_FAMILY:
        raise BadFileError(f"{config_path}: model_type {config.get('model_type')!r} is not one of {LLAMA_FAMILY}")
    if config.get("sliding_window") and config["sliding_window"] < config.get("max_position_embeddings", 0):
        raise BadFileError(f"{config_path}: sliding-window attention is not supported by the native model")
    cfg = from_hf_config(config, str(config_path))
    state = _read_weights(directory)
    return from_hf_state_dict(state, cfg, str(directory))


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    single, index, pickled = directory / "model.safetensors", directory / "model.safetensors.index.json", directory / "pytorch_model.bin"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(str(directory / shard)))
            return state
        if pickled.is_file():
            return torch.load(pickled, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, KeyError, json.JSONDecodeError) as e:
        raise BadFileError(f"{directory}: unreadable weights ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    raise BadFileError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
