"""slimlm.kernels.cpu_linear against a float64 reference built from the same (rounded) values."""

from __future__ import annotations

import pytest
import torch

from slimlm.kernels import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="needs an x86-64 CPU with AVX2 and FMA")


@pytest.fixture(scope="module")
def mod():
    return cpu_linear.load()


def _reference(x, w, b):
    """float64 x @ w.T + b from the exact values the kernel sees."""
    y = x.double() @ w.double().T
    if b is not None:
        y = y + b.double()
    return y


def _bf16_case(M: int, N: int, K: int, seed: int):
    """bf16 x [M, K] as a strided view (rows of a wider tensor, offset by 2), W [N, K] and a bias [N]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K + 6, generator=g).bfloat16()[:, 2 : K + 2]
    return x, torch.randn(N, K, generator=g).bfloat16(), torch.randn(N, generator=g).bfloat16()


def _check(y, x, w, b):
    ref = _reference(x, w, b)
    assert y.dtype == x.dtype
    assert y.shape == (*x.shape[:-1], w.shape[0])
    assert torch.isfinite(y).all()
    # fp32 accumulation over K products: error grows ~ sqrt(K) * eps * sum|x*w| at worst K * eps.
    scale = x.double().abs() @ w.double().abs().T
    if b is not None:
        scale = scale + b.double().abs()
    K = x.shape[-1]
    tol = 4 * (K**0.5) * 2**-24 * scale + 1e-30
    if x.dtype == torch.bfloat16:  # one final rounding to bf16 (half an ulp: at most 2^-8 relative)
        tol = tol + 2**-8 * ref.abs()
    err = (y.double() - ref).abs()
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} wrong, max err {err.max().item():.3g}"


CASES = [
    # (M, K, N)
    (1, 100, 33),
    (1, 577, 31),
    (1, 576, 1728),
    (1, 1000, 37),
    (2, 1000, 13),
    (1, 577, 1001),  # several tasks of many strided row runs, a short last task with leftover rows
    (5, 577, 1001),
    (3, 577, 65),
    (3, 16, 7),
    (2, 7, 5),
    (8, 100, 129),
    (8, 2048, 37),
    (17, 577, 33),
    (64, 100, 257),
    (150, 1100, 67),  # bf16 W: GEMM path; fp32 W: streaming kernel with many passes over M
    (300, 577, 65),
    (300, 64, 1001),
]


@pytest.mark.parametrize("M,K,N", CASES)
@pytest.mark.parametrize("wdt", [torch.bfloat16, torch.float32], ids=["wbf16", "wf32"])
@pytest.mark.parametrize("xdt", [torch.bfloat16, torch.float32], ids=["xbf16", "xf32"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matches_float64(mod, M, K, N, wdt, xdt, with_bias):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=g).to(xdt)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(wdt)
    b = torch.randn(N, generator=g).to(wdt) if with_bias else None
    _check(mod.linear(x, w, b), x, w, b)


@pytest.mark.parametrize("path", [1, 2], ids=["stream", "gemm"])
@pytest.mark.parametrize("M", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("wdt", [torch.bfloat16, torch.float32], ids=["wbf16", "wf32"])
@pytest.mark.parametrize("xdt", [torch.bfloat16, torch.float32], ids=["xbf16", "xf32"])
def test_both_paths_every_m(mod, path, M, wdt, xdt):
    """Each path is correct on its own, whatever M the dispatcher would send it."""
    g = torch.Generator().manual_seed(7 * M + path)
    K, N = 203, 45  # K % 16 = 11, N % 8 = 5, N % 3 = 0, N % 4 = 1
    x = torch.randn(M, K, generator=g).to(xdt)
    w = torch.randn(N, K, generator=g).to(wdt)
    b = torch.randn(N, generator=g)
    _check(mod.linear_path(x, w, b, path), x, w, b)
    _check(mod.linear_path(x, w, b.to(wdt), path), x, w, b.to(wdt))
    _check(mod.linear_path(x, w, None, path), x, w, None)


@pytest.mark.parametrize(
    "M,K,N", [(1, 64, 16), (5, 203, 45), (16, 96, 130), (17, 577, 33), (40, 2048, 100), (300, 64, 70)]
)
def test_amx_tile_path(mod, M, K, N):
    """The AMX tile kernel (bf16 x and W): one x tile and 64-row W blocks up to M = 16, pairs of x tiles above,
    K not a multiple of 32, N not a multiple of 16, strided x. Without AMX, forcing it is a clear error."""
    x, w, b = _bf16_case(M, N, K, seed=M + K + N)
    b = b.float()
    if not mod.config()["amx"]:
        with pytest.raises(RuntimeError, match="AMX"):
            mod.linear_path(x, w, b, 4)
        return
    _check(mod.linear_path(x, w, b, 4), x, w, b)
    _check(mod.linear_path(x, w, None, 4), x, w, None)
    _check(mod.linear_path(x.contiguous(), w, b.bfloat16(), 4), x, w, b.bfloat16())


def _sum_order_probe(K: int) -> torch.Tensor:
    """16 rows of 2^25, ones, -2^25 in bf16: fp32 sums lose the ones that meet the large value in the same
    accumulator, and kernels that group the inputs differently give different results, which tells them apart."""
    w = torch.ones(16, K)
    w[:, 0], w[:, -1] = 2.0**25, -(2.0**25)
    return w.bfloat16()


def test_bf16_dispatch_by_m_and_k(mod):
    """bf16 x and W: with AMX they stream up to amx_stream_max rows for K <= amx_long_k and up to
    amx_stream_max_long_k rows above, then take the tile kernel. Without AMX but with AVX512-BF16 they stream up
    to native_stream_max rows, take the vdpbf16ps GEMM up to dp_gemm_max rows (even K) and oneDNN's bf16 GEMM
    above. With neither, these M all stream."""
    cfg = mod.config()
    if cfg["amx"]:
        cases = ((384, cfg["amx_stream_max"]), (cfg["amx_long_k"] + 64, cfg["amx_stream_max_long_k"]))
    else:
        cases = ((384, cfg["native_stream_max"]), (2048, cfg["native_stream_max"]))
    for K, limit in cases:
        w = _sum_order_probe(K)
        for M in sorted({max(limit, 1), limit + 1, 5, 7, cfg.get("dp_gemm_max", 0) + 1}):
            x = torch.ones(M, K).bfloat16()
            stream = mod.linear_path(x, w, None, 1)
            if cfg["amx"]:
                other = mod.linear_path(x, w, None, 4)
            elif cfg["native_bf16_gemm"] and M <= cfg["dp_gemm_max"]:
                other = mod.linear_path(x, w, None, 5)
            elif cfg["native_bf16_gemm"]:
                other = torch.nn.functional.linear(x, w)
            else:
                assert torch.equal(mod.linear(x, w), stream), (K, M)
                continue
            assert not torch.equal(stream, other), (K, M)
            assert torch.equal(mod.linear(x, w), other if M > limit else stream), (K, M)


@pytest.mark.parametrize("M", [1, 3, 8, 17, 300])
@pytest.mark.parametrize("wdt", [torch.bfloat16, torch.float32], ids=["wbf16", "wf32"])
@pytest.mark.parametrize("xdt", [torch.bfloat16, torch.float32], ids=["xbf16", "xf32"])
def test_strided_x_view(mod, M, wdt, xdt):
    """x as a column slice of a wider tensor (row stride != K), as fused qkv outputs are."""
    g = torch.Generator().manual_seed(M)
    K, N = 577, 19
    wide = torch.randn(M, 3 * K + 5, generator=g).to(xdt)
    x = wide[:, K + 3 : 2 * K + 3]
    assert x.stride(0) == 3 * K + 5 and x.storage_offset() == K + 3
    w = torch.randn(N, K, generator=g).to(wdt)
    b = torch.randn(N, generator=g)
    _check(mod.linear(x, w, b), x, w, b)


PACKED_CASES = [
    # (M, K, N): every panel width (1-4 vectors, a partial last panel), K blocks (KC 256-1024 by
    # width), N groups with a short last one, M blocks of 256 rows.
    (1, 100, 33),
    (5, 577, 25),
    (16, 64, 24),
    (17, 1100, 13),
    (31, 577, 67),
    (32, 576, 960),
    (33, 203, 8),
    (48, 1536, 50),
    (49, 7, 6),
    (64, 2100, 37),
    (65, 577, 257),
    (100, 100, 1),
    (257, 300, 19),
    (600, 577, 30),
]


@pytest.mark.parametrize("M,K,N", PACKED_CASES)
@pytest.mark.parametrize("wdt", [torch.bfloat16, torch.float32], ids=["wbf16", "wf32"])
@pytest.mark.parametrize("xdt", [torch.bfloat16, torch.float32], ids=["xbf16", "xf32"])
def test_packed_gemm_path(mod, M, K, N, wdt, xdt):
    """The packed AVX-512 GEMM (path 3) on ragged shapes, with and without bias, strided x."""
    if not mod.config()["avx512"]:
        with pytest.raises(RuntimeError, match="AVX-512"):
            mod.linear_path(torch.randn(M, K), torch.randn(N, K), None, 3)
        return
    g = torch.Generator().manual_seed(M * 7919 + K * 31 + N)
    x = torch.randn(M, K + 3, generator=g).to(xdt)[:, 1 : K + 1]
    w = torch.randn(N, K, generator=g).to(wdt)
    b = torch.randn(N, generator=g)
    _check(mod.linear_path(x, w, b, 3), x, w, b)
    _check(mod.linear_path(x, w, None, 3), x, w, None)


def test_packed_gemm_keeps_nan_and_rounds_like_torch(mod):
    """NaN and Inf propagate; the bf16 output is torch's round-to-nearest-even of the fp32 result."""
    if not mod.config()["avx512"]:
        with pytest.raises(RuntimeError, match="AVX-512"):
            mod.linear_path(torch.randn(4, 8), torch.randn(4, 8), None, 3)
        return
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g)
    w = torch.randn(20, 64, generator=g)
    w[3, 5] = float("nan")
    w[7, 9] = float("inf")
    y32 = mod.linear_path(x, w, None, 3)
    assert y32[:, 3].isnan().all() and not y32[:, 2].isnan().any()
    y16 = mod.linear_path(x.bfloat16(), w, None, 3)
    assert torch.equal(y16.isnan(), mod.linear_path(x.bfloat16().float(), w, None, 3).isnan())
    finite = y16.isfinite()
    ref = mod.linear_path(x.bfloat16().float(), w, None, 3).bfloat16()
    assert torch.equal(y16[finite], ref[finite])


