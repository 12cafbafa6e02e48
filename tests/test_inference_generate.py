"""Generation: parity with HF `generate` and HF logits, ragged batches, fused/quantized/compiled paths,
speculative decoding, stop handling, streaming and context errors."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model_from, random_model, tiny_args

from llama3.inference import Generator, SamplingParams
from llama3.inference.fast import fuse_projections, optimize_for_inference
from llama3.inference.speculative import SpeculativeGenerator

GREEDY = SamplingParams(temperature=0)
PROMPTS = [[5, 17, 99, 3, 250], [7, 8, 9, 10, 11, 12, 13, 14, 15], [42]]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("config", ["gqa", "tied"])
def test_greedy_ids_equal_hf_generate_batch_1_and_ragged_batch(config, llama3_tokenizer):
    model = random_model(tiny_args(config))
    hf = hf_model_from(model)
    expected = [hf_greedy(hf, p, 12) for p in PROMPTS]
    gen = Generator(model, llama3_tokenizer)
    assert gen.generate([PROMPTS[0]], max_new_tokens=12, sampling=GREEDY)[0].token_ids == expected[0]
    results = gen.generate(PROMPTS, max_new_tokens=12, sampling=GREEDY)
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == "length" for r in results)


def test_step_logits_equal_hf_full_forward(llama3_tokenizer):
    """Prefill and every decode step give the logits HF computes for the same prefix (not just argmax)."""
    model = random_model(tiny_args("gqa"))
    hf = hf_model_from(model)
    gen = Generator(fuse_projections(model), llama3_tokenizer)
    gen.prepare_cache(2, 32)
    prompts = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 0, 0]])  # row 1 has 4 real tokens
    lengths = torch.tensor([6, 4])
    logits = gen.prefill(prompts, torch.arange(6).expand(2, 6), lengths - 1)
    seqs = [prompts[0].tolist(), prompts[1, :4].tolist()]
    for _step in range(4):
        with torch.no_grad():
            for i, seq in enumerate(seqs):
                ref = hf(torch.tensor([seq])).logits[0, -1]
                torch.testing.assert_close(logits[i], ref, atol=2e-4, rtol=1e-4)
        next_ids = logits.argmax(-1)
        for i in range(2):
            seqs[i].append(int(next_ids[i]))
        positions = torch.tensor([[len(seqs[0]) - 1], [len(seqs[1]) - 1]])
        logits = gen.decode_step(next_ids.view(2, 1), positions)


def test_quantized_models_stay_close_to_full_precision(llama3_tokenizer):
    x = torch.randint(0, 256, (2, 9))
    reference = random_model(tiny_args("gqa"))(x)
    for mode, tolerance in (("int8", 0.03), ("int4", 0.25)):
        quantized = optimize_for_inference(random_model(tiny_args("gqa")), quantize=mode)
        relative = ((quantized(x) - reference).abs().max() / reference.abs().max()).item()
        assert relative < tolerance, (mode, relative)
    # The int8 kernel equals the pure-PyTorch dequantize-then-matmul path.
    from llama3.inference.quantize import quantize_model

    kernel = quantize_model(random_model(tiny_args("gqa")), "int8")
    fallback = quantize_model(random_model(tiny_args("gqa")), "int8", use_kernel=False)
    kernel_out, fallback_out = kernel(x), fallback(x)  # both multiply in bf16; only the summation order differs
    assert ((kernel_out - fallback_out).abs().max() / fallback_out.abs().max()).item() < 0.02
    gen = Generator(kernel, llama3_tokenizer)
    assert len(gen.generate(PROMPTS, max_new_tokens=4, sampling=GREEDY)[2].token_ids) == 4


@pytest.mark.timeout(300)
def test_compiled_decode_equals_eager(llama3_tokenizer):
    model = optimize_for_inference(random_model(tiny_args("gqa")))
    eager = Generator(model, llama3_tokenizer).generate(PROMPTS, max_new_tokens=8, sampling=GREEDY)
    compiled_gen = Generator(model, llama3_tokenizer, compile=True, inductor_options={"freezing": True})
    compiled = compiled_gen.generate(PROMPTS, max_new_tokens=8, sampling=GREEDY)
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]
    assert compiled[0].timing.compile_s > 0
    again = compiled_gen.generate(PROMPTS, max_new_tokens=8, sampling=GREEDY)  # same bucket: no new warm-up
    assert again[0].timing.compile_s == 0 and [r.token_ids for r in again] == [r.token_ids for r in eager]


@pytest.mark.parametrize("same_draft", [True, False])
def test_speculative_equals_plain_greedy(same_draft, llama3_tokenizer):
    target = random_model(tiny_args("gqa"), seed=0)
    draft = random_model(tiny_args("gqa"), seed=0) if same_draft else random_model(tiny_args("mqa", n_layers=1), seed=3)
    plain = Generator(target, llama3_tokenizer).generate([PROMPTS[1]], max_new_tokens=20, sampling=GREEDY)[0]
    spec = SpeculativeGenerator(Generator(target, llama3_tokenizer), Generator(draft, llama3_tokenizer),
                                num_draft_tokens=3)
    result = spec.generate([PROMPTS[1]], max_new_tokens=20)[0]
    assert result.token_ids == plain.token_ids
    assert spec.acceptance_rate == 1.0 if same_draft else spec.acceptance_rate < 1.0
    with pytest.raises(ValueError, match="greedy"):
        spec.generate([PROMPTS[1]], max_new_tokens=5, sampling=SamplingParams(temperature=0.7))


def test_speculative_caches_start_small_and_grow(llama3_tokenizer):
    """Speculative decoding allocates room for the prompt and one bucket, then grows both caches in place as
    the generator does, and the output stays the plain greedy one."""
    target = random_model(tiny_args("gqa"), seed=0)
    draft = random_model(tiny_args("mqa", n_layers=1), seed=3)
    plain = Generator(target, llama3_tokenizer).generate([PROMPTS[1]], max_new_tokens=40, sampling=GREEDY)[0]
    target.clear_caches()  # the plain run left a full-size cache behind
    lengths = {"target": [], "draft": []}
    for name, model in (("target", target), ("draft", draft)):
        for method in ("setup_caches", "grow_caches"):
            original = getattr(model, method)

            def spy(*args, _original=original, _name=name, **kwargs):
                lengths[_name].append(args[1] if len(args) > 1 else args[0])
                return _original(*args, **kwargs)
            setattr(model, method, spy)
    spec = SpeculativeGenerator(Generator(target, llama3_tokenizer, cache_bucket=8),
                                Generator(draft, llama3_tokenizer, cache_bucket=8), num_draft_tokens=3)
    result = spec.generate([PROMPTS[1]], max_new_tokens=40)[0]
    assert result.token_ids == plain.token_ids
    for sizes in lengths.values():
        # 9 prompt + 8 new + 3 drafts -> a 32-slot cache first, grown (not reallocated) to 64 for 9 + 40 + 3
        assert sizes == [32, 64]


def test_seeded_sampling_is_reproducible_and_batch_independent(llama3_tokenizer):
    gen = Generator(random_model(tiny_args("gqa")), llama3_tokenizer)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    alone = gen.generate([PROMPTS[0]], max_new_tokens=10, sampling=params)[0].token_ids
    assert gen.generate([PROMPTS[0]], max_new_tokens=10, sampling=params)[0].token_ids == alone
    batched = gen.generate(PROMPTS[:2], max_new_tokens=10, sampling=[params, SamplingParams(seed=3)])
    assert batched[0].token_ids == alone


# ----- a model whose greedy continuation is known: each token predicts its successor in a chain -----

def chain_model(tokenizer, chain: list[int]):
    """A real Transformer whose weights make greedy decoding walk `chain`: attention and FFN outputs are
    zero, so the residual stream is the token's embedding, a basis vector the output maps to its successor."""
    args = tiny_args("gqa", vocab_size=tokenizer.n_words, n_layers=1)
    model = random_model(args)
    assert len(chain) < args.dim
    with torch.no_grad():
        model.layers[0].attention.wo.weight.zero_()
        model.layers[0].feed_forward.w2.weight.zero_()
        model.norm.weight.fill_(1.0)
        model.tok_embeddings.weight.zero_()
        model.output.weight.zero_()
        for i, token in enumerate(chain):
            model.tok_embeddings.weight[token, i] = 1.0
            if i + 1 < len(chain):
                model.output.weight[chain[i + 1], i] = 10.0
    return model


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte, so multi-byte characters span several tokens."""
    return [tokenizer.mergeable_ranks[bytes([b])] for b in text.encode("utf-8")]


def test_stream_never_splits_utf8_and_matches_generate(llama3_tokenizer):
    text = "a😀b中é!"
    chain = byte_tokens(llama3_tokenizer, "#" + text)
    gen = Generator(chain_model(llama3_tokenizer, chain), llama3_tokenizer)
    pieces = list(gen.stream([chain[0]], max_new_tokens=len(chain) - 1, sampling=GREEDY))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert len(pieces) == len(text)  # one piece per character, released when its last byte arrives
    assert gen.generate([[chain[0]]], max_new_tokens=len(chain) - 1, sampling=GREEDY)[0].text == text


def test_stop_strings_and_stop_ids(llama3_tokenizer):
    chain = byte_tokens(llama3_tokenizer, "#Hi-STOP+now") + [llama3_tokenizer.eot_id]
    gen = Generator(chain_model(llama3_tokenizer, chain), llama3_tokenizer)
    [result] = gen.generate([[chain[0]]], max_new_tokens=40, sampling=GREEDY, stop_strings=["STOP"])
    assert (result.text, result.finish_reason) == ("Hi-", "stop")
    pieces = list(gen.stream([chain[0]], max_new_tokens=40, sampling=GREEDY, stop_strings=["STOP", "xyz"]))
    assert "".join(pieces) == "Hi-"
    # Without stop strings it runs to the eot id, which ends it and is not part of the output.
    [result] = gen.generate([[chain[0]]], max_new_tokens=40, sampling=GREEDY)
    assert (result.text, result.finish_reason) == ("Hi-STOP+now", "stop")
    assert result.token_ids == chain[1:-1]
    [result] = gen.generate([[chain[0]]], max_new_tokens=40, sampling=GREEDY, stop_ids=[])
    assert result.finish_reason == "length" and len(result.token_ids) == 40
    [result] = gen.generate([[chain[0]]], max_new_tokens=3, sampling=GREEDY)
    assert (result.text, result.finish_reason) == ("Hi-", "length")


def test_context_length_and_prompt_errors(llama3_tokenizer):
    gen = Generator(random_model(tiny_args("gqa")), llama3_tokenizer)  # max_seq_len 128
    with pytest.raises(ValueError, match="context length is 128"):
        gen.generate([list(range(100))], max_new_tokens=29)
    assert len(gen.generate([list(range(100))], max_new_tokens=28, sampling=GREEDY)[0].token_ids) == 28
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], max_new_tokens=3)
    with pytest.raises(ValueError, match="vocabulary"):
        gen.generate([[1, 300]], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate([[1]], max_new_tokens=0)
