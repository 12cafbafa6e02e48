"""`llama3 generate`: continue a prompt with a model folder; prints only the continuation.

    llama3 generate --model out/hf --prompt "It is a truth universally acknowledged" --max-new-tokens 64
    llama3 generate --model out/hf --prompt "..." --temperature 0 --json      # one JSON object
    llama3 generate --model out/hf --prompt "..." --dtype bf16 --quantize int8 # fastest on a CPU
    llama3 generate --model out/hf --prompt-file prompt.txt                   # or --prompt-file - (stdin)
    llama3 generate --model out/hf --prompt "Who is Emma?" --chat               # as a chat turn

`--json` prints {"text", "token_ids", "finish_reason", "timing": {"load_s", "warmup_s", "prefill_s",
"decode_s", "num_prompt_tokens", "num_new_tokens", "decode_tokens_per_s"}}. Notices (such as a reply limit
shortened to fit the context) go to stderr, so stdout holds only the continuation (or the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = "continue a prompt with a model (greedy or sampled; streaming, JSON, compile, int8/int4, speculative)"

DEFAULT_MAX_NEW_TOKENS = 256
# Decode-step compilation costs a warm-up before the first token. On the CPU it does not pay for a reply:
# the products and the decode attention run on the project's kernels either way, and at the 1B shape in
# bf16 (quiet Zen 3, 2026-12-02) the compiled step decoded 8.0-8.5 tok/s against eager's 7.0-7.3 after a
# 70 s warm-up, i.e. ~5 s saved on a 256-token reply; on the 5M-parameter demo model a one-shot `generate`
# took 5.5 s compiled (16.7 s with an empty cache) against 2.3 s eager. So `auto` runs CPU models eagerly.
# On a GPU, where an eager step is a few hundred kernel launches, `auto` compiles models of 50M parameters
# and more.
COMPILE_MIN_PARAMS = 50 * 10**6


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `generate` and `chat`: which model, and how to run it fast."""
    parser.add_argument("--model", required=True, help="model folder (Hugging Face, Meta, training checkpoint) or .gguf")
    parser.add_argument("--dtype", default=None,
                        help="float32 | bfloat16 | float16 (default: as stored). CPU decode reads every weight "
                             "once per token: bfloat16 halves the bytes of float32, --quantize int8 halves "
                             "them again")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="weight-only quantization at load time (int8: ~2x less memory traffic than bf16)")
    add_kv_cache_option(parser)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="compile the decode step with torch.compile: auto (default) runs CPU models eagerly "
                             f"and compiles GPU models of {COMPILE_MIN_PARAMS // 10**6}M+ parameters, where it pays "
                             "for its warm-up; on / off force it")
    parser.add_argument("--no-compile", action="store_const", dest="compile", const="off",
                        help="the same as --compile off")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--draft-model", default=None,
                        help="a small model with the same tokenizer for speculative decoding (greedy only)")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="draft tokens per speculative round")


def add_kv_cache_option(parser: argparse.ArgumentParser) -> None:
    """`--kv-cache f32|f16|bf16|int8` (shared by generate, chat and serve)."""
    parser.add_argument("--kv-cache", choices=["f32", "f16", "bf16", "int8"], default=None,
                        help="the KV cache's format: a float dtype, or int8 with a scale per head and position "
                             "(about half the memory of bf16). Default: the model's dtype, f16 for quantized "
                             "GGUF files (their activations are f32)")


