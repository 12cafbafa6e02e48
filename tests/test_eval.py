"""Evaluation: log-likelihoods against HF transformers, perplexity against a direct computation, prompt
layouts and metrics against hand-written values and lm-evaluation-harness's own functions, and readers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import AUSTEN, REPO, hf_model_from, random_model, tiny_args

from llama3.eval.formats import load_examples
from llama3.eval.perplexity import perplexity_of_text, rolling_windows
from llama3.eval.scoring import LogLikelihoodScorer, encode_pair
from llama3.eval.tasks import (
    GSM8K_EXTRACTORS,
    GSM8K_IGNORE,
    build_context,
    evaluate_task,
    extract_answer,
    multiple_choice_metrics,
    normalize_answer,
    resolve_task,
)
from llama3.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE (256 ranks, no merges) + Llama 3's 256 special tokens: vocab 512, BOS 256."""
    return Tokenizer({bytes([i]): i for i in range(256)})


@pytest.fixture(scope="module")
def tiny_model():
    return random_model(tiny_args("gqa", vocab_size=512, max_seq_len=256), seed=3)


@pytest.fixture(scope="module")
def hf_reference(tiny_model):
    return hf_model_from(tiny_model)


def _hf_logprob(hf, ids: list[int], num_continuation: int) -> tuple[float, bool]:
    """Sum of log P(continuation token | prefix) straight from HF logits, one unpadded sequence."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits[0].double()  # (T-1, V)
    logprobs = F.log_softmax(logits, dim=-1)[-num_continuation:]
    targets = torch.tensor(ids[-num_continuation:])
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
    return picked, bool((logprobs.argmax(-1) == targets).all())


# ----- log-likelihoods -----
@pytest.mark.timeout(120)
def test_loglikelihood_matches_hf(tiny_model, hf_reference, byte_tokenizer):
    texts = [
        ("The cat sat on the", " mat"),
        ("Question: 2+2?\nAnswer:", " 4"),
        ("", "Hello there"),
        (
            "A much longer context that goes on for a while, about Emma Woodhouse, handsome, clever,",
            " and rich, with a comfortable home",
        ),
    ]
    pairs = [encode_pair(byte_tokenizer, c, x) for c, x in texts]
    scorer = LogLikelihoodScorer(tiny_model, batch_size=3)  # 2 batches, padded rows of different lengths
    got = scorer.score(pairs)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        want, want_greedy = _hf_logprob(hf_reference, context + continuation, len(continuation))
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
    # A greedy continuation is recognized as greedy: extend a context by HF's own argmax tokens.
    ids = [byte_tokenizer.bos_id] + byte_tokenizer.encode("Once upon")
    for _ in range(3):
        with torch.no_grad():
            ids.append(int(hf_reference(torch.tensor([ids])).logits[0, -1].argmax()))
    [(logprob, greedy)] = scorer.score([(ids[:-3], ids[-3:])])
    assert greedy and logprob == pytest.approx(_hf_logprob(hf_reference, ids, 3)[0], abs=1e-4)


@pytest.mark.timeout(60)
def test_loglikelihood_truncates_context_from_the_left(tiny_model, hf_reference):
    ids = list(range(1, 60))
    scorer = LogLikelihoodScorer(tiny_model, max_length=16)
    [(logprob, _)] = scorer.score([(ids[:-5], ids[-5:])])
    want, _ = _hf_logprob(hf_reference, ids[-17:], 5)  # the last 16 inputs, as lm-evaluation-harness keeps
    assert logprob == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="empty context"):
        scorer.score([([], [1, 2])])
    with pytest.raises(ValueError, match="longer than the scoring window"):
        scorer.score([([1], list(range(2, 40)))])


def test_encode_pair_moves_trailing_space(llama3_tokenizer):
    context, continuation = encode_pair(llama3_tokenizer, "The capital of France is ", "Paris")
    assert context == [128000] + llama3_tokenizer.encode("The capital of France is")
    assert continuation == llama3_tokenizer.encode(" Paris")  # one token with its leading space
    assert encode_pair(llama3_tokenizer, "", "Hello")[0] == [128000]


# ----- perplexity -----
def test_rolling_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 137))
    for window in (4, 7, 16, 64):
        ours = rolling_windows([0] + tokens, window)
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, window, 1)]
        assert ours == [(list(c), list(x)) for c, x in theirs]
    for window, stride in ((8, 3), (8, 1), (5, 5)):
        requests = rolling_windows([0] + tokens, window, stride)
        assert [t for _, x in requests for t in x] == tokens  # every token predicted exactly once
        for context, continuation in requests:
            assert len(context) + len(continuation) - 1 <= window
        for context, _ in requests[1:]:
            assert len(context) >= window - stride + 1  # at least window - stride tokens of context
    with pytest.raises(ValueError, match="stride"):
        rolling_windows([0, 1, 2], 4, 5)


@pytest.mark.timeout(120)
def test_perplexity_equals_exp_mean_nll(tiny_model, hf_reference, byte_tokenizer):
    text = (AUSTEN / "persuasion.txt").read_text(encoding="utf-8")[5000:5240]
    ids = byte_tokenizer.encode(text, bos=True)
    # Independent computation: one HF forward over the whole text (fits the window), mean cross-entropy.
    scorer = LogLikelihoodScorer(tiny_model, max_length=len(ids))
    with torch.no_grad():
        logits = hf_reference(torch.tensor([ids[:-1]])).logits[0]
    mean_nll = F.cross_entropy(logits.double(), torch.tensor(ids[1:])).item()
    result = perplexity_of_text(scorer, byte_tokenizer, [text])
    assert result.num_tokens == len(ids) - 1 and result.num_bytes == len(text.encode("utf-8"))
    assert result.perplexity == pytest.approx(math.exp(mean_nll), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(
        mean_nll * (len(ids) - 1) / math.log(2) / len(text.encode()), rel=1e-5
    )
    # Sliding windows of 64 with stride 24, against a plain loop over HF: each window predicts its tail.
    windowed = perplexity_of_text(
        LogLikelihoodScorer(tiny_model, max_length=64, batch_size=4), byte_tokenizer, [text], stride=24
    )
    total, next_target = 0.0, 1
    while next_target < len(ids):
        last = min(next_target + (64 if next_target == 1 else 24) - 1, len(ids) - 1)
        start = max(0, last - 64)
        with torch.no_grad():
            window_logits = hf_reference(torch.tensor([ids[start:last]])).logits[0].double()
        nll = F.cross_entropy(window_logits, torch.tensor(ids[start + 1 : last + 1]), reduction="none")
        total += nll[next_target - start - 1 :].sum().item()
        next_target = last + 1
    assert windowed.perplexity == pytest.approx(math.exp(total / (len(ids) - 1)), rel=1e-5)
    assert windowed.perplexity != pytest.approx(result.perplexity, rel=1e-6)  # less context, other value


# ----- prompts, metrics, extraction -----
def test_prompts_have_lm_eval_layout():
    arc = resolve_task("arc_easy")
    assert build_context(arc, 0, 1) == (
        "Question: Which of these is a source of light?\nAnswer: the Sun\n\n"
        "Question: Which tool is best for measuring the mass of a small stone?"
        "\nAnswer:"
    )
    mmlu = resolve_task("mmlu")
    assert build_context(mmlu, 5, 1) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 7 multiplied by 8?\nA. 54\nB. 56\nC. 58\nD. 64\nAnswer: B\n\n"
        "What is 9 + 16?\nA. 23\nB. 24\nC. 25\nD. 26\nAnswer:"
    )  # shots from the same subject
    hellaswag = resolve_task("hellaswag")
    example = hellaswag.examples[4]  # WikiHow artifacts removed as lm-evaluation-harness does
    assert example.prompt == (
        "Personal Care and Style: How to brush your teeth. Wet the toothbrush. put a pea-sized amount of"
    )
    assert example.choices[0] == "toothpaste on the bristles and brush in small circles."
    from lm_eval.tasks.hellaswag.utils import preprocess

    for example in hellaswag.examples:
        doc = example.fields
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        assert example.prompt == preprocess(doc["activity_label"] + ": " + ctx)
        assert example.choices == [preprocess(e) for e in doc["endings"]]
    gsm8k = resolve_task("gsm8k")
    assert build_context(gsm8k, 0, 0) == (
        "Question: Lena buys 3 notebooks at $4 each and a pen for $2. How much does she spend?\nAnswer:"
    )
    with pytest.raises(ValueError, match="only 4 are available"):
        build_context(gsm8k, 0, 5)


def test_acc_and_acc_norm_by_hand():
    # acc: highest log-likelihood; acc_norm: highest log-likelihood per character, ties to the first.
    assert multiple_choice_metrics([-10.0, -12.0, -30.0], ["a", "bbbb", "cccccccccc"], 0) == {
        "acc": 1.0,
        "acc_norm": 0.0,
    }  # per char: -10, -3, -3 -> choice 1
    assert multiple_choice_metrics([-10.0, -12.0, -30.0], ["a", "bbbb", "cccccccccc"], 1) == {
        "acc": 0.0,
        "acc_norm": 1.0,
    }
    assert multiple_choice_metrics([-5.0, -5.0], ["xx", "yy"], 0) == {"acc": 1.0, "acc_norm": 1.0}


@pytest.mark.timeout(120)
def test_task_scores_on_sample_file_by_hand(tiny_model, hf_reference, byte_tokenizer):
    task = resolve_task("arc_easy")
    result = evaluate_task(tiny_model, byte_tokenizer, task, num_fewshot=1, batch_size=5)
    hits, hits_norm = [], []
    for index, example in enumerate(task.examples):
        context = build_context(task, index, 1)
        logprobs = []
        for choice in example.choices:
            ctx_ids, cont_ids = encode_pair(byte_tokenizer, context, " " + choice)
            logprobs.append(_hf_logprob(hf_reference, ctx_ids + cont_ids, len(cont_ids))[0])
        hits.append(max(range(len(logprobs)), key=logprobs.__getitem__) == example.gold)
        normed = [lp / len(c) for lp, c in zip(logprobs, example.choices)]
        hits_norm.append(max(range(len(normed)), key=normed.__getitem__) == example.gold)
        assert result["samples"][index]["logprobs"] == pytest.approx(logprobs, abs=1e-4)
    n = len(task.examples)
    assert result["num_samples"] == n == 8
    assert result["metrics"]["acc"] == pytest.approx(sum(hits) / n)
    assert result["metrics"]["acc_norm"] == pytest.approx(sum(hits_norm) / n)
    p = sum(hits) / n
    assert result["metrics"]["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) * n / (n - 1) / n))


def test_gsm8k_extraction_matches_lm_eval():
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    reference = "Half of 2,468 is 1,234.\n#### 1,234"
    generations = [
        "So the total is 1,234.\n#### 1,234.",
        " She pays $1,234 in all.",
        "no numbers here",
        "First 12, then 15, so #### 15",
        "#### -7",
        " The answer is 1234",
    ]
    strict = ["1,234.", "[invalid]", "[invalid]", "15", "-7", "[invalid]"]
    flexible = ["1,234.", "$1,234", "[invalid]", "15", "-7", "1234"]
    assert [extract_answer(g, GSM8K_EXTRACTORS["strict-match"]) for g in generations] == strict
    assert [extract_answer(g, GSM8K_EXTRACTORS["flexible-extract"]) for g in generations] == flexible
    ours_target = normalize_answer(reference, GSM8K_IGNORE)
    assert ours_target == "1234"
    assert [normalize_answer(a, GSM8K_IGNORE) == ours_target for a in flexible] == [
        True,
        True,
        False,
        False,
        False,
        True,
    ]
    for name, extractor in GSM8K_EXTRACTORS.items():
        lm_eval_filter = RegexFilter(extractor.pattern, extractor.group_select)
        theirs = [r[0] for r in lm_eval_filter.apply([[g] for g in generations], [{}] * len(generations))]
        assert theirs == [extract_answer(g, extractor) for g in generations], name
        for answer in theirs:
            their_match = exact_match_hf_evaluate(
                [answer], [reference], regexes_to_ignore=list(GSM8K_IGNORE), ignore_case=True
            )["exact_match"]
            assert their_match == float(normalize_answer(answer, GSM8K_IGNORE) == ours_target)


# ----- readers -----
def test_readers_accept_published_layouts(tmp_path):
    arc_nested = {
        "id": "x1",
        "question": {
            "stem": "Which is a gas?",
            "choices": [{"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}],
        },
        "answerKey": "B",
    }
    mmlu_columns = {"input": "1+1?", "A": "1", "B": "2", "C": "3", "D": "4", "target": "B"}
    hellaswag_int = {
        "activity_label": "Cooking",
        "ctx_a": "A man cracks an egg.",
        "ctx_b": "he",
        "endings": ["fries it.", "eats the shell."],
        "label": 0,
    }
    for record, fmt, prompt_start, gold in [
        (arc_nested, "arc", "Question: Which is a gas?", 1),
        (mmlu_columns, "mmlu", "1+1?\nA. 1", 1),
        (hellaswag_int, "hellaswag", "Cooking: A man cracks an egg. He", 0),
    ]:
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        detected, [example] = load_examples(path)
        assert detected == fmt and example.prompt.startswith(prompt_start) and example.gold == gold
    csv_path = tmp_path / "astronomy_test.csv"
    csv_path.write_text('"Which planet is largest?",Mars,Jupiter,Venus,Earth,B\n')
    fmt, [example] = load_examples(csv_path)
    assert fmt == "mmlu" and example.gold == 1 and "B. Jupiter" in example.prompt
    fmt, examples = load_examples(REPO / "data" / "tasks" / "custom" / "multiple_choice.jsonl")
    assert fmt == "custom" and examples[1].gold == 1


def test_readers_report_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"}\n'
        '{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "C"}\n'
    )
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: answerKey 'C' is not one of"):
        load_examples(path)
    path.write_text('{"question": "q", "answer": "42"}\n')
    with pytest.raises(ValueError, match=r"line 1: GSM8K answers end with a line '#### <number>'"):
        load_examples(path)
    path.write_text('{"question": "q", "answer": "#### 4"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_examples(path)
    path.write_text('{"prompt": "q"}\n')
    with pytest.raises(ValueError, match="cannot tell the task format"):
        load_examples(path)
    path.write_text('{"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 0}\n')
    with pytest.raises(ValueError, match="line 1: MMLU items have 4 choices"):
        load_examples(path)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        resolve_task("nope")


# ----- the lm-evaluation-harness adapter's own request types -----
@pytest.mark.timeout(120)
def test_adapter_rolling_and_generation_match_hf(tiny_model, hf_reference, byte_tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from llama3.eval.lm_eval import Llama3LM

    lm = Llama3LM.from_model(tiny_model, byte_tokenizer, batch_size=2, max_length=64)
    text = (AUSTEN / "emma.txt").read_text(encoding="utf-8")[2000:2150]
    [rolling] = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True
    )
    want = 0.0  # lm-evaluation-harness's own windowing, each window scored by HF
    for context, continuation in map(
        make_disjoint_window,
        get_rolling_token_windows(byte_tokenizer.encode(text), byte_tokenizer.bos_id, 64, 1),
    ):
        want += _hf_logprob(hf_reference, context + continuation, len(continuation))[0]
    assert rolling == pytest.approx(want, abs=1e-3)

    # generate_until: HF greedy decoding of the same prompt, cut before the first stop string.
    prompts = ["Question: What is 2 + 2?\nAnswer:", "It is a truth universally"]
    requests = [
        Instance(
            "generate_until", {}, (p, {"until": ["\n\n", "Qu"], "max_gen_toks": 12, "do_sample": False}), i
        )
        for i, p in enumerate(prompts)
    ]
    outputs = lm.generate_until(requests, disable_tqdm=True)
    for prompt, output in zip(prompts, outputs):
        ids = [byte_tokenizer.bos_id] + byte_tokenizer.encode(prompt)
        for _ in range(12):
            with torch.no_grad():
                next_id = int(hf_reference(torch.tensor([ids])).logits[0, -1].argmax())
            if next_id in byte_tokenizer.stop_tokens:
                break
            ids.append(next_id)
        text_out = byte_tokenizer.decode(ids[len(byte_tokenizer.encode(prompt)) + 1 :])
        for stop in ("\n\n", "Qu"):
            text_out = text_out.split(stop)[0]
        assert output == text_out
    assert tiny_model.cache_len is None  # generation leaves no KV cache behind for later scoring
