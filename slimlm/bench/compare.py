"""``slimlm bench compare BASE OTHER ...``: decode speed of several checkpoints, interleaved, as ratios.

The answer to "is the int4 model faster than bf16, at batch 1 and under load?" on a machine whose memory
bandwidth swings by 1.6x within seconds: every model is loaded into its own engine in one process, and the
rounds alternate between them (A B C A B C ...), so each swing lands on every model; figures are medians
and ratios are against the first model. Per concurrency it reports the decode rate (concurrency / median
time per output token: the steady state, prefill excluded) and the total output tok/s (output tokens /
wall time, prefill included), plus each checkpoint's size on disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["CompareConfig", "format_compare", "run_compare"]


@dataclass
class CompareConfig:
    models: list[str]
    concurrency: list[int] = field(default_factory=lambda: [1, 16])
    input_len: int = 16
    output_len: int = 64
    rounds: int = 3
    dtype: str | None = None  # engine dtype for every model (None: each engine's default)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if not self.models:
            raise ValueError("give at least one model")
        if min(self.concurrency, default=0) < 1 or self.input_len < 1 or self.output_len < 2 or self.rounds < 1:
            raise ValueError("concurrency values and input_len must be >= 1, output_len >= 2, rounds >= 1")


def _checkpoint_bytes(path: str) -> int | None:
    files = list(Path(path).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def run_compare(config: CompareConfig) -> dict:
    from slimlm.bench.throughput import output_tok_s, random_prompts, run_batch
    from slimlm.engine.config import EngineConfig
    from slimlm.engine.engine import Engine

    engines = {
        m: Engine(EngineConfig(model=m, dtype=config.dtype, max_num_seqs=max(config.concurrency)))
        for m in tqdm(config.models, desc="load", disable=not config.progress)
    }
    vocab = min(e.model_config.vocab_size for e in engines.values())
    prompts = random_prompts(max(config.concurrency), config.input_len, vocab, config.seed)
    for engine in engines.values():  # warm-up: kernels built and prepared, first allocations
        run_batch(engine, prompts[:1], 4)
    decode = {(m, c): [] for m in engines for c in config.concurrency}
    total = {(m, c): [] for m in engines for c in config.concurrency}
    for _ in tqdm(range(config.rounds), desc="rounds (interleaved)", disable=not config.progress):
        for c in config.concurrency:
            for m, engine in engines.items():
                run = run_batch(engine, prompts[:c], config.output_len)
                decode[(m, c)].append(c / statistics.median(run["tpot_s"]))
                total[(m, c)].append(output_tok_s(run))
    base = config.models[0]
    rows = []
    for c in config.concurrency:
        for m in engines:
            d, t = statistics.median(decode[(m, c)]), statistics.median(total[(m, c)])
            rows.append(
                {
                    "model": m,
                    "concurrency": c,
                    "decode_tok_s": d,
                    "decode_runs": decode[(m, c)],
                    "output_tok_s": t,
                    "output_runs": total[(m, c)],
                    "decode_vs_base": d / statistics.median(decode[(base, c)]),
                    "output_vs_base": t / statistics.median(total[(base, c)]),
                }
            )
    sizes = {m: _checkpoint_bytes(m) for m in engines}
    return {
        "config": asdict(config),
        "base": base,
        "dtype": {m: str(e.dtype).removeprefix("torch.") for m, e in engines.items()},
        "checkpoint_bytes": sizes,
        "size_vs_base": {m: (s / sizes[base] if s and sizes[base] else None) for m, s in sizes.items()},
        "rows": rows,
    }


def format_compare(r: dict) -> str:
    lines = [
        f"ratios against {r['base']}; medians of {r['config']['rounds']} interleaved rounds, "
        f"{r['config']['input_len']} in / {r['config']['output_len']} out",
        "",
        "| model | concurrency | decode tok/s | x base | output tok/s (incl. prefill) | x base | size MB | x base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        m = row["model"]
        size = r["checkpoint_bytes"][m]
        ratio = r["size_vs_base"][m]
        lines.append(
            f"| {m} | {row['concurrency']} | {row['decode_tok_s']:.1f} | {row['decode_vs_base']:.2f} | "
            f"{row['output_tok_s']:.1f} | {row['output_vs_base']:.2f} | "
            f"{'-' if size is None else f'{size / 1e6:.0f}'} | {'-' if ratio is None else f'{ratio:.2f}'} |"
        )
    return "\n".join(lines)


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "compare", help="decode speed of several checkpoints, interleaved in one process, as ratios to the first"
    )
    p.add_argument("models", nargs="+", help="checkpoints; the first is the base of the ratios")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default=None, help="engine dtype for every model (default: each engine's choice)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_compare)


def cmd_bench_compare(a: argparse.Namespace) -> int:
    config = CompareConfig(
        models=a.models,
        concurrency=a.concurrency,
        input_len=a.input_len,
        output_len=a.output_len,
        rounds=a.rounds,
        dtype=a.dtype,
        progress=not a.json,
    )
    report = run_compare(config)
    print(json.dumps(report, indent=2) if a.json else format_compare(report))
    return 0
