"""Checkpoints on disk: a directory that `transformers` loads unchanged, plus lmforge's own record.

    config.json               LlamaConfig (architectures, sizes, special token ids)
    model.safetensors         weights under `transformers`' Llama names ("model.layers.0.self_attn.q_proj.weight")
    tokenizer.json            the BPE, and tokenizer_config.json with the Jinja chat template
    generation_config.json    BOS / EOS / pad ids for `generate`
    lmforge.json              kind, resolved configs, lineage, metrics, config hash, tokenizer fingerprint,
                              and the size and SHA-256 of each file (a truncated or altered file is caught on load)

Writes are atomic: everything goes into a hidden temporary directory beside the target, which is renamed into
place only when complete. Replacing an existing checkpoint renames the old one aside first; if a crash falls
between the two renames, `load_checkpoint` puts the old one back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import BadFileError, MismatchError
from lmforge.model import RewardModel, ModelConfig, Transformer, rope_cos_sin
from lmforge.tokenizer import Tokenizer

KINDS = ("causal_lm", "reward_model", "value_model")
FORMAT_VERSION = 1
_HASHED_FILE_LIMIT = 2 << 30  # larger files are checked by size only: hashing 26 GB on every load costs too much


def config_hash(configs: dict) -> str:
    """A short hash of the resolved configs: a stage whose checkpoint records the same hash is already done."""
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- config.json <-> ModelConfig --------------------------------------------------------------------------


def to_hf_config(cfg: ModelConfig, tokenizer: Tokenizer | None, kind: str = "causal_lm") -> dict:
    architecture = "LlamaForCausalLM" if kind == "causal_lm" else "LlamaForSequenceClassification"
    config = {
        "architectures": [architecture], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.resolved_d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "rope_theta": cfg.rope_theta,  # for readers older than transformers 5
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "dtype": "float32",
    }
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if kind != "causal_lm":
        config["num_labels"] = 1
    return config


def from_hf_config(config: dict, source: str = "config.json") -> ModelConfig:
    """Read a Llama-family config.json into a ModelConfig; refuse what the native model cannot represent."""
    unsupported = {
        "attention_bias": config.get("attention_bias", False), "mlp_bias": config.get("mlp_bias", False),
        "rope_scaling": config.get("rope_scaling"), "hidden_act != silu": config.get("hidden_act", "silu") != "silu",
    }
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        unsupported["rope_type"] = rope["rope_type"]
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise BadFileError(f"{source}: the native model does not support {', '.join(bad)}")
    try:
        n_heads = config["num_attention_heads"]
        return ModelConfig(
            vocab_size=config["vocab_size"], d_model=config["hidden_size"], n_layers=config["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            d_ff=config["intermediate_size"], max_seq_len=config.get("max_position_embeddings", 2048),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            norm_eps=config.get("rms_norm_eps", 1e-6), tie_embeddings=config.get("tie_word_embeddings", False),
            init_std=config.get("initializer_range", 0.02),
        )
    except KeyError as e:
        raise BadFileError(f"{source}: missing field {e.args[0]!r}") from None


def model_config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in known})


# -- weights ----------------------------------------------------------------------------------------------


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Native names -> `transformers` names. A tied head is left out, as `transformers` does."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.cfg.tie_embeddings:
                out[name] = tensor
        else:
            out["model." + name] = tensor
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str,
                       with_head: bool = True) -> Transformer:
    """The native model from `transformers` tensors; `with_head=False` for a reward model's body, which has
    no unembedding (its head is `score.weight`, loaded by the caller)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    native = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg.tie_embeddings or not with_head:
        native.pop("lm_head.weight", None)
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not ((cfg.tie_embeddings or not with_head) and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(native))
    unexpected = sorted(k for k in set(native) - set(expected) if "rotary_emb" not in k)
    if missing or unexpected:
        raise BadFileError(f"{source}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in expected.items():
        if native[k].shape != shape:
            raise BadFileError(f"{source}: {k} has shape {tuple(native[k].shape)}, config.json implies {tuple(shape)}")
    model.load_state_dict({k: native[k].float() for k in expected}, strict=False, assign=True)
    if not with_head:
        model.lm_head = torch.nn.Identity()
    elif cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # The rotary tables were built on the meta device; compute them for real.
    model.rope_cos, model.rope_sin = rope_cos_sin(cfg.resolved_head_dim, cfg.max_seq_len, cfg.rope_theta)
    return model


# -- save / load ------------------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | Path,
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    kind: str = "causal_lm",
    configs: dict | None = None,
    lineage: dict | None = None,
    metrics: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    trainer_state: dict | None = None,
) -> Path:
    """Write a checkpoint directory atomically. `configs` are the resolved configs of the stage that produced
    it (their hash decides whether a stage can be skipped); `lineage` names the stage and its parent;
    `trainer_state` (optimizer, step, RNG) goes into trainer_state.pt for exact resume."""
    assert kind in KINDS, kind
    if isinstance(model, RewardModel):  # LlamaForSequenceClassification: the body's tensors and score.weight
        kind, extra_tensors = "reward_model", {"score.weight": model.score.weight, **(extra_tensors or {})}
        model = model.body
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    tensors = to_hf_state_dict(model)
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()})
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    _write_json(tmp / "config.json", to_hf_config(model.cfg, tokenizer, kind))
    _write_json(tmp / "generation_config.json", {
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
        "max_length": model.cfg.max_seq_len,
    })
    tokenizer.save(tmp, model_max_length=model.cfg.max_seq_len)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    configs = {"model": asdict(model.cfg), **(configs or {})}
    record = {
        "format_version": FORMAT_VERSION, "kind": kind, "configs": configs, "config_hash": config_hash(configs),
        "lineage": lineage or {}, "metrics": metrics or {}, "tokenizer_fingerprint": tokenizer.fingerprint(),
        # an imported model keeps its own `transformers` tokenizer (and chat template)
        "tokenizer": "lmforge" if isinstance(tokenizer, Tokenizer) else "transformers",
        "files": {p.name: _file_record(p) for p in sorted(tmp.iterdir())},
    }
    _write_json(tmp / "lmforge.json", record)
    _fsync_tree(tmp)

    old = directory.parent / f".{directory.name}.old-{os.getpid()}"
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def read_record(directory: str | Path) -> dict:
    """lmforge.json of a checkpoint, or an error naming what is wrong."""
    directory = _recover(Path(directory))
    path = directory / "lmforge.json"
    if not directory.is_dir():
        raise BadFileError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise BadFileError(f"{path}: missing (not an lmforge checkpoint; use `lmforge import` for Hugging Face models)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadFileError(f"{path}: corrupt JSON at line {e.lineno}") from None


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    kind: str = "causal_lm") -> tuple[Transformer | RewardModel, Tokenizer, dict]:
    """Load (model, tokenizer, record), checking every file against the sizes and hashes in lmforge.json.
    `kind` is what the caller needs: a causal LM (`Transformer`) or a reward model (`RewardModel`)."""
    directory = Path(directory)
    record = read_record(directory)  # puts back a checkpoint a crash left renamed aside
    found = record.get("kind", "causal_lm")
    if found != kind:
        raise MismatchError(f"{directory}: a {found.replace('_', ' ')} checkpoint, but a "
                            f"{kind.replace('_', ' ')} is needed here")
    for name, expected in record.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise BadFileError(f"{path}: missing from the checkpoint")
        actual = _file_record(path, with_hash=expected.get("sha256") is not None)
        if actual != expected:
            raise BadFileError(f"{path}: corrupt (size or SHA-256 differs from lmforge.json)")
    cfg = model_config_from_dict(record["configs"]["model"])
    if record.get("tokenizer") == "transformers":
        from lmforge.hf import HFTokenizer

        tokenizer = HFTokenizer.load(directory)
    else:
        tokenizer = Tokenizer.load(directory)
    if tokenizer.fingerprint() != record.get("tokenizer_fingerprint", tokenizer.fingerprint()):
        raise MismatchError(f"{directory / 'tokenizer.json'}: vocabulary does not match the one the model was trained with")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise MismatchError(
            f"{directory / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, but the model has only {cfg.vocab_size} embeddings"
        )
    weights = directory / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise BadFileError(f"{weights}: unreadable ({str(e).splitlines()[0]})") from None
    if kind == "reward_model":
        score = state.pop("score.weight", None)
        if score is None:
            raise BadFileError(f"{weights}: no score.weight (the reward head)")
        model = RewardModel(from_hf_state_dict(state, cfg, str(weights), with_head=False))
        model.score.weight.data.copy_(score.float())
        return model.to(device), tokenizer, record
    state = {k: v for k, v in state.items() if k.startswith("model.") or k == "lm_head.weight"}
    model = from_hf_state_dict(state, cfg, str(weights)).to(device)
    return model, tokenizer, record


# -- helpers ----------------------------------------------------------------------------------------------


def _recover(directory: Path) -> Path:
    """If a crash fell between 'rename old aside' and 'rename new into place', put the old one back."""
    if not directory.exists() and directory.parent.is_dir():
        olds = sorted(directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], directory)
    return directory


def _file_record(path: Path, with_hash: bool = True) -> dict:
    size = path.stat().st_size
    if not with_hash or size > _HASHED_FILE_LIMIT:
        return {"size": size, "sha256": None}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """Make the files and the directory durable: a rename is only safe once what it points at is on disk."""
    for p in directory.iterdir():
        _fsync(p)
    _fsync(directory)