def test_leading_dims_and_1d(mod):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(11, 40, generator=g).bfloat16()
    x3 = torch.randn(2, 5, 40, generator=g)
    y3 = mod.linear(x3, w, None)
    assert y3.shape == (2, 5, 11)
    _check(y3.reshape(10, 11), x3.reshape(10, 40), w, None)
    x1 = torch.randn(40, generator=g)
    y1 = mod.linear(x1, w, None)
    assert y1.shape == (11,)
    _check(y1[None], x1[None], w, None)
    # a transposed (non unit last-dim stride) x is copied, not misread
    xt = torch.randn(40, 6, generator=g).T
    _check(mod.linear(xt, w, None), xt, w, None)


def test_tail_never_reads_past_the_weights(mod):
    """NaN right after the last row of W (K % 16 != 0) must not leak into the result."""
    for K in (37, 7):
        N = 9
        for wdt in (torch.bfloat16, torch.float32):
            buf = torch.full((N * K + 64,), float("nan"), dtype=wdt)
            buf[: N * K] = torch.randn(N * K).to(wdt)
            w = buf[: N * K].view(N, K)
            assert w.is_contiguous()
            for M in (1, 2, 5, 40):
                x = torch.randn(M, K)
                _check(mod.linear(x, w, None), x, w, None)
                if mod.config()["avx512"]:
                    _check(mod.linear_path(x, w, None, 3), x, w, None)


