"""``slimlm bench serve``: load-test a running OpenAI-compatible server, with vLLM's serving-benchmark metrics.

Definitions (vLLM's ``benchmark_serving``), per request, all from the client's clock:

* TTFT: request sent -> first streamed chunk with a token;
* ITL: the gaps between successive streamed chunks (a chunk may carry several tokens);
* TPOT: (e2e - TTFT) / (output tokens - 1), for requests with more than one output token;
* E2EL: request sent -> last chunk.

Requests arrive as a Poisson process at ``--request-rate`` per second (``inf``: all at once), with at most
``--max-concurrency`` in flight. Prompts are ``--input-len`` random token ids (or windows of the built-in
stdlib corpus), sent as token ids so their length is exact; ``ignore_eos`` makes every output
``--output-len`` tokens long. Goodput is the rate of requests that met every ``--goodput`` SLO.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimlm.bench.stats import percentile

GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class ServeBenchConfig:
    url: str
    num_prompts: int = 100
    request_rate: float = math.inf
    max_concurrency: int | None = None
    input_len: int = 128
    output_len: int = 128
    dataset: str = "random"  # "random" token ids or "corpus" (the built-in stdlib text)
    goodput: dict[str, float] = field(default_factory=dict)  # metric -> SLO in milliseconds
    model: str | None = None  # default: the server's only model
    tokenizer: str | None = None  # default: the model directory the server reports (/v1/models "root")
    api_key: str | None = None
    seed: int = 0
    offline_baseline: str | None = None  # a model directory: also run the prompts offline, interleaved
    rounds: int = 1  # server rounds (interleaved with offline rounds when offline_baseline is set)
    progress: bool = True

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("num_prompts, input_len and output_len must be >= 1")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.dataset not in ("random", "corpus"):
            raise ValueError(f"dataset must be 'random' or 'corpus', got {self.dataset!r}")
        unknown = set(self.goodput) - set(GOODPUT_METRICS)
        if unknown:
            raise ValueError(f"goodput metrics must be among {GOODPUT_METRICS}, got {sorted(unknown)}")


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# ---- prompts ---------------------------------------------------------------------------------------------


def _load_tokenizer(path: str):
    """The ``tokenizers`` library is enough here, and imports in a fraction of transformers' time."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.exists():
        raise ValueError(f"no tokenizer.json in {path}; pass --tokenizer DIR (a directory with tokenizer.json)")
    return Tokenizer.from_file(str(file))


def make_prompts(config: ServeBenchConfig, tokenizer) -> list[list[int]]:
    rng = random.Random(config.seed)
    if config.dataset == "random":
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        vocab = [i for tok, i in tokenizer.get_vocab().items() if tok not in special]
        return [[rng.choice(vocab) for _ in range(config.input_len)] for _ in range(config.num_prompts)]
    from slimlm.data.corpus import iter_documents

    need = config.num_prompts * config.input_len
    ids: list[int] = []
    for doc in iter_documents("validation"):
        ids += tokenizer.encode(doc, add_special_tokens=False).ids
        if len(ids) >= need:
            break
    if len(ids) < config.input_len:
        raise ValueError("the corpus is shorter than one prompt")
    starts = [rng.randrange(0, len(ids) - config.input_len + 1) for _ in range(config.num_prompts)]
    return [ids[s : s + config.input_len] for s in starts]


# ---- requests --------------------------------------------------------------------------------------------


async def _sse_data(response):
    """The ``data:`` payloads of a server-sent event stream, up to ``[DONE]``. Events end with a blank line;
    one read may hold several events, or part of one."""
    buffer = b""
    async for piece in response.content.iter_any():
        buffer += piece
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: "):
                continue
            data = event[len(b"data: ") :]
            if data == b"[DONE]":
                return
            yield data


