"""Quantized GGUF: our block quantizers and dequantizer against the `gguf` package, the ggml block
kernel against float64 references, a quantized file's forward against the same file dequantized by the
`gguf` package (KL <= 5e-4 per preset), the writer's type mixture, and bad files refused.

Models have dim 256 so that rows fill the K-types' 256-value blocks; the vocabulary is the 512-id byte
tokenizer (llama.cpp's own runs are in test_gguf_llama_cpp.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llama3
from llama3 import kernels
from llama3.checkpoint.gguf_quants import PRESETS, QUANT_TYPES, dequantize, quantize, tensor_type_for
from llama3.inference.ggml_quant import GGMLEmbedding, GGMLLinear
from tests.conftest import at_threads, random_model, tiny_args

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
AFFINE = ("Q4_1", "Q5_1", "Q4_K", "Q5_K")  # scale · code + min: a bias term in the kernel


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows with a few outliers and an all-zero block (the scale 0 edge case)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.integers(0, rows, 8), rng.integers(0, cols, 8)] *= 12
    w[0, :256] = 0
    return w


def _gguf_type(kind):
    import gguf

    return gguf.GGMLQuantizationType[kind]


@pytest.mark.parametrize("kind", LEGACY)
def test_quantizers_are_bit_exact_with_the_gguf_package(kind):
    import gguf

    w = _weights(48, 512)
    assert np.array_equal(quantize(w, kind), gguf.quants.quantize(w, _gguf_type(kind)))


def _random_blocks(kind: str, rows: int, cols: int, seed: int = 1) -> np.ndarray:
    """Random bytes in `kind`'s layout with finite f16 scales: tests the decoding of every bit of the
    layout, not only the values our quantizer happens to write."""
    qtype = QUANT_TYPES[kind]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows * cols // qtype.block_values, qtype.block_bytes), dtype=np.uint8)
    for offset in qtype.scale_offsets:
        data[:, offset:offset + 2] = (rng.standard_normal((len(data), 1)) * 0.01).astype(np.float16).view(np.uint8)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("kind", list(QUANT_TYPES))
def test_dequantize_equals_the_gguf_package(kind):
    import gguf

    for data in (_random_blocks(kind, 8, 512), quantize(_weights(8, 512), kind)):
        expected = gguf.quants.dequantize(data, _gguf_type(kind))
        np.testing.assert_allclose(dequantize(data, kind), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind,bound", [("Q4_K", 0.13), ("Q5_K", 0.065), ("Q6_K", 0.035)])
def test_k_quantizers_round_trip_within_their_bits(kind, bound):
    """Our K-type quantizers (no reference implementation to match bit for bit): the relative RMS error
    stays near what the bits allow (4, 5, 6 bits: each extra bit halves it)."""
    w = _weights(64, 1024, seed=3)
    restored = dequantize(quantize(w, kind), kind)
    rel = np.sqrt(np.mean((restored - w) ** 2) / np.mean(w ** 2))
    assert bound / 4 < rel < bound
    assert np.array_equal(restored[0, :256], np.zeros(256, dtype=np.float32))  # zeros stay zeros


def _rounded_activations(x: np.ndarray) -> np.ndarray:
    """x as the kernel rounds it: int8 per block of 32 with scale absmax / 127, dequantized (float64)."""
    b = x.astype(np.float64).reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    q = np.rint(b * np.divide(127, amax, out=np.zeros_like(amax), where=amax > 0))
    return (q * amax / 127).reshape(x.shape)


def _centre_bias(data: np.ndarray, kind: str) -> np.ndarray:
    """Per weight of an affine type, the value its block gives the middle code (8 of 0..15, 16 of 0..31):
    the kernel multiplies codes centred there with rounded x and this bias with exact sums of x."""
    blocks = data.reshape(-1, QUANT_TYPES[kind].block_bytes).copy()
    # (byte range, value): 4-bit codes 8 = nibbles 0x88; 5-bit 16 = low nibbles 0 and every 5th bit set
    fills = {"Q4_1": [(slice(4, 20), 0x88)], "Q5_1": [(slice(4, 8), 0xFF), (slice(8, 24), 0)],
             "Q4_K": [(slice(16, 144), 0x88)], "Q5_K": [(slice(16, 48), 0xFF), (slice(48, 176), 0)]}[kind]
    for where, value in fills:
        blocks[:, where] = value
    return dequantize(blocks.reshape(data.shape), kind).astype(np.float64)


@pytest.mark.parametrize("isa", kernels.supported_isas())
@pytest.mark.parametrize("kind", list(QUANT_TYPES))
@pytest.mark.parametrize("rows", [1, 3, 21])
def test_ggml_kernel_equals_a_float64_reference(kind, rows, isa):
    """The kernel's sum, recomputed in float64, at every instruction-set level this CPU runs: weights as
    dequantized, activations rounded to int8 per block of 32 where they multiply (centred) codes, exact
    where they multiply an affine type's bias."""
    assert kernels.available(), f"the CPU kernels must build on every test machine: {kernels.why_unavailable()}"
    ops = kernels.ops(isa)
    K, N = 768, 37  # K: three 256-value super-blocks; N: more than two tiles of 16 rows, the last one partial
    data = quantize(_weights(N, K, seed=5), kind)
    w = dequantize(data, kind).astype(np.float64)
    x = np.random.default_rng(6).standard_normal((rows, K)).astype(np.float32)
    xr = _rounded_activations(x)
    bias = _centre_bias(data, kind) if kind in AFFINE else np.zeros_like(w)
    expected = xr @ (w - bias).T + x.astype(np.float64) @ bias.T
    y = ops.ggml_matmul(torch.from_numpy(x), torch.from_numpy(data), QUANT_TYPES[kind].ggml_id, K)
    assert y.dtype == torch.float32 and y.shape == (rows, N)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # and close to the unrounded product (the rounding of x costs well under 2% of the output scale)
    exact = x.astype(np.float64) @ w.T
    assert np.abs(y.numpy() - exact).max() < 0.02 * np.abs(exact).max()
    y16 = ops.ggml_matmul(torch.from_numpy(x).bfloat16(), torch.from_numpy(data), QUANT_TYPES[kind].ggml_id, K)
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y).abs().max() < 0.03 * y.abs().max()


