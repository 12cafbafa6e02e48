"""The hand-written CPU kernels against float64 references, under `torch.compile`, inside a model, and the
pure-PyTorch fallback when they are switched off: the decode products (`llama3/kernels/gemv.cpp`) and the
training loss's cross-entropy rows (`llama3/kernels/xent.cpp`)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_model, tiny_args

from llama3 import kernels
from llama3.inference.fast import optimize_for_inference, to_huge_pages
from llama3.inference.gemv import GemvLinear, use_gemv_kernels

# (M, K, N): one row and several (up to 8 per pass, then another pass), widths with and without a tail of the 32/64-wide steps,
# output counts that do not divide the thread split
SHAPES = [(1, 64, 40), (1, 576, 1000), (3, 100, 77), (4, 2048, 64), (6, 33, 5), (1, 7, 3), (9, 130, 129),
          (8, 576, 33), (5, 96, 10), (2, 32, 4), (17, 96, 11)]


# Every instruction-set level this CPU runs is built and checked against the references (`ops`); the
# others are compiled (test_every_level_compiles_without_warnings).
RUNNABLE_LEVELS = kernels.supported_isas()
COMPILABLE_LEVELS = kernels.ISA_LEVELS if platform.machine().lower() in ("x86_64", "amd64") else ("portable",)


@pytest.fixture(scope="module", autouse=True)
def built():
    # The setup installs a C++ compiler: the kernels must build here.
    assert kernels.available(), kernels.why_unavailable()


def quantize_activations_like_the_kernel(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x rounded to int8 per block of 32 values (absmax / 127), returned dequantized, in float64."""
    M, K = x.shape
    pad = (-K) % block
    blocks = F.pad(x.double(), (0, pad)).view(M, -1, block)
    amax = blocks.abs().amax(-1, keepdim=True).float().numpy()
    # fp32 arithmetic as in the kernel, in numpy: IEEE-rounded division (torch's vectorized 127 / t may
    # differ by an ulp, which moves products that land on .5 ties)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blocks.float().numpy() * inv)  # round half to even, like std::nearbyint
    scale = amax / np.float32(127)
    return torch.from_numpy(q.astype(np.float64) * scale.astype(np.float64)).view(M, -1)[:, :K]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_gemv_bf16_equals_float64_reference(ops, M, K, N, threads):
    torch.manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K).bfloat16()
    w = torch.randn(N, K).bfloat16()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ops.gemv_bf16(x, w)
    finally:
        torch.set_num_threads(previous)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    ref = x.double() @ w.double().T
    # fp32 accumulation then one bf16 rounding: within one bf16 ulp of the exact value (plus fp32 noise)
    bound = ref.abs() * 2**-8 + 1e-5 * K
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max()


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_gemv_f32_equals_float64_reference(ops, M, K, N):
    torch.manual_seed(M * 1000 + K + N + 2)
    x, w = torch.randn(M, K), torch.randn(N, K)
    y = ops.gemv_f32(x, w)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    ref = x.double() @ w.double().T
    assert ((y.double() - ref).abs() <= 1e-5 * (x.double().abs() @ w.double().abs().T)).all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_gemv_int8_equals_float64_reference(ops, M, K, N, out_dtype):
    torch.manual_seed(M * 1000 + K + N + 1)
    x = torch.randn(M, K).to(out_dtype)
    if K >= 128:
        x[0, 0] = 40.0  # an outlier: only its own block of 32 (of 4 or more) loses precision
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scales = torch.rand(N) * 0.01 + 1e-3
    y = ops.gemv_int8(x, w, scales)
    assert y.dtype == out_dtype and y.shape == (M, N)
    # exactly the documented arithmetic: x rounded per block of 32, integer dot products, per-row scales
    ref = quantize_activations_like_the_kernel(x.float()) @ w.double().T * scales.double()
    tol = 1e-5 if out_dtype == torch.float32 else 2**-8
    assert ((y.double() - ref).abs() <= ref.abs() * tol + 1e-4).all(), (y.double() - ref).abs().max()
    # and within half a quantization step per value of the unrounded product
    amax = F.pad(x.double().abs(), (0, (-K) % 32)).view(M, -1, 32).amax(-1)  # (M, blocks)
    half_step = (amax / 254).repeat_interleave(32, dim=1)[:, :K]  # (M, K)
    exact = x.double() @ w.double().T * scales.double()
    bound = half_step @ w.double().abs().T * scales.double() * 1.01 + 1e-3
    assert ((y.double() - exact).abs() <= bound).all()


