"""Text metrics against hand-computed values: SQuAD matching, BLEU, ROUGE-L via LCS, pooling and cosine,
distinct-n and repetition, and perplexity of one text."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import BadConfigError, BadFileError
from lmforge.evaluate.metrics import (corpus_bleu, distinct_n, embed_texts, embedding_cosine, exact_match,
                                      final_hidden_states, load_encoder, mean_pool, normalize_answer,
                                      repetition_rate, rouge_l, sentence_bleu, text_perplexity, token_f1)
from lmforge.evaluate.perplexity import perplexity
from lmforge.hf import load_model


# --- exact match and token F1 (SQuAD) ---------------------------------------------------------------------------

def test_squad_normalisation_lowercases_and_strips_punctuation_articles_and_spaces():
    assert normalize_answer("The Cat's  mat!") == "cats mat"
    assert normalize_answer("  An apple, a pear;\tthe end. ") == "apple pear end"
    assert normalize_answer("Theatre") == "theatre"  # "the" only as a whole word
    assert normalize_answer("고양이가  생선을!") == "고양이가 생선을"


def test_exact_match_on_fixed_strings():
    assert exact_match("The Mat.", "mat") == 1.0
    assert exact_match("mats", "mat") == 0.0
    assert exact_match("Paris", ["London", "paris!"]) == 1.0  # any reference


def test_token_f1_on_fixed_strings():
    # normalised: [cat, sat] against [cat, sat, down]: common 2, P = 1, R = 2/3, F1 = 2·(2/3)/(5/3) = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # multisets: [x, b, b] vs [b, b, b]: common = 2 (b twice), P = 2/3, R = 2/3
    assert token_f1("x b b", "b b b") == pytest.approx(2 / 3)
    assert token_f1("red", "blue") == 0.0
    assert token_f1("red", ["blue", "red car"]) == pytest.approx(2 * 1 * 0.5 / 1.5)  # best reference
    assert token_f1("the", "a") == 1.0 and token_f1("the", "cat") == 0.0  # empty after normalisation


def test_token_f1_char_level_for_korean():
    # the particle differs (가/는): no word in common, 3 of 4 characters in common
    assert token_f1("고양이가", "고양이는") == 0.0
    assert token_f1("고양이가", "고양이는", char_level=True) == pytest.approx(0.75)


# --- BLEU (sacrebleu) ----------------------------------------------------------------------------------------------

def test_bleu_on_sacrebleus_documented_example():
    """sacrebleu's README: BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)."""
    hypotheses = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    references = [["The dog bit the man.", "The dog had bit the man."],
                  ["It was not unexpected.", "No one was surprised."],
                  ["The man bit him first.", "The man had bitten the dog."]]
    assert corpus_bleu(hypotheses, references) == pytest.approx(48.53, abs=0.005)


def test_bleu_on_hand_cases():
    # "a b c d e" vs "a b c d f": precisions 4/5, 3/4, 2/3, 1/2, equal lengths (BP = 1):
    # BLEU = 100 · (4/5 · 3/4 · 2/3 · 1/2)^(1/4) = 100 · 0.2^0.25
    assert corpus_bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(100 * 0.2 ** 0.25)
    assert sentence_bleu("a b c d e", "a b c d f") == pytest.approx(100 * 0.2 ** 0.25)
    # all precisions 1, c = 4 < r = 6: BP = exp(1 - 6/4)
    assert sentence_bleu("a b c d", "a b c d e f") == pytest.approx(100 * math.exp(-0.5))
    assert sentence_bleu("a b c d", ["x", "a b c d"]) == pytest.approx(100.0)  # closest reference length
    with pytest.raises(BadConfigError):
        corpus_bleu(["a", "b"], ["a"])


# --- ROUGE-L (rouge-score) -----------------------------------------------------------------------------------------

def test_rouge_l_equals_the_lcs_f_measure_computed_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5; P = R = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS("a b c d", "a c e") = "a c" = 2; P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("The CAT!", "the cat") == 1.0  # lowercased, punctuation dropped
    assert rouge_l("a b c d", ["z", "a c e"]) == pytest.approx(4 / 7)  # best reference


def test_rouge_l_korean_falls_back_to_characters():
    pred, ref = "고양이가 생선을 먹는다", "고양이는 생선을 좋아한다"
    # rouge-score's own tokenizer keeps only [a-z0-9]: Korean has no tokens, so the score is 0 (the limitation)
    assert rouge_l(pred, ref, tokenize="english") == 0.0
    # characters: 10 and 11, LCS = 고양이 생선을 다 = 7, F = 2·7/(10+11) = 2/3
    assert rouge_l(pred, ref) == pytest.approx(2 / 3)
    assert rouge_l(pred, ref, tokenize="char") == pytest.approx(2 / 3)
    with pytest.raises(BadConfigError):
        rouge_l(pred, ref, tokenize="words")