def test_ggml_kernel_refuses_bad_inputs():
    assert kernels.available(), f"the CPU kernels must build on every test machine: {kernels.why_unavailable()}"
    data = torch.from_numpy(quantize(_weights(4, 256), "Q4_K"))
    x = torch.randn(2, 256)
    with pytest.raises(RuntimeError, match="ggml type 99 is not one of"):
        torch.ops.llama3.ggml_matmul(x, data, 99, 256)
    with pytest.raises(RuntimeError, match=r"w must be contiguous uint8 \(N, 144\)"):
        torch.ops.llama3.ggml_matmul(x, data[:, :100], 12, 256)
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.llama3.ggml_matmul(torch.randn(2, 128), data, 12, 256)
    with pytest.raises(ValueError, match=r"Q4_K rows of 256 values need uint8 \(N, 144\)"):
        GGMLLinear(data[:, :100].contiguous(), "Q4_K", 256)


@pytest.mark.parametrize("isa", kernels.supported_isas())
@pytest.mark.parametrize("rows", [1, 5])
def test_grouped_products_equal_the_separate_ones(rows, isa):
    """ggml_matmul_group over weights of mixed types (a Q4_K_M layer's q/k/v: Q4_K, Q4_K, Q6_K) rounds x
    once, as each separate product does, so its columns equal the separate products bit for bit."""
    ops = kernels.ops(isa)
    K = 512
    kinds, sizes = ["Q4_K", "Q4_0", "Q6_K"], [40, 19, 33]  # not multiples of the 16-row tile
    parts = [torch.from_numpy(quantize(_weights(n, K, seed=i), k)) for i, (k, n) in enumerate(zip(kinds, sizes))]
    types = [QUANT_TYPES[k].ggml_id for k in kinds]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).to(dtype)
        y = ops.ggml_matmul_group(x, parts, types, K)
        assert y.dtype == dtype and y.shape == (rows, sum(sizes))
        separate = torch.cat([ops.ggml_matmul(x, w, t, K) for w, t in zip(parts, types)], dim=1)
        assert torch.equal(y, separate)
    with pytest.raises(RuntimeError, match="one ggml type per weight"):
        ops.ggml_matmul_group(x, parts, types[:2], K)
    with pytest.raises(RuntimeError, match=r"w must be contiguous uint8 \(N, 288\) for 512 Q4_K"):
        ops.ggml_matmul_group(x, parts, [types[0], types[1], types[0]], K)


