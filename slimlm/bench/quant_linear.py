"""``slimlm bench linear``: quantized linear kernels against the bf16 dense kernel on tinyllama-1.1b's matrices.

Each kernel multiplies a bf16 ``x [M, K]`` by one of the merged decoder-layer weights (qkv, o, gate_up,
down); kernels run interleaved (A B C .., A B C ..) and medians are reported, since this machine's memory
bandwidth moves by tens of percent within seconds. Every kernel cycles through enough copies of its weight
to exceed the last-level cache several times over, so each call reads its weight from memory, as decode
does. Per call the report gives the time, the weight bytes read per second against the read bandwidth
measured in the same run (``slimlm.bench.bandwidth``), and the speedup over bf16; per M, the sum over the
four matrices (one decoder layer's linears) gives the layer speedup.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimlm.bench.bandwidth import read_bandwidth_gbs

# tinyllama-1.1b: hidden 2048, 32 heads + 4 kv heads of 64, intermediate 5632 (merged qkv and gate_up).
SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}
KERNELS = ("bf16", "int8", "int4", "w8a8", "nf4", "torch-int8", "torch-int4")


@dataclass
class LinearBenchConfig:
    ms: tuple[int, ...] = (1, 4, 16, 64)
    kernels: tuple[str, ...] = KERNELS
    shapes: tuple[str, ...] = tuple(SHAPES)
    repeats: int = 15
    cold_mb: int = 96  # weight bytes cycled through per kernel and matrix (3x the 32 MB L3 here)
    threads: int | None = None
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.kernels) - set(KERNELS) | set(self.shapes) - set(SHAPES)
        if unknown:
            raise ValueError(f"unknown kernels or shapes: {sorted(unknown)}")
        if "bf16" not in self.kernels:
            raise ValueError("the bf16 kernel is the baseline and must be included")
        if self.repeats < 1 or any(m < 1 for m in self.ms):
            raise ValueError("repeats and M must be >= 1")


def _ours(codes, scales, spec) -> tuple[Callable, int]:
    from slimlm.kernels import cpu_quant

    kernel = cpu_quant.prepare(codes, scales, None, None, spec)
    return (lambda x: kernel(x, None)), kernel.nbytes


def _make(kind: str, n: int, k: int, g: torch.Generator) -> tuple[Callable, int]:
    """One copy of ``kind``'s weight: ``(x -> y, weight bytes read per call)``."""
    from slimlm.kernels import cpu_linear
    from slimlm.kernels.quant import QuantLinearSpec

    if kind == "bf16":
        w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
        linear = cpu_linear.load().linear
        return (lambda x: linear(x, w, None)), w.nbytes
    scale = torch.rand(n, 1, generator=g) * 1e-3 + 1e-4
    if kind in ("int8", "w8a8", "torch-int8"):
        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        if kind == "torch-int8":
            s = scale.view(-1).bfloat16()
            return (lambda x: torch.ops.aten._weight_int8pack_mm(x, codes, s)), codes.nbytes + s.nbytes
        return _ours(codes, scale, QuantLinearSpec(8, -1, "int", "int8-token" if kind == "w8a8" else None))
    group = 64 if kind == "nf4" else 128
    scales = scale.expand(n, k // group).contiguous()
    if kind == "nf4":
        return _ours(torch.randint(0, 16, (n, k), generator=g, dtype=torch.int8), scales, QuantLinearSpec(4, 64, "nf4"))
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    if kind == "int4":
        return _ours(codes, scales, QuantLinearSpec(4, group))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes + 8).to(torch.int32), 1)
    # scale and zero per group as [K / group, N, 2]: w = (q - 8) * s = q * s + (-8 * s)
    sz = torch.stack([scales.T, -8 * scales.T], dim=-1).bfloat16().contiguous()
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)), packed.nbytes + sz.nbytes


def _probe_gbs(buf: torch.Tensor, repeats: int = 5) -> float:
    """Best-of-``repeats`` GB/s of the kernels' own read pattern (8 interleaved 4 KB streams) over ``buf``."""
    from slimlm.kernels import cpu_quant

    probe = cpu_quant.load().read_probe
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = probe(buf)
        best = max(best, n / (time.perf_counter() - start) / 1e9)
    return best


def _bandwidth(buf: torch.Tensor) -> float:
    """The better of ``slimlm.bench.bandwidth`` (torch.sum) and the probe: both stall on a busy machine."""
    return max(read_bandwidth_gbs(), _probe_gbs(buf))


