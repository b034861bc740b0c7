"""Supervised fine-tuning: packing == padding per example, only assistant tokens trained, LoRA trains only
adapters and merges exactly, SFT teaches a tiny model to answer and stop, real data sets train, bad input."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import _file_record, load_checkpoint, save_checkpoint
from lmforge.errors import BadConfigError, BadFileError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.train.loop import TrainConfig
from lmforge.train.sft import (IGNORE, SFTConfig, add_lora, example_losses, merged_copy, pack_rows,
                               packed_batch, pad_batch, sft)

from conftest import SHARED, tiny_config, train_a_little

CONVERSATIONS = [
    [{"role": "user", "content": "Where does Mina live?"}, {"role": "assistant", "content": "Velmora."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "고양이"}, {"role": "assistant", "content": "cat"},
     {"role": "user", "content": "개"}, {"role": "assistant", "content": "dog"}],
    [{"role": "user", "content": "Say something long."},
     {"role": "assistant", "content": "The cat sat on the mat and the dog ate 12 apples."}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
]


@pytest.fixture(scope="module")
def base(tokenizer):
    torch.manual_seed(0)
    return train_a_little(Transformer(tiny_config(tokenizer.vocab_size, max_seq_len=64)), tokenizer)


def test_padding_trains_exactly_the_assistant_tokens(tokenizer):
    examples = [tokenizer.render(c) for c in CONVERSATIONS]
    batch = pad_batch(examples, tokenizer.pad_id)
    for row, (ids, mask) in enumerate(examples):
        trained = [ids[i + 1] for i in range(len(ids) - 1) if mask[i + 1]]
        assert batch["targets"][row][batch["targets"][row] != IGNORE].tolist() == trained


def test_packed_batch_gives_the_same_per_example_losses(base, tokenizer):
    examples = [tokenizer.render(c) for c in CONVERSATIONS]
    row_len = 48
    rows = pack_rows(examples, torch.arange(len(examples)).numpy(), row_len)
    assert any(len(r) > 1 for r in rows)  # some rows really hold several examples
    batch = packed_batch(examples, rows, row_len, tokenizer.pad_id)
    with torch.no_grad():
        logits = base(batch["input_ids"], position_ids=batch["position_ids"], attn_mask=batch["attn_mask"])
    token_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["targets"].reshape(-1),
                                 ignore_index=IGNORE, reduction="none").view(batch["targets"].shape)
    packed = {}
    for b, members in enumerate(rows):
        start = 0
        for i in members:
            n = len(examples[i][0]) - 1
            t = batch["targets"][b, start:start + n]
            packed[i] = (token_loss[b, start:start + n][t != IGNORE]).mean().item()
            start += n
    unpacked = example_losses(base, examples, tokenizer.pad_id)
    for i, loss in enumerate(unpacked):
        assert packed[i] == pytest.approx(loss, abs=1e-5)


def _chat_file(path, conversations, repeat=1):
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for c in conversations:
                f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
    return path


def test_sft_teaches_answers_that_end_with_eos(base, tokenizer, tmp_path):
    save_checkpoint(tmp_path / "base", base, tokenizer)
    data = _chat_file(tmp_path / "train.jsonl", CONVERSATIONS, repeat=4)
    cfg = SFTConfig(model=str(tmp_path / "base"), data=str(data), out=str(tmp_path / "sft"), packing=True,
                    train=TrainConfig(steps=60, batch_size=4, lr=3e-3, warmup_steps=5, eval_every=1000,
                                      progress=False, log_every=1))
    final = sft(cfg)
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] / 3
    model, tok, record = load_checkpoint(final)
    assert record["lineage"]["stage"] == "sft"
    prompts = [tok.render_prompt(c[:-1]) for c in CONVERSATIONS]
    longest = max(len(tok.encode(c[-1]["content"])) for c in CONVERSATIONS) + 1
    outs = Engine(model, tok).generate(prompts, SamplingParams(temperature=0, max_new_tokens=2 * longest))
    ended = [o.finish_reason == "stop" and o.token_ids[-1] == tok.eos_id for o in outs]
    assert sum(ended) / len(ended) >= 0.9
    assert [o.text for o in outs] == [c[-1]["content"] for c in CONVERSATIONS]


def test_lora_trains_only_adapters_and_merges_exactly(base, tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    save_checkpoint(tmp_path / "base", base, tokenizer)
    data = _chat_file(tmp_path / "train.jsonl", CONVERSATIONS, repeat=4)
    cfg = SFTConfig(model=str(tmp_path / "base"), data=str(data), out=str(tmp_path / "lora"), lora=True,
                    lora_rank=4, train=TrainConfig(steps=20, batch_size=4, lr=1e-2, warmup_steps=2,
                                                   eval_every=1000, progress=False))
    # the adapter model, trained in place through the same code path as `sft`
    model, _, _ = load_checkpoint(tmp_path / "base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = add_lora(model, cfg)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    from lmforge.train.loop import train
    from lmforge.train.sft import make_batcher, sft_loss
    from lmforge.data.instructions import load_sft_dataset

    examples, _ = load_sft_dataset(str(data), tokenizer, 64)
    train(peft_model, make_batcher(examples, cfg, 64, tokenizer.pad_id, 0, 1), sft_loss, cfg.train,
          tmp_path / "inplace")
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            assert p.abs().sum() > 0  # adapters moved (B starts at zero)
    base_now = peft_model.get_base_model().state_dict()
    for k, v in before.items():  # the frozen base weights did not change
        key = k if k in base_now else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(base_now[key], v), k
    merged = merged_copy(peft_model)
    x = torch.randint(0, tokenizer.vocab_size, (2, 20))
    with torch.no_grad():
        assert (merged(x) - peft_model(x)).abs().max().item() <= 1e-4
    # the CLI path saves merged checkpoints that transformers loads
    final = sft(cfg)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours, _, _ = load_checkpoint(final)
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4
    assert (final / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name,columns", [("llamafactory/alpaca_en_demo.json", ()),
                                          ("korean_chatbot/ChatbotData.csv", ("instruction=Q", "output=A"))])
def test_sft_on_real_data(tokenizer, tmp_path, name, columns):
    path = SHARED / "data" / "instruction" / name
    if not path.is_file():
        pytest.skip("../shared/data is absent")
    torch.manual_seed(0)
    model = Transformer(tiny_config(tokenizer.vocab_size, max_seq_len=256))
    save_checkpoint(tmp_path / "base", model, tokenizer)
    cfg = SFTConfig(model=str(tmp_path / "base"), data=str(path), columns=columns, out=str(tmp_path / "out"),
                    packing=True, train=TrainConfig(steps=25, batch_size=4, lr=3e-3, warmup_steps=3,
                                                    eval_every=1000, progress=False, log_every=1))
    sft(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_bad_sft_input(base, tokenizer, tmp_path):
    save_checkpoint(tmp_path / "base", base, tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "no output here"}\n')
    with pytest.raises(BadFileError, match="bad.jsonl:2"):
        sft(SFTConfig(model=str(tmp_path / "base"), data=str(bad), out=str(tmp_path / "o1")))
    assert not (tmp_path / "o1").exists()
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "word " * 200, "output": "x"}) + "\n")
    with pytest.raises(BadFileError, match="long"):
        sft(SFTConfig(model=str(tmp_path / "base"), data=str(long), out=str(tmp_path / "o2")))
    # a checkpoint whose tokenizer_config has no chat template (and whose record was updated to match)
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path / "base", plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    record = json.loads((plain / "lmforge.json").read_text())
    record["files"]["tokenizer_config.json"] = _file_record(plain / "tokenizer_config.json")
    (plain / "lmforge.json").write_text(json.dumps(record))
    good = _chat_file(tmp_path / "good.jsonl", CONVERSATIONS)
    with pytest.raises(BadConfigError, match="chat_template"):
        sft(SFTConfig(model=str(plain), data=str(good), out=str(tmp_path / "o3")))
    assert not (tmp_path / "o3").exists()


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _transformers_llama_dir(tokenizer, path):
    """A random Llama saved by `transformers`, with a tokenizer of a different chat layout (ChatML)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_str(tokenizer.hf.to_str())
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|bos|>", eos_token="<|im_end|>",
                                                  pad_token="<|pad|>",
                                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf_tok.chat_template = CHATML
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