_POOL_SCRIPT = """
import sys, threading, numpy as np, torch
from llama3 import kernels
from llama3.checkpoint.gguf_quants import quantize
assert kernels.available()
parts = [torch.from_numpy(quantize(np.random.default_rng(i).standard_normal((n, 256)).astype(np.float32), k))
         for i, (k, n) in enumerate([("Q4_0", 300), ("Q6_K", 200)])]
x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
torch.set_num_threads(2)
try:
    ys = [torch.ops.llama3.ggml_matmul_group(x, parts, [2, 14], 256) for _ in range(3)]
except RuntimeError as exc:
    sys.exit(str(exc))
out = []  # two Python threads at once: the second runs its product alone, with the same result
threads = [threading.Thread(target=lambda: out.append(torch.ops.llama3.ggml_matmul_group(x, parts, [2, 14], 256)))
           for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
assert all(torch.equal(y, ys[0]) for y in ys + out)
np.save(sys.argv[1], ys[0].numpy())
"""


def test_thread_pool_settings_give_the_same_products_and_bad_ones_are_refused(tmp_path):
    """LLAMA3_GGML_SPIN_US picks who runs the products ("off": torch's pool; a number of microseconds,
    200 by default: our pool of spinning workers): each output row is one thread's sum whoever runs it, so the
    results are equal bit for bit, also with two Python threads at once; a value that is not a number of
    microseconds is refused, naming the variable and what it takes."""
    import os
    import subprocess
    import sys

    ours = tmp_path / "ours.npy"
    namespace = {}
    script = compile(_POOL_SCRIPT.replace("sys.argv[1]", repr(str(ours))), "pool", "exec")
    at_threads(torch.get_num_threads(), exec, script, namespace)  # in this process; its thread count set back
    for spin, code in (("off", 0), ("fast", 1)):
        env = {**os.environ, "LLAMA3_GGML_SPIN_US": spin}
        proc = subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(tmp_path / "spin.npy")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == code, proc.stderr[-2000:]
    assert np.array_equal(np.load(ours), np.load(tmp_path / "spin.npy"))
    assert "LLAMA3_GGML_SPIN_US=fast is not a number of microseconds" in proc.stderr


def test_pure_pytorch_path_matches_the_kernel():
    data = torch.from_numpy(quantize(_weights(40, 512), "Q5_K"))
    x = torch.randn(3, 7, 512)
    slow = GGMLLinear(data, "Q5_K", 512, use_kernel=False)
    reference = F.linear(x, torch.from_numpy(dequantize(data.numpy(), "Q5_K")))
    torch.testing.assert_close(slow(x), reference, rtol=1e-5, atol=1e-5)
    fast = GGMLLinear(data, "Q5_K", 512)
    assert fast.use_kernel == kernels.available()
    assert (fast(x) - reference).abs().max() < 0.02 * reference.abs().max()


# ----- whole models -----

def _model(tied: bool = False):
    """dim 256, 2 layers; the output projection scaled so the logits spread like a trained model's (std ~6,
    where a small error in the products shows in the KL)."""
    args = tiny_args("gqa", dim=256, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=256,
                     tie_word_embeddings=tied)
    model = random_model(args, seed=21)
    with torch.no_grad():
        model.output.weight.mul_(6)
    return model


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from tests.test_checkpoint_hf import byte_tokenizer

    return _model(), byte_tokenizer()


