"""Runs a list of distributed steps inside one torchrun job (starting processes is the slow part), for
tests/distributed/test_distributed.py:

    python -m torch.distributed.run --nproc_per_node N tests/distributed/worker.py PLAN.json

PLAN.json is a list of steps, run in order on every rank:
  {"kind": "cli", "argv": [...], "stdout": PATH or null}  `llama3 <argv>` (pretrain, generate), stdout of
                                                          rank 0 captured into PATH
  {"kind": "tp_logits", "model": DIR, "prompt_ids": [...], "max_new_tokens": N, "out": PATH}
                                                          tensor-parallel logits and greedy tokens against
                                                          the same model on one process, written by rank 0
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
import torch.distributed as dist


def tp_logits(step: dict) -> None:
    """Full-sequence logits, KV-cache decode logits and greedy tokens: TP model vs the plain model."""
    from torch.distributed.device_mesh import init_device_mesh

    import llama3
    from llama3.distributed import init_distributed
    from llama3.distributed.inference import TensorParallelGenerator, load_tensor_parallel
    from llama3.inference.generate import Generator
    from llama3.inference.sampling import SamplingParams

    info = init_distributed("cpu")
    mesh = init_device_mesh("cpu", (info.world_size,), mesh_dim_names=("tp",))
    tp_model, tokenizer = load_tensor_parallel(step["model"], mesh, device=info.device)
    plain, _ = llama3.load(step["model"])
    ids = torch.tensor([step["prompt_ids"]])  # (1, T)
    with torch.no_grad():
        full_diff = (tp_model(ids) - plain(ids)).abs().max().item()
    greedy = SamplingParams(temperature=0)
    n = step["max_new_tokens"]
    [tp_result] = TensorParallelGenerator(tp_model, tokenizer).generate([step["prompt_ids"]], max_new_tokens=n,
                                                                         sampling=greedy)
    [ref_result] = Generator(plain, tokenizer).generate([step["prompt_ids"]], max_new_tokens=n, sampling=greedy)
    # Decode-step logits with the caches the generators left: one more position after the continuation.
    pos = torch.tensor([[len(step["prompt_ids"]) + n - 1]])
    last = torch.tensor([[tp_result.token_ids[-1]]])
    with torch.no_grad():
        decode_diff = (tp_model(last, input_pos=pos) - plain(last, input_pos=pos)).abs().max().item()
    kv_heads_local = tp_model.layers[0].attention.kv_cache.k.shape[1]
    if info.rank == 0:
        result = {"full_logits_max_diff": full_diff, "decode_logits_max_diff": decode_diff,
                  "tp_tokens": tp_result.token_ids, "ref_tokens": ref_result.token_ids,
                  "kv_heads_local": kv_heads_local, "world_size": info.world_size}
        with open(step["out"], "w") as f:
            json.dump(result, f)


def run_cli(step: dict) -> None:
    from llama3.cli import main as cli_main

    rank = dist.get_rank() if dist.is_initialized() else 0
    if step.get("stdout") and rank == 0:
        with open(step["stdout"], "w") as f, contextlib.redirect_stdout(f):
            code = cli_main(step["argv"])
    else:
        code = cli_main(step["argv"])
    if code:
        raise SystemExit(f"llama3 {' '.join(step['argv'])} exited with {code}")


def main() -> int:
    torch.set_num_threads(1)
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    for step in plan:
        {"cli": run_cli, "tp_logits": tp_logits}[step["kind"]](step)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
