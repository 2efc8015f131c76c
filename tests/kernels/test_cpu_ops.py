"""Parity of the C++ CPU kernels (slimlm/kernels/cpu) with the pure-PyTorch reference ops."""

from __future__ import annotations

import pytest
import torch

from slimlm.kernels import REFERENCE_OPS, cpu, get_ops, reference


@pytest.fixture(scope="module")
def ops():
    try:
        return get_ops("cpu", backend="cpu")
    except RuntimeError as exc:  # pragma: no cover - only without a compiler
        pytest.fail(f"C++ kernels failed to build: {exc}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype)


def _cos_sin(max_positions: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _qkv_views(T, hq, hk, d, dtype, seed):
    """q, k, v as strided views of one merged projection output, like the model produces."""
    qkv = _randn(T, (hq + 2 * hk) * d, dtype=dtype, seed=seed)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    return qkv, q.unflatten(-1, (hq, d)), k.unflatten(-1, (hk, d)), v.unflatten(-1, (hk, d))


def _assert_bf16_close(actual, expected, min_exact=0.98):
    """At most one bf16 ulp apart everywhere, and (the roundings being mimicked) mostly bit-identical."""
    assert actual.dtype == expected.dtype
    a, e = actual.float(), expected.float()
    torch.testing.assert_close(a, e, rtol=2**-7, atol=1e-5)
    exact = (a == e).float().mean().item()
    assert exact >= min_exact, f"only {exact:.3f} of the elements match exactly"


TOL32 = dict(rtol=1e-5, atol=1e-6)
LOW = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------ norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 576), (7, 1000), (3, 4, 20)])
def test_rms_norm(ops, dtype, shape):
    x = _randn(*shape, dtype=dtype, seed=1, scale=0.5)
    w = _randn(shape[-1], dtype=dtype, seed=2)
    out = ops.rms_norm(x, w, 1e-5)
    ref = reference.rms_norm(x, w, 1e-5)
    assert out.shape == ref.shape and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, **TOL32)
    else:
        _assert_bf16_close(out, ref)


@pytest.mark.parametrize("hq,hk", [(9, 3), (2, 1)])
def test_rms_norm_strided_heads(ops, hq, hk):
    """q_norm / k_norm style: per-head RMSNorm of strided [T, H, D] views of the merged qkv output."""
    _, q, k, _ = _qkv_views(5, hq, hk, 64, torch.float32, seed=3)
    w = _randn(64, seed=4)
    for x in (q, k, k[::2]):
        assert not x.is_contiguous()
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), **TOL32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_add_rms_norm(ops, dtype):
    x = _randn(6, 576, dtype=dtype, seed=5)
    res = _randn(6, 576, dtype=dtype, seed=6, scale=4.0)
    w = _randn(576, dtype=dtype, seed=7)
    x_ref, res_ref = x.clone(), res.clone()
    reference.fused_add_rms_norm(x_ref, res_ref, w, 1e-6)
    out_x, out_res = ops.fused_add_rms_norm(x, res, w, 1e-6)
    assert out_x is x and out_res is res  # in place, same objects back
    if dtype == torch.float32:
        torch.testing.assert_close(res, res_ref, rtol=0, atol=0)
        torch.testing.assert_close(x, x_ref, **TOL32)
    else:
        assert torch.equal(res, res_ref)
        _assert_bf16_close(x, x_ref)