def _kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p = F.log_softmax(reference_logits.double(), -1)
    q = F.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _ggml_types(model) -> set[str]:
    return {m.kind for m in model.modules() if isinstance(m, (GGMLLinear, GGMLEmbedding))}


# every block type appears in at least one preset: q4_0 (Q4_0, Q6_K), q4_1, q5_0, q5_1, q8_0,
# q4_k_m (Q4_K, Q6_K), q5_k_m (Q5_K, Q6_K), q6_k
@pytest.mark.timeout(120)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_quantized_file_runs_quantized_and_equals_the_gguf_package_dequantization(model_and_tokenizer, preset,
                                                                                    tmp_path):
    from llama3.checkpoint.gguf import load_gguf

    model, tokenizer = model_and_tokenizer
    path = llama3.save(model, tokenizer, tmp_path / f"m-{preset}.gguf", format="gguf", dtype=preset)
    ours, _ = llama3.load(path)
    reference, _ = load_gguf(path, dequantize=True)  # every tensor through gguf.quants.dequantize, float32
    # nothing 2-D left in floating point: every weight matrix is ggml blocks on a view of the file
    assert all(p.dim() == 1 for p in ours.parameters())
    default = PRESETS[preset][0]
    expected_types = {default} | ({"Q6_K"} if default != "Q8_0" else set())
    assert _ggml_types(ours) == expected_types
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, ref_logits = ours(tokens), reference(tokens)  # 48 rows per product: a prompt, not a decode
        plain = model(tokens)
    kl = _kl(ref_logits, logits)
    assert kl <= 5e-4, kl
    assert _kl(ref_logits, plain) > kl  # the quantization itself moves the logits more than our products do
    # decode: one token at a time through the KV cache gives the same logits as the full forward
    ours.setup_caches(batch_size=1, max_seq_len=32)  # the model's own set-up reads ggml layers' sizes
    with torch.no_grad():
        steps = [ours(tokens[:1, i:i + 1], input_pos=torch.tensor([i])) for i in range(8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), logits[:1, :8], rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(120)
def test_tied_model_uses_the_quantized_embeddings_for_the_output(tmp_path):
    from tests.test_checkpoint_hf import byte_tokenizer

    from llama3.checkpoint.gguf import load_gguf

    model = _model(tied=True)
    path = llama3.save(model, byte_tokenizer(), tmp_path / "tied.gguf", format="gguf", dtype="q4_k_m")
    ours, _ = llama3.load(path)
    assert isinstance(ours.output, GGMLLinear) and ours.output.data is not None
    assert ours.tok_embeddings.kind == ours.output.kind == "Q6_K"  # the output's type, as llama.cpp gives it
    reference, _ = load_gguf(path, dequantize=True)
    tokens = torch.arange(0, 480, 20).view(1, -1)
    with torch.no_grad():
        assert _kl(reference(tokens), ours(tokens)) <= 5e-4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_kernel", [True, False])
def test_fused_projections_of_a_quantized_file_group_the_mapped_blocks(model_and_tokenizer, tmp_path, use_kernel):
    """fuse_projections on a quantized GGUF model (what optimize_for_inference runs) groups q/k/v and
    gate/up into one product each over the same bytes (no copy of the file's pages), with logits equal to
    the unfused model's, prompt and decode, on the kernels and on the pure-PyTorch path."""
    from llama3.inference.fast import fuse_projections, is_fused
    from llama3.inference.ggml_quant import GGMLGroupLinear

    model, tokenizer = model_and_tokenizer
    from llama3.checkpoint.gguf import load_gguf

    path = llama3.save(model, tokenizer, tmp_path / "m.gguf", format="gguf", dtype="q4_k_m")
    ours, _ = load_gguf(path, repack=False)  # the file's layout (a plain load repacks for the kernels)
    for m in ours.modules():
        if isinstance(m, GGMLLinear):
            m.use_kernel = m.use_kernel and use_kernel
    attn = ours.layers[-1].attention
    pointers = [w.data.data_ptr() for w in (attn.wq, attn.wk, attn.wv)]
    assert {attn.wq.kind, attn.wv.kind} == {"Q4_K", "Q6_K"}  # a mixed group (attn_v: Q6_K in the last layer)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unfused = ours(tokens)
        fuse_projections(ours)
        assert is_fused(ours) and isinstance(ours.layers[0].feed_forward.w13, GGMLGroupLinear)
        assert [w.data_ptr() for w in ours.layers[-1].attention.wqkv._data] == pointers
        assert ours.layers[-1].attention.wqkv.use_kernel == (use_kernel and kernels.available())
        torch.testing.assert_close(ours(tokens), unfused, rtol=0, atol=0)
        ours.setup_caches(batch_size=1, max_seq_len=32)
        steps = [ours(tokens[:1, i:i + 1], input_pos=torch.tensor([i])) for i in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), unfused[:1, :6], rtol=1e-4, atol=1e-4)


