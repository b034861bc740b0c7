import json
import os
import shutil

import pytest
import torch

from lmforge.checkpoint import load_checkpoint, read_record, save_checkpoint
from lmforge.errors import BadFileError, MismatchError
from lmforge.hf import load_hf_llama
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer

from conftest import tiny_config

transformers = pytest.importorskip("transformers")


def test_save_load_round_trip_and_record(trained_checkpoint, tokenizer):
    model, tok, record = load_checkpoint(trained_checkpoint)
    assert record["kind"] == "causal_lm" and record["lineage"] == {"stage": "test"}
    assert len(record["config_hash"]) == 16 and record["configs"]["model"]["vocab_size"] == tok.vocab_size
    assert tok.fingerprint() == tokenizer.fingerprint()
    assert not any(p.name.startswith(".") for p in trained_checkpoint.parent.iterdir())  # no temp dirs left


def test_transformers_logits_match_native(trained_checkpoint):
    model, _, _ = load_checkpoint(trained_checkpoint)
    hf = transformers.AutoModelForCausalLM.from_pretrained(trained_checkpoint, dtype=torch.float32).eval()
    x = torch.randint(0, model.cfg.vocab_size, (3, 40))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff <= 1e-4


def test_transformers_tokenizer_encodes_the_same(trained_checkpoint, tokenizer):
    hf = transformers.AutoTokenizer.from_pretrained(trained_checkpoint)
    text = "Mina lives in Velmora. 고양이가 생선을 먹는다 2024 🙂  done"
    assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert hf(text)["input_ids"] == tokenizer.encode(text, add_bos=True)  # BOS added like Llama
    assert hf.decode(tokenizer.encode(text)) == text


def test_random_transformers_llama_imports_with_same_logits(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    model = load_hf_llama(tmp_path).eval()
    x = torch.randint(0, 120, (2, 30))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-5


def test_replacing_a_checkpoint_is_atomic_and_recovers(trained_checkpoint, tokenizer, tmp_path):
    target = tmp_path / "final"
    shutil.copytree(trained_checkpoint, target)
    before = (target / "model.safetensors").read_bytes()
    # A crash right after the old checkpoint was renamed aside: load puts it back.
    os.replace(target, tmp_path / ".final.old-999")
    model, _, _ = load_checkpoint(target)
    assert (target / "model.safetensors").read_bytes() == before
    # A normal replacement leaves exactly one directory.
    torch.manual_seed(1)
    save_checkpoint(target, Transformer(tiny_config(tokenizer.vocab_size)), tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.mark.parametrize("damage", ["missing_weights", "truncated_weights", "flipped_byte", "missing_record",
                                    "corrupt_record", "missing_config"])
def test_damaged_checkpoint_is_a_clear_error(trained_checkpoint, tmp_path, damage):
    target = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, target)
    weights = target / "model.safetensors"
    if damage == "missing_weights":
        weights.unlink()
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flipped_byte":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "missing_record":
        (target / "lmforge.json").unlink()
    elif damage == "corrupt_record":
        (target / "lmforge.json").write_text("{not json")
    elif damage == "missing_config":
        (target / "config.json").unlink()
    with pytest.raises(BadFileError) as info:
        load_checkpoint(target)
    assert str(target) in str(info.value) and "\n" not in str(info.value)


def test_tokenizer_that_does_not_match_the_checkpoint(trained_checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, target)
    other = train_tokenizer(["completely different text about zebras 99"] * 50, vocab_size=300)
    other.hf.save(str(target / "tokenizer.json"))
    record = read_record(target)
    # Even with the file hashes updated (a deliberate swap), the vocabulary check still catches it.
    from lmforge.checkpoint import _file_record

    record["files"]["tokenizer.json"] = _file_record(target / "tokenizer.json")
    (target / "lmforge.json").write_text(json.dumps(record))
    with pytest.raises(MismatchError, match="vocabulary does not match"):
        load_checkpoint(target)


def test_import_errors_name_the_file(tmp_path):
    with pytest.raises(BadFileError, match="config.json"):
        load_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(BadFileError, match="gpt2"):
        load_hf_llama(tmp_path)
