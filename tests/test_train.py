"""The training loop: config overrides, schedules, parity with HF transformers, non-finite steps."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import AUSTEN, hf_model_from, random_model, tiny_args

from llama3.train.config import ScheduleSection, TrainConfig, apply_overrides
from llama3.train.loop import train
from llama3.train.loss import causal_lm_loss, linear_cross_entropy
from llama3.train.optim import build_optimizer
from llama3.train.recipes import recipe, recipe_names
from llama3.train.schedule import lr_at

# ----- config -----

def test_overrides_parse_into_typed_fields():
    cfg = apply_overrides(recipe("debug"), ["--train.steps=7", "--optim.lr", "1e-3", "--train.dtype=bf16",
                                            "--model.n_layers=3", "--logging.tensorboard=false",
                                            "--parallel.activation_checkpoint=full", "--train.steps=1e2"])
    assert cfg.train.steps == 100 and cfg.optim.lr == 1e-3 and cfg.train.dtype == "bf16"
    assert cfg.model.overrides["n_layers"] == 3 and cfg.logging.tensorboard is False
    assert cfg.parallel.activation_checkpoint == "full"
    assert cfg.model.model_args(vocab_size=300).n_layers == 3


@pytest.mark.parametrize("args, message", [
    (["--nosuch.key=1"], "unknown config section 'nosuch'"),
    (["--train.nosuch=1"], "unknown key 'nosuch' in section 'train'"),
    (["--train.steps=ten"], "--train.steps: expected an integer, got 'ten'"),
    (["--optim.lr=fast"], "--optim.lr: expected a number"),
    (["--train.dtype=fp8"], "'fp8' is not one of fp32, bf16"),
    (["--checkpoint.export_hf=maybe"], "expected true or false"),
    (["--model.nosuch=1"], "unknown model field 'nosuch'"),
    (["--train.steps"], "--train.steps needs a value"),
    (["positional"], "unexpected argument 'positional'"),
])
def test_override_errors_name_the_option(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(TrainConfig(), args)


def test_config_json_round_trip_and_strict_loading():
    for name in recipe_names():
        cfg = recipe(name)
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    bad = recipe("debug").to_dict()
    bad["train"]["stepz"] = 3
    with pytest.raises(ValueError, match="unknown keys in config section 'train'"):
        TrainConfig.from_dict(bad)


def test_schedules_are_pure_functions_of_step():
    cosine = ScheduleSection(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, lr=1.0, total_steps=100, schedule=cosine) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    wsd = ScheduleSection(name="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    lrs = [lr_at(s, lr=1.0, total_steps=100, schedule=wsd) for s in range(100)]
    assert lrs[10:80] == [1.0] * 70 and lrs[-1] == pytest.approx(0.0) and lrs[85] < 1.0


def test_optimizer_groups_exempt_norms_and_embeddings():
    model = random_model(tiny_args("gqa"))
    cfg = TrainConfig().optim
    opt = build_optimizer(model, cfg, "cpu")
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.tok_embeddings.weight) not in decayed and id(model.norm.weight) not in decayed
    assert id(model.layers[0].attention.wq.weight) in decayed and id(model.output.weight) in decayed
    assert opt.defaults["fused"]  # torch's fused AdamW on the CPU too (one pass per tensor)
    model.layers[0].attention.wq.weight.requires_grad_(False)  # frozen params never reach the optimizer
    opt = build_optimizer(model, cfg, "cpu")
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])


def test_chunked_cross_entropy_matches_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 10]] = -100
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    ref = F.cross_entropy(hidden @ weight.T, targets)
    torch.testing.assert_close(loss, ref)
    grads, ref_grads = torch.autograd.grad(loss * 3, (hidden, weight)), torch.autograd.grad(ref * 3, (hidden, weight))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_on_the_cpu_kernel_matches_full_logits(dtype, monkeypatch):
    """fp32 and bf16 (under autocast, as training runs) through the `xent_rows_` kernel against full
    float64 logits; and the same chunks through torch's own operators (the fallback) agree with the kernel."""
    from llama3 import kernels
    from llama3.train import loss as loss_module

    assert kernels.available(), kernels.why_unavailable()
    calls = []
    monkeypatch.setattr(loss_module, "_fused_rows", lambda logits: calls.append(logits.dtype) or True)
    torch.manual_seed(0)
    hidden = torch.randn(45, 32, requires_grad=True)
    weight = (torch.randn(1003, 32) / 4).requires_grad_()
    targets = torch.randint(0, 1003, (45,))
    targets[[0, 17, 44]] = -100

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, targets, chunk_size=16)
        return (loss.detach(), *torch.autograd.grad(loss * 3, (hidden, weight)))

    got = run()
    assert calls == [dtype] * 3  # three chunks, all on the kernel
    # the loss from the matmul inputs the kernel's chunks saw (rounded to bf16 under autocast), in float64
    logits = hidden.detach().to(dtype).double() @ weight.detach().to(dtype).double().T
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_loss = F.cross_entropy(logits, targets)
    ref = (ref_loss, *torch.autograd.grad(F.cross_entropy(h64 @ w64.T, targets) * 3, (h64, w64)))
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=3e-2, atol=3e-3)}[dtype]
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=0)
    for g, r in zip(got[1:], ref[1:]):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, **tol)
    monkeypatch.setattr(loss_module, "_fused_rows", lambda logits: False)  # torch's operators
    fallback = run()
    for g, r in zip(got, fallback):
        torch.testing.assert_close(g, r, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-6 if dtype == torch.float32 else 1e-4)