def test_preset_mixture_follows_llama_cpp():
    """q4_k_m on a 32-layer model: attn_v and ffn_down get Q6_K in the first and last eighth and every third
    layer between (16 of 32), the output Q6_K, everything else Q4_K; rows of 14336 (ffn_down of 8B) are whole
    256-value blocks, rows of 4128 are not and fall back (Q4_K -> Q5_0, Q6_K -> Q8_0), rows of 4100 to F16."""
    def kind(name, row=4096, preset="q4_k_m", tied=False):
        return tensor_type_for(preset, name, row, 32, tied)

    more_bits = [i for i in range(32) if kind(f"blk.{i}.attn_v.weight") == "Q6_K"]
    assert more_bits == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if kind(f"blk.{i}.ffn_down.weight", 14336) == "Q6_K"] == more_bits
    assert {kind(f"blk.{i}.{t}.weight") for i in range(32) for t in ("attn_q", "attn_k", "attn_output",
                                                                        "ffn_gate", "ffn_up")} == {"Q4_K"}
    assert kind("output.weight") == "Q6_K" and kind("token_embd.weight") == "Q4_K"
    assert kind("token_embd.weight", tied=True) == "Q6_K"
    assert kind("blk.5.attn_q.weight", 4128) == "Q5_0" and kind("blk.0.attn_v.weight", 4128) == "Q8_0"
    assert kind("blk.5.attn_q.weight", 4100) == "F16"
    assert kind("blk.0.attn_v.weight", preset="q5_k_m") == "Q6_K" and kind("blk.4.attn_v.weight", preset="q5_k_m") == "Q5_K"
    assert kind("output.weight", preset="q4_0") == "Q6_K" and kind("blk.0.attn_v.weight", preset="q4_0") == "Q4_0"
    assert kind("output.weight", preset="q8_0") == "Q8_0"
    assert kind("output.weight", 4096 + 32, preset="q4_0") == "Q8_0"


@pytest.mark.timeout(120)
def test_convert_cli_writes_presets_and_reads_quantized_files(model_and_tokenizer, tmp_path, monkeypatch):
    from llama3.cli.convert import main as convert

    model, tokenizer = model_and_tokenizer
    src = llama3.save(model, tokenizer, tmp_path / "hf", format="hf")
    out = tmp_path / "m.Q4_K_M.gguf"
    assert convert([str(src), str(out), "--to", "gguf", "--dtype", "q4_k_m"]) == 0
    loaded, _ = llama3.load(out)
    assert _ggml_types(loaded) == {"Q4_K", "Q6_K"}
    # and back out of a quantized file: dequantized to float32
    back = tmp_path / "back"
    # export reads the file's blocks: no repack for the kernels' products (time and a copy of the weights)
    monkeypatch.setattr(GGMLLinear, "repack", lambda *a, **k: pytest.fail("convert repacked the weights it exports"))
    assert convert([str(out), str(back), "--to", "hf"]) == 0
    plain, _ = llama3.load(back)
    tokens = torch.arange(3, 200, 9).view(1, -1)
    with torch.no_grad():
        assert _kl(loaded(tokens), plain(tokens)) <= 5e-4
    with pytest.raises(ValueError, match="dequantize it first"):
        llama3.save(loaded, tokenizer, tmp_path / "x", format="hf")


