"""``slimlm bench step``: the time of one batch-1 decode step and where it goes.

On a 1-layer model the matmuls are small, so this is the engine's per-step overhead: scheduling,
building the flattened inputs, op dispatch, sampling and detokenization.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from slimlm.engine.config import EngineConfig
from slimlm.engine.engine import Engine
from slimlm.sampling_params import SamplingParams


@dataclass
class StepConfig:
    model: str
    steps: int = 200
    prompt_len: int = 32
    engine: dict = field(default_factory=dict)


def run_step_bench(config: StepConfig) -> dict:
    engine = Engine(EngineConfig(model=config.model, **config.engine))
    params = SamplingParams(temperature=0, max_tokens=config.steps + 1, ignore_eos=True)
    prompt = [(7 * i) % 997 + 3 for i in range(config.prompt_len)]
    engine.add_request("warm", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("bench", prompt, params)
    engine.step()  # prefill
    before = dict(vars(engine.stats))
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    n = len(times)
    phases = {
        k: (getattr(engine.stats, k) - before[k]) / n * 1e3
        for k in ("schedule_s", "model_s", "sample_s", "postprocess_s")
    }
    return {
        "model": config.model,
        "layers": engine.model_config.num_layers,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "kernels": engine.loaded.model.ops.name,
        "steps": n,
        "step_ms_median": statistics.median(times) * 1e3,
        "step_ms_mean": statistics.fmean(times) * 1e3,
        "phase_ms_mean": {k.removesuffix("_s"): v for k, v in phases.items()},
    }


def format_step_report(r: dict) -> str:
    phases = "  ".join(f"{k} {v:.3f}" for k, v in r["phase_ms_mean"].items())
    return (
        f"{r['model']} ({r['layers']} layers, {r['dtype']}, {r['kernels']} kernels): batch-1 decode step "
        f"median {r['step_ms_median']:.3f} ms, mean {r['step_ms_mean']:.3f} ms over {r['steps']} steps\n"
        f"  mean ms per phase: {phases}"
    )
