import pytest
import torch

from lmforge.errors import BadConfigError
from lmforge.model import GPT3_TABLE_PARAMS, PRESETS, ModelConfig, Transformer, count_parameters, get_preset

from conftest import tiny_config


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(100, **overrides)).eval()


def test_causality_future_tokens_do_not_change_past_logits():
    model = make_model()
    x = torch.randint(0, 100, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_decoding_equals_full_forward_with_gqa():
    model = make_model(n_heads=4, n_kv_heads=2)
    assert model.cfg.n_kv_heads < model.cfg.n_heads
    x = torch.randint(0, 100, (3, 30))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(batch_size=3)
        pieces = [model(x[:, :10], kv_cache=cache)]  # prefill
        for t in range(10, 30):  # 20 single-token steps
            pieces.append(model(x[:, t:t + 1], kv_cache=cache))
    cached = torch.cat(pieces, dim=1)
    assert cache.length == 30
    assert (cached - full).abs().max().item() <= 1e-5


def test_kv_cache_multi_token_chunks_after_prefill():
    """A chunk of several tokens after a prefill needs the offset causal mask (not SDPA's top-left one)."""
    model = make_model()
    x = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(batch_size=2)
        chunked = torch.cat([model(x[:, :8], kv_cache=cache), model(x[:, 8:24], kv_cache=cache)], dim=1)
    assert (chunked - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(GPT3_TABLE_PARAMS))
def test_gpt3_presets_match_the_table_within_3_percent(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / GPT3_TABLE_PARAMS[name] - 1) <= 0.03, (name, n)
    assert n == count_parameters(cfg)["total"]
    assert cfg.n_kv_heads == cfg.n_heads and cfg.vocab_size == 50257 and cfg.max_seq_len == 2048
    assert cfg.tie_embeddings
    assert cfg.resolved_d_ff == round(8 * cfg.d_model / 3)


def test_parameter_count_closed_form_untied_tiny():
    torch.manual_seed(0)
    cfg = tiny_config(100, tie_embeddings=False)
    model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]


def test_unknown_preset_and_bad_shapes_are_user_errors():
    with pytest.raises(BadConfigError, match="unknown preset 'gpt5'"):
        get_preset("gpt5")
    with pytest.raises(BadConfigError, match="multiple of n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(BadConfigError, match="longer than the model's context"):
        make_model()(torch.zeros(1, 65, dtype=torch.long))


def test_tiny_model_overfits_one_batch():
    model = make_model().train()
    x = torch.randint(0, 100, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 100), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
