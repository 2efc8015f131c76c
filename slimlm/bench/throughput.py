"""``slimlm bench throughput``: prefill, batch-1 decode and concurrent throughput of the engine.

Batch-1 decode is reported next to the machine's read bandwidth measured in the same run (decode reads
every weight once per token), and ``--baseline hf`` times transformers' ``generate`` on the same
checkpoint and dtype in the same process, interleaved with ours (A B A B, medians), since this
machine's bandwidth moves by tens of percent within seconds.
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from dataclasses import dataclass, field

import psutil
import torch
from tqdm.auto import tqdm

from slimlm.bench.bandwidth import read_bandwidth_gbs
from slimlm.bench.compute import concurrent_flops_per_output_token, matmul_gflops
from slimlm.bench.stats import summarize
from slimlm.engine.config import EngineConfig
from slimlm.engine.engine import Engine
from slimlm.sampling_params import SamplingParams


@dataclass
class ThroughputConfig:
    model: str
    input_len: int = 128
    output_len: int = 128
    concurrency: int = 32
    repeats: int = 3
    baseline: str | None = None  # "hf": transformers generate, same checkpoint and dtype
    rss_requests: int = 0  # > 0: also run this many sequential requests and report RSS along the way
    seed: int = 0
    workload: str = "random"  # "grounded": held-out code the output should repeat (speculative decoding)
    engine: dict = field(default_factory=dict)  # extra EngineConfig fields

    def __post_init__(self):
        for name in ("input_len", "output_len", "concurrency", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.baseline not in (None, "hf"):
            raise ValueError(f"baseline must be 'hf' or None, got {self.baseline!r}")
        if self.workload not in ("random", "grounded"):
            raise ValueError(f"workload must be 'random' or 'grounded', got {self.workload!r}")


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    hi = max(16, min(vocab, 8000))
    return [[rng.randrange(8, hi) for _ in range(length)] for _ in range(count)]


# ---- speculative decoding: an input-grounded workload, and speculation on vs off on one engine ----------

_GROUNDED_CUE = "\n\n# The same function again, unchanged:\n"


def grounded_prompts(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """Functions from the held-out stdlib-test split, then a cue and the function's first two lines again, so
    a model that can copy continues with the rest of the function (prompt lookup's and drafts' best case)."""
    import ast
    import textwrap

    from slimlm.data.corpus import iter_documents

    found: list[list[int]] = []
    enough = max(64, 4 * count)  # a sample of the split (in its fixed order) is varied enough and quick
    for doc in iter_documents("test"):
        if len(found) >= enough:
            break
        try:
            tree = ast.parse(doc)
        except SyntaxError:
            continue
        lines = doc.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 4:
                source = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
                # The head stops before its line break: byte-level BPE merges a line break with the next
                # line's indentation, so a prompt ending in a bare "\n" tells the model the next line starts
                # at column 0 (py-target then began a new top-level def instead of the function's body).
                head = "".join(source.splitlines(keepends=True)[:2]).rstrip("\n")
                ids = tokenizer.encode(source + _GROUNDED_CUE + head, add_special_tokens=False)
                if length // 2 <= len(ids) <= length:
                    found.append(ids)
    if not found:
        raise ValueError(f"no held-out function fits a grounded prompt of {length // 2}..{length} tokens")
    random.Random(seed).shuffle(found)
    return [found[i % len(found)] for i in range(count)]


def _spec_delta(before: dict, after: dict) -> dict:
    keys = ("proposed_tokens", "accepted_tokens", "verified_seqs", "emitted_tokens", "verify_steps")
    d = {k: after[k] - before.get(k, 0) for k in keys}
    d["acceptance_rate"] = d["accepted_tokens"] / d["proposed_tokens"] if d["proposed_tokens"] else 0.0
    d["mean_accepted_length"] = d["accepted_tokens"] / d["verified_seqs"] if d["verified_seqs"] else 0.0
    return d


def _predicted_speedup(engine: Engine, batch_size: int) -> float | None:
    spec = engine.speculator
    k_max = spec.config.num_speculative_tokens
    ks = range(1, k_max + 1) if spec.config.adaptive else [k_max]
    predictions = [p for k in ks if (p := spec.controller.predict(batch_size, k)) is not None]
    return max(predictions, default=None)


def run_batch(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Submits all prompts at once and steps to completion; per-request TTFT, TPOT and end-to-end."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", prompt, params)
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = (now, len(out.outputs[0].token_ids))
    wall = time.perf_counter() - start
    ttft = [first[r] for r in done]
    tpot = [(e2e - first[r]) / (n - 1) for r, (e2e, n) in done.items() if n > 1]
    total_out = sum(n for _, n in done.values())
    return {"wall_s": wall, "ttft_s": ttft, "tpot_s": tpot, "output_tokens": total_out}


def output_tok_s(run: dict) -> float:
    return run["output_tokens"] / run["wall_s"]


def _rss_over_sequential_requests(engine: Engine, count: int, seed: int) -> dict:
    """RSS while ``count`` distinct short requests run one after another: flat if finished KV is freed."""
    process = psutil.Process()
    vocab = engine.model_config.vocab_size
    samples = []
    prompts = random_prompts(count, 32, vocab, seed + 1)
    for i, prompt in enumerate(tqdm(prompts, desc="sequential requests", unit="req")):
        run_batch(engine, [prompt], 8)
        if i % max(1, count // 10) == 0 or i == count - 1:
            samples.append(process.memory_info().rss / 2**20)
    return {"requests": count, "rss_mib_samples": samples, "rss_growth_mib": samples[-1] - samples[0]}


def _weight_bytes_per_token(engine: Engine) -> int:
    """Bytes of weights one decode step reads: every parameter, but only one row of an untied embedding."""
    model = engine.loaded.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        emb = model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


def _compute_bound(engine: Engine, config: ThroughputConfig) -> dict:
    """The highest concurrent output tok/s the machine's measured GEMM rate allows (prefill included)."""
    c = engine.model_config
    body = c.num_layers * (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size)
    body += c.num_layers * 3 * c.hidden_size * c.intermediate_size
    flops = concurrent_flops_per_output_token(
        body, c.vocab_size * c.hidden_size, c.num_layers, c.q_size, config.input_len, config.output_len
    )
    # The engine's large-M GEMM runs in float32 unless the CPU has native bf16 matmul: take the faster.
    gflops = max(matmul_gflops(torch.float32), matmul_gflops(engine.dtype) if engine.dtype != torch.float32 else 0)
    return {"gemm_gflops": gflops, "flops_per_output_token": flops, "output_tok_s": gflops * 1e9 / flops}


