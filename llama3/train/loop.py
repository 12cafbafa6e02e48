"""The one training loop: pretraining, SFT, LoRA and DPO differ only in the arguments to `train`.

    result = train(cfg, tokenizer=tok, train_batches=batches, val_batches=make_val_iter)

What a caller can swap (the extension points):

- `model_args`: the shape (default: `cfg.model` with the tokenizer's vocab size).
- `initialize(model)`: fills a freshly materialized model (default: `model.init_weights()`, i.e. training from
  scratch; fine-tuning passes a function that loads weights, e.g. from `llama3.load`).
- `transform(model) -> model | None`: runs after initialization and before the optimizer is built (LoRA
  injection: freeze the base, add adapters). Only parameters with `requires_grad` are optimized.
- `train_batches`: an iterator of batch dicts (`inputs`, `targets`, optional `document_ids`, or whatever the
  loss reads) with `state_dict()`/`load_state_dict()` for exact resume (see `llama3.data.pretrain`).
- `val_batches()`: returns a fresh iterable of validation batches (the first `cfg.train.val_batches` are used).
- `loss_fn(model, batch) -> scalar`: default `causal_lm_loss` (chunked cross-entropy, ignore index -100).
- `runtime`: device and data-parallel placement (`llama3.train.runtime.Runtime`, one device by default);
  `Runtime.parallelize` applies TP → activation checkpointing → compile → FSDP2 to the meta-device model
  (`llama3.distributed.parallelize.parallelize`, with no mesh on one device).

Model building is `build_model`: meta device → parallelize → to_empty → initialize. Per step: micro-batches
under bf16 autocast (optional), gradient clipping, a non-finite check *before* the optimizer update, the lr
from `schedule.lr_at` (a pure function of the step). Checkpoints via `llama3.checkpoint.native`.
"""

from __future__ import annotations

import functools
import math
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import native
from ..checkpoint.safety import WriteFailed
from ..config import ModelArgs
from ..model import Transformer
from .config import TrainConfig
from .fused import prepare_for_training
from .loss import release_scratch
from .metrics import MetricsWriter, format_duration, measure_peak_flops, memory_gib
from .optim import build_optimizer
from .runtime import Runtime, autocast_dtype, bf16_notice
from .schedule import lr_at

__all__ = [
    "Runtime",
    "TrainResult",
    "build_model",
    "evaluate",
    "setup_runtime",
    "time_steps",
    "train",
]

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """The single-process runtime for `cfg.train.device` (`auto`: CUDA when available, else CPU); under
    torchrun, the distributed one (`llama3.distributed.runtime`)."""
    from ..distributed.mesh import launched_by_torchrun

    if launched_by_torchrun():
        from ..distributed.runtime import distributed_runtime

        return distributed_runtime(cfg)
    name = cfg.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available; use --train.device=cpu")
    return Runtime(device=device)


def build_model(args: ModelArgs, cfg: TrainConfig, runtime: Runtime, *,
                initialize: Callable[[Transformer], None] | None = None) -> Transformer:
    """Meta device → parallelize (TP → activation checkpointing → compile → FSDP2; on one device the first
    and last do nothing) → to_empty → init_weights / initialize → the CPU training ops
    (`llama3.train.fused.prepare_for_training`)."""
    model = Transformer.on_meta(args)
    model = runtime.parallelize(model, cfg.parallel)
    model.to_empty(device=runtime.device)
    torch.manual_seed(cfg.train.seed)
    if initialize is None:
        runtime.init_weights(model)
    else:
        model.init_buffers(runtime.device)
        initialize(model)
    # One CPU process: fused element-wise kernels (not under compile, which fuses them itself) and the tied
    # embedding's gradient added into the output projection's. Sharded (DTensor) models keep torch's operators.
    one_cpu = runtime.device.type == "cpu" and runtime.world_size == 1
    return prepare_for_training(model, fuse=one_cpu and not cfg.parallel.compile, tied_embedding_grad=one_cpu)


