"""The trade-off table: for each compression method, size, decode speed and accuracy against the base.

``slimlm demo`` runs it on the shipped ``models/py-target``: compress with each method (into a temporary
directory), then measure every variant the same way in one process:

- size: bytes of the checkpoint's safetensors; ``memory x`` = base bytes / variant bytes;
- batch-1 greedy decode tok/s through the engine, rounds interleaved across variants (A B C A B C ...,
  medians) because this machine's bandwidth drifts within seconds;
- perplexity (GPTQ protocol on ``stdlib-test``) and mean KL(base || variant) on the same windows, in float32
  compute so the numbers describe the weights, not the runtime dtype.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

__all__ = ["DEFAULT_METHODS", "TradeoffConfig", "format_table", "run_tradeoff"]

# label -> (method, options for method_recipe)
DEFAULT_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn-w8": ("rtn", {"bits": 8}),
    "rtn-w4-g128": ("rtn", {"bits": 4, "group_size": 128}),
    "gptq-w4-g128": ("gptq", {"bits": 4, "group_size": 128}),
    "awq-w4-g128": ("awq", {"bits": 4, "group_size": 128}),
    "smoothquant-w8a8": ("smoothquant", {}),
    "nf4": ("nf4", {}),
    "rtn-w3-g128": ("rtn", {"bits": 3, "group_size": 128}),
    "gptq-w3-g128": ("gptq", {"bits": 3, "group_size": 128}),
}


@dataclass
class TradeoffConfig:
    model: str = "models/py-target"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    eval_data: str = "stdlib-test"
    eval_tokens: int = 65536  # cap on the evaluation tokens (0: the whole split)
    seq_len: int = 1024
    eval_memory_mib: int = 4096  # float32 variants held at once while evaluating
    calib_tokens: int | None = None  # None: the compressor's CPU default
    decode_tokens: int = 64
    rounds: int = 3
    work_dir: str | None = None  # keep the compressed checkpoints here (default: a temporary directory)
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in DEFAULT_METHODS]
        if unknown:
            raise ValueError(f"unknown method label(s) {unknown}; choose from {', '.join(DEFAULT_METHODS)}")
        if self.rounds < 1 or self.decode_tokens < 2:
            raise ValueError("rounds must be >= 1 and decode_tokens >= 2")


def _checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _compress_all(cfg: TradeoffConfig, work: Path) -> dict[str, dict[str, Any]]:
    from slimlm.compress.calibration import CalibrationConfig
    from slimlm.compress.recipe import method_recipe
    from slimlm.compress.run import compress_checkpoint

    reports = {}
    for label in tqdm(cfg.methods, desc="compress", disable=not cfg.progress):
        method, options = DEFAULT_METHODS[label]
        reports[label] = compress_checkpoint(
            cfg.model,
            work / label,
            lambda config, method=method, options=options: method_recipe(method, config, **options),
            CalibrationConfig(tokens=cfg.calib_tokens),
        )
    return reports


def _decode_speeds(paths: dict[str, Path], cfg: TradeoffConfig) -> dict[str, float]:
    """Median batch-1 greedy decode tok/s of each variant, rounds interleaved across variants."""
    from slimlm import LLM, SamplingParams

    llms = {label: LLM(str(p)) for label, p in paths.items()}
    prompt = "def parse_args(argv):\n"
    params = SamplingParams(temperature=0.0, max_tokens=cfg.decode_tokens, ignore_eos=True)
    for llm in llms.values():  # warm-up: kernel preparation, first allocations
        llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times: dict[str, list[float]] = {label: [] for label in llms}
    for _ in tqdm(range(cfg.rounds), desc="decode rounds", disable=not cfg.progress):
        for label, llm in llms.items():
            # Decode time = time to N tokens minus time to the first one (the prefill), same prompt.
            t0 = time.perf_counter()
            llm.generate(prompt, first, use_tqdm=False)
            t1 = time.perf_counter()
            llm.generate(prompt, params, use_tqdm=False)
            t2 = time.perf_counter()
            times[label].append((cfg.decode_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9))
    return {label: statistics.median(v) for label, v in times.items()}


def _accuracy(paths: dict[str, Path], cfg: TradeoffConfig) -> dict[str, dict[str, float]]:
    """Perplexity and KL of every variant; the base runs once per window for a whole group of variants
    (it was half the evaluation time), as many variants per group as ``cfg.eval_memory_mib`` holds."""
    from slimlm.data.corpus import load_text
    from slimlm.eval.kl_div import kl_divergences
    from slimlm.eval.perplexity import perplexity, tokenize
    from slimlm.model.loader import load_model

    base = load_model(cfg.model, dtype="float32")
    ids = tokenize(base.tokenizer, load_text(cfg.eval_data))
    cap = cfg.eval_tokens or None
    per_model = sum(p.numel() * p.element_size() for p in base.model.parameters())
    per_group = max(1, cfg.eval_memory_mib * 2**20 // max(per_model, 1))
    variants = [label for label in paths if label != "base"]
    scores = {}
    bar = tqdm(total=len(variants), desc="evaluate", disable=not cfg.progress)
    for i in range(0, len(variants), per_group):
        group = {label: load_model(paths[label], dtype="float32").model for label in variants[i : i + per_group]}
        scores.update(kl_divergences(group, base.model, ids, cfg.seq_len, max_tokens=cap, progress=False))
        bar.update(len(group))
        del group
    bar.close()
    if scores:
        base_ppl = next(iter(scores.values())).base_perplexity
    else:
        base_ppl = perplexity(base.model, ids, cfg.seq_len, max_tokens=cap).perplexity
    result = {"base": {"perplexity": base_ppl, "kl_div": 0.0}}
    for label in variants:
        result[label] = {"perplexity": scores[label].perplexity, "kl_div": scores[label].kl_div}
    return result


def run_tradeoff(cfg: TradeoffConfig) -> dict[str, Any]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slimlm-demo-") as tmp:
        work = Path(cfg.work_dir) if cfg.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        reports = _compress_all(cfg, work)
        paths = {"base": Path(cfg.model), **{label: work / label for label in cfg.methods}}
        accuracy = _accuracy(paths, cfg)
        speeds = _decode_speeds(paths, cfg)
        sizes = {label: _checkpoint_bytes(p) for label, p in paths.items()}
    base_ppl, base_speed, base_size = accuracy["base"]["perplexity"], speeds["base"], sizes["base"]
    rows = []
    for label in paths:
        method, options = DEFAULT_METHODS.get(label, ("none", {}))
        scheme = reports[label]["scheme"] if label in reports else "bf16"
        ppl = accuracy[label]["perplexity"]
        rows.append(
            {
                "label": label,
                "method": method,
                "scheme": scheme,
                "size_mb": sizes[label] / 1e6,
                "memory_x": base_size / sizes[label],
                "decode_tok_s": speeds[label],
                "speed_x": speeds[label] / base_speed,
                "perplexity": ppl,
                "delta_ppl_pct": 100 * (ppl / base_ppl - 1),
                "kl_div": accuracy[label]["kl_div"],
                "compress_seconds": reports[label]["seconds"] if label in reports else 0.0,
                "peak_rss_mib": reports[label]["peak_rss_mib"] if label in reports else None,
            }
        )
    return {"config": asdict(cfg), "rows": rows, "seconds": round(time.perf_counter() - start, 1)}


def format_table(result: dict[str, Any]) -> str:
    head = "| method | bits | size MB | memory x | decode tok/s | speed x | ppl | delta ppl % | KL |"
    lines = [head, "|" + "---|" * 9]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['scheme']} | {r['size_mb']:.1f} | {r['memory_x']:.2f} | {r['decode_tok_s']:.1f} | "
            f"{r['speed_x']:.2f} | {r['perplexity']:.3f} | {r['delta_ppl_pct']:+.2f} | {r['kl_div']:.4f} |"
        )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
