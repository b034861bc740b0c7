"""Reward model and DPO/IPO: the losses on hand-built numbers, sequence log-probabilities that ignore prompt and
padding, the reward head read at the last real token and loadable by `transformers`, kind mismatches, and short
trainings on tiny comparisons where the loss must fall."""

import json
import math

import pytest
import torch

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.errors import MismatchError
from lmforge.model import RewardModel, Transformer
from lmforge.train.dpo import DPOConfig, collate_pairs, dpo, dpo_loss, sequence_logprobs
from lmforge.train.loop import TrainConfig
from lmforge.train.reward import (RewardConfig, ScoreConfig, collate_groups, ranking_loss, score_file,
                                  train_reward)

from conftest import SHARED, tiny_config, train_a_little


def _nll_sigmoid(x: float) -> float:
    return -math.log(1 / (1 + math.exp(-x)))


# -- losses on hand-built inputs ---------------------------------------------------------------------------


def test_ranking_loss_for_known_rewards():
    rewards = torch.tensor([2.0, 0.5, -1.0, 0.3, 0.7])  # a ranked triple, then a pair ranked the wrong way
    loss, metrics = ranking_loss(rewards, [3, 2])
    triple = (_nll_sigmoid(1.5) + _nll_sigmoid(3.0) + _nll_sigmoid(1.5)) / 3  # 1/C(3,2) of the 3 pairs
    pair = _nll_sigmoid(-0.4)
    assert loss.item() == pytest.approx((triple + pair) / 2, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx((1.0 + 0.0) / 2)
    with_margin, _ = ranking_loss(rewards[3:], [2], margin=1.0)
    assert with_margin.item() == pytest.approx(_nll_sigmoid(-1.4), abs=1e-6)
    centred, _ = ranking_loss(rewards[3:], [2], center=0.01)
    assert centred.item() == pytest.approx(pair + 0.01 * 1.0 ** 2, abs=1e-6)


def test_dpo_loss_is_ln2_at_the_reference_and_the_formula_elsewhere():
    logps = torch.tensor([-5.0, -12.0])
    loss, metrics = dpo_loss(logps[:1], logps[1:], logps[:1], logps[1:], beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/margins"] == 0
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-5.0, -9.0, -6.0, -7.0))
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(_nll_sigmoid(0.1 * ((-5 + 6) - (-9 + 7))), abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(0.1) and metrics["rewards/rejected"] == pytest.approx(-0.2)
    assert metrics["rewards/accuracies"] == 1.0


def test_ipo_loss_at_the_reference_and_the_formula_elsewhere():
    beta = 0.25
    same = torch.tensor([-4.0])
    loss, _ = dpo_loss(same, same, same, same, beta, "ipo", torch.tensor([4.0]), torch.tensor([4.0]))
    assert loss.item() == pytest.approx((1 / (2 * beta)) ** 2)
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-5.0, -9.0, -6.0, -7.0))
    loss, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo", torch.tensor([2.0]), torch.tensor([4.0]))
    assert loss.item() == pytest.approx((1 / 2 - (-2) / 4 - 1 / (2 * beta)) ** 2)


@pytest.fixture(scope="module")
def base(tokenizer):
    torch.manual_seed(0)
    return train_a_little(Transformer(tiny_config(tokenizer.vocab_size, max_seq_len=64)), tokenizer)


def test_sequence_logprobs_ignore_prompt_and_padding(base, tokenizer):
    prompt = [{"role": "user", "content": "Where does Mina live?"}]
    ids, mask = tokenizer.render([*prompt, {"role": "assistant", "content": "Velmora."}])
    n_prompt = mask.index(1)
    with torch.no_grad():
        logits = base(torch.tensor([ids]))[0]
        logp = torch.log_softmax(logits, -1)
        by_hand = sum(logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids)))
        encoded = [((ids, mask), (ids, mask))]
        narrow = collate_pairs(encoded, None, [0], tokenizer.pad_id)
        wide = {k: torch.cat([v, torch.full((2, 7), tokenizer.pad_id if k == "input_ids" else 0)], 1)
                for k, v in narrow.items()}
        for batch in (narrow, wide):
            total, count = sequence_logprobs(base, batch["input_ids"], batch["loss_mask"])
            assert total[0].item() == pytest.approx(by_hand, abs=1e-4)
            assert count[0].item() == len(ids) - n_prompt
        # another prompt in front changes nothing but the context
        other = tokenizer.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "Velmora."}])
        assert sum(other[1]) == sum(mask)


# -- the reward model ----------------------------------------------------------------------------------------


def test_reward_is_read_at_the_last_real_token_and_loads_in_transformers(base, tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    import copy

    rm = RewardModel(copy.deepcopy(base)).eval()
    rows = [tokenizer.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": a}])[0]
            for a in ("Hello there, friend.", "No.")]
    batch = collate_groups([rows], tokenizer.pad_id)
    with torch.no_grad():
        together = rm(batch["input_ids"], batch["lengths"])
        alone = [rm(torch.tensor([r]), torch.tensor([len(r)])).item() for r in rows]
    assert together.tolist() == pytest.approx(alone, abs=1e-5)  # padding never reaches the read-out
    save_checkpoint(tmp_path / "rm", rm, tokenizer)
    loaded, _, record = load_checkpoint(tmp_path / "rm", kind="reward_model")
    assert record["kind"] == "reward_model"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["input_ids"] != tokenizer.pad_id).logits[:, 0]
        ours = loaded(batch["input_ids"], batch["lengths"])
    assert (theirs - together).abs().max().item() <= 1e-4 and (ours - together).abs().max().item() <= 1e-6