@dataclass
class TrainResult:
    model: Transformer
    step: int  # optimizer steps done
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl records of this process
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    stop_reason: str = "steps"  # steps | time_budget
    last_checkpoint: Path | None = None


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], *, num_batches: int, loss_fn: LossFn,
             device: torch.device, autocast_dtype: torch.dtype | None) -> float:
    """Mean loss over the first `num_batches` batches (eval mode; training mode restored after)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        if count >= num_batches:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            total += float(loss_fn(model, batch))
        count += 1
    model.train(was_training)
    if count == 0:
        raise ValueError("the validation set gave no batches")
    return total / count


def _batch_checksum(batch: Batch) -> int:
    """crc32 of the input ids: lets tests and users confirm a resumed run sees the same batches."""
    return zlib.crc32(batch["inputs"].cpu().numpy().tobytes())


class _StepRunner:
    """One optimizer step: micro-batches, clipping, the non-finite check, the update."""

    def __init__(self, model, optimizer, cfg: TrainConfig, runtime: Runtime, loss_fn: LossFn):
        self.model, self.optimizer, self.cfg, self.runtime, self.loss_fn = model, optimizer, cfg, runtime, loss_fn
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.autocast_dtype = autocast_dtype(cfg.train.dtype, runtime.device)  # fp32 where bf16 is emulated

    def __call__(self, batches: Iterator[Batch], lr: float) -> dict[str, Any]:
        cfg, device = self.cfg.train, self.runtime.device
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_total = torch.zeros((), device=device)
        num_tokens, checksum = 0, 0
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            checksum = zlib.crc32(checksum.to_bytes(4, "little"), _batch_checksum(batch))
            num_tokens += batch["inputs"].numel()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                loss = self.loss_fn(self.model, batch)
            (loss / cfg.grad_accum).backward()
            loss_total += loss.detach() / cfg.grad_accum
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = self.runtime.clip_grad_norm(self.params, max_norm)
        loss_value = float(self.runtime.all_reduce_mean(loss_total))
        grad_norm_value = float(grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm_value)
        if finite:
            self.optimizer.step()
        # A non-finite loss or gradient never reaches the weights or the optimizer state: drop the grads.
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "grad_norm": grad_norm_value, "skipped": not finite,
                "num_tokens": num_tokens, "data_checksum": checksum}


def time_steps(cfg: TrainConfig, *, model_args: ModelArgs, train_batches: Iterator[Batch], num_steps: int = 3,
               runtime: Runtime | None = None) -> float:
    """Seconds of one optimizer step of `cfg` (the loop's own step: micro-batches, clipping, update) on a
    model built from scratch: the best of `num_steps` steps after the first, which warms up allocators and
    kernels. What a wall-time budget is turned into a number of steps with (`llama3 demo`)."""
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps}: time at least 2 steps (the first one only warms up)")
    runtime = runtime or setup_runtime(cfg)
    model = build_model(model_args, cfg, runtime)
    model.train()
    optimizer = build_optimizer(model, cfg.optim, runtime.device.type)
    run_step = _StepRunner(model, optimizer, cfg, runtime,
                           functools.partial(runtime.lm_loss, chunk_size=cfg.train.loss_chunk_size))
    best = math.inf
    for i in range(num_steps):
        start = time.perf_counter()
        run_step(train_batches, cfg.optim.lr)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def _format_line(rec: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {rec['step']}/{total_steps}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
             f"gnorm {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:,.0f} tok/s", f"MFU {100 * rec['mfu']:.1f}%",
             f"mem {rec['memory_gib']:.2f}GiB", f"eta {format_duration(rec['eta_s'])}"]
    if "val_loss" in rec:
        parts.append(f"val {rec['val_loss']:.4f}")
    if rec["skipped"]:
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)


def train(cfg: TrainConfig, *, tokenizer: Any, train_batches: Iterator[Batch],
          val_batches: Callable[[], Iterable[Batch]] | None = None, model_args: ModelArgs | None = None,
          initialize: Callable[[Transformer], None] | None = None,
          transform: Callable[[Transformer], Transformer | None] | None = None,
          loss_fn: LossFn | None = None, resume: bool = False, runtime: Runtime | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Run `cfg.train.steps` optimizer steps (from the newest complete checkpoint in `cfg.train.out_dir`
    when `resume`), validating, logging and checkpointing as configured; export an HF folder at the end."""
    runtime = runtime or setup_runtime(cfg)
    if not runtime.is_main:  # one log line per job, not one per rank
        def log(message: str) -> None:
            pass
    out_dir = Path(cfg.train.out_dir)
    if model_args is None:
        model_args = cfg.model.model_args(vocab_size=tokenizer.n_words, max_seq_len=cfg.data.seq_len)
    model = build_model(model_args, cfg, runtime, initialize=initialize)
    if transform is not None:
        model = transform(model) or model
    model.train()
    optimizer = build_optimizer(model, cfg.optim, runtime.device.type)
    reports_perplexity = loss_fn is None  # the default losses are cross-entropy; a caller's (DPO) may not be
    loss_fn = loss_fn or functools.partial(runtime.lm_loss, chunk_size=cfg.train.loss_chunk_size)

    start_step, skipped_in_row, checkpoint_dir = 0, 0, None
    if resume:
        checkpoint_dir = native.latest_checkpoint(out_dir)
        if checkpoint_dir is None:
            log(f"no complete checkpoint in {out_dir}; starting from scratch")
        else:
            state = native.load_train_state(checkpoint_dir, model, optimizer)
            start_step, skipped_in_row = int(state["step"]), int(state.get("skipped_in_row", 0))
            train_batches.load_state_dict(state["data"])
            torch.set_rng_state(state["rng_cpu"])
            if runtime.device.type == "cuda" and "rng_cuda" in state:
                torch.cuda.set_rng_state(state["rng_cuda"], runtime.device)
            log(f"resumed from {checkpoint_dir} at step {start_step}")

    notice = bf16_notice(cfg.train.dtype, runtime.device)
    if notice and runtime.is_main:
        log(notice)
    peak = cfg.logging.peak_flops or measure_peak_flops(
        runtime.device, autocast_dtype(cfg.train.dtype, runtime.device) or torch.float32)
    flops_per_token = model_args.flops_per_token(cfg.data.seq_len)
    metrics = MetricsWriter(out_dir, resume_step=start_step if resume else None,
                            tensorboard=cfg.logging.tensorboard, enabled=runtime.is_main, log=log)
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(cfg.to_json())
    run_step = _StepRunner(model, optimizer, cfg, runtime, loss_fn)
    result = TrainResult(model=model, step=start_step, last_checkpoint=checkpoint_dir)

    def validate() -> float | None:
        if val_batches is None:
            return None
        val_loss = evaluate(model, val_batches(), num_batches=cfg.train.val_batches, loss_fn=loss_fn,
                            device=runtime.device, autocast_dtype=run_step.autocast_dtype)
        return float(runtime.all_reduce_mean(torch.tensor(val_loss, device=runtime.device)))

    def save(step: int) -> None:
        state = {"step": step, "skipped_in_row": skipped_in_row, "data": train_batches.state_dict(),
                 "rng_cpu": torch.get_rng_state()}
        if runtime.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(runtime.device)
        try:
            result.last_checkpoint = runtime.save_checkpoint(
                out_dir, step, model=model, optimizer=optimizer, train_state=state, config_json=cfg.to_json(),
                tokenizer=tokenizer, keep=cfg.checkpoint.keep)
        except OSError as e:  # a full disk: one line naming the path and the checkpoint to resume from
            raise WriteFailed.from_os_error(e, f"the checkpoint of step {step}", fallback_path=out_dir,
                                            training=True, last_checkpoint=result.last_checkpoint) from None

    if start_step == 0 and (val_loss := validate()) is not None:
        result.val_losses[0] = val_loss
        ppl = f" | val ppl {math.exp(min(val_loss, 50)):.1f}" if reports_perplexity else ""
        log(f"step 0 | val loss {val_loss:.4f}{ppl}")

    bar = None
    if cfg.logging.progress_bar and runtime.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step", desc="training")
    t_start = time.perf_counter()
    step = start_step
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, lr=cfg.optim.lr, total_steps=cfg.train.steps, schedule=cfg.schedule)
        out = run_step(train_batches, lr)
        step += 1
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        dt = time.perf_counter() - t0
        tokens_per_s = out["num_tokens"] * runtime.dp_world_size / dt
        elapsed = time.perf_counter() - t_start
        rec = {"step": step, "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
               "tokens_per_s": tokens_per_s,
               # per device: this step's FLOPs over all data-parallel ranks, shared by all devices
               "mfu": flops_per_token * out["num_tokens"] * runtime.dp_world_size / runtime.world_size
               / dt / peak,
               "memory_gib": memory_gib(runtime.device), "elapsed_s": elapsed,
               "eta_s": elapsed / (step - start_step) * (cfg.train.steps - step), "skipped": out["skipped"],
               "data_checksum": out["data_checksum"]}
        skipped_in_row = skipped_in_row + 1 if out["skipped"] else 0
        if out["skipped"] and (cfg.train.on_nonfinite == "stop" or skipped_in_row >= cfg.train.max_skipped_steps):
            _write_record(metrics, rec, result.last_checkpoint)
            metrics.close()
            raise RuntimeError(
                f"step {step}: non-finite loss ({out['loss']}) or gradient norm ({out['grad_norm']}); the update "
                f"was not applied and nothing was saved. Last complete checkpoint: {result.last_checkpoint}. "
                "Lower optim.lr or raise schedule.warmup_steps, then resume with --resume.")
        over_budget = cfg.train.time_budget_s > 0 and elapsed >= cfg.train.time_budget_s
        last = step == cfg.train.steps or over_budget
        val_due = (cfg.train.val_interval and step % cfg.train.val_interval == 0) or last
        if val_due and (val_loss := validate()) is not None:
            rec["val_loss"] = result.val_losses[step] = val_loss
        _write_record(metrics, rec, result.last_checkpoint)
        result.history.append(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        elif runtime.is_main and (step % cfg.logging.log_interval == 0 or last):
            log(_format_line(rec, cfg.train.steps))
        if last or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0):
            save(step)
        if over_budget:
            result.stop_reason = "time_budget"
            break
    if bar is not None:
        bar.close()
    metrics.close()
    release_scratch()  # the loss's reusable CPU buffers (up to ~0.5 GB with a 128K vocabulary)
    result.step = step
    if cfg.checkpoint.export_hf:
        runtime.export_hf(model, tokenizer, out_dir / "hf", log)
    return result


def _write_record(metrics: MetricsWriter, record: dict[str, Any], last_checkpoint: Path | None) -> None:
    try:
        metrics.write(record)
    except OSError as e:
        raise WriteFailed.from_os_error(e, f"metrics of step {record['step']}", fallback_path=metrics.path,
                                        training=True, last_checkpoint=last_checkpoint) from None
