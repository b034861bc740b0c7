"""The network: a decoder-only Transformer of the Llama architecture.

Choices (each the Llama recipe, so a checkpoint loads as `LlamaForCausalLM` unchanged):
- RMSNorm before attention and before the MLP (pre-norm), and once more before the output head;
- rotary position embeddings (RoPE) on queries and keys, in the "rotate half" layout `transformers` uses;
- grouped-query attention: `n_kv_heads` key/value heads shared by `n_heads` query heads, computed by
  `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels where available);
- a SwiGLU MLP, `down(silu(gate(x)) * up(x))`, no biases anywhere;
- optionally the input embedding table reused as the output head (tied, as GPT-3 had).

Module names follow `transformers`' Llama (`embed_tokens`, `layers.N.self_attn.q_proj`, `mlp.gate_proj`, ...)
so that saving is a rename of the prefix, not a translation.

`forward` takes an optional `KVCache`: the engine prefills the prompt, then feeds one token at a time; each
call appends its keys and values to the cache and attends over everything cached so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import BadConfigError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: round(8 * d_model / 3), so SwiGLU's three matrices hold GPT's 8d² parameters
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise BadConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise BadConfigError(
                f"model config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise BadConfigError(
                f"model config: d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); "
                "set head_dim explicitly"
            )
        if self.resolved_head_dim % 2:
            raise BadConfigError(f"model config: head_dim must be even for rotary embeddings, got {self.resolved_head_dim}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_d_ff(self) -> int:
        return self.d_ff if self.d_ff is not None else round(8 * self.d_model / 3)


def _gpt3(n_layers: int, d_model: int, n_heads: int, head_dim: int | None = None) -> ModelConfig:
    # GPT-3 ("Language Models are Few-Shot Learners", Table 2.1): vocabulary 50257, context 2048, tied embeddings, no GQA.
    return ModelConfig(
        vocab_size=50257, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
        head_dim=head_dim, max_seq_len=2048, tie_embeddings=True,
    )


# Tiny presets are sized for a 2-core CPU; their vocab_size is a placeholder replaced by the tokenizer's.
PRESETS: dict[str, ModelConfig] = {
    "nano": ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128),  # ~0.1M + embeddings
    "micro": ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),  # ~0.8M + embeddings
    "tiny": ModelConfig(d_model=192, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=256),  # ~2.4M + embeddings
    "small": ModelConfig(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=512),  # ~5.8M + embeddings
    "gpt3-small": _gpt3(12, 768, 12),  # 125M
    "gpt3-medium": _gpt3(24, 1024, 16),  # 350M
    "gpt3-large": _gpt3(24, 1536, 16),  # 760M
    # The table's 24 heads do not divide d=2048; 16 heads of 128 keep d and the parameter count.
    "gpt3-xl": _gpt3(24, 2048, 16),  # 1.3B
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    # The table's d=5140 is not divisible by its 40 heads; 5120 = 40 x 128 is what the model needs.
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
}

# Parameter counts of the GPT-3 table, for the test that our presets match it.
GPT3_TABLE_PARAMS = {
    "gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13e9, "gpt3-175b": 175e9,
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise BadConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like `transformers` does, so bf16 runs agree with it.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (max_seq_len, head_dim), in the rotate-half layout: frequencies repeated twice."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by position; cos/sin are (B or 1, 1, T, hd).

    Pairs are (i, i + hd/2), not adjacent entries: that is the layout of `transformers`' Llama, so weights
    move between the two without permuting q_proj/k_proj rows.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of past positions for every layer, preallocated to `max_len`.

    `length` is how many positions are filled, the same for every row. Each forward call writes its T new
    positions at [length, length + T) and the model calls `advance(T)` once all layers have written. Any object
    with `update(layer, k, v) -> (keys, values)` and `advance(n)` can stand in: the engine's slot cache, whose
    rows have lengths of their own, passes explicit positions and masks.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) after the filled part; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise BadConfigError(f"KV cache holds {self.max_len} positions; asked for {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Called by the model once every layer has written its n new positions."""
        self.length += n


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, Hkv, S, hd): everything this row may attend to
        # With no mask, SDPA's causal triangle is right only when queries and keys start together.
        is_causal = attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.resolved_d_ff)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cos_sin(cfg.resolved_head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not saved: they are a function of the config and `transformers` recomputes its own.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self, seed: int | None = None):
        """Normal(0, 0.02) everywhere; residual output projections scaled by 1/sqrt(2 * n_layers) (GPT-2),
        so the residual stream's variance does not grow with depth. Norm weights start at 1."""
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                nn.init.ones_(p)
            else:
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * std * scale)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T); default: past length + arange(T)
        attn_mask: torch.Tensor | None = None,  # bool (B or 1, 1, T, past + T), True = may attend; default causal
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        # With explicit positions the caller (the engine) also gives the mask and the cache tracks its rows.
        past = kv_cache.length if kv_cache is not None and position_ids is None else 0
        if position_ids is None:
            if past + T > self.cfg.max_seq_len:
                raise BadConfigError(
                    f"sequence of {past + T} tokens is longer than the model's context ({self.cfg.max_seq_len})"
                )
            # Every row at the same positions: a slice of the tables, broadcast over the batch (no gather).
            cos = self.rope_cos[past:past + T][None, None]  # (1, 1, T, hd)
            sin = self.rope_sin[past:past + T][None, None]
        else:
            cos = self.rope_cos[position_ids].unsqueeze(1)  # (B, 1, T, hd)
            sin = self.rope_sin[position_ids].unsqueeze(1)
        if attn_mask is None and past > 0 and T > 1:
            # A chunk after a prefill: SDPA's is_causal would align the triangle to the top-left, but these
            # queries sit at the end, after `past` cached positions.
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=input_ids.device).tril(diagonal=past)
        x = self.embed_tokens(input_ids)  # (B, T, d)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.lm_head(self.norm(x))  # (B, T, V)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, self.cfg.resolved_head_dim,
                       max_len or self.cfg.max_seq_len, dtype=p.dtype, device=p.device)