async def _one_request(session, url: str, body: dict, result: RequestResult) -> RequestResult:
    start = time.perf_counter()
    last = start
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for data in _sse_data(response):
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = last - start
        result.ok = result.ttft > 0
        if not result.ok:
            result.error = "the stream carried no tokens"
    except Exception as e:  # a failed request is a data point, not the end of the benchmark
        result.error = f"{type(e).__name__}: {e}"
    return result


def _arrival_gaps(config: ServeBenchConfig) -> list[float]:
    if math.isinf(config.request_rate):
        return [0.0] * config.num_prompts
    rng = random.Random(config.seed + 1)
    return [rng.expovariate(config.request_rate) for _ in range(config.num_prompts)]


async def _run(config: ServeBenchConfig, prompts: list[list[int]], model: str, headers: dict) -> tuple:
    # aiohttp (as vLLM's serving benchmark uses): the client usually shares the machine's cores with the
    # server, so it should cost little per streamed chunk; the report gives its CPU time.
    import aiohttp
    from tqdm.auto import tqdm

    url = config.url.rstrip("/") + "/v1/completions"
    gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    bar = tqdm(total=len(prompts), desc="requests", unit="req", disable=not config.progress)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as client:

        async def send(prompt: list[int]) -> RequestResult:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": config.output_len,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            result = RequestResult(prompt_len=len(prompt))
            if gate is None:
                await _one_request(client, url, body, result)
            else:
                async with gate:
                    await _one_request(client, url, body, result)
            bar.update(1)
            return result

        # One request first, untimed: a server that cannot answer fails here, with its own message.
        probe = await _one_request(client, url, {**_probe_body(model, prompts[0]), "stream": True}, RequestResult())
        if not probe.ok:
            raise RuntimeError(f"the server did not answer a test request: {probe.error}")
        start, cpu_start = time.perf_counter(), time.process_time()
        tasks = []
        for prompt, gap in zip(prompts, _arrival_gaps(config), strict=True):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(send(prompt)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        client_cpu = time.process_time() - cpu_start
    bar.close()
    return results, duration, client_cpu


def _probe_body(model: str, prompt: list[int]) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0.0, "ignore_eos": True}