def test_fused_add_rms_norm_strided(ops):
    base = _randn(4, 2 * 96, seed=8)
    x = base[:, :96]  # row stride 192
    res = _randn(4, 96, seed=9)
    w = _randn(96, seed=10)
    x_ref, res_ref = x.clone(), res.clone()
    reference.fused_add_rms_norm(x_ref, res_ref, w, 1e-5)
    ops.fused_add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(x, x_ref, **TOL32)
    torch.testing.assert_close(res, res_ref, **TOL32)
    torch.testing.assert_close(base[:, 96:], _randn(4, 2 * 96, seed=8)[:, 96:], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_apply_rope_strided(ops, dtype, d):
    T, hq, hk = 11, 9, 3
    qkv, q, k, _ = _qkv_views(T, hq, hk, d, dtype, seed=11)
    positions = torch.randint(0, 500, (T,), generator=_gen(12))
    cos_sin = _cos_sin(512, d)
    ref_qkv, rq, rk, _ = _qkv_views(T, hq, hk, d, dtype, seed=11)  # same data, separate storage
    reference.apply_rope(rq, rk, positions, cos_sin)
    assert ops.apply_rope(q, k, positions, cos_sin) is None
    if dtype == torch.float32:
        torch.testing.assert_close(qkv, ref_qkv, **TOL32)
    else:
        _assert_bf16_close(qkv, ref_qkv, min_exact=0.995)
    original, _, _, _ = _qkv_views(T, hq, hk, d, dtype, seed=11)
    assert torch.equal(qkv[:, (hq + hk) * d :], original[:, (hq + hk) * d :])  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_cache(ops, dtype):
    T, hq, hk, d, bs, nblocks = 9, 9, 3, 64, 16, 12
    qkv, q, k, v = _qkv_views(T, hq, hk, d, dtype, seed=13)
    positions = torch.randint(0, 300, (T,), generator=_gen(14))
    slots = torch.randperm(nblocks * bs, generator=_gen(15))[:T]
    slots[[2, 5]] = -1  # padding tokens: not written
    cos_sin = _cos_sin(512, d)
    k_cache = _randn(nblocks, hk, bs, d, dtype=dtype, seed=16)
    v_cache = _randn(nblocks, hk, bs, d, dtype=dtype, seed=17)

    ref_q, ref_k, ref_v = q.clone(), k.clone(), v.clone()
    ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
    reference.apply_rope(ref_q, ref_k, positions, cos_sin)
    reference.write_kv_cache(ref_k, ref_v, ref_kc, ref_vc, slots)

    ops.rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    if dtype == torch.float32:
        for a, b in ((q, ref_q), (k, ref_k), (k_cache, ref_kc)):
            torch.testing.assert_close(a, b, **TOL32)
    else:
        for a, b in ((q, ref_q), (k, ref_k), (k_cache, ref_kc)):
            _assert_bf16_close(a, b, min_exact=0.995)
    assert torch.equal(v, ref_v)
    assert torch.equal(v_cache, ref_vc)  # written rows equal v, the rest untouched
    untouched = torch.ones(nblocks * bs, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    rows = k_cache.transpose(1, 2).flatten(0, 1)  # [slot, hk, d]
    original = _randn(nblocks, hk, bs, d, dtype=dtype, seed=16).transpose(1, 2).flatten(0, 1)
    assert torch.equal(rows[untouched], original[untouched])
    assert not torch.equal(rows[~untouched], original[~untouched])


# -------------------------------------------------------------------------------------------- attention


def _attention_case(hq, hk, d, dtype, window, seed, block_dtype=torch.int32, bs=16):
    """Mixed batch: a 37-token prefill, three decodes, and a 10-row prefill chunk resuming mid-sequence."""
    q_lens = [37, 1, 1, 1, 10]
    seq_lens = [37, 50, 200, 129, 75]
    T = sum(q_lens)
    max_blocks = max((s + bs - 1) // bs for s in seq_lens) + 1
    nblocks = len(seq_lens) * max_blocks + 3
    ids = torch.randperm(nblocks, generator=_gen(seed))  # scattered, non-contiguous blocks
    block_tables = ids[: len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks).to(block_dtype)
    k_cache = _randn(nblocks, hk, bs, d, dtype=dtype, seed=seed + 1)
    v_cache = _randn(nblocks, hk, bs, d, dtype=dtype, seed=seed + 2)
    _, q, _, _ = _qkv_views(T, hq, hk, d, dtype, seed=seed + 3)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return dict(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=qsl,
        scale=d**-0.5,
        sliding_window=window,
    )


def _upcast(case):
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}


@pytest.mark.parametrize(
    "hq,hk,d,window",
    [(9, 3, 64, 0), (9, 3, 64, 24), (9, 3, 80, 0), (8, 1, 128, 0), (8, 1, 128, 40), (4, 4, 64, 7)],
)
def test_paged_attention_fp32(ops, hq, hk, d, window):
    case = _attention_case(hq, hk, d, torch.float32, window, seed=20 + d + hk)
    assert not case["q"].is_contiguous()
    out = ops.paged_attention(**case)
    ref = reference.paged_attention(**case)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("hq,hk,d,window", [(9, 3, 64, 0), (9, 1, 128, 30), (6, 3, 80, 0)])
def test_paged_attention_low_precision(ops, dtype, hq, hk, d, window):
    case = _attention_case(hq, hk, d, dtype, window, seed=40 + d)
    out = ops.paged_attention(**case)
    assert out.dtype == dtype
    # fp32 accumulation, rounded once: close to the exact result on the same (rounded) inputs ...
    exact = reference.paged_attention(**_upcast(case))
    torch.testing.assert_close(out.float(), exact, rtol=2**-7, atol=2e-3)
    # ... and no further from it than the reference's own low-precision arithmetic.
    ref = reference.paged_attention(**case)
    assert (out.float() - exact).abs().max() <= (ref.float() - exact).abs().max() + 1e-3


@pytest.fixture(scope="module")
def ops_8wide():
    """The same kernels built with the 8-float attention only (what CPUs without AVX-512 run)."""
    return cpu.load(extra_cflags=("-DSLIMLM_NO_ATTN512",))


@pytest.mark.parametrize("d", [32, 64, 96, 128])
@pytest.mark.parametrize("bs,window", [(16, 0), (8, 24), (32, 0), (5, 0), (16, 33)])
def test_paged_attention_bf16_every_head_dim(ops, ops_8wide, d, bs, window):
    """bf16 at the head sizes of the 512-bit kernel (and the 8-float one), odd block sizes, windows:
    both close to the exact result, the 512-bit one no further from it than the 8-float one (plus noise)."""
    case = _attention_case(6, 2, d, torch.bfloat16, window, seed=90 + d + bs, bs=bs)
    exact = reference.paged_attention(**_upcast(case))
    out, out8 = ops.paged_attention(**case), ops_8wide.paged_attention(**case)
    for o in (out, out8):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), exact, rtol=2**-7, atol=2e-3)
    assert (out.float() - exact).abs().max() <= (out8.float() - exact).abs().max() + 2**-8


