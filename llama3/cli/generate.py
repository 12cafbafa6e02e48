"""`llama3 generate`: continue a prompt with a model folder; prints only the continuation.

    llama3 generate --model out/hf --prompt "It is a truth universally acknowledged" --max-new-tokens 64
    llama3 generate --model out/hf --prompt "..." --temperature 0 --json      # one JSON object
    llama3 generate --model out/hf --prompt "..." --dtype bf16 --quantize int8 # fastest on a CPU
    llama3 generate --model out/hf --prompt "Who is Emma?" --chat               # as a chat turn

`--json` prints {"text", "token_ids", "finish_reason", "timing": {"prefill_s", "decode_s",
"num_prompt_tokens", "num_new_tokens", "decode_tokens_per_s"}}. Progress and the one-time compilation note
go to stderr, so stdout holds only the continuation (or the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "continue a prompt with a model (greedy or sampled; streaming, JSON, compile, int8/int4, speculative)"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `generate` and `chat`: which model, and how to run it fast."""
    parser.add_argument("--model", required=True, help="model folder (Hugging Face, Meta, training checkpoint) or .gguf")
    parser.add_argument("--dtype", default=None,
                        help="float32 | bfloat16 | float16 (default: as stored; float16 decodes fastest on CPU)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="weight-only quantization at load time (int8: ~2x less memory traffic than bf16)")
    parser.add_argument("--no-compile", action="store_true",
                        help="run eager PyTorch instead of compiling the decode step (compilation takes "
                             "seconds to a minute once per shape, then is cached on disk)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--draft-model", default=None,
                        help="a small model with the same tokenizer for speculative decoding (greedy only)")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="draft tokens per speculative round")


def add_sampling_options(parser: argparse.ArgumentParser, *, temperature: float, top_p: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
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


def build_generator(args: argparse.Namespace, *, cache_bucket: int = 256):
    """Load the model (and draft) as the options say; returns a Generator or SpeculativeGenerator."""
    import torch

    from ..inference.fast import load_for_inference
    from ..inference.generate import Generator

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from ..distributed.mesh import launched_by_torchrun

    if launched_by_torchrun():  # under torchrun: one model split over the ranks (tensor parallel)
        from ..distributed.inference import tp_generator_from_args

        return tp_generator_from_args(args, cache_bucket=cache_bucket)
    model, tokenizer = load_for_inference(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    generator = Generator(model, tokenizer, compile=not args.no_compile, cache_bucket=cache_bucket)
    if args.draft_model is None:
        return generator
    from ..inference.speculative import SpeculativeGenerator

    draft, _ = load_for_inference(args.draft_model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    draft_generator = Generator(draft, tokenizer, compile=not args.no_compile, cache_bucket=cache_bucket)
    return SpeculativeGenerator(generator, draft_generator, num_draft_tokens=args.num_draft_tokens)


def _prompt_and_stops(generator, args: argparse.Namespace):
    """The prompt text as given (BOS added by the tokenizer's rule), or with `--chat` the ids of a one-message
    dialog in the model's chat format together with that format's stop tokens."""
    if not args.chat:
        return args.prompt, None
    from ..chat_template import chat_format_for

    chat = chat_format_for(generator.tokenizer)
    return chat.encode_dialog_prompt([{"role": "user", "content": args.prompt}]), sorted(chat.stop_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama3 generate", description=HELP)
    add_model_options(parser)
    parser.add_argument("--prompt", required=True, help="the text to continue (BOS is added)")
    add_sampling_options(parser, temperature=0.6, top_p=0.9)
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with text, ids and timing")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as one user message in the model's chat format (Llama 3's, or the "
                             "model's own template) and stop at its end of turn")
    args = parser.parse_args(argv)

    try:
        sampling = sampling_from_args(args)
        generator = build_generator(args)
        prompt, stop_ids = _prompt_and_stops(generator, args)
        if args.json:
            [result] = generator.generate([prompt], max_new_tokens=args.max_new_tokens, sampling=sampling,
                                          stop_strings=args.stop, stop_ids=stop_ids)
            print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                              "finish_reason": result.finish_reason, "timing": result.timing.to_dict()},
                             ensure_ascii=False))
            return 0
        for piece in generator.stream(prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
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