def test_transformers_chat_template_masks_exactly_the_assistant_turns(tokenizer, tmp_path):
    from lmforge.hf import HFTokenizer

    hf_tok = HFTokenizer.load(_transformers_llama_dir(tokenizer, tmp_path / "hf"))
    conversation = CONVERSATIONS[2]
    ids, mask = hf_tok.render(conversation)
    assert ids == hf_tok.hf.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    trained = hf_tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    assert trained == "cat<|im_end|>\ndog<|im_end|>\n"
    assert hf_tok.render_prompt(conversation[:1]) == ids[:mask.index(1)]


def test_lora_on_a_transformers_llama(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    source = _transformers_llama_dir(tokenizer, tmp_path / "hf")
    data = _chat_file(tmp_path / "train.jsonl", CONVERSATIONS, repeat=4)
    cfg = SFTConfig(model=str(source), data=str(data), out=str(tmp_path / "lora"), lora=True, lora_rank=4,
                    train=TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=1000,
                                      progress=False, log_every=1))
    final = sft(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    ours, tok, record = load_checkpoint(final)
    assert record["tokenizer"] == "transformers" and tok.render(CONVERSATIONS[0])[0]  # ChatML kept
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    x = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4
        assert (hf(x).logits - base(x).logits).abs().max().item() > 1e-3  # the merged adapter changed it
    # the merged weights differ from the base only where adapters were attached
    merged_sd, base_sd = hf.state_dict(), base.state_dict()
    for name, value in base_sd.items():
        changed = not torch.equal(merged_sd[name], value)
        assert changed == any(t in name for t in cfg.lora_targets), name
