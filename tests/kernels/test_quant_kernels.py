"""The quantized CPU kernels (slimlm.kernels.cpu_quant) and the dispatch against the reference semantics.

Tolerances: the integer kernels (small M) quantize x to int8 per block of up to 128 inputs, so they are
checked by the relative error of the whole output, ``||y - ref|| / ||ref|| <= 1e-2`` (Frobenius norms), against
the float64 product of the reference's weight (measured 4e-3 to 7e-3 on this Gaussian data: x's rounding
error, about absmax / 254 per input, relative to x); the dequantize + sgemm path (large M) computes the
reference's exact fp32 weight, so only the summation order differs (1e-5). W8A8 and the "torch" backend
must equal the reference bit for bit.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from slimlm.kernels import cpu_quant, quant
from slimlm.kernels.quant import QuantLinearSpec, dequantize, prepare_quantized_linear

INT_TOL = 1e-2
GEMM_TOL = 1e-5


def _weight(n, k, bits, group, symmetric, kind="int", act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else k // group
    if kind == "nf4":
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int8)
    else:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, groups, generator=g) * 0.02 + 0.001
    zeros = None
    if not symmetric:
        zeros = torch.randint(lo, hi + 1, (n, groups), generator=g, dtype=torch.int8)
    g_idx = None
    if act_order:
        size = k if group == -1 else group
        g_idx = (torch.arange(k) // size)[torch.randperm(k, generator=g)].to(torch.int32)
    return codes, scales, zeros, g_idx, QuantLinearSpec(bits, group, kind)


def _reference(x, w, bias):
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


def _check(y, x, w, bias, tol):
    ref = _reference(x, w, bias)
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = ((y.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    if x.dtype == torch.bfloat16:
        tol = tol + 2**-8  # one rounding of the output to bf16
    assert err <= tol, f"relative error {err:.3g} > {tol}"


@pytest.fixture(scope="module")
def mod():
    return cpu_quant.load()


CASES = [
    # bits, group, symmetric, kind
    (4, 32, True, "int"),
    (4, 64, False, "int"),
    (4, 128, True, "int"),
    (4, 128, False, "int"),
    (4, -1, True, "int"),
    (4, -1, False, "int"),
    (3, 64, False, "int"),
    (2, 32, True, "int"),
    (8, -1, True, "int"),
    (8, -1, False, "int"),
    (8, 128, True, "int"),
    (8, 32, False, "int"),
    (4, 64, True, "nf4"),
    (4, -1, True, "nf4"),
]


@pytest.mark.parametrize("bits,group,symmetric,kind", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_reference(mod, bits, group, symmetric, kind, dtype):
    n = 67
    # channel-wise: K not a multiple of 32; group 32: an odd number of groups (a padded 64-input unit)
    k = 200 if group == -1 else (160 if group == 32 else 2 * max(group, 128))
    codes, scales, zeros, g_idx, spec = _weight(n, k, bits, group, symmetric, kind)
    w = dequantize(codes, scales, zeros, None, spec)
    kernel = cpu_quant.prepare(codes, scales, zeros, g_idx, spec)
    assert kernel is not None
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=g)
    for m in (1, 3, 16, 65):
        x = torch.randn(m, k, generator=g).to(dtype)
        for b in (None, bias):
            _check(kernel.forward_path(x, b, 1), x, w, b, INT_TOL)
            _check(kernel.forward_path(x, b, 2), x, w, b, GEMM_TOL)
            _check(kernel(x, b), x, w, b, INT_TOL)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, 128, True), (8, 64, True), (3, -1, True)])
def test_act_order(mod, bits, group, symmetric):
    n, k = 37, 256
    codes, scales, zeros, g_idx, spec = _weight(n, k, bits, group, symmetric, act_order=True, seed=3)
    w = dequantize(codes, scales, zeros, g_idx, spec)
    kernel = prepare_quantized_linear(codes, scales, zeros, g_idx, spec, torch.float32, "cpu")
    assert isinstance(kernel, mod.QLinear), "act-order g_idx should run the C++ kernel"
    g = torch.Generator().manual_seed(2)
    for m in (1, 3, 16, 65):
        x = torch.randn(2, m, k, generator=g)  # leading batch dims
        _check(kernel.forward_path(x, None, 1), x, w, None, INT_TOL)
        _check(kernel.forward_path(x, None, 2), x, w, None, GEMM_TOL)


def test_irregular_g_idx_falls_back_to_reference():
    n, k, group = 13, 128, 32
    codes, scales, zeros, _, spec = _weight(n, k, 4, group, False)
    g_idx = torch.randint(0, k // group, (k,), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    assert cpu_quant.prepare(codes, scales, zeros, g_idx, spec) is None
    kernel = prepare_quantized_linear(codes, scales, zeros, g_idx, spec, torch.float32, "auto")
    x = torch.randn(3, k)
    ref = quant._reference(codes, scales, zeros, g_idx, spec, torch.float32)
    assert torch.equal(kernel(x, None), ref(x, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_exact(mod, dtype):
    n, k = 67, 300
    codes, scales, _, _, _ = _weight(n, k, 8, -1, True)
    codes[0, 0] = -128  # the extreme code: |w| = 128 in maddubs must not saturate
    spec = QuantLinearSpec(8, -1, "int", "int8-token")
    kernel = prepare_quantized_linear(codes, scales, None, None, spec, dtype, "cpu")
    ref = quant._reference(codes, scales, None, None, spec, dtype)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(n, generator=g).to(dtype)
    for m in (1, 3, 16, 65):
        x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10).to(dtype)
        x[0, :7] = 0.0
        for b in (None, bias):
            assert torch.equal(kernel(x, b), ref(x, b))
    zero = torch.zeros(2, k, dtype=dtype)
    assert torch.equal(kernel(zero, None), ref(zero, None))


@pytest.mark.parametrize("kind,bits,symmetric", [("int", 4, False), ("int", 8, True), ("nf4", 4, True)])
def test_torch_backend_is_reference(kind, bits, symmetric):
    codes, scales, zeros, g_idx, spec = _weight(19, 128, bits, 64, symmetric, kind, act_order=True)
    for dtype in (torch.float32, torch.bfloat16):
        kernel = prepare_quantized_linear(codes, scales, zeros, g_idx, spec, dtype, "torch")
        weight = dequantize(codes, scales, zeros, g_idx, spec, dtype)
        x = torch.randn(5, 128).to(dtype)
        bias = torch.randn(19).to(dtype)
        assert torch.equal(kernel(x, bias), torch.nn.functional.linear(x, weight, bias))


def test_auto_uses_cpu_kernel_and_env_forces_reference(mod, monkeypatch):
    codes, scales, zeros, g_idx, spec = _weight(9, 64, 4, 32, True)
    monkeypatch.delenv("SLIMLM_KERNELS", raising=False)
    assert isinstance(prepare_quantized_linear(codes, scales, zeros, g_idx, spec, torch.float32), mod.QLinear)
    meta = prepare_quantized_linear(codes.to("meta"), scales.to("meta"), None, None, spec, torch.float32)
    assert not isinstance(meta, mod.QLinear)  # other devices: the reference
    with pytest.raises(ValueError):
        prepare_quantized_linear(codes.to("meta"), scales.to("meta"), None, None, spec, torch.float32, "cpu")
    monkeypatch.setenv("SLIMLM_KERNELS", "torch")
    assert not isinstance(prepare_quantized_linear(codes, scales, zeros, g_idx, spec, torch.float32), mod.QLinear)
    with pytest.raises(ValueError):
        prepare_quantized_linear(codes, scales, zeros, g_idx, spec, torch.float32, "fast")


def test_odd_shapes_and_inputs(mod):
    """M = 0, a 3-D strided x, float16 x (computed in fp32, returned as float16), a wrong K."""
    codes, scales, zeros, _, spec = _weight(37, 128, 4, 64, False)
    kernel = cpu_quant.prepare(codes, scales, zeros, None, spec)
    w = dequantize(codes, scales, zeros, None, spec)
    assert kernel(torch.randn(0, 128)).shape == (0, 37)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(6))[..., ::2]
    _check(kernel(x), x, w, None, INT_TOL)
    y = kernel(x.half())
    assert y.dtype == torch.float16
    _check(y.float(), x.half().float(), w, None, INT_TOL + 1e-3)  # + the float16 output rounding
    with pytest.raises(RuntimeError):
        kernel(torch.randn(2, 65))
    assert torch.equal(copy.deepcopy(kernel)(x), kernel(x))


def test_build_failure_falls_back_once(monkeypatch, caplog):
    def broken(*_args, **_kwargs):
        raise OSError("no compiler here")

    monkeypatch.delenv("SLIMLM_KERNELS", raising=False)
    monkeypatch.setattr(quant, "_cpu_error", None)
    monkeypatch.setattr(quant, "_warned", False)
    monkeypatch.setattr(cpu_quant, "load", broken)
    codes, scales, zeros, g_idx, spec = _weight(9, 64, 4, 32, True)
    x = torch.randn(2, 64)
    ref = quant._reference(codes, scales, zeros, g_idx, spec, torch.float32)
    with caplog.at_level(logging.WARNING, logger="slimlm.kernels.quant"):
        for _ in range(2):
            kernel = prepare_quantized_linear(codes, scales, zeros, g_idx, spec, torch.float32, "auto")
            assert torch.equal(kernel(x, None), ref(x, None))
    warnings = [r for r in caplog.records if "quantized CPU kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="could not build the quantized CPU kernels"):
        prepare_quantized_linear(codes, scales, zeros, g_idx, spec, torch.float32, "cpu")


def test_same_bits_for_any_thread_count(mod):
    codes, scales, zeros, g_idx, spec = _weight(1001, 256, 4, 64, False, seed=7)
    kernel = cpu_quant.prepare(codes, scales, zeros, g_idx, spec)
    threads = torch.get_num_threads()
    try:
        for m in (1, 5, 80):
            x = torch.randn(m, 256)
            torch.set_num_threads(1)
            one = kernel(x, None)
            torch.set_num_threads(2)
            assert torch.equal(one, kernel(x, None))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "bits,group,symmetric,kind",
    [(4, 32, True, "int"), (4, 128, False, "int"), (8, -1, True, "int"), (4, 64, True, "nf4")],
)
def test_vnni_and_avx2_integer_paths_agree_bit_for_bit(mod, bits, group, symmetric, kind):
    """vpdpbusd (where the CPU has AVX512-VNNI) and AVX2's maddubs+madd form the same integer sums; on a CPU
    without VNNI both builds are the AVX2 path and this still checks that the define changes nothing else."""
    codes, scales, zeros, g_idx, spec = _weight(96, 512, bits, group, symmetric, kind, seed=11)
    default = cpu_quant.prepare(codes, scales, zeros, g_idx, spec)
    avx2 = cpu_quant.prepare(codes, scales, zeros, g_idx, spec, defines={"SLIMLM_QUANT_VNNI": 0})
    assert cpu_quant.load({"SLIMLM_QUANT_VNNI": 0}).config()["vnni"] is False
    g = torch.Generator().manual_seed(5)
    for m in (1, 4, 16):
        x = torch.randn(m, 512, generator=g)
        assert torch.equal(default.forward_path(x, None, 1), avx2.forward_path(x, None, 1))


def test_w8a8_vnni_and_avx2_agree_bit_for_bit(mod):
    codes, scales, _, _, _ = _weight(64, 320, 8, -1, True, seed=12)
    codes[0, 0] = -128  # |w| = 128: an unsigned 128 in both instructions
    spec = QuantLinearSpec(8, -1, "int", "int8-token")
    default = cpu_quant.prepare(codes, scales, None, None, spec)
    avx2 = cpu_quant.prepare(codes, scales, None, None, spec, defines={"SLIMLM_QUANT_VNNI": 0})
    x = torch.randn(9, 320, generator=torch.Generator().manual_seed(6))
    assert torch.equal(default(x, None), avx2(x, None))


def test_the_integer_kernel_runs_up_to_its_crossover_and_sgemm_above(mod):
    """``small_max`` rows and fewer take the vector integer kernel, up to ``tile_max`` the AMX kernel (where the
    CPU has one), more take dequantize + sgemm (bit for bit); the crossover is lower where sgemm has AVX-512, and
    lower still where the CPU has a bf16 GEMM."""
    for kind in (cpu_quant.KIND_U4, cpu_quant.KIND_S8, cpu_quant.KIND_NF4):
        assert cpu_quant.small_max(kind, "avx2 avx512f fma") < cpu_quant.small_max(kind, "avx2 fma")
        # With AVX512-BF16 the GEMM path runs on oneDNN's bf16 GEMM and takes over sooner still (never for NF4).
        native = cpu_quant.small_max(kind, "avx2 avx512f avx512_bf16 fma")
        assert native <= cpu_quant.small_max(kind, "avx2 avx512f fma")
        assert native < cpu_quant.small_max(kind, "avx2 avx512f fma") or kind == cpu_quant.KIND_NF4
        amx = "avx2 avx512f fma amx_tile amx_int8"
        assert cpu_quant.small_max(kind, amx) < cpu_quant.small_max(kind, amx, tiles=False)
        assert cpu_quant.tile_max(kind, False, amx) == cpu_quant.small_max(kind, "avx2 avx512f fma")
        assert cpu_quant.tile_max(kind, False, "avx2 avx512f fma") == 0
    codes, scales, zeros, _, spec = _weight(24, 128, 4, 64, False)
    kernel = cpu_quant.prepare(codes, scales, zeros, None, spec)
    assert kernel.tiles_fit == bool(mod.config()["amx"])
    assert kernel.small_max == cpu_quant.small_max(cpu_quant.KIND_U4)
    assert kernel.tile_max == cpu_quant.tile_max(cpu_quant.KIND_U4, False)
    g = torch.Generator().manual_seed(3)
    top = max(kernel.small_max, kernel.tile_max)
    for m, path in ((kernel.small_max, 1), (top, 3 if kernel.tile_max else 1), (top + 1, 2)):
        x = torch.randn(m, 128, generator=g)
        assert torch.equal(kernel(x), kernel.forward_path(x, None, path))
        if path != 3:
            assert not torch.equal(kernel(x), kernel.forward_path(x, None, 3 - path))
    # Group size 32 (two scales per x-block) never takes the tiles: the vector kernel keeps its whole range.
    codes, scales, zeros, _, spec = _weight(24, 128, 4, 32, False)
    g32 = cpu_quant.prepare(codes, scales, zeros, None, spec)
    assert not g32.tiles_fit and g32.tile_max == 0
    assert g32.small_max == cpu_quant.small_max(cpu_quant.KIND_U4, tiles=False)


AMX_CASES = [
    # bits, group, symmetric, kind, act_order
    (4, 128, True, "int", False),
    (4, 64, False, "int", False),
    (4, -1, False, "int", True),
    (3, 128, False, "int", True),
    (8, -1, True, "int", False),
    (8, 128, False, "int", False),
    (4, 64, True, "nf4", False),
    (8, -1, True, "w8a8", False),
]


@pytest.mark.parametrize("bits,group,symmetric,kind,act_order", AMX_CASES)
def test_the_amx_kernel_equals_the_vector_kernel(mod, bits, group, symmetric, kind, act_order):
    """AMX-INT8's tiles form the same integer sums per x-block as the vector kernel; only the fp32 folding of
    the blocks runs in another order (1e-7 relative), and W8A8 (one block) gives the same bits. Every tile
    layout (M <= 16: one x tile; above: pairs, the last one half used), partial blocks of W rows, padded
    inputs. Without AMX, forcing that path is a clear error."""
    n, k = 100, 200 if group == -1 else 384
    w8a8 = kind == "w8a8"
    codes, scales, zeros, g_idx, spec = _weight(n, k, bits, group, symmetric, "int" if w8a8 else kind, act_order)
    if w8a8:
        spec = QuantLinearSpec(8, -1, "int", "int8-token")
    kernel = cpu_quant.prepare(codes, scales, zeros, g_idx, spec)
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(n, generator=g)
    if not mod.config()["amx"]:
        with pytest.raises(RuntimeError, match="AMX"):
            kernel.forward_path(torch.randn(5, k, generator=g), None, 3)
        return
    for m in (1, 5, 16, 17, 40):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, generator=g).to(dtype)
            for b in (None, bias):
                y, ref = kernel.forward_path(x, b, 3), kernel.forward_path(x, b, 1)
                if w8a8:
                    assert torch.equal(y, ref), (m, dtype)
                elif dtype == torch.float32:
                    assert (y - ref).abs().max() <= 1e-6 * ref.abs().max(), (m, dtype)
                else:  # fp32 results 1e-7 apart may round to bf16 one ulp apart
                    y, ref = y.float(), ref.float()
                    tol = 2**-7 * ref.abs() + 1e-6 * ref.abs().max()
                    assert ((y - ref).abs() <= tol).all(), (m, dtype)


@pytest.mark.parametrize(
    "bits,group,symmetric,kind",
    [(4, 128, True, "int"), (4, 64, False, "int"), (8, -1, True, "int"), (4, 64, True, "nf4")],
)
def test_dequantized_panels_into_the_bf16_gemm(mod, bits, group, symmetric, kind):
    """bf16 x above the integer kernels' range on AVX512-BF16 CPUs without AMX: W is dequantized 64 rows at a time,
    rounded to bf16 and multiplied by slimlm's vdpbf16ps GEMM (path 4, what path 0 picks there): the bf16 model's
    product within the output's bf16 rounding. Elsewhere forcing path 4 is a clear error."""
    n, k = 130, 512
    codes, scales, zeros, g_idx, spec = _weight(n, k, bits, group, symmetric, kind, seed=21)
    kernel = cpu_quant.prepare(codes, scales, zeros, g_idx, spec)
    w = dequantize(codes, scales, zeros, g_idx, spec).bfloat16()
    g = torch.Generator().manual_seed(22)
    x = torch.randn(kernel.small_max + 5, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    if not mod.config().get("dp_gemm", False):
        with pytest.raises(RuntimeError, match="path 4"):
            kernel.forward_path(x, bias, 4)
        return
    y = kernel.forward_path(x, bias, 4)
    ref = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    assert y.dtype == torch.bfloat16
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2**-8
    assert torch.equal(kernel(x, bias), y)
    with pytest.raises(RuntimeError, match="path 4"):
        kernel.forward_path(x.float(), bias, 4)