def test_chunked_cross_entropy_reuses_scratch_without_corrupting_results():
    """The CPU scratch buffers carry over between calls (bigger, smaller, other vocabulary): every call still
    equals its full-logits reference, and gradients handed out earlier are not overwritten later."""
    torch.manual_seed(1)
    kept = []
    for rows, vocab, chunk in [(40, 300, 16), (10, 300, 16), (70, 300, 64), (33, 500, 64)]:
        hidden = torch.randn(rows, 24, requires_grad=True)
        weight = torch.randn(vocab, 24, requires_grad=True)
        targets = torch.randint(0, vocab, (rows,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk)
        grads = torch.autograd.grad(loss, (hidden, weight))
        # the kernel sees the matmul's bf16 output: round the float64 products the same way
        ref_logits = (hidden.detach().bfloat16().double() @ weight.detach().bfloat16().double().T).bfloat16()
        torch.testing.assert_close(loss.double(), F.cross_entropy(ref_logits.double(), targets), rtol=2e-6, atol=0)
        kept.append((grads, [g.clone() for g in grads]))
    for grads, copies in kept:
        for g, c in zip(grads, copies):
            assert torch.equal(g, c)
    from llama3.train import loss as loss_module

    assert loss_module._workspace.buffers  # kept for the next step ...
    loss_module.release_scratch()  # ... until the run ends
    assert not hasattr(loss_module._workspace, "buffers")


# ----- the loop -----

class ListBatches:
    """A resumable batch iterator over a fixed list (the loop's batch-source protocol)."""

    def __init__(self, batches):
        self.batches, self.index = batches, 0

    def __next__(self):
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def _byte_tokenizer():
    """A real tokenizer with only the 256 byte ranks (checkpoints store it)."""
    from llama3.tokenizer import Tokenizer

    return Tokenizer({bytes([i]): i for i in range(256)})


def _loop_config(tmp_path, steps: int) -> TrainConfig:
    cfg = TrainConfig()
    cfg.train.steps, cfg.train.out_dir, cfg.train.device = steps, str(tmp_path / "run"), "cpu"
    cfg.train.loss_chunk_size = 64
    cfg.optim.lr, cfg.schedule.warmup_steps = 3e-3, 5
    cfg.checkpoint.interval, cfg.checkpoint.export_hf = 0, False
    cfg.logging.peak_flops = 1e11
    return cfg


def _random_batches(n: int, batch: int = 4, seq: int = 32, seed: int = 0):
    """Random windows of Austen's text as bytes (token id = byte): real structure, so the loss falls."""
    text = torch.frombuffer(bytearray((AUSTEN / "persuasion.txt").read_bytes()[:200_000]), dtype=torch.uint8)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, text.numel() - seq - 1, (batch,), generator=g)
        tokens = torch.stack([text[s: s + seq + 1] for s in starts.tolist()]).long()  # (B, T+1)
        out.append({"inputs": tokens[:, :-1].clone(), "targets": tokens[:, 1:].clone()})
    return out


