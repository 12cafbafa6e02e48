"""`llama3 serve`: the OpenAI-compatible API and the web chat page for one model folder."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from .generate import add_kv_cache_option

HELP = "serve a model over an OpenAI-compatible HTTP API with a web chat page at /"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama3 serve", description=HELP)
    parser.add_argument("--model", required=True, help="model folder or file that llama3.load reads")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (visible to other users "
                             f"in `ps`: prefer --api-key-file or the {API_KEY_ENV} environment variable)")
    parser.add_argument("--api-key-file", default=None,
                        help="read the API key from this file (its first line)")
    parser.add_argument("--model-name", default=None, help="the model id clients use (default: the folder name)")
    parser.add_argument("--num-slots", type=int, default=8, help="sequences decoded together (KV-cache rows)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot before 429")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="context per slot (default: the model's, at most 8192)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization")
    add_kv_cache_option(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="request body size limit")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="open connections at most; more are closed on accept (default: the file "
                             "descriptor limit less 64)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds one request may generate before it is stopped (default 600)")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="a request's tokens and logprobs do not depend on what shares its batch, bit for bit "
                             "(every decode step runs all --num-slots rows; slower at low load)")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0,
                        help="memory for the automatic prefix cache, which keeps the keys and values of prompt "
                             "prefixes (system prompts, earlier chat turns) for the requests that start the same "
                             "way (default 1 GB; 0 turns it off)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                        help="serve the PEFT LoRA adapter folder PATH as model NAME beside the base model "
                             "(repeatable); requests pick one by their `model` field")
    parser.add_argument("--allow-lora-updates", action="store_true",
                        help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read folders "
                             "on this machine: keep them to trusted clients, with --api-key)")
    parser.add_argument("--embedding-pooling", choices=["mean", "last"], default="mean",
                        help="how /v1/embeddings pools the final hidden states (default mean)")
    return parser


API_KEY_ENV = "LLAMA3_API_KEY"


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, --api-key-file or $LLAMA3_API_KEY (at most one of them), or None."""
    env_key = os.environ.get(API_KEY_ENV) or None
    given = [name for name, value in (("--api-key", args.api_key), ("--api-key-file", args.api_key_file),
                                      (f"${API_KEY_ENV}", env_key)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"the API key is given twice ({' and '.join(given)}); use one of them")
    if args.api_key_file is not None:
        path = Path(args.api_key_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the API key file {path}: {e}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"the API key file {path} is empty; put the key on its first line")
        return key
    key = args.api_key if args.api_key is not None else env_key
    if key is not None and not key.strip():
        raise ValueError("the API key is empty")
    return key


def usage_banner(url: str, model_name: str, api_key: str | None) -> str:
    """What to print once the server is up: where it is, and how to call it. The key itself is never
    printed (logs and terminals are shared); the examples read it from $LLAMA3_API_KEY."""
    key = f'os.environ["{API_KEY_ENV}"]' if api_key is not None else '"unused"'
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if api_key is not None else ""
    return "\n".join([
        f"llama3 serve: {model_name} at {url}",
        f"  chat page:  {url}/",
        f"  metrics:    {url}/metrics",
        "",
        "curl:",
        f"  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\",
        f"    -d '{{\"model\": \"{model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'",
        "",
        "python (pip install openai):",
        *(["  import os"] if api_key is not None else []),
        "  from openai import OpenAI",
        f"  client = OpenAI(base_url=\"{url}/v1\", api_key={key})",
        f"  reply = client.chat.completions.create(model=\"{model_name}\",",
        "                                         messages=[{\"role\": \"user\", \"content\": \"Hello!\"}])",
        "  print(reply.choices[0].message.content)",
    ])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"llama3 serve: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    try:
        import fastapi  # noqa: F401 - checked here so a missing extra is one line, not a traceback
        import uvicorn  # noqa: F401 -- the server runs on it (serve/server.py)
    except ImportError:
        print("llama3 serve needs the serve extra: pip install -e '.[serve]' in the repository (or make "
              "setup-runtime)", file=sys.stderr)
        return 2
    import torch

    import llama3

    from ..inference.engine import Engine
    from ..inference.fast import optimize_for_inference
    from ..serve.app import create_app
    from ..serve.schema import ServerLimits
    from ..serve.server import ConnectionLimits, build_server, run_server

    try:
        api_key = resolve_api_key(args)
        model_name = args.model_name or default_model_name(Path(args.model))
        adapters = parse_lora_flags(args.lora, model_name)
        limits = ServerLimits(max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout)
        connection_limits = ConnectionLimits(**({} if args.max_connections is None
                                                else {"max_connections": args.max_connections}))
    except ValueError as exc:
        print(f"llama3 serve: {exc}", file=sys.stderr)
        return 2

    if not args.kv_cache_gb >= 0:  # also refuses NaN
        print(f"llama3 serve: --kv-cache-gb must be >= 0 (0 turns the prefix cache off), got {args.kv_cache_gb}",
              file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"llama3 serve: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = llama3.load(args.model, device=args.device, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as exc:
        print(f"llama3 serve: cannot load {args.model}: {exc}", file=sys.stderr)
        return 2
    optimize_for_inference(model, quantize=args.quantize)
    max_seq_len = args.max_seq_len or min(model.args.max_seq_len, 8192)
    engine = Engine(model, tokenizer, num_slots=args.num_slots, max_queue=args.max_queue,
                    max_seq_len=max_seq_len, batch_invariant=args.batch_invariant, kv_cache=args.kv_cache,
                    prefix_cache_bytes=int(args.kv_cache_gb * 2**30)).start()
    try:
        for name, path in adapters:
            engine.load_lora(name, path)
    except ValueError as exc:
        engine.stop()
        print(f"llama3 serve: --lora: {exc}", file=sys.stderr)
        return 2
    app = create_app(engine, api_key=api_key, model_name=model_name, limits=limits,
                     embedding_pooling=args.embedding_pooling,
                     generation_defaults=generation_defaults(Path(args.model)),
                     allow_lora_updates=args.allow_lora_updates)
    host_shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host_shown}:{args.port}"
    print(usage_banner(url, model_name, api_key), flush=True)
    if api_key is None and not _is_loopback(args.host):
        print(f"warning: {args.host} is reachable from other machines and no API key is set", file=sys.stderr)
    try:
        run_server(build_server(app, host=args.host, port=args.port, limits=connection_limits))
    finally:
        engine.stop()
    return 0


def parse_lora_flags(values: list[str], model_name: str) -> list[tuple[str, str]]:
    """--lora NAME=PATH values -> (name, path) pairs; ValueError for a malformed or clashing one."""
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"'{value}' is not NAME=PATH (e.g. --lora austen=runs/chat/adapter)")
        if name == model_name or name in dict(pairs):
            raise ValueError(f"the name '{name}' is taken (by the base model or another --lora); pick another")
        pairs.append((name, path))
    return pairs


def default_model_name(path: Path) -> str:
    """The model id clients use: the folder's name, or its run's name for an export folder called `hf`
    (`runs/chat/hf` -> `chat`), without a `.gguf` suffix."""
    path = path.resolve()
    if path.name == "hf" and path.parent.name:
        return path.parent.name
    return path.stem if path.suffix == ".gguf" else path.name


def generation_defaults(path: Path) -> dict | None:
    """Sampling settings of the model's generation_config.json (temperature, top_p, top_k), if it has one."""
    import json

    config = path / "generation_config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"warning: {config} is unreadable ({e}); the chat page starts from its own sampling defaults",
              file=sys.stderr)
        return None
    keep = {k: data[k] for k in ("temperature", "top_p", "top_k") if isinstance(data.get(k), int | float)}
    if data.get("do_sample") is False:
        keep["temperature"] = 0.0  # greedy, as transformers would decode it
    return keep or None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
