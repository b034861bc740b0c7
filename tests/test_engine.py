"""The engine: greedy == a naive argmax loop (on the general path and on the equal-length short path), beam
search == transformers, seeded rows independent of their batch, abort, streaming text that never splits a
character nor shows a stop string, scoring == engine logprobs, and the Hugging Face stand-in."""

import pytest
import torch

from lmforge.checkpoint import load_checkpoint
from lmforge.errors import BadConfigError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scoring import loglikelihood, loglikelihood_tokens, split_context

PROMPTS = ["The cat", "고양이가 생선을", "def add(a, b):\n", "Mina lives in Velmora. She is a", "Emoji", "1"]


@pytest.fixture(scope="module")
def model_and_tokenizer(trained_checkpoint):
    model, tokenizer, _ = load_checkpoint(trained_checkpoint)
    return model.eval(), tokenizer


def naive_greedy(model, ids, n, eos):
    ids = list(ids)
    out = []
    for _ in range(n):
        with torch.no_grad():
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token == eos:
            break
    return out


def test_greedy_batch_equals_naive_loop(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = Engine(model, tok, max_batch_size=3)  # fewer slots than prompts: requests join as others leave
    prompts = [tok.encode(p, add_bos=True) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 3
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=20))
    assert [o.prompt_index for o in outputs] == list(range(len(PROMPTS)))
    for o, p in zip(outputs, prompts):
        assert o.token_ids == naive_greedy(model, p, 20, tok.eos_id)
    assert not engine.has_unfinished() and not engine.running


def test_equal_length_batch_takes_the_short_path_with_the_same_tokens(model_and_tokenizer):
    """Equal-length prompts in consecutive slots are prefilled in one pass and decoded through the model's own
    KV-cache path (no mask, cache slices); the same prompts beside a longer one take the general path (mask,
    gathered rows). Both must give the naive loop's tokens, and the same logprobs."""
    model, tok = model_and_tokenizer
    texts = ["The cat sat on the mat", "고양이가 생선을 먹는다", "def add(a, b):\n    return", "Mina lives in Velmora"]
    encoded = [tok.encode(t, add_bos=True) for t in texts]
    prompts = [e[:min(map(len, encoded))] for e in encoded]
    longer = max(encoded, key=len)  # in slot 0, a row at another position: every step takes the general path
    params = SamplingParams(temperature=0, max_new_tokens=15, ignore_eos=True)
    masked = []  # per forward call: was a mask passed?
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: masked.append("attn_mask" in kwargs),
                                           with_kwargs=True)
    try:
        short = Engine(model, tok, max_batch_size=4).generate(prompts, params)
        assert masked == [False] * 15  # one prefill for all four, then 14 unmasked decode steps
        masked.clear()
        general = Engine(model, tok, max_batch_size=5).generate([longer, *prompts], params)[1:]
        assert masked == [False, False] + [True] * 14
    finally:
        hook.remove()
    for a, b, prompt in zip(short, general, prompts):
        assert a.token_ids == b.token_ids == naive_greedy(model, prompt, 15, eos=-1)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_beam_search_equals_transformers(model_and_tokenizer, trained_checkpoint):
    transformers = pytest.importorskip("transformers")
    model, tok = model_and_tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(trained_checkpoint, dtype=torch.float32).eval()
    engine = Engine(model, tok)
    for prompt in PROMPTS[:4]:
        ids = tok.encode(prompt, add_bos=True)
        for beams, penalty, early in [(3, 1.0, False), (4, 2.0, True), (2, 0.5, False)]:
            params = SamplingParams(temperature=0, num_beams=beams, length_penalty=penalty, early_stopping=early,
                                    max_new_tokens=12)
            ours = engine.generate([ids], params)[0]
            with torch.no_grad():
                theirs = hf.generate(torch.tensor([ids]), num_beams=beams, length_penalty=penalty,
                                     early_stopping=early, max_new_tokens=12, do_sample=False,
                                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(ids):].tolist()
            while theirs and theirs[-1] == tok.pad_id:  # transformers pads finished beams
                theirs.pop()
            assert ours.token_ids == theirs, (prompt, beams, penalty, early)


def test_seeded_request_is_the_same_alone_and_in_a_mixed_batch(model_and_tokenizer):
    model, tok = model_and_tokenizer
    mine = SamplingParams(temperature=1.0, top_k=20, seed=7, max_new_tokens=25)
    prompt = tok.encode("The dog", add_bos=True)
    alone = Engine(model, tok).generate([prompt], mine)[0]
    others = [SamplingParams(temperature=0.5, top_p=0.8, seed=1, max_new_tokens=5),
              SamplingParams(temperature=0, max_new_tokens=40), mine,
              SamplingParams(temperature=1.3, repetition_penalty=1.3, seed=None, max_new_tokens=30)]
    prompts = [tok.encode(p, add_bos=True) for p in ["x", "고양이", "The dog", "def f"]]
    prompts[2] = prompt
    mixed = Engine(model, tok, max_batch_size=4).generate(prompts, others)[2]
    assert mixed.token_ids == alone.token_ids and mixed.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    other_seed = Engine(model, tok).generate([prompt], SamplingParams(temperature=1.0, top_k=20, seed=8,
                                                                      max_new_tokens=25))[0]
    assert other_seed.token_ids != alone.token_ids


