"""Hugging Face interop.

Export needs no code: a native checkpoint *is* a `transformers` Llama directory (see checkpoint.py), so
`AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)` load it as it is.

Import: a local Llama-family checkpoint saved by `transformers` (config.json plus model.safetensors, sharded
safetensors with an index, or pytorch_model.bin) becomes a native `Transformer` with identical logits.
Nothing is downloaded: the path must be a local directory.

Stand-in: `load_model(path)` gives (model, tokenizer) for any local checkpoint, so the engine and the scoring
functions run on an lmforge checkpoint, a Llama-family `transformers` directory (imported natively) or any
other `transformers` causal LM (GPT-2, say) wrapped in `HFCausalLM`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmforge.checkpoint import from_hf_config, from_hf_state_dict
from lmforge.errors import BadFileError
from lmforge.model import Transformer
from lmforge.tokenizer import check_message

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


# ---------------------------------------------------------------------------------------------------------
# Any local Hugging Face causal LM standing in for the native model (the engine and scoring use these)


@dataclass(frozen=True)
class ForeignModelConfig:
    max_seq_len: int
    vocab_size: int


class HFCausalLM(torch.nn.Module):
    """A `transformers` causal LM behind the native model's call: `model(input_ids, position_ids=None,
    attn_mask=None) -> logits (B, T, V)`. It has no slot cache, so the engine recomputes whole sequences
    (correct, slower); Llama-family checkpoints are better imported natively with `load_hf_llama`."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model.eval()
        config = hf_model.config
        max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        self.cfg = ForeignModelConfig(max_seq_len=int(max_len), vocab_size=int(config.vocab_size))

    def forward(self, input_ids, position_ids=None, attn_mask=None, kv_cache=None):
        if kv_cache is not None or attn_mask is not None:
            raise NotImplementedError("HFCausalLM has no slot cache; the engine recomputes full sequences")
        return self.hf_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


class HFTokenizer:
    """An `AutoTokenizer` with the few members lmforge uses: encode/decode, special ids, chat prompts."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.eos_id = hf_tokenizer.eos_token_id
        self.bos_id = hf_tokenizer.bos_token_id if hf_tokenizer.bos_token_id is not None else self.eos_id
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos_id
        if self.eos_id is None:
            raise BadFileError(f"{hf_tokenizer.name_or_path}: the tokenizer has no EOS token")

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.hf(text, add_special_tokens=False)["input_ids"]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def _template_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        if not self.has_chat_template:
            raise BadFileError(f"{self.hf.name_or_path}: the tokenizer has no chat template")
        out = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(out if isinstance(out, list) else out["input_ids"])

    def render_prompt(self, messages: list[dict]) -> list[int]:
        return self._template_ids(messages, add_generation_prompt=True)

    def render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Messages -> (ids, loss_mask) through the model's own chat template. The template is rendered once per
        prefix of the conversation: an assistant turn's tokens are what its message adds after the generation
        prompt (content and whatever end-of-turn marker the template writes), and only they are trained."""
        for i, message in enumerate(messages):
            check_message(message, i)
        ids: list[int] = []
        loss_mask: list[int] = []

        def extend(new: list[int], trained: int) -> None:
            if new[:len(ids)] != ids:
                raise BadFileError(f"{self.hf.name_or_path}: the chat template re-renders earlier turns differently "
                                   "once a message is added, so assistant tokens cannot be masked exactly")
            loss_mask.extend([trained] * (len(new) - len(ids)))
            ids[:] = new

        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                extend(self._template_ids(messages[:i], add_generation_prompt=True), 0)
                extend(self._template_ids(messages[:i + 1], add_generation_prompt=False), 1)
            else:
                extend(self._template_ids(messages[:i + 1], add_generation_prompt=False), 0)
        return ids, loss_mask

    def fingerprint(self) -> str:
        blob = json.dumps(sorted(self.hf.get_vocab().items()), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        if model_max_length:
            self.hf.model_max_length = model_max_length
        self.hf.save_pretrained(str(directory))

    @classmethod
    def load(cls, directory: str | Path) -> "HFTokenizer":
        try:
            import transformers
        except ImportError:
            raise BadFileError(f"{directory}: this tokenizer needs `pip install 'lmforge[hf]'`") from None
        try:
            return cls(transformers.AutoTokenizer.from_pretrained(str(directory)))
        except (OSError, ValueError) as e:
            raise BadFileError(f"{directory}: no usable tokenizer ({str(e).splitlines()[0]})") from None


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) for any local checkpoint: an lmforge checkpoint or a Llama-family `transformers`
    directory as the native model, any other `transformers` causal LM through `HFCausalLM`."""
    from lmforge.checkpoint import load_checkpoint

    path = Path(path)
    if (path / "lmforge.json").is_file():
        model, tokenizer, _ = load_checkpoint(path, device=device)
        return model, tokenizer
    if not (path / "config.json").is_file():
        raise BadFileError(f"{path}: not a checkpoint directory (no lmforge.json or config.json)")
    try:
        import transformers
    except ImportError:
        raise BadFileError(f"{path}: loading Hugging Face models needs `pip install 'lmforge[hf]'`") from None
    tokenizer = HFTokenizer.load(path)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type in LLAMA_FAMILY:
        return load_hf_llama(path).to(device).eval(), tokenizer
    try:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise BadFileError(f"{path}: not a loadable causal LM ({str(e).splitlines()[0]})") from None
    return HFCausalLM(hf_model).to(device), tokenizer