def run_linear_bench(config: LinearBenchConfig) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    g = torch.Generator().manual_seed(config.seed)
    buf = torch.ones(512 * 2**20, dtype=torch.uint8)
    bandwidth = [_bandwidth(buf)]
    rows = []
    for shape in config.shapes:
        n, k = SHAPES[shape]
        copies: dict[str, list[Callable]] = {}
        nbytes: dict[str, int] = {}
        for kind in config.kernels:
            fn, size = _make(kind, n, k, g)
            count = max(2, math.ceil(config.cold_mb * 2**20 / size))
            copies[kind] = [fn] + [_make(kind, n, k, g)[0] for _ in range(count - 1)]
            nbytes[kind] = size
        for m in config.ms:
            x = torch.randn(m, k, generator=g).bfloat16()
            times: dict[str, list[float]] = {kind: [] for kind in config.kernels}
            for rep in range(config.repeats + 1):  # round 0 warms up
                for kind, fns in copies.items():
                    fn = fns[rep % len(fns)]
                    start = time.perf_counter()
                    fn(x)
                    if rep:
                        times[kind].append(time.perf_counter() - start)
            base = statistics.median(times["bf16"])
            for kind, samples in times.items():
                t = statistics.median(samples)
                rows.append(
                    {
                        "shape": shape,
                        "n": n,
                        "k": k,
                        "m": m,
                        "kernel": kind,
                        "median_ms": t * 1e3,
                        "weight_mb": nbytes[kind] / 2**20,
                        "weight_gbs": nbytes[kind] / t / 1e9,
                        "speedup_vs_bf16": base / t,
                    }
                )
        bandwidth.append(_bandwidth(buf))
    layer = []
    for m in config.ms:
        total = {
            kind: sum(r["median_ms"] for r in rows if r["m"] == m and r["kernel"] == kind) for kind in config.kernels
        }
        for kind, t in total.items():
            layer.append({"m": m, "kernel": kind, "ms": t, "speedup_vs_bf16": total["bf16"] / t})
    bw = statistics.median(bandwidth)
    from slimlm.kernels import cpu_quant

    serial_fallbacks = cpu_quant.load().config()["late_helper_events"]
    for r in rows:
        r["pct_of_read_bw"] = 100 * r["weight_gbs"] / bw
    return {
        "threads": torch.get_num_threads(),
        "read_bandwidth_gbs": bw,
        "read_bandwidth_samples_gbs": bandwidth,
        "serial_fallbacks": serial_fallbacks,  # quantized calls that found a stalled thread and went serial
        "rows": rows,
        "layer": layer,
    }


def format_report(report: dict) -> str:
    lines = [
        f"threads {report['threads']}, read bandwidth {report['read_bandwidth_gbs']:.1f} GB/s "
        f"(samples {', '.join(f'{b:.1f}' for b in report['read_bandwidth_samples_gbs'])}), "
        f"{report['serial_fallbacks']} serial fallbacks of the quantized kernels",
        f"{'shape':8} {'M':>3} {'kernel':11} {'ms':>8} {'MB':>7} {'GB/s':>6} {'%bw':>5} {'vs bf16':>7}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['shape']:8} {r['m']:>3} {r['kernel']:11} {r['median_ms']:8.3f} {r['weight_mb']:7.1f} "
            f"{r['weight_gbs']:6.1f} {r['pct_of_read_bw']:5.0f} {r['speedup_vs_bf16']:6.2f}x"
        )
    lines.append("one decoder layer's linears (sum of the medians):")
    for r in report["layer"]:
        lines.append(f"  M={r['m']:<3} {r['kernel']:11} {r['ms']:8.3f} ms  {r['speedup_vs_bf16']:5.2f}x")
    return "\n".join(lines)


def _cmd(a: argparse.Namespace) -> int:
    config = LinearBenchConfig(
        ms=tuple(a.m),
        kernels=tuple(a.kernels),
        shapes=tuple(a.shapes),
        repeats=a.repeats,
        cold_mb=a.cold_mb,
        threads=a.threads,
    )
    report = run_linear_bench(config)
    print(json.dumps(report, indent=2) if a.json else format_report(report))
    return 0


def register(bench_subparsers) -> None:
    """Adds ``linear`` to the ``slimlm bench`` subcommands."""
    p = bench_subparsers.add_parser("linear", help="quantized linear kernels vs bf16 on tinyllama-1.1b matrices")
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64], help="rows of x (tokens)")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds (medians reported)")
    p.add_argument("--cold-mb", type=int, default=96, help="weight bytes cycled through per kernel and matrix")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd)
