"""The server against the offline engine: the same prompts at the same concurrency, interleaved.

``slimlm bench serve --offline-baseline MODEL --rounds R`` answers "how much does the HTTP layer cost?".
The bench process loads MODEL into an offline :class:`~slimlm.engine.engine.Engine` (``max_num_seqs`` =
the benchmark's concurrency) and alternates a server round with an offline round (A B A B) so that the
machine's bandwidth swings land on both sides; the ratio is of the medians. While one side runs the other
sits idle. The bench client shares the machine with the server, as it does in every serving benchmark.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from tqdm.auto import tqdm

__all__ = ["compare_with_offline"]


def compare_with_offline(
    model: str,
    prompts: list[list[int]],
    output_len: int,
    concurrency: int,
    rounds: int,
    run_server: Callable[[], float],
    progress: bool = True,
) -> dict:
    """``run_server()`` runs one server round and returns its output tok/s; returns both sides' runs."""
    from slimlm.bench.throughput import output_tok_s, run_batch
    from slimlm.engine.config import EngineConfig
    from slimlm.engine.engine import Engine

    engine = Engine(EngineConfig(model=model, max_num_seqs=concurrency))
    run_batch(engine, prompts[:1], 4)  # warm-up: kernels built, caches touched
    server, offline = [], []
    for _ in tqdm(range(rounds), desc="server vs offline rounds", disable=not progress):
        server.append(run_server())
        offline.append(output_tok_s(run_batch(engine, prompts, output_len)))
    return {
        "model": model,
        "concurrency": concurrency,
        "server_output_tok_s_runs": server,
        "offline_output_tok_s_runs": offline,
        "server_output_tok_s": statistics.median(server),
        "offline_output_tok_s": statistics.median(offline),
        "server_over_offline": statistics.median(server) / statistics.median(offline),
    }
