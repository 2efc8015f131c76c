"""Interleaved A/B of kernel builds that differ in compile-time constants, on cold weights.

usage: .venv/bin/python scripts/bench/kernel_builds.py linear|quant SPEC SPEC ...   (SPEC: NAME=V,NAME=V
       without the SLIMLM_ prefix, e.g. PREFETCH_BYTES=0; an empty SPEC '' is the default build)
       env MS=1,2,5,8 picks the rows of x; KINDS=int8,int4,w8a8,nf4 the quantized kernels (int8,int4).

Per call each build gets its own copy of the weight from a set larger than the last-level cache, so no
build reads what another has just loaded (with one shared weight the second build read it from cache and
looked 2x faster). Prints the median microseconds per call.
"""

import os
import statistics
import sys
import time

import torch

from slimlm.kernels import cpu_linear, cpu_quant
from slimlm.kernels.quant import QuantLinearSpec

LINEAR_SHAPES = {
    "py_qkv": (640, 384),
    "py_gate_up": (2048, 384),
    "py_down": (384, 1024),
    "py_lm_head": (8192, 384),
    "smol_gate_up": (3072, 576),
    "tl_gate_up": (11264, 2048),
}
QUANT_SHAPES = {"tl_gate_up": (11264, 2048), "tl_down": (2048, 5632), "py_gate_up": (2048, 384)}
COLD_BYTES = 96_000_000


def defines(spec: str) -> dict[str, int]:
    return {f"SLIMLM_{kv.split('=')[0]}": int(kv.split("=")[1]) for kv in spec.split(",") if kv}


def linear_kernels(spec: str, copies: list) -> list:
    """Callables ``(x, bias)`` like the quantized kernels, one per weight copy."""
    lin = cpu_linear.load(defines=defines(spec)).linear
    return [lambda x, bias, w=w: lin(x, w, bias) for w in copies]


def quant_kernels(spec: str, copies: list) -> list:
    return [cpu_quant.prepare(codes, scales, None, None, qs, defines=defines(spec)) for codes, scales, qs in copies]


def main() -> None:
    kind, specs = sys.argv[1], sys.argv[2:]
    ms = [int(m) for m in os.environ.get("MS", "1,2,5,8").split(",")]
    g = torch.Generator().manual_seed(0)
    qkinds = os.environ.get("KINDS", "int8,int4").split(",")
    for qkind in ("bf16",) if kind == "linear" else qkinds:
        for name, (n, k) in (LINEAR_SHAPES if kind == "linear" else QUANT_SHAPES).items():
            count = max(2, COLD_BYTES // (n * k * (2 if kind == "linear" else 1)))
            if kind == "linear":
                copies = [torch.randn(n, k, generator=g).bfloat16() for _ in range(count)]
                kernels = {s: linear_kernels(s, copies) for s in specs}
            else:
                copies = []
                for _ in range(count):
                    scale = torch.rand(n, 1, generator=g) * 1e-3 + 1e-4
                    if qkind in ("int8", "w8a8"):
                        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
                        act = "int8-token" if qkind == "w8a8" else None
                        copies.append((codes, scale, QuantLinearSpec(8, -1, "int", act)))
                    elif qkind == "nf4":
                        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int8)
                        copies.append((codes, scale.expand(n, k // 64).contiguous(), QuantLinearSpec(4, 64, "nf4")))
                    else:
                        group = 32 if qkind == "int4-g32" else 128
                        codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
                        copies.append((codes, scale.expand(n, k // group).contiguous(), QuantLinearSpec(4, group)))
                kernels = {s: quant_kernels(s, copies) for s in specs}
            for m in ms:
                x = torch.randn(m, k).bfloat16()
                times = {s: [] for s in specs}
                for r in range(40):
                    for i, s in enumerate(specs):
                        fn = kernels[s][(r * len(specs) + i) % count]
                        t0 = time.perf_counter_ns()
                        fn(x, None)
                        times[s].append(time.perf_counter_ns() - t0)
                cells = "  ".join(f"{s or 'default'}: {statistics.median(v[4:]) / 1000:8.1f}" for s, v in times.items())
                print(f"{qkind} {name} {n}x{k} M={m}: {cells}", flush=True)


if __name__ == "__main__":
    main()