def run_throughput(config: ThroughputConfig) -> dict:
    engine = Engine(EngineConfig(model=config.model, **{**config.engine, "max_num_seqs": config.concurrency}))
    vocab = engine.model_config.vocab_size
    dtype = str(engine.dtype).replace("torch.", "")
    spec = engine.speculator
    # Without speculation every round runs its own concurrent set (a repeated set would find its prompts in
    # the prefix cache: 1.36x the output rate of the first run at 32 concurrent on smollm2); with it, one set
    # that every A/B run finds cached (see below).
    sets = 1 if spec is not None else config.repeats
    count = config.concurrency * sets + config.repeats
    if config.workload == "grounded":
        if engine.tokenizer is None:
            raise ValueError("--workload grounded needs the model's tokenizer")
        prompts = grounded_prompts(engine.tokenizer, count, config.input_len, config.seed)
    else:
        prompts = random_prompts(count, config.input_len, vocab, config.seed)
    # Each batch-1 round decodes its own prompt: how much a speculative method gains depends on the prompt
    # (one grounded prompt measured 2.0x with prompt lookup where eight others had a median of 1.4x). The
    # batch-1 prompts are kept out of the concurrent sets, which they would reach prefix-cached, and prefill
    # is timed on a fresh prompt every round (a cached one measured 12-15x transformers' prefill speed).
    singles = prompts[config.concurrency * sets :]
    concurrent_sets = [prompts[i * config.concurrency : (i + 1) * config.concurrency] for i in range(sets)]
    prompts = concurrent_sets[0]
    run_batch(engine, singles[:1], 4)  # warm-up: kernels built, caches touched

    hf = None
    if config.baseline == "hf":
        from slimlm.bench.hf_baseline import HFBaseline

        hf = HFBaseline(str(engine.loaded.path), engine.dtype)
    ours_decode, ours_prefill, hf_decode, hf_prefill, bandwidth, plain_decode = [], [], [], [], [], []
    concurrent, concurrent_runs, plain_concurrent_runs = None, [], []
    spec_before = engine.speculative_metrics()
    steps = tqdm(range(config.repeats), desc="batch-1 (interleaved)", unit="round")
    for round_ in steps:
        single = singles[round_ : round_ + 1]
        bandwidth.append(read_bandwidth_gbs())
        fresh = random_prompts(1, len(single[0]), vocab, config.seed + 1000 + len(ours_prefill))
        ours_prefill.append(len(fresh[0]) / run_batch(engine, fresh, 1)["ttft_s"][0])
        run = run_batch(engine, single, config.output_len)
        ours_decode.append(1.0 / run["tpot_s"][0])
        if spec is not None:  # the same engine with speculation off, interleaved
            spec.enabled = False
            plain_decode.append(1.0 / run_batch(engine, single, config.output_len)["tpot_s"][0])
            spec.enabled = True
        if hf is not None:
            hf_prefill.append(hf.prefill_tokens_per_s(single[0]))
            hf_decode.append(hf.decode_tokens_per_s(single[0], config.output_len))
        if spec is None:
            # The N-concurrent run joins each round, so batch-1 and concurrency see the same phases of the VM's
            # bandwidth (the same engine measured 311-600 output tok/s at 32 concurrent within minutes); the
            # report's TTFT and TPOT are the first run's.
            run = run_batch(engine, concurrent_sets[round_], config.output_len)
            concurrent = run if concurrent is None else concurrent
            concurrent_runs.append(output_tok_s(run))
    spec_batch1 = _spec_delta(spec_before, engine.speculative_metrics()) if spec is not None else None
    if spec is not None:
        # An untimed plain run first: it puts the prompts in the prefix cache, which every later run reuses, so
        # no side of the A/B pairs below holds the one cold prefill (it held the first speculative run's,
        # 0.63x of the median plain run with medusa at 16 concurrent). The controller only times plain steps in it.
        spec.enabled = False
        run_batch(engine, prompts, config.output_len)
        spec.enabled = True
        spec_mid = engine.speculative_metrics()
        concurrent = run_batch(engine, prompts, config.output_len)
        concurrent_runs.append(output_tok_s(concurrent))
        # Speculation on and off alternate (A B A B) so a bandwidth swing does not decide the ratio.
        spec_concurrent = _spec_delta(spec_mid, engine.speculative_metrics())
        for round_ in range(config.repeats):
            if round_:
                concurrent_runs.append(output_tok_s(run_batch(engine, prompts, config.output_len)))
            spec.enabled = False
            plain_concurrent_runs.append(output_tok_s(run_batch(engine, prompts, config.output_len)))
            spec.enabled = True
    sequential = (
        _rss_over_sequential_requests(engine, config.rss_requests, config.seed) if config.rss_requests else None
    )
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB

    decode = statistics.median(ours_decode)
    bound = statistics.median(bandwidth)
    bytes_per_token = _weight_bytes_per_token(engine)
    report = {
        "model": config.model,
        "dtype": dtype,
        "device": str(engine.device),
        "threads": torch.get_num_threads(),
        "input_len": config.input_len,
        "output_len": config.output_len,
        "prefill_tok_s": statistics.median(ours_prefill),
        "decode_batch1_tok_s": decode,
        "decode_batch1_runs": ours_decode,
        "weight_bytes_per_token": bytes_per_token,
        "decode_gb_s": decode * bytes_per_token / 1e9,
        "read_bandwidth_gb_s": bound,
        "bandwidth_fraction": decode * bytes_per_token / 1e9 / bound,
        "concurrency": config.concurrency,
        "concurrent_output_tok_s": statistics.median(concurrent_runs),
        "concurrent_runs": concurrent_runs,
        "ttft_s": summarize(concurrent["ttft_s"]),
        "tpot_s": summarize(concurrent["tpot_s"]),
        "peak_rss_gib_before_baseline": peak_rss,
    }
    report["concurrent_over_batch1"] = report["concurrent_output_tok_s"] / decode
    if engine.device.type == "cpu":
        bound = _compute_bound(engine, config)
        report["concurrent_compute_bound"] = {**bound, "over_batch1": bound["output_tok_s"] / decode}
    report["workload"] = config.workload
    if spec is not None:
        plain = statistics.median(plain_decode)
        plain_concurrent = statistics.median(plain_concurrent_runs)
        report["speculative"] = {
            "method": spec.config.method,
            "num_speculative_tokens": spec.config.num_speculative_tokens,
            "adaptive": spec.config.adaptive,
            "batch1": {
                **spec_batch1,
                "decode_tok_s_plain": plain,
                "decode_plain_runs": plain_decode,
                "measured_speedup": decode / plain,
                # Round r decoded prompt r with speculation, then without: one ratio per prompt.
                "round_speedups": [a / b for a, b in zip(ours_decode, plain_decode, strict=True)],
                "predicted_speedup": _predicted_speedup(engine, 1),
            },
            "concurrent": {
                **spec_concurrent,
                "output_tok_s_plain": plain_concurrent,
                "output_plain_runs": plain_concurrent_runs,
                "measured_speedup": report["concurrent_output_tok_s"] / plain_concurrent,
                "predicted_speedup": _predicted_speedup(engine, config.concurrency),
            },
            "metrics": engine.speculative_metrics(),
        }
    if sequential:
        report["sequential_rss"] = sequential
    if hf is not None:
        report["baseline"] = {
            "name": "transformers generate",
            "decode_batch1_tok_s": statistics.median(hf_decode),
            "decode_batch1_runs": hf_decode,
            "prefill_tok_s": statistics.median(hf_prefill),
        }
        report["decode_speedup_vs_baseline"] = decode / report["baseline"]["decode_batch1_tok_s"]
        report["prefill_speedup_vs_baseline"] = report["prefill_tok_s"] / report["baseline"]["prefill_tok_s"]
    return report