def test_a_failed_convert_leaves_nothing_behind(model_and_tokenizer, tmp_path, monkeypatch):
    import llama3.checkpoint.gguf as gguf_module

    model, tokenizer = model_and_tokenizer
    calls = []

    def failing(data, kind):  # the third tensor fails to quantize, as a full disk or a bug would
        calls.append(kind)
        if len(calls) == 3:
            raise OSError("no space left on device")
        return quantize(data, kind)

    monkeypatch.setattr(gguf_module, "quantize", failing)
    with pytest.raises(OSError):
        llama3.save(model, tokenizer, tmp_path / "m.gguf", format="gguf", dtype="q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_generate_cli_runs_a_quantized_file(model_and_tokenizer, tmp_path, capsys):
    import json

    from llama3.cli.generate import main as generate

    model, tokenizer = model_and_tokenizer
    path = llama3.save(model, tokenizer, tmp_path / "m.gguf", format="gguf", dtype="q4_0")
    assert generate(["--model", str(path), "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    loaded, _ = llama3.load(path)
    ids = tokenizer.encode("Hello", bos=True)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(loaded(torch.tensor([ids]))[0, -1].argmax()))
    assert result["token_ids"] == ids[-5:]
    assert result["kv_cache"] == "f16"  # a quantized file's default cache (f32 activations)
    from llama3.inference.fast import optimize_for_inference

    with pytest.raises(ValueError, match="already quantized"):
        optimize_for_inference(loaded, quantize="int4")


def test_finetune_refuses_a_quantized_file(model_and_tokenizer, tmp_path, capsys):
    """Block layers have no gradients: `llama3 finetune` says so in one line and how to get float weights."""
    from llama3.cli.finetune import main as finetune

    model, tokenizer = model_and_tokenizer
    path = llama3.save(model, tokenizer, tmp_path / "m.gguf", format="gguf", dtype="q4_0")
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n')
    assert finetune(["--model", str(path), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "quantized GGUF file (Q4_0, Q6_K)" in err and f"llama3 convert {path} OUT --to hf" in err
    assert not (tmp_path / "out").exists()


# ----- bad files -----

def _write_raw_gguf(path, tensors: dict[str, tuple[np.ndarray, object, tuple[int, ...]]]):
    """A llama-shaped GGUF written with the gguf package directly (so its tensors can be wrong): name ->
    (bytes or floats, ggml type, logical shape)."""
    import gguf

    from llama3.checkpoint.gguf import _add_metadata, _add_tokenizer
    from tests.test_checkpoint_hf import byte_tokenizer

    args = _model().args
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_metadata(writer, args, 15, "bad")
    _add_tokenizer(writer, byte_tokenizer(), args.vocab_size)
    for name, (data, kind, _shape) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _good_tensors(kind: str = "Q4_K"):
    import gguf

    model = _model()
    out = {}
    for key, value in model.state_dict().items():
        from llama3.checkpoint.gguf import gguf_tensor_name

        v = value.float().numpy()
        if v.ndim == 2:
            out[gguf_tensor_name(key)] = (quantize(v, kind), gguf.GGMLQuantizationType[kind], v.shape)
        else:
            out[gguf_tensor_name(key)] = (v, gguf.GGMLQuantizationType.F32, v.shape)
    return out


def test_unknown_tensor_type_is_named_with_the_types_we_read(tmp_path):
    import gguf

    tensors = _good_tensors()
    data, _, shape = tensors["blk.1.ffn_up.weight"]
    iq = gguf.GGMLQuantizationType.IQ4_NL  # 32 values in 18 bytes, like Q4_0: a valid file we do not run
    tensors["blk.1.ffn_up.weight"] = (np.zeros((shape[0], shape[1] // 32 * 18), np.uint8), iq, shape)
    path = _write_raw_gguf(tmp_path / "iq.gguf", tensors)
    with pytest.raises(ValueError, match=r"iq\.gguf: tensor 'blk\.1\.ffn_up\.weight' is stored as IQ4_NL.*"
                                         r"reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K"):
        llama3.load(path)


def test_nan_or_inf_scale_is_refused_naming_file_and_tensor(tmp_path):
    tensors = _good_tensors()
    data, kind, shape = tensors["blk.0.attn_k.weight"]
    data = data.copy()
    data.reshape(-1, 144)[3, 2:4] = np.array([np.inf], dtype=np.float16).view(np.uint8)  # dmin of block 3
    tensors["blk.0.attn_k.weight"] = (data, kind, shape)
    path = _write_raw_gguf(tmp_path / "nan.gguf", tensors)
    with pytest.raises(ValueError, match=r"nan\.gguf: tensor 'blk\.0\.attn_k\.weight' \(Q4_K\) has a NaN or "
                                         r"infinite scale in block 3"):
        llama3.load(path)


def _with_bad_scale(data: np.ndarray, kind: str, block: int, offset: int, value=np.nan) -> np.ndarray:
    bad = data.copy()
    bad.reshape(-1, QUANT_TYPES[kind].block_bytes)[block, offset:offset + 2] = np.array([value], np.float16).view(np.uint8)
    return bad


@pytest.mark.parametrize("kind", list(QUANT_TYPES))
def test_kernel_scale_check_and_repack_find_the_first_bad_block(kind):
    """The kernels' scale check (`ggml_check_scales`) and the repack's own (`ggml_repack`, which checks while it
    copies) report the first block with a NaN or inf scale, row-major, as numpy's check does; -1 when all
    are finite. Every scale field of every type (d; dmin / m of the affine types)."""
    from llama3.checkpoint.gguf_quants import first_bad_scale_block

    qtype, K = QUANT_TYPES[kind], 512
    data = quantize(_weights(24, K, seed=4), kind)
    ops = torch.ops.llama3
    repacks = ops.ggml_repack_block_bytes(qtype.ggml_id) > 0
    out = torch.empty(3, K // qtype.block_values * max(1, ops.ggml_repack_block_bytes(qtype.ggml_id)), dtype=torch.uint8)
    assert ops.ggml_check_scales(torch.from_numpy(data), qtype.ggml_id, K) == -1 == first_bad_scale_block(kind, data)
    if repacks:
        assert ops.ggml_repack(torch.from_numpy(data), qtype.ggml_id, K, out) == -1
    for offset in qtype.scale_offsets:
        bad = _with_bad_scale(_with_bad_scale(data, kind, 9, offset, np.inf), kind, 7, offset)
        assert first_bad_scale_block(kind, bad) == 7
        assert ops.ggml_check_scales(torch.from_numpy(bad), qtype.ggml_id, K) == 7
        if repacks:
            assert ops.ggml_repack(torch.from_numpy(bad), qtype.ggml_id, K, out) == 7


def test_bad_scale_in_a_repacked_weight_its_tail_or_the_embeddings_is_refused(tmp_path):
    """The load checks each weight once: a repacked Q4_0 matrix in its repack, rows past the last 8 and the
    token embeddings (kept in the file's layout) by the kernels' check; each error names file and tensor."""
    from llama3.inference.ggml_quant import BadScale

    for name, block in (("blk.1.ffn_down.weight", 40), ("token_embd.weight", 17)):
        tensors = _good_tensors("Q4_0")
        data, kind, shape = tensors[name]
        tensors[name] = (_with_bad_scale(data, "Q4_0", block, 0, np.inf), kind, shape)
        path = _write_raw_gguf(tmp_path / f"bad-{name}.gguf", tensors)
        with pytest.raises(ValueError, match=rf"tensor '{name}' \(Q4_0\) has a NaN or infinite scale in block {block};"):
            llama3.load(path)
    data = _with_bad_scale(quantize(_weights(37, 256, seed=9), "Q4_0"), "Q4_0", 36 * 8 + 5, 0)  # row 36: the tail
    layer = GGMLLinear(torch.from_numpy(data), "Q4_0", 256)
    with pytest.raises(BadScale, match=r"block 293") as caught:
        layer.repack()
    assert caught.value.block == 293 and not layer.repacked


def test_cut_block_data_and_misfitting_shapes_are_refused(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    path = llama3.save(model, tokenizer, tmp_path / "m.gguf", format="gguf", dtype="q4_k_m")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"cut\.gguf: not a readable GGUF file \(tensor .* runs past the end"):
        llama3.load(cut)
    # a Q4_K tensor whose header claims rows of 128 values (not whole 256-value blocks), same byte count
    name = b"blk.0.attn_k.weight"
    raw = bytearray(path.read_bytes())
    at = raw.index(name + b"\x02\x00\x00\x00") + len(name) + 4  # after the name: n_dims, then the dims
    assert np.frombuffer(bytes(raw[at:at + 16]), "<u8").tolist() == [256, 128]
    raw[at:at + 16] = np.array([128, 256], "<u8").tobytes()
    misfit = tmp_path / "misfit.gguf"
    misfit.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"misfit\.gguf: not a readable GGUF file \(tensor blk\.0\.attn_k\.weight: "
                                         r"128 values per row do not fill Q4_K blocks"):
        llama3.load(misfit)
    # a tensor of whole blocks but the wrong shape for the model
    tensors = _good_tensors()
    data, kind, shape = tensors["blk.0.attn_k.weight"]
    tensors["blk.0.attn_k.weight"] = (data.reshape(64, 288), kind, (64, 512))  # config wants 128 x 256
    wrong = _write_raw_gguf(tmp_path / "wrong.gguf", tensors)
    with pytest.raises(ValueError, match=r"wrong\.gguf: tensor 'blk\.0\.attn_k\.weight' has shape \[64, 512\] "
                                         r"but the config implies \[128, 256\]"):
        llama3.load(wrong)


def test_reader_type_table_matches_the_gguf_package():
    """The reader's own table of the ggml types it runs (no `gguf` import at load) names and sizes them as the
    `gguf` package does; any other type is resolved through that package."""
    import gguf

    from llama3.checkpoint.gguf import GGMLType, _block_size, _ggml_type

    for kind in GGMLType:
        theirs = gguf.GGMLQuantizationType(int(kind))
        assert theirs.name == kind.name and gguf.GGML_QUANT_SIZES[theirs] == _block_size(kind)
    iq = _ggml_type(int(gguf.GGMLQuantizationType.IQ4_NL))
    assert iq.name == "IQ4_NL" and _block_size(iq) == (32, 18)
    with pytest.raises(ValueError):
        _ggml_type(1000)


@pytest.mark.parametrize("texts", [["Ġthe", "", "é€😀", "<|eot_id|>"], ["a\x00b", "c", ""], []])
def test_string_arrays_decode_at_once_as_one_by_one(texts):
    """The reader's bulk decode of a GGUF string array (lengths walked, text decoded in one go) gives the
    strings one by one would, also for strings that hold a NUL (its separator) and empty ones; a string
    running past the end is refused."""
    import struct

    from llama3.checkpoint.gguf import _read_strings

    raw = b"junk" + b"".join(struct.pack("<Q", len(t.encode())) + t.encode() for t in texts) + b"tail"
    items, end = _read_strings(memoryview(raw), 4, len(texts))
    assert items == texts and raw[end:] == b"tail"
    with pytest.raises(ValueError, match="runs past the end"):
        _read_strings(memoryview(raw[:end] + struct.pack("<Q", 10) + b"abc"), 4, len(texts) + 1)
