"""DPO: the loss equals a hand computation on a fixed batch, precomputed reference log-probs equal a live
reference model, and training on a toy preference set widens the chosen-minus-rejected margin."""

import math

import pytest
import torch

from llama3.data.sft import IGNORE_INDEX, encode_preference_record, preference_batch
from llama3.tokenizer import ChatFormat, Tokenizer
from llama3.train.dpo import DPOConfig, DPOLoss, compute_reference_logps, sequence_logprobs
from tests.conftest import random_model, tiny_args

PAIRS = [
    {"prompt": "Who is Emma?", "chosen": "The heroine of Emma.", "rejected": "no idea"},
    {"prompt": [{"role": "system", "content": "Be civil."}, {"role": "user", "content": "Who wrote Persuasion?"}],
     "chosen": "Jane Austen.", "rejected": "Look it up yourself."},
    {"prompt": "Who is Mr. Darcy?", "chosen": "The master of Pemberley.", "rejected": "some guy lol"},
    {"prompt": "Hello!", "chosen": "How do you do?", "rejected": "sup"},
]



@pytest.fixture(scope="module")
def chat():
    return ChatFormat(Tokenizer({bytes([i]): i for i in range(256)}))


@pytest.fixture(scope="module")
def examples(chat):
    return [encode_preference_record(p, chat, f"pairs:{i + 1}", max_seq_len=128) for i, p in enumerate(PAIRS)]


def _model():
    return random_model(tiny_args("gqa", vocab_size=512, max_seq_len=256))


def _hand_logp(model, ids, mask):
    """log π(y|x) by the definition: sum over response positions t of log softmax(logits[t-1])[ids[t]]."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t]), sum(mask[1:])


def test_loss_matches_hand_computation(chat, examples):
    policy, reference = _model(), random_model(tiny_args("gqa", vocab_size=512, max_seq_len=256), seed=7)
    beta, nll_weight = 0.3, 0.2
    loss_fn = DPOLoss(DPOConfig(beta=beta, nll_weight=nll_weight), reference_model=reference)
    batch = preference_batch(examples, chat.tokenizer.pad_id)
    with torch.no_grad():
        loss = loss_fn(policy, batch)
    metrics = loss_fn.last_metrics
    per_pair, chosen_sum, chosen_count, margins = [], 0.0, 0, []
    for e in examples:
        pc, nc = _hand_logp(policy, e.chosen_ids, e.chosen_mask)
        pr, _ = _hand_logp(policy, e.rejected_ids, e.rejected_mask)
        rc, _ = _hand_logp(reference, e.chosen_ids, e.chosen_mask)
        rr, _ = _hand_logp(reference, e.rejected_ids, e.rejected_mask)
        margin = beta * ((pc - rc) - (pr - rr))
        per_pair.append(-math.log(1 / (1 + math.exp(-margin))))
        margins.append(margin)
        chosen_sum, chosen_count = chosen_sum + pc, chosen_count + nc
    expected = sum(per_pair) / len(per_pair) + nll_weight * (-chosen_sum / chosen_count)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["dpo_loss"] == pytest.approx(sum(per_pair) / len(per_pair), rel=1e-5)
    assert metrics["reward_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-6)


def test_precomputed_reference_equals_live_reference(chat, examples):
    policy, reference = _model(), random_model(tiny_args("gqa", vocab_size=512, max_seq_len=256), seed=7)
    live = DPOLoss(reference_model=reference)(policy, preference_batch(examples, chat.tokenizer.pad_id))
    with_ref = compute_reference_logps(reference, examples, chat.tokenizer.pad_id, batch_size=3)
    batch = preference_batch(with_ref, chat.tokenizer.pad_id)
    assert "ref_chosen_logps" in batch
    precomputed = DPOLoss()(policy, batch)
    torch.testing.assert_close(precomputed, live, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        DPOLoss()(policy, preference_batch(examples, chat.tokenizer.pad_id))


def test_chunked_logprobs_equal_unchunked(chat, examples):
    model = _model()
    batch = preference_batch(examples, chat.tokenizer.pad_id)
    with torch.no_grad():
        whole, counts = sequence_logprobs(model, batch["inputs"], batch["targets"], chunk_size=4096)
        chunked, _ = sequence_logprobs(model, batch["inputs"], batch["targets"], chunk_size=7)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-5)
    assert counts.tolist() == (batch["targets"] != IGNORE_INDEX).sum(1).tolist()


def _loop_config(out_dir, steps: int, lr: float):
    from llama3.train.config import TrainConfig

    cfg = TrainConfig()
    cfg.train.steps, cfg.train.out_dir, cfg.train.val_interval, cfg.train.device = steps, str(out_dir), 0, "cpu"
    cfg.optim.lr, cfg.optim.weight_decay = lr, 0.0
    cfg.schedule.name, cfg.schedule.warmup_steps = "constant", 0
    cfg.checkpoint.interval, cfg.checkpoint.export_hf = 0, False
    cfg.logging.peak_flops, cfg.data.seq_len = 1e11, 64  # skip the matmul probe; seq_len only feeds MFU
    return cfg


@pytest.mark.timeout(120)
def test_training_through_the_loop_widens_the_margin(chat, examples, tmp_path):
    from llama3.data.sft import PreferenceBatches
    from llama3.train.loop import train

    start_model = _model()
    with_ref = compute_reference_logps(start_model, examples, chat.tokenizer.pad_id)  # reference = start
    loss_fn = DPOLoss(DPOConfig(beta=0.1, nll_weight=0.2))
    batch = preference_batch(with_ref, chat.tokenizer.pad_id)
    with torch.no_grad():
        loss_fn(start_model, batch)
    assert loss_fn.last_metrics["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert loss_fn.last_metrics["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    result = train(_loop_config(tmp_path, steps=12, lr=3e-3), tokenizer=chat.tokenizer,
                   train_batches=PreferenceBatches(with_ref, batch_size=4, pad_id=chat.tokenizer.pad_id),
                   model_args=start_model.args, initialize=lambda m: m.load_state_dict(start_model.state_dict()),
                   loss_fn=loss_fn, log=lambda line: None)
    with torch.no_grad():
        loss_fn(result.model.eval(), batch)
    end = loss_fn.last_metrics
    assert end["reward_margin"] > 1.0 and end["reward_accuracy"] == 1.0
    assert end["dpo_loss"] < math.log(2) - 0.3
    assert result.history[-1]["loss"] < result.history[0]["loss"]