def test_paged_attention_variants(ops):
    """int64 block tables / lengths, block size 8 and 32, positional call with the default window."""
    for bs in (8, 32):
        case = _attention_case(6, 2, 64, torch.float32, 0, seed=60 + bs, block_dtype=torch.int64, bs=bs)
        case["seq_lens"] = case["seq_lens"].long()
        case["query_start_loc"] = case["query_start_loc"].long()
        args = [case[k] for k in ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc")]
        out = ops.paged_attention(*args, case["scale"])
        ref = reference.paged_attention(*args, case["scale"])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_paged_attention_decode_batch_threads(ops):
    """Enough decodes to take the multi-threaded path; a skipped (empty) sequence in the middle."""
    hq, hk, d, bs = 8, 2, 64, 16
    lens = [300, 17, 0, 1024, 64, 513]
    q_lens = [1 if n else 0 for n in lens]
    seq_lens = [max(n, 1) if q else 5 for n, q in zip(lens, q_lens, strict=True)]
    max_blocks = max(seq_lens) // bs + 1
    nblocks = len(lens) * max_blocks
    block_tables = torch.randperm(nblocks, generator=_gen(70)).view(len(lens), max_blocks).int()
    k_cache = _randn(nblocks, hk, bs, d, seed=71)
    v_cache = _randn(nblocks, hk, bs, d, seed=72)
    q = _randn(sum(q_lens), hq, d, seed=73)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    args = (q, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32), qsl, 0.125, 0)
    torch.testing.assert_close(ops.paged_attention(*args), reference.paged_attention(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [2, 3])
def test_paged_attention_split_context(ops, dtype, threads):
    """Few long sequences on several threads: the context is split across threads and merged."""
    hq, hk, d, bs = 4, 1, 64, 16  # two work items only: fewer than 2 per thread, so they get split
    q_lens, seq_lens = [1, 3], [1500, 900]  # a decode and a 3-row chunk, both with long contexts
    max_blocks = max(seq_lens) // bs + 1
    nblocks = len(seq_lens) * max_blocks
    block_tables = torch.randperm(nblocks, generator=_gen(74)).view(len(seq_lens), max_blocks).int()
    k_cache = _randn(nblocks, hk, bs, d, dtype=dtype, seed=75)
    v_cache = _randn(nblocks, hk, bs, d, dtype=dtype, seed=76)
    # peaked scores, so that a wrong merge of the per-split maxima shows
    q = _randn(sum(q_lens), hq, d, dtype=dtype, seed=77, scale=3.0)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for window in (0, 700):
            args = (q, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32), qsl)
            out = ops.paged_attention(*args, d**-0.5, window)
            exact = reference.paged_attention(
                *(t.float() if t.is_floating_point() else t for t in args), d**-0.5, window
            )
            if dtype == torch.float32:
                torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
            else:
                torch.testing.assert_close(out.float(), exact, rtol=2**-7, atol=2e-3)
    finally:
        torch.set_num_threads(before)


