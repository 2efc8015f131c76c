"""The ``slimlm`` command: argument parsing only; the work lives in the subpackages."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from slimlm.engine.config import EngineConfig


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default=None, help="auto (fastest measured), float32, bfloat16, float16")
    g.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens)
    g.add_argument("--block-size", type=int, default=EngineConfig.block_size)
    g.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
    g.add_argument("--kernels", default="auto", choices=["auto", "torch", "cpu"])
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--speculative-method", choices=["ngram", "draft", "medusa"], default=None)
    g.add_argument("--num-speculative-tokens", type=int, default=4, help="K: most proposals verified per step")
    g.add_argument("--draft-model", default=None, help="draft checkpoint (draft) or Medusa heads directory (medusa)")


def _engine_kwargs(a: argparse.Namespace) -> dict:
    speculative = None
    if a.speculative_method is not None:
        speculative = {"method": a.speculative_method, "num_speculative_tokens": a.num_speculative_tokens}
        if a.draft_model is not None:
            speculative["model"] = a.draft_model
    return dict(
        dtype=a.dtype,
        device=a.device,
        max_model_len=a.max_model_len,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        block_size=a.block_size,
        kv_cache_memory=a.kv_cache_memory,
        kernels=a.kernels,
        enable_prefix_caching=not a.no_prefix_caching,
        speculative_config=speculative,
    )


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--logprobs", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")


def _sampling_params(a: argparse.Namespace):
    from slimlm.sampling_params import SamplingParams

    return SamplingParams(
        n=a.n,
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
        presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty,
        seed=a.seed,
        stop=a.stop,
        logprobs=a.logprobs,
        ignore_eos=a.ignore_eos,
    )


def cmd_generate(a: argparse.Namespace) -> int:
    from slimlm import LLM

    params = _sampling_params(a)
    llm = LLM(a.model, **_engine_kwargs(a))
    start = time.perf_counter()
    outputs = llm.generate(a.prompt, params, use_tqdm=not a.json)
    elapsed = time.perf_counter() - start
    if a.json:
        records = []
        for prompt, out in zip(a.prompt, outputs, strict=True):
            records.append(
                {
                    "prompt": prompt,
                    "prompt_tokens": len(out.prompt_token_ids),
                    "outputs": [
                        {
                            "text": c.text,
                            "token_ids": c.token_ids,
                            "finish_reason": c.finish_reason,
                            "cumulative_logprob": c.cumulative_logprob,
                        }
                        for c in out.outputs
                    ],
                }
            )
        generated = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        print(json.dumps({"results": records, "elapsed_s": elapsed, "output_tok_s": generated / elapsed}, indent=2))
    else:
        for prompt, out in zip(a.prompt, outputs, strict=True):
            for c in out.outputs:
                print(f"{prompt}{c.text}")
                print(f"[{len(c.token_ids)} tokens, finish_reason={c.finish_reason}]")
    return 0


def cmd_new_model(a: argparse.Namespace) -> int:
    from pathlib import Path

    from slimlm.model.new_model import new_model

    out = Path(a.out)
    if a.exist_ok and (out / "config.json").exists():
        print(f"{out} already exists; keeping it")
        return 0
    overrides = {}
    for item in a.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = json.loads(value) if value[:1] in "-0123456789[{tn" else value
    path = new_model(
        a.shape,
        out,
        num_layers=a.layers,
        seed=a.seed,
        dtype=a.dtype,
        overrides=overrides or None,
        overwrite=a.overwrite,
    )
    print(f"wrote a random-initialised {a.shape} checkpoint to {path}")
    return 0


def cmd_bench_throughput(a: argparse.Namespace) -> int:
    from slimlm.bench.throughput import ThroughputConfig, format_report, run_throughput

    config = ThroughputConfig(
        model=a.model,
        input_len=a.input_len,
        output_len=a.output_len,
        concurrency=a.concurrency,
        repeats=a.repeats,
        baseline=a.baseline,
        rss_requests=a.rss_requests,
        workload=a.workload,
        engine=_engine_kwargs(a),
    )
    report = run_throughput(config)
    print(json.dumps(report, indent=2) if a.json else format_report(report))
    return 0


def cmd_bench_step(a: argparse.Namespace) -> int:
    from slimlm.bench.step import StepConfig, format_step_report, run_step_bench

    report = run_step_bench(StepConfig(model=a.model, steps=a.steps, engine=_engine_kwargs(a)))
    print(json.dumps(report, indent=2) if a.json else format_step_report(report))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from slimlm.bench.tradeoff import TradeoffConfig, format_table, run_tradeoff, write_json

    cfg = TradeoffConfig(
        model=a.model,
        methods=a.methods or TradeoffConfig().methods,
        eval_tokens=a.eval_tokens,
        calib_tokens=a.calib_tokens,
        rounds=a.rounds,
        work_dir=a.work_dir,
    )
    result = run_tradeoff(cfg)
    write_json(result, Path(a.out))
    print(json.dumps(result, indent=2) if a.json else format_table(result) + f"\n\n(written to {a.out})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimlm", description="Make open LLMs small and fast, with numbers.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("model", help="checkpoint directory or Hugging Face hub id")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    _sampling_args(p)
    _engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("new-model", help="write a random-initialised checkpoint of a published shape")
    p.add_argument("shape", help="a shape name (e.g. smollm2-135m) or a config.json path")
    p.add_argument("out", help="output directory")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--exist-ok", action="store_true", help="do nothing if OUT already holds a checkpoint")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.set_defaults(func=cmd_new_model)

    p = sub.add_parser(
        "demo",
        help="compress the shipped model with every method and print the trade-off table (size, speed, accuracy)",
    )
    p.add_argument("--model", default="models/py-target")
    p.add_argument("--methods", nargs="+", default=None, help="labels (default: all): rtn-w8 gptq-w4-g128 ...")
    p.add_argument("--eval-tokens", type=int, default=65536, help="evaluation tokens of stdlib-test (0: all)")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default: the CPU default)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved decode-speed rounds (medians)")
    p.add_argument("--work-dir", default=None, help="keep the compressed checkpoints here")
    p.add_argument("--out", default="runs/demo/tradeoff.json", help="where to write the table as JSON")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    from slimlm.compress.cli import register as register_compress
    from slimlm.eval.cli import register as register_eval
    from slimlm.train.cli import register as register_train

    register_train(sub)
    register_compress(sub)
    register_eval(sub)
    from slimlm.serve.cli import register as register_serve

    register_serve(sub)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("throughput", help="prefill, batch-1 decode and concurrent throughput")
    p.add_argument("model")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument(
        "--repeats", type=int, default=3, help="interleaved batch-1 rounds, each on its own prompt (medians reported)"
    )
    p.add_argument("--baseline", choices=["hf"], default=None)
    p.add_argument("--rss-requests", type=int, default=0, help="also run N sequential requests, report RSS")
    p.add_argument(
        "--workload",
        choices=["random", "grounded"],
        default="random",
        help="grounded: held-out stdlib functions and a cue to repeat them (speculative decoding's case)",
    )
    p.add_argument("--json", action="store_true")
    _engine_args(p)
    p.set_defaults(func=cmd_bench_throughput)

    p = bench.add_parser("step", help="time of one batch-1 decode step and its phases (engine overhead)")
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", action="store_true")
    _engine_args(p)
    p.set_defaults(func=cmd_bench_step)

    from slimlm.bench.compare import register as register_bench_compare
    from slimlm.bench.quant_linear import register as register_bench_linear
    from slimlm.bench.serve import register as register_bench_serve

    register_bench_serve(bench)
    register_bench_linear(bench)
    register_bench_compare(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
