"""Pretraining: token shards from `llama3 prepare` -> packed batches -> the training loop.

    from llama3.train.recipes import recipe
    cfg = recipe("debug"); cfg.data.path = "runs/demo/data"; cfg.train.out_dir = "runs/mine"
    result = pretrain(cfg)          # result.model, result.val_losses, OUT/hf
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..data.pretrain import PackedBatches, load_index
from ..tokenizer import Tokenizer
from .loop import TrainResult, setup_runtime, train

__all__ = ["pretrain"]


def pretrain(cfg, *, resume: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    """Build the data pipeline for `cfg` (a TrainConfig whose `data.path` is a folder `llama3 prepare`
    wrote) and run the training loop, from the newest checkpoint in `train.out_dir` when `resume`; under
    torchrun, distributed. Returns the TrainResult."""
    runtime = setup_runtime(cfg)
    data_dir = Path(cfg.data.path)
    index = load_index(data_dir)
    tokenizer = Tokenizer.from_file(data_dir / index["tokenizer"])
    batch_args = {"batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "dp_rank": runtime.dp_rank,
                  "dp_world_size": runtime.dp_world_size, "document_mask": cfg.data.document_mask}
    train_batches = PackedBatches(data_dir, "train", seed=cfg.data.seed, **batch_args)
    val_batches = None
    if index["splits"].get("val", {}).get("num_tokens", 0) > cfg.data.seq_len * cfg.data.batch_size:
        def val_batches():
            return PackedBatches(data_dir, "val", shuffle=False, repeat=False, **batch_args)
    return train(cfg, tokenizer=tokenizer, train_batches=train_batches, val_batches=val_batches,
                 resume=resume, runtime=runtime, log=log)