# --- embedding cosine ----------------------------------------------------------------------------------------------

def test_mean_pool_and_cosine_on_a_hand_built_2d_case():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]],
                           [[1.0, 1.0], [3.0, -1.0], [9.0, 9.0]]])  # (B=2, T=3, d=2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the last position is padding
    pooled = mean_pool(hidden, mask)
    assert torch.allclose(pooled, torch.tensor([[0.5, 0.5], [2.0, 0.0]]))
    # cos((0.5, 0.5), (2, 0)) = 1 / (sqrt(0.5) · 2) = 1 / sqrt(2)
    cosines = embedding_cosine(["a"], ["b"], lambda texts: pooled)
    assert cosines == pytest.approx([1 / math.sqrt(2)])
    assert torch.equal(mean_pool(hidden[:1], torch.zeros(1, 3)), torch.zeros(1, 2))  # nothing unmasked


def test_native_model_embeddings(trained_checkpoint, tokenizer):
    model, _ = load_model(trained_checkpoint)
    ids = torch.tensor([tokenizer.encode("The cat sat on the mat.", add_bos=True)])
    with torch.no_grad():  # the hooked hidden states are what the output head reads
        hidden = final_hidden_states(model, ids, torch.ones_like(ids))
        assert torch.allclose(model.lm_head(hidden), model(ids), atol=1e-5)
    encode = load_encoder(trained_checkpoint)
    texts = ["The cat sat on the mat.", "Mina lives in Velmora.", "고양이가 생선을 먹는다.", ""]
    together = encode(texts)
    alone = torch.cat([encode([t]) for t in texts])
    assert together.shape == (4, model.cfg.d_model)
    assert torch.allclose(together, alone, atol=1e-5)  # right padding changes nothing
    same = embedding_cosine(texts[:3], texts[:3], encode)
    assert same == pytest.approx([1.0] * 3, abs=1e-5)
    different = embedding_cosine(texts[:1], texts[2:3], encode)[0]
    assert different < 1 - 1e-3


def test_hf_model_embeddings_use_the_attention_mask(tokenizer):
    transformers = pytest.importorskip("transformers")
    from lmforge.hf import HFCausalLM

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    model = HFCausalLM(transformers.GPT2LMHeadModel(config))
    texts = ["The cat sat on the mat.", "Mina"]
    together = embed_texts(model, tokenizer, texts)
    alone = torch.cat([embed_texts(model, tokenizer, [t]) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)


def test_load_encoder_never_downloads(tmp_path):
    with pytest.raises(BadFileError, match="nothing is downloaded"):
        load_encoder("sentence-transformers/all-MiniLM-L6-v2")
    if importlib.util.find_spec("sentence_transformers") is None:  # a sentence-transformers directory, no package
        (tmp_path / "modules.json").write_text("[]")
        with pytest.raises(BadFileError, match="pip install sentence-transformers"):
            load_encoder(tmp_path)


# --- reference-free quality ----------------------------------------------------------------------------------------

def test_distinct_n_on_fixed_strings():
    import lmforge.evaluate.decoding as decoding

    assert decoding.distinct_n is distinct_n  # one definition, used by the decoding comparison
    assert distinct_n(["a b c", "a b c"], 2) == 2 / 4
    assert distinct_n(["a b c", "c b a"], 1) == 3 / 6
    assert distinct_n(["a"], 2) == 0.0


def test_repetition_rate_on_fixed_strings():
    # bigrams: (the cat) (cat the) (the cat) (cat the) (the cat): 5 occurrences, 2 distinct -> 3/5 repeat
    assert repetition_rate("the cat the cat the cat", 2) == pytest.approx(3 / 5)
    assert repetition_rate("a b a", 1) == pytest.approx(1 / 3)
    assert repetition_rate("a b c d", 2) == 0.0
    assert repetition_rate("a", 2) == 0.0
    assert repetition_rate("x y x y", 2) == pytest.approx(1 - distinct_n(["x y x y"], 2))


def test_text_perplexity_matches_the_perplexity_module_and_the_hand_value(trained_checkpoint, tokenizer):
    model, _ = load_model(trained_checkpoint)
    text = "Mina lives in Velmora. She is a baker."
    value = text_perplexity(model, tokenizer, text)
    assert value == pytest.approx(perplexity(model, tokenizer, [text])["perplexity"], rel=1e-9)
    ids = [tokenizer.bos_id, *tokenizer.encode(text)]
    with torch.no_grad():
        logps = F.log_softmax(model(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
    mean_logp = logps.gather(-1, torch.tensor(ids[1:])[:, None]).mean().item()
    assert value == pytest.approx(math.exp(-mean_logp), rel=1e-5)