class RewardModel(nn.Module):
    """A scalar reward for a whole (prompt, response) sequence: the transformer without its unembedding and a
    linear head `d_model -> 1` read at the last real token, the EOS that closes the response (InstructGPT's
    reward model). Saved, it is a `transformers` `LlamaForSequenceClassification` with one label, which also
    reads the score at the last non-pad token."""

    def __init__(self, body: Transformer):
        super().__init__()
        self.cfg = body.cfg
        body.lm_head = nn.Identity()  # the body now returns final-norm hidden states (B, T, d)
        self.body = body
        self.score = nn.Linear(body.cfg.d_model, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(body.cfg.d_model + 1))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor,
                position_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) of right-padded rows whose real tokens number `lengths` (B,)."""
        hidden = self.body(input_ids, position_ids=position_ids, attn_mask=attn_mask)
        last = hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]
        return self.score(last).squeeze(-1).float()


# ---------------------------------------------------------------------------------------------------------
# Counting


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Closed-form parameter counts: `total` (unique tensors, tied head counted once) and `matmul`, the
    parameters that take part in matrix products (all weights but the input embedding table, the output head
    counted once even when tied), which is the N of the 6N FLOPs-per-token rule (DESIGN §6)."""
    d, hd, L = cfg.d_model, cfg.resolved_head_dim, cfg.n_layers
    attn = d * hd * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)  # q, o, k, v
    mlp = 3 * d * cfg.resolved_d_ff
    norms = 2 * d
    per_layer = attn + mlp + norms
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = embed + L * per_layer + d + head
    matmul = L * (attn + mlp) + cfg.vocab_size * d
    return {"total": total, "matmul": matmul, "embedding": embed, "per_layer": per_layer}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the matrix products (forward 2N, backward 4N) plus 12·L·d·T for the
    attention scores and the weighted sum (PaLM appendix B; DESIGN §6), with d the attention width."""
    n = count_parameters(cfg)["matmul"]
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len