def _copy_weights(source):
    state = {k: v.clone() for k, v in source.state_dict().items()}
    return lambda model: model.load_state_dict(state)


@pytest.mark.timeout(180)
def test_50_steps_match_hf_llama(tmp_path):
    """Our loop (chunked CE, AdamW groups, clipping, warmup+cosine) and a plain HF LlamaForCausalLM loop
    from the same initial weights and batches give the same loss curve in fp32."""
    steps = 50
    args = tiny_args("gqa")
    initial = random_model(args, seed=1)
    batches = _random_batches(steps, seed=2)
    cfg = _loop_config(tmp_path, steps)
    cfg.train.grad_clip = 0.5  # low enough that clipping is active in some steps
    result = train(cfg, tokenizer=_byte_tokenizer(), train_batches=ListBatches(batches), model_args=args,
                   initialize=_copy_weights(initial), log=lambda _: None)
    ours = [r["loss"] for r in result.history]

    hf = hf_model_from(initial).train()
    decay = [p for n, p in hf.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in hf.named_parameters() if p.dim() < 2 or "embed_tokens" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    theirs = []
    for step, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=cfg.optim.lr, total_steps=steps, schedule=cfg.schedule)
        logits = hf(input_ids=batch["inputs"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad()
        theirs.append(loss.item())
    assert ours[-1] < ours[0] - 0.5, "the loss must actually fall for the comparison to mean anything"
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4, list(zip(ours, theirs))


@pytest.mark.timeout(120)
def test_nan_loss_never_reaches_weights_or_checkpoints(tmp_path):
    from safetensors.torch import load_file

    from llama3.checkpoint.native import latest_checkpoint

    args = tiny_args("gqa")
    initial = random_model(args, seed=3)
    calls, snapshots = [0], {}
    bad_step = 4  # 1-based optimizer step whose loss is NaN

    def poisoned_loss(model, batch):
        calls[0] += 1
        snapshots[calls[0]] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        loss = causal_lm_loss(model, batch, chunk_size=64)
        return loss * float("nan") if calls[0] == bad_step else loss

    cfg = _loop_config(tmp_path, 6)
    cfg.checkpoint.interval = bad_step  # a checkpoint is written right after the NaN step
    result = train(cfg, tokenizer=_byte_tokenizer(), train_batches=ListBatches(_random_batches(6)), model_args=args,
                   initialize=_copy_weights(initial), loss_fn=poisoned_loss, log=lambda _: None)
    skipped = [r["step"] for r in result.history if r["skipped"]]
    assert skipped == [bad_step] and math.isnan(result.history[bad_step - 1]["loss"])
    for key, before in snapshots[bad_step].items():  # the skipped step left every weight as it was
        torch.testing.assert_close(snapshots[bad_step + 1][key], before, rtol=0, atol=0)
    assert not torch.equal(snapshots[bad_step]["layers.0.attention.wq.weight"],
                           snapshots[bad_step - 1]["layers.0.attention.wq.weight"])  # other steps did update
    step_dir = tmp_path / "run" / f"step-{bad_step:08d}"
    weights = load_file(str(step_dir / "model.safetensors"))
    for key, value in weights.items():
        assert torch.isfinite(value).all(), key
        torch.testing.assert_close(value, snapshots[bad_step][key], rtol=0, atol=0)
    state = torch.load(step_dir / "train_state.pt", weights_only=True)
    assert all(torch.isfinite(s["exp_avg"]).all() for s in state["optimizer"]["state"].values())
    assert latest_checkpoint(tmp_path / "run").name == "step-00000006"

    # on_nonfinite=stop: the run stops before the update and writes nothing for that step
    calls[0] = 0
    cfg = _loop_config(tmp_path / "stop", 6)
    cfg.train.on_nonfinite, cfg.checkpoint.interval = "stop", 1
    with pytest.raises(RuntimeError, match=f"step {bad_step}: non-finite loss"):
        train(cfg, tokenizer=_byte_tokenizer(), train_batches=ListBatches(_random_batches(6)), model_args=args,
              initialize=_copy_weights(initial), loss_fn=poisoned_loss, log=lambda _: None)
    assert latest_checkpoint(tmp_path / "stop" / "run").name == f"step-{bad_step - 1:08d}"


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_names_and_gradients(mode):
    from llama3.train.loop import Runtime, build_model

    args = tiny_args("gqa")
    initial = random_model(args, seed=5)
    batch = _random_batches(1)[0]
    grads = []
    for ac in ("none", mode):
        cfg = TrainConfig()
        cfg.parallel.activation_checkpoint = ac
        model = build_model(args, cfg, Runtime(device=torch.device("cpu")), initialize=_copy_weights(initial))
        assert list(model.state_dict()) == list(initial.state_dict())  # checkpoints stay loadable
        wrapped = [isinstance(block.forward, functools.partial) for block in model.layers]
        assert wrapped == {"none": [False, False], "full": [True, True], "selective": [True, False]}[ac]
        causal_lm_loss(model, batch, chunk_size=64).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0)


def test_op_level_selective_checkpointing_wraps_every_block_and_keeps_gradients():
    """`selective_ac_option=op` (torchtitan's op-level mode) on one device: the same function as under torchrun."""
    from llama3.train.loop import Runtime, build_model

    args = tiny_args("gqa")
    initial = random_model(args, seed=5)
    batch = _random_batches(1)[0]
    grads = []
    for ac in ("none", "selective"):
        cfg = TrainConfig()
        cfg.parallel.activation_checkpoint, cfg.parallel.selective_ac_option = ac, "op"
        model = build_model(args, cfg, Runtime(device=torch.device("cpu")), initialize=_copy_weights(initial))
        wrapped = [isinstance(block.forward, functools.partial) for block in model.layers]
        assert wrapped == [ac == "selective"] * args.n_layers
        causal_lm_loss(model, batch, chunk_size=64).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0)
    cfg = TrainConfig()
    cfg.parallel.activation_checkpoint, cfg.parallel.selective_ac_option = "selective", "every"
    with pytest.raises(ValueError, match="selective_ac_option='every'.*'op'.*positive integer"):
        build_model(args, cfg, Runtime(device=torch.device("cpu")))