def test_abort_frees_the_slot(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = Engine(model, tok, max_batch_size=1)
    first = engine.add(tok.encode("The cat", add_bos=True), SamplingParams(temperature=0, max_new_tokens=50,
                                                                           ignore_eos=True))
    second = engine.add(tok.encode("The dog", add_bos=True), SamplingParams(temperature=0, max_new_tokens=3))
    engine.step()
    assert [r.id for r in engine.running.values()] == [first] and len(engine.waiting) == 1
    assert engine.abort(first)
    assert not engine.running
    deltas = engine.step()
    assert [d.request_id for d in deltas] == [second]
    assert not engine.abort(12345)


def test_streaming_equals_generate_and_never_splits_a_character(model_and_tokenizer):
    model, tok = model_and_tokenizer
    for seed in range(6):
        params = SamplingParams(temperature=1.2, seed=seed, max_new_tokens=40)
        engine = Engine(model, tok)
        deltas = list(engine.stream("고양이가", params))
        streamed = "".join(d.text for d in deltas)
        whole = Engine(model, tok).generate(["고양이가"], params)[0]
        assert streamed == whole.text
        ids = [t for d in deltas for t in d.token_ids]
        assert ids == whole.token_ids
        decoded = tok.decode(ids[:-1] if whole.finish_reason == "stop" else ids).rstrip("\ufffd")
        assert streamed == decoded  # no delta ever showed a half character that later changed
        assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])


def test_stop_string_spanning_tokens_never_appears(model_and_tokenizer):
    model, tok = model_and_tokenizer
    plain = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    full = Engine(model, tok).generate(["The cat"], plain)[0]
    ids = full.token_ids
    # a stop string made of the text of tokens 3..5 of the greedy output (several tokens)
    head, stop = tok.decode(ids[:3]), tok.decode(ids[3:6])
    assert len(tok.encode(stop)) >= 2 and stop in full.text
    cut = full.text.index(stop)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, stop=(stop,))
    deltas = list(Engine(model, tok).stream("The cat", params))
    text = "".join(d.text for d in deltas)
    assert text == full.text[:cut] and stop not in text
    assert deltas[-1].finish_reason == "stop"
    assert head.startswith(text) or text.startswith(head)


def test_length_and_prompt_errors(model_and_tokenizer):
    model, tok = model_and_tokenizer
    out = Engine(model, tok).generate(["The"], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    with pytest.raises(BadConfigError, match="context"):
        Engine(model, tok).add(list(range(5, 5 + model.cfg.max_seq_len)))


def test_loglikelihood_equals_the_engines_logprobs(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = tok.encode("Mina lives", add_bos=True)
    out = Engine(model, tok).generate([prompt], SamplingParams(temperature=1.0, seed=3, max_new_tokens=15))[0]
    (total, is_greedy), = loglikelihood_tokens(model, [(prompt, out.token_ids)], tok.pad_id)
    assert total == pytest.approx(sum(out.logprobs), abs=1e-4)
    greedy = Engine(model, tok).generate([prompt], SamplingParams(temperature=0, max_new_tokens=15))[0]
    (_, is_greedy), = loglikelihood_tokens(model, [(prompt, greedy.token_ids)], tok.pad_id)
    assert is_greedy


def test_loglikelihood_strings_batch_and_split(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ctx, cont = split_context(tok, "The cat ", "sat on the mat")
    assert tok.decode(cont).startswith(" sat")  # the trailing space moved to the continuation
    requests = [("The cat", " sat"), ("고양이가", " 생선을"), ("", "The dog"), ("Mina lives in", " Velmora.")]
    batched = loglikelihood(model, tok, requests, batch_size=4)
    alone = [loglikelihood(model, tok, [r], batch_size=1)[0] for r in requests]
    for (a, ga), (b, gb) in zip(batched, alone):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb and a < 0


def _save_tokenizer_for(directory, tok):
    tok.save(directory)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_any_local_hf_causal_lm_runs_through_the_engine(tokenizer, tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    from lmforge.hf import HFCausalLM, load_model

    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2,
                                         n_head=2, initializer_range=0.5, bos_token_id=tokenizer.bos_id,
                                         eos_token_id=tokenizer.eos_id)
        hf = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, initializer_range=0.5,
                                          bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
        hf = transformers.LlamaForCausalLM(config)
    hf.eval().save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    model, tok = load_model(tmp_path)
    assert isinstance(model, HFCausalLM) == (kind == "gpt2")  # Llama is imported natively
    prompts = [tok.encode(p, add_bos=True) for p in ["The cat", "고양이", "x"]]
    outputs = Engine(model, tok).generate(prompts, SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))
    for o, p in zip(outputs, prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                              pad_token_id=tok.pad_id)[0, len(p):].tolist()
        assert o.token_ids == ref
    (ll, _), = loglikelihood(model, tok, [("The cat", " sat")])
    assert ll < 0


def test_generation_under_autocast_keeps_the_cache_dtype(model_and_tokenizer):
    """A training loop evaluates under bf16 autocast (CUDA); keys and values then arrive in bf16 while the cache
    holds the fp32 weights' dtype. CPU autocast reproduces it."""
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(t, add_bos=True) for t in ("The cat", "Mina lives in", "Hi")]  # unequal lengths
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = Engine(model, tokenizer).generate(prompts, SamplingParams(temperature=0, max_new_tokens=6))
    assert [len(o.token_ids) for o in outputs] and all(o.token_ids for o in outputs)