def unpack_int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4_codes`, written from the layout's description: chunks of 64 bytes (128
    values: low nibbles first, then high nibbles), and a last chunk of 32 bytes when K is an odd multiple of 64."""
    N, half = packed.shape
    parts = []
    for start in range(0, half, 64):
        chunk = packed[:, start: start + 64]  # 64 bytes, or the last 32
        parts += [chunk & 0x0F, chunk >> 4]
    return torch.cat(parts, dim=1)


# (M, K, N, group): one row and several (passes of 8), chunks of 64 with one or two groups each
INT4_SHAPES = [(M, K, N, g) for (M, K, N) in [(1, 64, 40), (1, 2048, 100), (3, 128, 77), (8, 576, 33),
                                               (9, 256, 129), (2, 384, 5)]
               for g in (32, 64, 128) if K % g == 0]


@pytest.mark.parametrize("M,K,N,group", INT4_SHAPES)
def test_gemv_int4_equals_float64_reference(ops, M, K, N, group):
    from llama3.inference.quantize import pack_int4_codes

    torch.manual_seed(M * 1000 + K + N + group)
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    packed = pack_int4_codes(codes)
    assert torch.equal(unpack_int4_codes(packed), codes)
    scales = (torch.rand(N, K // group) * 0.1).half()
    lows = (torch.randn(N, K // group) * 0.1).half()
    x = torch.randn(M, K)
    g_scales, g_lows = scales.double().repeat_interleave(group, 1), lows.double().repeat_interleave(group, 1)
    for dtype in (torch.float32, torch.bfloat16):
        xi = x.to(dtype)
        y = ops.gemv_int4(xi, packed, scales, lows, group)
        assert y.dtype == dtype and y.shape == (M, N)
        # the kernel's arithmetic: codes against x rounded to int8 per block of 32, lows against exact x
        ref = quantize_activations_like_the_kernel(xi.float()) @ (codes.double() * g_scales).T + xi.double() @ g_lows.T
        tolerance = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the output's rounding
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tolerance
        exact = xi.double() @ (g_lows + codes.double() * g_scales).T
        assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 0.02  # int8 activations


def test_int4_linear_on_the_kernel_equals_its_dequantized_weights():
    from llama3.inference.quantize import Int4WeightOnlyLinear

    torch.manual_seed(3)
    weight = torch.randn(96, 256)
    layer = Int4WeightOnlyLinear(weight, group_size=32, blocks=False)  # the gemv_int4 layout
    assert layer.use_gemv and layer.weight_int4.shape == (96, 128) and layer.scales_f16.dtype == torch.float16
    codes = unpack_int4_codes(layer.weight_int4).double()
    dequantized = (layer.lows_f16.double().repeat_interleave(32, 1)
                   + codes * layer.scales_f16.double().repeat_interleave(32, 1))
    assert (dequantized - weight.double()).abs().max() <= layer.scales_f16.double().max() / 2 + 1e-3  # half a step
    compiled = torch.compile(layer, fullgraph=True)
    for rows in (1, 5, 40):  # decode, a few rows, a prompt (passes of 8 rows)
        x = torch.randn(rows, 256)
        y = layer(x)
        ref = quantize_activations_like_the_kernel(x) @ (codes * layer.scales_f16.double().repeat_interleave(32, 1)).T \
            + x.double() @ layer.lows_f16.double().repeat_interleave(32, 1).T
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), y, rtol=0, atol=0)


def test_kernels_reject_bad_inputs_with_clear_errors():
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="x has 6 columns but w has 8"):
        torch.ops.llama3.gemv_bf16(torch.zeros(1, 6, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        torch.ops.llama3.gemv_bf16(torch.zeros(1, 8), w)
    with pytest.raises(RuntimeError, match="scales must be a contiguous float32 vector"):
        torch.ops.llama3.gemv_int8(torch.zeros(1, 8), torch.zeros(4, 8, dtype=torch.int8), torch.zeros(3))
    packed, halves = torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="x has 48 columns but w packs 64"):
        torch.ops.llama3.gemv_int4(torch.zeros(1, 48), packed, halves, halves, 32)
    with pytest.raises(RuntimeError, match="group size \\(48\\) that is a multiple of 32"):
        torch.ops.llama3.gemv_int4(torch.zeros(1, 64), packed, halves, halves, 48)
    with pytest.raises(RuntimeError, match="scales and lows must be contiguous float16"):
        torch.ops.llama3.gemv_int4(torch.zeros(1, 64), packed, halves.float(), halves, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_linear_under_compile_equals_eager_and_torch(dtype):
    torch.manual_seed(0)
    layer = GemvLinear(torch.nn.Parameter(torch.randn(96, 64).to(dtype), requires_grad=False))
    one, many = torch.randn(1, 1, 64).to(dtype), torch.randn(2, 5, 64).to(dtype)
    compiled = torch.compile(layer, fullgraph=True, options={"freezing": True})
    with torch.no_grad():
        for x in (one, many):
            eager = layer(x)
            torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
            torch.testing.assert_close(eager.float(), F.linear(x.float(), layer.weight.float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.03), (torch.float32, 1e-5)])
def test_model_decode_on_kernels_matches_torch_linear(dtype, tolerance):
    """The same model, once on the kernels and once on F.linear: decode logits agree to rounding."""
    x = torch.randint(0, 256, (1, 6))
    plain = optimize_for_inference(random_model(tiny_args("tied")), dtype=dtype, kernels=False)
    fast = optimize_for_inference(random_model(tiny_args("tied")), dtype=dtype)
    assert any(isinstance(m, GemvLinear) for m in fast.modules())
    assert not any(isinstance(m, GemvLinear) for m in plain.modules())
    assert fast.output.weight is fast.tok_embeddings.weight  # still tied after the swap and the page move
    for model in (plain, fast):
        model.setup_caches(1, 16)
    with torch.no_grad():
        plain(x[:, :5], input_pos=torch.arange(5)), fast(x[:, :5], input_pos=torch.arange(5))  # prefill
        a = plain(x[:, 5:], input_pos=torch.tensor([5]))  # one row: the kernel path
        b = fast(x[:, 5:], input_pos=torch.tensor([5]))
    assert ((a - b).abs().max() / a.abs().max()).item() < tolerance


def test_to_huge_pages_keeps_values_and_ties():
    model = random_model(tiny_args("tied", dim=512))  # the 512 x 1024 tables pass the 2 MiB threshold in fp32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moved = to_huge_pages(model)
    assert moved >= 2 * 2**20
    assert model.output.weight is model.tok_embeddings.weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_switched_off_kernels_fall_back_to_torch():
    code = ("import torch\n"
            "from llama3 import kernels\n"
            "from llama3.inference.gemv import use_gemv_kernels\n"
            "from conftest import random_model, tiny_args\n"
            "m = random_model(tiny_args('tied')).to(torch.bfloat16)\n"
            "assert not kernels.available() and 'LLAMA3_KERNELS=0' in kernels.why_unavailable()\n"
            "assert use_gemv_kernels(m) == 0\n"
            "print('fallback ok')\n")
    env = {**os.environ, "LLAMA3_KERNELS": "0"}
    tests_dir = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tests_dir,
                         timeout=120)
    assert out.returncode == 0 and "fallback ok" in out.stdout, out.stderr
    assert "unavailable" not in out.stderr  # switching off on purpose is not reported as a failure


def test_failed_build_falls_back_to_torch_and_says_why(tmp_path):
    """A machine whose compiler fails (here CXX=false, empty cache): one line on stderr, torch's kernels,
    the same greedy tokens as a model that never asked for the kernels."""
    code = ("import torch\n"
            "from llama3 import kernels\n"
            "from llama3.inference.fast import optimize_for_inference\n"
            "from llama3.inference.gemv import GemvLinear\n"
            "from conftest import random_model, tiny_args\n"
            "m = optimize_for_inference(random_model(tiny_args('gqa')), dtype=torch.bfloat16)\n"
            "assert not kernels.available() and 'failed' in kernels.why_unavailable()\n"
            "assert not any(isinstance(x, GemvLinear) for x in m.modules())\n"
            "ref = optimize_for_inference(random_model(tiny_args('gqa')), dtype=torch.bfloat16, kernels=False)\n"
            "x = torch.randint(0, 256, (1, 7))\n"
            "assert torch.equal(m(x), ref(x))\n"
            "print('fallback ok')\n")
    env = {**os.environ, "CXX": "false", "LLAMA3_CACHE": str(tmp_path)}
    env.pop("LLAMA3_KERNELS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(__file__), timeout=120)
    assert out.returncode == 0 and "fallback ok" in out.stdout, out.stderr
    assert out.stderr.count("fast CPU kernels unavailable") == 1
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind


def test_use_gemv_kernels_counts_replaced_layers():
    model = random_model(tiny_args("gqa"))
    n_linear = sum(1 for name, m in model.named_modules()
                   if type(m) is torch.nn.Linear and (name.startswith("layers.") or name == "output"))
    assert use_gemv_kernels(model) == n_linear > 0
    assert use_gemv_kernels(model) == 0  # nothing left to replace


# ----- cross-entropy rows (xent.cpp) -----

def xent_reference(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    """float64 per-row loss and (softmax - one_hot) * weight, from the same (possibly bf16) logit values."""
    x = logits.double()
    lse = x.logsumexp(-1)
    nll = lse - x.gather(1, targets[:, None])[:, 0]
    grad = (x - lse[:, None]).exp()
    grad[torch.arange(len(targets)), targets] -= 1.0
    return nll, grad * weights.double()[:, None]


# widths around the 16-wide vector and the 256-value summing block, and a vocabulary-sized one
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 255, 256, 257, 4099, 32768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xent_rows_equal_float64_reference(ops, vocab, dtype):
    torch.manual_seed(vocab)
    rows = 13
    logits = (torch.randn(rows, vocab) * 5).to(dtype)
    targets = torch.randint(0, vocab, (rows,))
    weights = torch.rand(rows) / rows
    nll_ref, grad_ref = xent_reference(logits, targets, weights)
    grad = logits.clone()
    nll = ops.xent_rows_(grad, targets, weights, True)
    assert nll.dtype == torch.float32 and nll.shape == (rows,)
    torch.testing.assert_close(nll.double(), nll_ref, rtol=1e-6, atol=1e-5)
    # Error bounds. bf16: the gradient is rounded to 8 significant bits (2^-8 relative), plus the fp32
    # arithmetic below. fp32: e^(x - lse) is computed from x - lse rounded to fp32, so its relative error
    # grows with |x - lse| (about |x - lse| · 2^-24), plus a few units of the exponential and the division.
    # The target's entry (p - 1) · w loses its relative accuracy when p is near 1: bounded absolutely.
    x_minus_lse = logits.double() - (nll_ref + logits.double().gather(1, targets[:, None])[:, 0])[:, None]
    relative = 2.0 ** -7 if dtype == torch.bfloat16 else (x_minus_lse.abs() + 8) * 2.0 ** -23
    bound = grad_ref.abs() * relative + weights.double()[:, None] * 2.0 ** -21
    assert ((grad.double() - grad_ref).abs() <= bound).all()
    untouched = logits.clone()
    nll2 = ops.xent_rows_(untouched, targets, weights, False)
    assert torch.equal(untouched, logits) and torch.equal(nll2, nll)  # write_grad=False: loss only


def test_xent_rows_spread_over_threads_give_the_same_result(ops):
    torch.manual_seed(1)
    logits, targets, weights = torch.randn(64, 1000).bfloat16(), torch.randint(0, 1000, (64,)), torch.rand(64)
    results = []
    previous = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            grad = logits.clone()
            results.append((ops.xent_rows_(grad, targets, weights, True), grad))
        finally:
            torch.set_num_threads(previous)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_xent_rows_propagate_non_finite_logits(ops):
    """A NaN or infinite logit makes that row's loss non-finite (so the training loop skips the step); it
    must not vanish inside the exponentials."""
    logits = torch.randn(3, 300)
    logits[0, 17] = float("nan")
    logits[1, 250] = float("inf")
    nll = ops.xent_rows_(logits.clone(), torch.tensor([0, 1, 2]), torch.ones(3), True)
    assert not nll[0].isfinite() and not nll[1].isfinite() and nll[2].isfinite()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xent_rows_with_logits_far_below_the_maximum(ops, dtype):
    """Exponentials that underflow fp32 (logits 87 to 300 below the row's maximum, where the vectorized
    exponentials clamp) give probabilities of 0, as in float64, and leave the loss exact."""
    torch.manual_seed(4)
    logits = torch.randn(4, 300) * 3
    logits[:, ::3] -= torch.linspace(80, 300, 100)  # a third of each row far below the rest
    logits = logits.to(dtype)
    targets, weights = torch.tensor([0, 1, 3, 299]), torch.full((4,), 0.25)
    nll_ref, grad_ref = xent_reference(logits, targets, weights)
    grad = logits.clone()
    nll = ops.xent_rows_(grad, targets, weights, True)
    torch.testing.assert_close(nll.double(), nll_ref, rtol=1e-6, atol=1e-5)
    assert ((grad.double() - grad_ref).abs() <= grad_ref.abs() * 2.0 ** -7 + 2.0 ** -24).all()


def test_xent_rows_reject_bad_inputs_with_clear_errors():
    logits = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="target 8 at row 1 is outside the vocabulary"):
        torch.ops.llama3.xent_rows_(logits, torch.tensor([0, 8]), torch.ones(2), True)
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16"):
        torch.ops.llama3.xent_rows_(logits.half(), torch.tensor([0, 1]), torch.ones(2), True)
    with pytest.raises(RuntimeError, match="contiguous 2-D"):
        torch.ops.llama3.xent_rows_(torch.zeros(8, 2).T, torch.tensor([0, 1]), torch.ones(2), True)
    with pytest.raises(RuntimeError, match="weights must be a contiguous float32 vector"):
        torch.ops.llama3.xent_rows_(logits, torch.tensor([0, 1]), torch.ones(3), True)


def test_xent_rows_under_compile_equal_eager():
    def loss_and_grad(logits, targets, weights):
        logits = logits.clone()
        nll = torch.ops.llama3.xent_rows_(logits, targets, weights, True)
        return nll.sum(), logits

    torch.manual_seed(2)
    args = (torch.randn(5, 300), torch.randint(0, 300, (5,)), torch.rand(5))
    compiled = torch.compile(loss_and_grad, fullgraph=True)
    for got, want in zip(compiled(*args), loss_and_grad(*args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----- instruction-set levels (kernels/__init__.py) -----

@pytest.fixture(scope="module")
def every_level_built():
    """Every compilable level's library (or the build's error), built once per session and side by side: each
    build is one compiler process (all sources in one translation unit), so the levels this CPU cannot run
    (built for their warnings alone) take the cores together instead of one after another."""
    def build(isa):
        try:
            return kernels.build(isa=isa)  # cached: the levels the other tests load are built once
        except RuntimeError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(COMPILABLE_LEVELS, pool.map(build, COMPILABLE_LEVELS)))


@pytest.mark.parametrize("isa", COMPILABLE_LEVELS)
def test_every_level_compiles_without_warnings(isa, every_level_built):
    """Every level builds here, also those this CPU cannot run, with -Wall -Wextra and nothing to say."""
    library = every_level_built[isa]
    assert not isinstance(library, Exception), str(library)
    assert library.exists() and isa in library.name
    assert kernels.build_warnings(library) == ""


def test_default_level_is_the_best_this_cpu_runs(monkeypatch):
    monkeypatch.delenv("LLAMA3_KERNELS_ISA", raising=False)
    assert kernels.selected_isa() == RUNNABLE_LEVELS[0]
    if "LLAMA3_KERNELS_ISA" not in os.environ:
        assert kernels.loaded_isa() == RUNNABLE_LEVELS[0]
    assert RUNNABLE_LEVELS[-1] == "portable"
    monkeypatch.setenv("LLAMA3_KERNELS_ISA", "Portable")
    assert kernels.selected_isa() == "portable"  # forced, case-insensitive


@pytest.mark.parametrize("value,message", [("avx3", "is not a kernel level; use one of avx512bf16"),
                                           ("avx512bf16", "needs CPU features this CPU lacks")])
def test_forcing_a_level_that_cannot_run_is_refused(monkeypatch, value, message):
    if value in RUNNABLE_LEVELS:
        value = "nonexistent"
        message = "is not a kernel level"
    monkeypatch.setenv("LLAMA3_KERNELS_ISA", value)
    with pytest.raises(ValueError, match=message):
        kernels.selected_isa()
    with pytest.raises(ValueError, match="does not run on this CPU"):
        kernels.ops(value)


def test_levels_follow_the_cpu_flags():
    zen3 = {"avx", "avx2", "fma", "f16c"}
    zen4 = zen3 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
    ice_lake = zen3 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    alder_lake = zen3 | {"avx_vnni"}
    assert kernels.supported_isas("x86_64", zen3) == ["avx2", "portable"]
    assert kernels.supported_isas("x86_64", zen4) == ["avx512bf16", "avx512", "avx2", "portable"]
    assert kernels.supported_isas("x86_64", ice_lake)[0] == "avx512"
    assert kernels.supported_isas("x86_64", alder_lake)[0] == "avxvnni"
    assert kernels.supported_isas("x86_64", {"sse2"}) == ["portable"]
    assert kernels.supported_isas("aarch64", zen4) == ["portable"]


def test_non_x86_builds_the_portable_level_for_its_own_cpu(monkeypatch):
    accepted: set[str] = set()
    monkeypatch.setattr(kernels, "_accepts", lambda cxx, flag: flag in accepted)
    assert kernels.isa_flags("portable", "c++", machine="aarch64") == []  # no -march=native forced on it
    accepted.add("-march=native")
    assert kernels.isa_flags("portable", "c++", machine="aarch64") == ["-march=native"]
    accepted.add("-mcpu=native")
    assert kernels.isa_flags("portable", "c++", machine="aarch64") == ["-mcpu=native"]
    with pytest.raises(ValueError, match="x86-only"):
        kernels.isa_flags("avx2", "c++", machine="aarch64")
    assert kernels.isa_flags("avx2", "c++", machine="x86_64") == ["-mavx2", "-mfma", "-mf16c"]


def test_every_source_registers_through_the_namespace_macro():
    """A library of another level loads beside the default one only if all its operators go to its own
    namespace: a source registering straight into `llama3` would collide with the default library."""
    for source in kernels._SOURCES:
        text = source.read_text()
        assert '#include "ops_namespace.h"' in text, f"{source.name} must include ops_namespace.h"
        assert "TORCH_LIBRARY(" not in text and "TORCH_LIBRARY_FRAGMENT(" not in text and \
            "TORCH_LIBRARY_IMPL(" not in text, \
            f"{source.name}: register with LLAMA3_LIBRARY_FRAGMENT(m) / LLAMA3_LIBRARY_IMPL_CPU(m)"


def test_a_level_built_on_purpose_gives_the_default_levels_numbers():
    """The portable level (plain C++) and the default level on the same inputs: equal to fp32 rounding."""
    other = kernels.ops("portable")
    default = kernels.ops()
    torch.manual_seed(5)
    x, w = torch.randn(3, 320), torch.randn(50, 320)
    torch.testing.assert_close(other.gemv_f32(x, w), default.gemv_f32(x, w), rtol=1e-5, atol=1e-5)
    q = torch.randint(-128, 128, (50, 320), dtype=torch.int8)  # -128 included: the AVX2 sign trick's edge
    scales = torch.rand(50)
    torch.testing.assert_close(other.gemv_int8(x, q, scales), default.gemv_int8(x, q, scales), rtol=1e-5, atol=1e-4)


def test_torch_paths_are_the_ones_cpp_extension_names():
    """The build command (and so the cache key) uses torch's folders without importing cpp_extension."""
    from torch.utils.cpp_extension import include_paths, library_paths

    assert kernels.torch_paths() == (include_paths(), library_paths())