def test_paged_attention_rejects_bad_input(ops):
    case = _attention_case(9, 3, 64, torch.float32, 0, seed=80)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        ops.paged_attention(**{**case, "q": case["q"][:, :8]})
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.paged_attention(**{**case, "q": case["q"].bfloat16()})


# --------------------------------------------------------------------------------------------- silu*up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2 * 1536), (5, 2 * 100), (2, 3, 2 * 36)])
def test_silu_and_mul(ops, dtype, shape):
    x = _randn(*shape, dtype=dtype, seed=90, scale=4.0)
    out = ops.silu_and_mul(x)
    ref = reference.silu_and_mul(x)
    assert out.shape == ref.shape and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        _assert_bf16_close(out, ref)


# ------------------------------------------------------------------------------------------- selection


def test_get_ops_selects_cpu_kernels(ops, monkeypatch):
    monkeypatch.delenv("SLIMLM_KERNELS", raising=False)
    assert ops.name == "cpu"
    assert get_ops("cpu") is ops and get_ops(torch.device("cpu"), "auto") is ops
    assert type(ops.paged_attention).__name__ == "builtin_function_or_method"  # the raw C++ entry point
    assert get_ops("cpu", "torch") is REFERENCE_OPS
    assert get_ops("meta") is REFERENCE_OPS  # non-CPU devices keep the reference ops
    with pytest.raises(ValueError):
        get_ops("cpu", "cuda-magic")


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv("SLIMLM_KERNELS", "torch")
    assert get_ops("cpu") is REFERENCE_OPS
    assert get_ops("cpu", "cpu") is REFERENCE_OPS


def test_build_failure_falls_back_once(monkeypatch, caplog):
    import slimlm.kernels as kernels
    from slimlm.kernels import cpu

    def broken(*_args, **_kwargs):
        raise OSError("no compiler here")

    monkeypatch.delenv("SLIMLM_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_cpu_ops", None)
    monkeypatch.setattr(kernels, "_cpu_error", None)
    monkeypatch.setattr(kernels, "_warned", False)
    monkeypatch.setattr(cpu, "load", broken)
    with caplog.at_level("WARNING", logger="slimlm.kernels"):
        assert get_ops("cpu") is REFERENCE_OPS
        assert get_ops("cpu", "auto") is REFERENCE_OPS
    warnings = [r for r in caplog.records if "C++ CPU kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="could not build the C\\+\\+ CPU kernels"):
        get_ops("cpu", "cpu")