@pytest.mark.parametrize("native", [True, False])
def test_bf16_is_autocast_only_where_the_cpu_multiplies_bf16(native, tmp_path, monkeypatch):
    """`train.dtype=bf16` on a CPU without bf16 instructions (emulated bf16 matmuls, many times slower)
    trains in fp32 and says so in one line; with them it runs under bf16 autocast, silently."""
    from llama3.train import runtime
    from llama3.train.runtime import autocast_dtype

    flags = {"avx2", "fma", "avx512f", "avx512_bf16"} if native else {"avx2", "fma", "f16c"}
    monkeypatch.setattr(runtime, "_x86_cpu_flags", lambda: flags)
    cpu = torch.device("cpu")
    assert autocast_dtype("bf16", cpu) == (torch.bfloat16 if native else None)
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    seen = []

    def recording_loss(model, batch):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return causal_lm_loss(model, batch)

    cfg = _loop_config(tmp_path, 2)
    cfg.train.dtype = "bf16"
    lines = []
    train(cfg, tokenizer=_byte_tokenizer(), train_batches=ListBatches(_random_batches(2)), model_args=tiny_args("gqa"),
          loss_fn=recording_loss, log=lines.append)
    assert seen == [torch.bfloat16 if native else False] * 2
    notices = [line for line in lines if "no bf16 instructions" in line]
    assert len(notices) == (0 if native else 1), lines