def test_kind_mismatch_is_a_clear_error(base, tokenizer, tmp_path):
    import copy

    save_checkpoint(tmp_path / "lm", base, tokenizer)
    save_checkpoint(tmp_path / "rm", RewardModel(copy.deepcopy(base)), tokenizer)
    with pytest.raises(MismatchError, match="reward model checkpoint, but a causal lm is needed"):
        load_checkpoint(tmp_path / "rm")
    with pytest.raises(MismatchError, match="causal lm checkpoint, but a reward model is needed"):
        load_checkpoint(tmp_path / "lm", kind="reward_model")
    with pytest.raises(MismatchError, match="reward model"):
        dpo(DPOConfig(model=str(tmp_path / "rm"), data=str(tmp_path / "none.jsonl")))


# tiny comparisons: the right fact beats a wrong one
FACTS = [("Where does Mina live?", "Velmora.", "Osk."), ("What is 2+2?", "4", "5"),
         ("What does Mina bake?", "Bread.", "Stones."), ("Say hello.", "Hello!", "No."),
         ("Name a pet.", "A cat.", "A rock."), ("What is 3+4?", "7", "9")]


def _pairs_file(path, repeat=1):
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for q, good, bad in FACTS:
                f.write(json.dumps({"prompt": q, "chosen": good, "rejected": bad}) + "\n")
    return path


def test_reward_model_learns_comparisons_and_scores_a_file(base, tokenizer, tmp_path):
    save_checkpoint(tmp_path / "sft", base, tokenizer)
    data = _pairs_file(tmp_path / "pairs.jsonl", repeat=3)
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text("".join(json.dumps({"prompt": q, "responses": [g, "I am not sure.", b]}) + "\n"
                              for q, g, b in FACTS))
    final = train_reward(RewardConfig(model=str(tmp_path / "sft"), data=str(ranked), valid_data=str(data),
                                      out=str(tmp_path / "rm"),
                                      train=TrainConfig(steps=40, batch_size=4, lr=3e-3, warmup_steps=3,
                                                        eval_every=40, progress=False, log_every=1)))
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in rows[-5:]) / 5 < sum(r["loss"] for r in rows[:5]) / 5 - 0.3
    assert rows[-1]["val_accuracy"] >= 0.8
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"prompt": q, "responses": [g, b]}) + "\n" for q, g, b in FACTS))
    scored = score_file(ScoreConfig(model=str(final), data=str(responses), out=str(tmp_path / "scored.jsonl")))
    assert sum(r["rewards"][0] > r["rewards"][1] for r in scored) >= 5
    assert len((tmp_path / "scored.jsonl").read_text().splitlines()) == len(FACTS)


def test_dpo_starts_at_ln2_and_learns_the_pairs(base, tokenizer, tmp_path):
    save_checkpoint(tmp_path / "sft", base, tokenizer)
    data = _pairs_file(tmp_path / "pairs.jsonl", repeat=3)
    cfg = DPOConfig(model=str(tmp_path / "sft"), data=str(data), valid_data=str(_pairs_file(tmp_path / "v.jsonl")),
                    out=str(tmp_path / "dpo"), beta=0.1,
                    train=TrainConfig(steps=30, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=30,
                                      progress=False, log_every=1))
    final = dpo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as the reference
    assert rows[-1]["loss"] < 0.5 and rows[-1]["val_rewards/accuracies"] == 1.0
    model, _, record = load_checkpoint(final)
    assert record["lineage"]["stage"] == "dpo"
    assert (tmp_path / "dpo" / "reference_logps.pt").is_file()


def test_preference_training_on_real_hh_rlhf(tokenizer, tmp_path):
    path = SHARED / "data" / "preference" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    if not path.is_file():
        pytest.skip("../shared/data is absent")
    import gzip

    sample = tmp_path / "hh.jsonl"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        sample.write_text("".join(line for _, line in zip(range(300), f)))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", Transformer(tiny_config(tokenizer.vocab_size, max_seq_len=512)), tokenizer)
    common = dict(model=str(tmp_path / "base"), data=str(sample))
    train_reward(RewardConfig(**common, out=str(tmp_path / "rm"), train=TrainConfig(
        steps=30, batch_size=8, lr=1e-3, warmup_steps=2, eval_every=1000, progress=False, log_every=1)))
    dpo(DPOConfig(**common, out=str(tmp_path / "dpo"), train=TrainConfig(
        steps=30, batch_size=8, lr=1e-3, warmup_steps=2, eval_every=1000, progress=False, log_every=1)))
    for run in ("rm", "dpo"):
        losses = [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, run