def add_sampling_options(parser: argparse.ArgumentParser, *, temperature: float, top_p: float) -> None:
    """Sampling options shared by `generate` and `chat` (Llama 3's instruct settings as defaults)."""
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"most tokens to generate (default {DEFAULT_MAX_NEW_TOKENS}, or the room left in "
                             "the model's context when that is less)")
    parser.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    parser.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling mass (default {top_p})")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x top probability")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty (1 = off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def sampling_from_args(args: argparse.Namespace):
    from ..inference.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def _model_of(generator):
    """The generator's model (for a speculative pair, the target's)."""
    return generator.target.model if hasattr(generator, "target") else generator.model


def context_length(generator) -> int:
    """The model's context in tokens (for a speculative pair, the target's)."""
    return _model_of(generator).args.max_seq_len


def fit_new_tokens(requested: int | None, num_prompt: int, context: int) -> tuple[int, str | None]:
    """The number of new tokens to generate after a `num_prompt`-token prompt, and a notice when the default
    had to shrink to the room left. An explicit request that cannot fit, or a prompt that fills the context,
    is a ValueError that says what to change."""
    room = context - num_prompt
    if room < 1:
        raise ValueError(f"the prompt is {num_prompt} tokens and the model's context length is {context}: "
                         "shorten the prompt")
    if requested is None:
        if room >= DEFAULT_MAX_NEW_TOKENS:
            return DEFAULT_MAX_NEW_TOKENS, None
        return room, (f"at most {room} new tokens fit in the model's {context}-token context after the "
                      f"{num_prompt}-token prompt; generating up to {room}")
    if requested < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {requested}")
    if requested > room:
        raise ValueError(f"--max-new-tokens {requested} does not fit: the prompt is {num_prompt} tokens and the "
                         f"model's context length is {context}, which leaves {room}. Ask for at most {room}, or leave "
                         "--max-new-tokens out to use the room left")
    return requested, None


def _should_compile(choice: str, model) -> bool:
    if choice == "auto":
        on_cpu = model.tok_embeddings.weight.device.type == "cpu"
        return not on_cpu and model.num_params() >= COMPILE_MIN_PARAMS
    return choice == "on"


def build_generator(args: argparse.Namespace, *, cache_bucket: int = 256):
    """Load the model (and draft) as the options say; returns a Generator or SpeculativeGenerator."""
    import torch

    from ..inference.loading import load_for_inference
    from ..inference.generate import Generator

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from ..distributed.mesh import launched_by_torchrun

    if launched_by_torchrun():  # under torchrun: one model split over the ranks (tensor parallel)
        return _tensor_parallel_generator(args, cache_bucket)
    model, tokenizer = load_for_inference(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    compile_step = _should_compile(args.compile, model)
    generator = Generator(model, tokenizer, compile=compile_step, cache_bucket=cache_bucket, kv_cache=args.kv_cache)
    if args.draft_model is None:
        return generator
    from ..inference.speculative import SpeculativeGenerator

    draft, _ = load_for_inference(args.draft_model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    draft_generator = Generator(draft, tokenizer, compile=compile_step, cache_bucket=cache_bucket,
                                kv_cache=args.kv_cache)
    return SpeculativeGenerator(generator, draft_generator, num_draft_tokens=args.num_draft_tokens)


def _tensor_parallel_generator(args: argparse.Namespace, cache_bucket: int):
    from ..distributed.inference import tensor_parallel_generator
    from ..distributed.mesh import is_rank0

    if args.quantize or args.draft_model:
        raise ValueError("--quantize and --draft-model are not supported with tensor parallel (torchrun)")
    generator = tensor_parallel_generator(args.model, device=args.device, dtype=args.dtype, seed=args.seed,
                                          cache_bucket=cache_bucket, kv_cache=args.kv_cache)
    if args.compile == "on" and is_rank0():
        print("tensor parallel: decoding eagerly (no torch.compile)", file=sys.stderr)
    return generator


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt from --prompt, --prompt-file FILE, or standard input (--prompt-file -)."""
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None


def _prompt_and_stops(generator, prompt: str, chat: bool):
    """The prompt's ids (BOS added by the tokenizer's rule), or with `--chat` the ids of a one-message dialog
    in the model's chat format together with that format's stop tokens."""
    if not chat:
        return generator.tokenizer.encode(prompt, bos=True), None
    from ..chat_template import chat_format_for

    chat_format = chat_format_for(generator.tokenizer)
    return chat_format.encode_dialog_prompt([{"role": "user", "content": prompt}]), sorted(chat_format.stop_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama3 generate", description=HELP)
    add_model_options(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue (BOS is added)")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file ('-': standard input)")
    add_sampling_options(parser, temperature=0.6, top_p=0.9)
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with text, ids and timing")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as one user message in the model's chat format (Llama 3's, or the "
                             "model's own template) and stop at its end of turn")
    args = parser.parse_args(argv)

    try:
        prompt = _read_prompt(args)
        sampling = sampling_from_args(args)
        start = time.perf_counter()
        generator = build_generator(args)
        load_s = time.perf_counter() - start
        prompt_ids, stop_ids = _prompt_and_stops(generator, prompt, args.chat)
        max_new, notice = fit_new_tokens(args.max_new_tokens, len(prompt_ids), context_length(generator))
        if notice:
            print(f"llama3 generate: note: {notice}", file=sys.stderr)
        if args.json:
            from ..inference.attention import kv_cache_format

            [result] = generator.generate([prompt_ids], max_new_tokens=max_new, sampling=sampling,
                                          stop_strings=args.stop, stop_ids=stop_ids)
            timing = {"load_s": load_s, "warmup_s": result.timing.compile_s, **result.timing.to_dict()}
            print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                              "finish_reason": result.finish_reason, "timing": timing,
                              "kv_cache": kv_cache_format(_model_of(generator)),
                              "kv_cache_bytes": _model_of(generator).cache_bytes()}, ensure_ascii=False))
            return 0
        for piece in generator.stream(prompt_ids, max_new_tokens=max_new, sampling=sampling,
                                      stop_strings=args.stop, stop_ids=stop_ids):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except ValueError as e:
        print(f"llama3 generate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    return 0
