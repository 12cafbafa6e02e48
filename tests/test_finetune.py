"""`llama3 finetune` end to end on a tiny model: SFT with LoRA lowers the assistant-token loss, the merged
HF export loads in transformers and in `llama3.load` with equal logits, peft on the adapter folder equals
the merged model, only adapters moved; DPO widens the reward margin; the loss weights assistant tokens only;
bad data stops the command with the line number."""

import json

import pytest
import torch
from safetensors.torch import load_file

import llama3
from llama3.cli.finetune import main as finetune_main
from llama3.data.sft import IGNORE_INDEX, encode_chat_record, pad_batch
from llama3.tokenizer import ChatFormat, Tokenizer
from llama3.train.loss import causal_lm_loss
from tests.conftest import REPO, random_model, tiny_args

CHAT_FILE = REPO / "data" / "chat" / "austen_chat.jsonl"
DPO_FILE = REPO / "data" / "chat" / "austen_dpo.jsonl"
COMMON = ["--data.seq_len=256", "--train.val_interval=0", "--train.val_batches=4", "--logging.peak_flops=1e11",
          "--train.device=cpu", "--schedule.warmup_steps=0", "--checkpoint.interval=0"]



@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama 3 with a byte-level tokenizer (512 ids with the specials), as an HF folder."""
    path = tmp_path_factory.mktemp("base") / "hf"
    tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    llama3.save(random_model(tiny_args("gqa", vocab_size=512, max_seq_len=512)), tokenizer, path, format="hf")
    return path


def _subset(src, dst, num_lines):
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:num_lines]))
    return dst


def test_loss_weights_assistant_tokens_only(base_dir):
    model, tokenizer = llama3.load(base_dir)
    record = {"messages": [{"role": "user", "content": "Who wrote Emma?"},
                           {"role": "assistant", "content": "Jane Austen."}]}
    example = encode_chat_record(record, ChatFormat(tokenizer), "x:1", max_seq_len=256)
    batch = pad_batch([example], tokenizer.pad_id)
    with torch.no_grad():
        loss = causal_lm_loss(model, batch)
        logprobs = torch.log_softmax(model(batch["inputs"])[0], dim=-1)
    answer_start = len(ChatFormat(tokenizer).encode_dialog_prompt(record["messages"][:1]))  # after the header
    positions = range(answer_start, len(example.ids))  # "Jane Austen." and <|eot_id|>, counted by hand
    expected = -sum(logprobs[t - 1, example.ids[t]] for t in positions) / len(positions)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (batch["targets"] != IGNORE_INDEX).sum() == len(positions)


@pytest.mark.timeout(240)
def test_sft_lora_end_to_end(base_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = _subset(CHAT_FILE, tmp_path / "chat.jsonl", 80)
    out = tmp_path / "run"
    rc = finetune_main(["--model", str(base_dir), "--data", str(data), "--out", str(out), "--lora-rank", "8",
                        "--train.steps=30", "--optim.lr=1e-2", "--data.batch_size=4",
                        "--finetune.val_fraction=0.1", *COMMON])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "finetune_report.json").read_text())
    val = {int(k): v for k, v in report["val_loss"].items()}
    assert val[30] < val[0] - 1.5, val  # assistant-token loss on held-out dialogs falls

    # only the adapters moved: the base tensors in the final checkpoint are the starting ones
    start = llama3.load(base_dir)[0].state_dict()
    trained = load_file(str(out / "step-00000030" / "model.safetensors"))
    adapters = [k for k in trained if ".lora_" in k]
    assert len(adapters) == 2 * 7 * 2
    assert all(torch.equal(trained[k], start[k]) for k in trained if ".lora_" not in k)
    assert any(not torch.equal(trained[k], torch.zeros_like(trained[k])) for k in adapters if k.endswith("lora_B"))

    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    merged, _ = llama3.load(out / "hf")
    with torch.no_grad():
        ours = merged(tokens)
        hf = AutoModelForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
        torch.testing.assert_close(hf(tokens).logits, ours, atol=1e-4, rtol=1e-4)
        base_hf = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base_hf, str(out / "adapter")).eval()
        torch.testing.assert_close(adapted(tokens).logits, ours, atol=1e-4, rtol=1e-4)
        assert (ours - llama3.load(base_dir)[0](tokens)).abs().max() > 1e-2  # and it did change the model

    # served with the format it was trained on: HF's chat template gives our training ids
    from transformers import AutoTokenizer

    messages = json.loads(data.read_text().splitlines()[0])["messages"]
    hf_tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    hf_ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert hf_ids == ChatFormat(llama3.load(out / "hf")[1]).encode_dialog(messages)[0]
    # and our own generate command runs on the export
    from llama3.cli.generate import main as generate_main

    capsys.readouterr()
    assert generate_main(["--model", str(out / "hf"), "--prompt", "Who is Emma?", "--max-new-tokens", "4",
                          "--temperature", "0", "--no-compile", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4


@pytest.mark.timeout(240)
def test_dpo_end_to_end(base_dir, tmp_path, capsys):
    data = _subset(DPO_FILE, tmp_path / "pairs.jsonl", 40)
    out = tmp_path / "dpo"
    rc = finetune_main(["--model", str(base_dir), "--data", str(data), "--out", str(out), "--method", "dpo",
                        "--train.steps=20", "--optim.lr=3e-3", "--data.batch_size=4",
                        "--finetune.val_fraction=0.2", *COMMON])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "step 0 | val loss" in captured.out and "val ppl" not in captured.out  # a preference loss: no ppl
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["val_reward"]["margin"] > 0.5 and report["val_reward"]["accuracy"] >= 0.75, report
    assert not (out / "adapter").exists()  # full fine-tuning: no adapter folder
    model, _ = llama3.load(out / "hf")
    assert model.args.vocab_size == 512


@pytest.mark.timeout(240)
def test_resumed_lora_run_equals_uninterrupted(base_dir, tmp_path):
    data = _subset(CHAT_FILE, tmp_path / "chat.jsonl", 40)
    flags = ["--model", str(base_dir), "--data", str(data), "--lora-rank", "4", "--optim.lr=1e-2",
             "--data.batch_size=2", "--schedule.name=constant", *COMMON]
    assert finetune_main([*flags, "--out", str(tmp_path / "whole"), "--train.steps=6"]) == 0
    assert finetune_main([*flags, "--out", str(tmp_path / "parts"), "--train.steps=3"]) == 0
    assert finetune_main([*flags, "--out", str(tmp_path / "parts"), "--train.steps=6", "--resume"]) == 0
    whole = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "adapter" / "adapter_model.safetensors"))
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert any(not torch.equal(whole[k], torch.zeros_like(whole[k])) for k in whole)


def test_bad_data_stops_with_the_line_number(base_dir, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
    data.write_text(good + "\n" + good + "\n" + '{"messages": [{"role": "user", "content": "Hi"}]}\n')
    rc = finetune_main(["--model", str(base_dir), "--data", str(data), "--out", str(tmp_path / "o"), *COMMON])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:3: no assistant reply" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        finetune_main(["--data", str(data)])
    assert "no starting model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune_main(["--model", str(base_dir), "--data", str(data), "--finetune.lora_rnk=4"])
    assert "unknown key 'lora_rnk'" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_recipe_seq_len_past_the_model_context_shrinks_to_it(base_dir, tmp_path, capsys):
    """The sft recipe's data.seq_len (1024) is longer than the model's 512-token context: it becomes 512
    with a notice; a data.seq_len the user set that long is refused."""
    data = _subset(CHAT_FILE, tmp_path / "chat.jsonl", 20)
    flags = ["--model", str(base_dir), "--data", str(data), "--train.steps=1", "--data.batch_size=2",
             *[flag for flag in COMMON if not flag.startswith("--data.seq_len")]]
    assert finetune_main([*flags, "--out", str(tmp_path / "fit")]) == 0
    out = capsys.readouterr().out
    assert ("the model's context is 512 tokens, shorter than the recipe's data.seq_len=1024; training on rows "
            "of 512 (--data.seq_len sets it)") in out.splitlines()
    assert json.loads((tmp_path / "fit" / "config.json").read_text())["data"]["seq_len"] == 512
    assert finetune_main([*flags, "--out", str(tmp_path / "set"), "--data.seq_len", "1024"]) == 2
    assert ("llama3 finetune: error: data.seq_len=1024 exceeds the model's context (512); pass --data.seq_len=512 "
            "or less") in capsys.readouterr().err
    assert not (tmp_path / "set").exists()