def format_report(r: dict) -> str:
    lines = [
        f"model {r['model']}  dtype {r['dtype']}  device {r['device']}  threads {r['threads']}",
        f"prefill ({r['input_len']} tokens, batch 1): {r['prefill_tok_s']:.1f} tok/s",
        f"decode batch 1: {r['decode_batch1_tok_s']:.1f} tok/s  "
        f"(runs: {', '.join(f'{v:.1f}' for v in r['decode_batch1_runs'])})",
        f"  weights read per token {r['weight_bytes_per_token'] / 1e6:.1f} MB -> {r['decode_gb_s']:.1f} GB/s "
        f"= {100 * r['bandwidth_fraction']:.0f}% of the measured read bandwidth {r['read_bandwidth_gb_s']:.1f} GB/s",
        f"{r['concurrency']} concurrent ({r['input_len']} in / {r['output_len']} out): "
        f"{r['concurrent_output_tok_s']:.1f} output tok/s = {r['concurrent_over_batch1']:.2f}x batch-1",
        *(
            [
                f"  compute bound: {r['concurrent_compute_bound']['output_tok_s']:.1f} output tok/s "
                f"= {r['concurrent_compute_bound']['over_batch1']:.2f}x batch-1 "
                f"({r['concurrent_compute_bound']['flops_per_output_token'] / 1e6:.0f} MFLOP per output token, "
                f"prefill included, at the measured GEMM rate {r['concurrent_compute_bound']['gemm_gflops']:.0f} "
                "GFLOP/s)"
            ]
            if "concurrent_compute_bound" in r
            else []
        ),
        "  TTFT s  mean {mean:.3f}  p50 {p50:.3f}  p95 {p95:.3f}".format(**r["ttft_s"]),
        "  TPOT s  mean {mean:.4f}  p50 {p50:.4f}  p95 {p95:.4f}".format(**r["tpot_s"]),
        f"peak RSS {r['peak_rss_gib_before_baseline']:.2f} GiB",
    ]
    if "speculative" in r:
        s = r["speculative"]
        for name, d, plain in (
            ("batch 1", s["batch1"], s["batch1"]["decode_tok_s_plain"]),
            (f"{r['concurrency']} concurrent", s["concurrent"], s["concurrent"]["output_tok_s_plain"]),
        ):
            predicted = "n/a" if d["predicted_speedup"] is None else f"{d['predicted_speedup']:.2f}x"
            lines.append(
                f"speculative {s['method']} K={s['num_speculative_tokens']} ({r['workload']} workload), {name}: "
                f"acceptance {d['acceptance_rate']:.2f}, mean accepted length {d['mean_accepted_length']:.2f}, "
                f"speedup measured {d['measured_speedup']:.2f}x (plain {plain:.1f} tok/s), predicted {predicted}"
            )
        rounds = s["batch1"].get("round_speedups")
        if rounds:
            lines.append("  batch-1 speedup per prompt: " + " ".join(f"{x:.2f}x" for x in rounds))
    if "sequential_rss" in r:
        q = r["sequential_rss"]
        lines.append(
            f"RSS over {q['requests']} sequential requests: {q['rss_mib_samples'][0]:.0f} -> "
            f"{q['rss_mib_samples'][-1]:.0f} MiB (growth {q['rss_growth_mib']:+.1f} MiB)"
        )
    if "baseline" in r:
        b = r["baseline"]
        lines += [
            f"baseline {b['name']}: decode {b['decode_batch1_tok_s']:.1f} tok/s "
            f"(runs: {', '.join(f'{v:.1f}' for v in b['decode_batch1_runs'])}), prefill {b['prefill_tok_s']:.1f} tok/s",
            f"  slimlm / baseline: decode {r['decode_speedup_vs_baseline']:.2f}x, "
            f"prefill {r['prefill_speedup_vs_baseline']:.2f}x",
        ]
    return "\n".join(lines)