def _server_model(config: ServeBenchConfig, headers: dict) -> tuple[str, str | None]:
    import httpx

    response = httpx.get(config.url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    card = response.json()["data"][0]
    return card["id"], card.get("root")


def run_serve_bench(config: ServeBenchConfig) -> dict:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    model, root = _server_model(config, headers)
    model = config.model or model
    tokenizer_path = config.tokenizer or root
    if tokenizer_path is None:
        raise ValueError("the server does not say where its model is; pass --tokenizer DIR")
    prompts = make_prompts(config, _load_tokenizer(tokenizer_path))
    reports = []

    def server_round() -> float:
        reports.append(summarize(config, *asyncio.run(_run(config, prompts, model, headers))))
        return reports[-1]["output_throughput"]

    comparison = None
    if config.offline_baseline:
        from slimlm.bench.serve_offline import compare_with_offline

        concurrency = min(config.max_concurrency or config.num_prompts, config.num_prompts)
        comparison = compare_with_offline(
            config.offline_baseline,
            prompts,
            config.output_len,
            concurrency,
            config.rounds,
            server_round,
            progress=config.progress,
        )
    else:
        for _ in range(config.rounds):
            server_round()
    # The round with the median output throughput stands for the run; every round's figure is kept.
    by_speed = sorted(reports, key=lambda r: r["output_throughput"])
    report = by_speed[(len(by_speed) - 1) // 2]
    report["output_throughput_runs"] = [r["output_throughput"] for r in reports]
    if comparison is not None:
        report["offline_comparison"] = comparison
    return report


# ---- report ----------------------------------------------------------------------------------------------


def _stats_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    if not ms:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    return {"mean": statistics.fmean(ms), "median": statistics.median(ms), "p99": percentile(ms, 99)}


def _meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(values[name] * 1000 <= limit for name, limit in slos.items())


def summarize(
    config: ServeBenchConfig, results: list[RequestResult], duration: float, client_cpu: float | None = None
) -> dict:
    """``client_cpu``: CPU seconds this client spent in the timed part (taken from the server's cores when
    both run on one machine)."""
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_len for r in ok)
    report = {
        "config": {k: v for k, v in asdict(config).items() if k not in ("api_key", "progress")},
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "client_cpu_s": client_cpu,
        "ttft_ms": _stats_ms([r.ttft for r in ok]),
        "tpot_ms": _stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats_ms([gap for r in ok for gap in r.itl]),
        "e2el_ms": _stats_ms([r.latency for r in ok]),
    }
    if config.goodput:
        report["request_goodput"] = sum(_meets_slos(r, config.goodput) for r in ok) / duration
    report["config"]["request_rate"] = str(config.request_rate)  # inf is not JSON
    return report


def format_report(report: dict) -> str:
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]

    def row(label: str, value) -> None:
        lines.append(f"{label:<44}{value:>16.2f}" if isinstance(value, float) else f"{label:<44}{value:>16}")

    row("Successful requests:", report["completed"])
    row("Failed requests:", report["failed"])
    row("Benchmark duration (s):", report["duration_s"])
    row("Total input tokens:", report["total_input_tokens"])
    row("Total generated tokens:", report["total_output_tokens"])
    row("Request throughput (req/s):", report["request_throughput"])
    if "request_goodput" in report:
        row("Request goodput (req/s):", report["request_goodput"])
    row("Output token throughput (tok/s):", report["output_throughput"])
    row("Total token throughput (tok/s):", report["total_token_throughput"])
    if report.get("client_cpu_s") is not None:
        row("Client CPU (% of one core):", 100 * report["client_cpu_s"] / report["duration_s"])
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL")):
        stats = report[key]
        lines.append("{:-^60}".format(f" {title} "))
        row(f"Mean {title} (ms):", stats["mean"])
        row(f"Median {title} (ms):", stats["median"])
        row(f"P99 {title} (ms):", stats["p99"])
    if "offline_comparison" in report:
        c = report["offline_comparison"]
        lines.append("{:-^60}".format(f" Server vs offline engine ({c['concurrency']} concurrent) "))
        row("Server output tok/s (median):", c["server_output_tok_s"])
        row("Offline output tok/s (median):", c["offline_output_tok_s"])
        row("Server / offline:", c["server_over_offline"])
    for error in report["errors"]:
        lines.append(f"error: {error}")
    lines.append("=" * 60)
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------


def _goodput(items: list[str] | None) -> dict[str, float]:
    slos = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"--goodput expects METRIC:MS with METRIC in {GOODPUT_METRICS}, got {item!r}")
        slos[name] = float(value)
    return slos


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("serve", help="load-test a running server (TTFT, TPOT, ITL, goodput)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dataset", choices=["random", "corpus"], default="random")
    p.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    p.add_argument("--model", default=None, help="model id to request (default: the server's)")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the server's model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--offline-baseline",
        default=None,
        metavar="MODEL",
        help="also run the same prompts through an offline engine on MODEL in this process, interleaved",
    )
    p.add_argument("--rounds", type=int, default=1, help="benchmark rounds (medians; interleaved with offline)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(a: argparse.Namespace) -> int:
    config = ServeBenchConfig(
        url=a.url,
        num_prompts=a.num_prompts,
        request_rate=a.request_rate,
        max_concurrency=a.max_concurrency,
        input_len=a.input_len,
        output_len=a.output_len,
        dataset=a.dataset,
        goodput=_goodput(a.goodput),
        model=a.model,
        tokenizer=a.tokenizer,
        api_key=a.api_key,
        seed=a.seed,
        offline_baseline=a.offline_baseline,
        rounds=a.rounds,
        progress=not a.json,
    )
    report = run_serve_bench(config)
    print(json.dumps(report, indent=2) if a.json else format_report(report))
    return 0