def test_agrees_with_torch_linear(mod):
    """Same answer as F.linear on fp32 (both fp32-accumulated)."""
    g = torch.Generator().manual_seed(11)
    for M in (1, 4, 16, 33, 128):
        x = torch.randn(M, 576, generator=g)
        w = torch.randn(1728, 576, generator=g) / 24
        b = torch.randn(1728, generator=g)
        torch.testing.assert_close(mod.linear(x, w, b), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_rejects_bad_input(mod):
    w = torch.randn(4, 8)
    with pytest.raises(RuntimeError):
        mod.linear(torch.randn(2, 7), w, None)
    with pytest.raises(RuntimeError):
        mod.linear(torch.randn(2, 8, dtype=torch.float64), w, None)
    with pytest.raises(RuntimeError):
        mod.linear(torch.randn(2, 8), w, torch.randn(5))


def test_empty_m(mod):
    w = torch.randn(4, 8).bfloat16()
    y = mod.linear(torch.randn(0, 8), w, None)
    assert y.shape == (0, 4)


def test_cache_key_covers_cpu_flags():
    """A different CPU (flags line) must map to a different build directory."""
    flags = cpu_linear.cpu_flags()
    assert cpu_linear.build_key(flags) != cpu_linear.build_key(flags + " avx512f")
    assert cpu_linear.build_key(flags) != cpu_linear.build_key(flags, {"SLIMLM_SMALL_MAX_BF16": 3})
    name = cpu_linear.load().__name__
    assert cpu_linear.build_key(flags) in name, (cpu_linear.build_key(flags), name)


def test_same_bits_for_any_thread_count(mod):
    """Each output is computed by one thread in a fixed order: 1 or 2 threads give equal bits."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(1001, 577, generator=g).bfloat16()
    b = torch.randn(1001, generator=g)
    threads = torch.get_num_threads()
    try:
        for M in (1, 3, 8, 32, 100):  # streaming kernel, packed GEMM
            x = torch.randn(M, 577, generator=g)
            torch.set_num_threads(1)
            one = mod.linear(x, w, b)
            torch.set_num_threads(2)
            two = mod.linear(x, w, b)
            assert torch.equal(one, two)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("M", [1, 2, 4, 5, 6, 7, 11, 23])
@pytest.mark.parametrize("K", [31, 203, 577])
@pytest.mark.parametrize("wdt", [torch.bfloat16, torch.float32], ids=["wbf16", "wf32"])
def test_256_bit_build_matches_too(mod, M, K, wdt):
    """The streaming kernel exists at two widths (512-bit where the CPU has AVX-512, else 256-bit) with
    different x packing, register blocking and M remainders: the forced 256-bit build is checked on the
    shapes the default build is, so a CPU without AVX-512 runs tested code. On a CPU without AVX-512
    both builds are the 256-bit kernel."""
    avx2 = cpu_linear.load({"SLIMLM_LINEAR_AVX512": 0})
    assert avx2.config()["avx512"] is False
    g = torch.Generator().manual_seed(M * 31 + K)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = (torch.randn(53, K, generator=g) / K**0.5).to(wdt)
    b = torch.randn(53, generator=g)
    for m in (mod, avx2):
        _check(m.linear_path(x, w, b, 1), x, w, b)


def _other_thread_during(call) -> tuple[int, float, float]:
    """(how often another Python thread ran during the call, the longest stretch in which it did not run, the
    call's duration).
    A kernel holding the GIL lets no bytecode of another thread run while it computes, so the other thread
    falls silent for the kernel's whole duration (it may still run around the call's edges, when the calling
    thread is descheduled); a kernel that releases the GIL lets it run all through."""
    import itertools
    import threading
    import time

    done = threading.Event()
    started = threading.Event()
    stamps = []

    def count():
        started.set()
        while not done.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0)

    t = threading.Thread(target=count)
    t.start()
    started.wait()
    t0 = time.perf_counter()
    call()
    t1 = time.perf_counter()
    done.set()
    t.join()
    inside = [t0, *(s for s in stamps if t0 < s < t1), t1]
    return len(inside) - 2, max(b - a for a, b in itertools.pairwise(inside)), t1 - t0


def test_releases_the_gil_only_during_long_calls(mod):
    """At SLIMLM_GIL_RELEASE_MACS multiply-adds and above the server's event loop thread runs while the engine
    thread is inside the kernel; below it the GIL stays held: handing it to the event loop for every short
    call made the engine thread wait for the loop's Python afterwards (common/gil.h)."""
    import time

    limit = mod.config()["gil_release_macs"]
    w = torch.randn(4096, 4096).bfloat16()
    rows = limit // w.numel()
    short, long = torch.randn(rows - 1, 4096), torch.randn(rows + 1, 4096)
    solo = []
    for _ in range(3):  # the short call alone (the first also warms up)
        t0 = time.perf_counter()
        mod.linear(short, w)
        solo.append(time.perf_counter() - t0)
    kernel = min(solo)
    assert kernel > 0.005, solo
    for call in (lambda: mod.linear_path(long, w, None, 2), lambda: mod.linear(long, w)):
        runs, _, _ = _other_thread_during(call)  # tens of milliseconds: hundreds of runs when released
        assert runs > 50, runs
    # Held: the other thread is silent for most of the call. Measured against this call's own duration, not
    # the solo calls': this VM's speed moves by 2x within seconds (a 40 ms call once took 22 ms next).
    runs, quiet, duration = _other_thread_during(lambda: mod.linear(short, w))
    assert quiet >= 0.8 * duration, (runs, quiet, duration, solo)


@pytest.mark.parametrize(
    "M,N,K", [(1, 16, 32), (6, 64, 64), (7, 70, 34), (33, 130, 576), (64, 200, 1026), (13, 1, 2050), (100, 65, 96)]
)
def test_dp_gemm_path(mod, M, N, K):
    """The vdpbf16ps GEMM (bf16 x and W, even K): M not a multiple of its 6-row micro-kernel, N not a multiple of
    its 64-row panels, K past its 512-element blocks and not a multiple of 32 pairs, strided x, bias or none.
    Without AVX512-BF16 (or with AMX), forcing it is a clear error; odd K is refused."""
    x, w, b = _bf16_case(M, N, K, seed=M * 7 + N + K)
    if not mod.config()["dp_gemm_max"]:
        with pytest.raises(RuntimeError, match="vdpbf16ps"):
            mod.linear_path(x, w, b, 5)
        return
    _check(mod.linear_path(x, w, b, 5), x, w, b)
    _check(mod.linear_path(x, w, None, 5), x, w, None)
    with pytest.raises(RuntimeError, match="even K"):
        mod.linear_path(torch.ones(2, 33).bfloat16(), torch.ones(4, 33).bfloat16(), None, 5)
