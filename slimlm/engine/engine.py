"""The engine: requests in, one batched model step at a time, outputs (streamable) out."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import psutil
import torch

from slimlm.engine.block_manager import BlockManager
from slimlm.engine.config import EngineConfig
from slimlm.engine.detokenizer import StreamingDetokenizer
from slimlm.engine.model_runner import KVCache, ModelOutput, ModelRunner
from slimlm.engine.sampler import Sampler, SamplerOutput, SamplingState, compute_logprobs, make_generator
from slimlm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from slimlm.engine.sequence import Sequence, SequenceIds
from slimlm.engine.speculative.metrics import SpeculativeStats
from slimlm.engine.speculative.speculator import Speculator
from slimlm.model.loader import LoadedModel, load_model
from slimlm.outputs import CompletionOutput, Logprob, RequestOutput
from slimlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival: float
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    texts: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.seqs)


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    # Seconds spent in each phase of step(), summed: where per-step overhead goes.
    schedule_s: float = 0.0
    model_s: float = 0.0
    sample_s: float = 0.0
    postprocess_s: float = 0.0
    speculative: SpeculativeStats | None = None  # with speculative_config: proposals, acceptance, step times


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        max_len = config.max_model_len
        self.loaded = loaded or load_model(
            config.model,
            dtype=config.dtype,
            device=config.device,
            kernels=config.kernels,
            max_positions=max_len,
            load_tokenizer_files=not config.skip_tokenizer_init,
        )
        model = self.loaded.model
        self.model_config = model.config
        self.tokenizer = self.loaded.tokenizer
        self.eos_token_ids = self.loaded.eos_token_ids
        self.dtype = model.embed_tokens.weight.dtype
        self.device = model.embed_tokens.weight.device
        self.max_model_len = min(max_len or model.max_positions, model.max_positions)
        num_blocks = self._kv_blocks()
        kv = KVCache(model, num_blocks, config.block_size, self.dtype, self.device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill),
            self.block_manager,
        )
        self.runner = ModelRunner(model, kv)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._seq_ids = SequenceIds()
        self.speculator = None
        if config.speculative_config is not None:
            self.speculator = Speculator(config.speculative_config, self)
            self.stats.speculative = self.speculator.stats

    def _kv_blocks(self) -> int:
        cfg = self.config
        per_block = KVCache.bytes_per_block(self.loaded.model, cfg.block_size, self.dtype)
        if cfg.num_kv_blocks:
            blocks = cfg.num_kv_blocks
        else:
            if cfg.kv_cache_memory:
                budget = cfg.kv_cache_memory
            elif self.device.type == "cuda":
                budget = torch.cuda.mem_get_info(self.device)[0] * cfg.kv_cache_fraction
            else:
                # Like vLLM's CPU backend, cap the default: host RAM is shared with everything else.
                budget = min(psutil.virtual_memory().available * cfg.kv_cache_fraction, 4 * 2**30)
            # No point in reserving more than every sequence at full length could use.
            wanted = -(-cfg.max_num_seqs * self.max_model_len // cfg.block_size)
            blocks = min(int(budget // per_block), wanted)
        capacity = blocks * cfg.block_size
        if capacity < self.max_model_len:
            if cfg.max_model_len is not None:
                raise ValueError(
                    f"the KV cache budget holds {capacity} tokens, fewer than max_model_len={self.max_model_len}; "
                    f"raise kv_cache_memory / num_kv_blocks or lower max_model_len"
                )
            if capacity < cfg.block_size:
                raise ValueError(f"the KV cache budget ({blocks} blocks) cannot hold a single block")
            logger.warning("max_model_len lowered from %d to %d to fit the KV cache", self.max_model_len, capacity)
            self.max_model_len = capacity
        logger.info(
            "KV cache: %d tokens (%.2f GiB), max concurrency %.1f at length %d",
            capacity,
            blocks * per_block / 2**30,
            capacity / self.max_model_len,
            self.max_model_len,
        )
        return blocks

    # ---- requests -------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer; pass prompts as lists of token ids")
            return prompt, list(self.tokenizer.encode(prompt))
        if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise ValueError("prompt must be a string or a list of token ids (ints)")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return None, list(prompt)

    def default_sampling_params(self) -> SamplingParams:
        """The checkpoint's generation_config.json sampling defaults (as vLLM applies them), else vLLM's."""
        gen = self.loaded.generation_config
        fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        kwargs = {name: gen[name] for name in fields if gen.get(name) is not None}
        if gen.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        if gen.get("max_new_tokens"):
            kwargs["max_tokens"] = int(gen["max_new_tokens"])
        return SamplingParams(**kwargs)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        params = params or self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling params must be a SamplingParams")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        text, ids = self.encode_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: it must be shorter "
                f"to leave room for at least one generated token (shorten it or raise max_model_len)"
            )
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        now = time.monotonic()
        seqs = []
        for index in range(params.n):
            seq_output: list[int] = []
            sampling = SamplingState(
                params,
                ids,
                seq_output,
                make_generator(params.seed, index, self.device),
                () if params.ignore_eos else self.eos_token_ids,
            )
            seq = Sequence(self._seq_ids(), request_id, index, ids, params, sampling, max_tokens, now, seq_output)
            seq.skip_prefix_cache = params.prompt_logprobs is not None
            if self.tokenizer is not None:
                seq.detokenizer = StreamingDetokenizer(self.tokenizer, ids, params)
            seqs.append(seq)
        request = Request(request_id, text, ids, params, seqs, now, texts=[""] * params.n)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        self.requests[request_id] = request
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- one step -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        stats = self.stats
        stats.preemptions += batch.num_preempted
        t1 = time.perf_counter()
        stats.schedule_s += t1 - t0
        if not batch.seqs:
            return []
        if self.speculator is not None:
            self.speculator.plan(batch)
        want = {
            i
            for i, seq in enumerate(batch.seqs)
            if seq.index == 0
            and seq.params.prompt_logprobs is not None
            and seq.num_computed_tokens < seq.num_prompt_tokens
        }
        out = self.runner.execute(batch, want)
        t2 = time.perf_counter()
        stats.model_s += t2 - t1
        stats.steps += 1
        touched: dict[str, Request] = {}
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True)):
            if i in out.prompt_logits:
                self._record_prompt_logprobs(seq, out.prompt_logits[i])
            self.stats.prompt_tokens += max(
                0, min(seq.num_computed_tokens + n, seq.num_prompt_tokens) - seq.num_computed_tokens
            )
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
        if out.sample_rows:
            self._sample(batch, out)
        outputs = [
            self._output(request)
            for request in touched.values()
            if request.seqs[0].first_token_time or request.finished
        ]
        for request in touched.values():
            if request.finished:
                self.requests.pop(request.request_id, None)
        stats.postprocess_s += time.perf_counter() - t2
        return outputs

    def _sample(self, batch: ScheduledBatch, out: ModelOutput) -> None:
        if self.speculator is not None:
            spent = self.speculator.sample(batch, out)
            self.stats.sample_s += spent
            self.stats.postprocess_s -= spent
            return
        seqs = [batch.seqs[i] for i in out.sample_rows]
        start = time.perf_counter()
        result = self.sampler(out.sample_logits, [seq.sampling for seq in seqs])
        now = time.perf_counter()
        # Postprocessing time is measured around this call: the sampler's share moves to sample_s.
        self.stats.sample_s += now - start
        self.stats.postprocess_s -= now - start
        now = time.monotonic()
        for j, seq in enumerate(seqs):
            self._append_token(seq, result, j, now)

    def speculative_metrics(self) -> dict:
        """Acceptance, proposal counters and step times of speculative decoding ({} without it)."""
        return {} if self.speculator is None else self.speculator.stats.as_dict()

    def _append_token(self, seq: Sequence, result: SamplerOutput, row: int, now: float) -> None:
        token = result.token_ids[row]
        params = seq.params
        seq.output_token_ids.append(token)
        self.stats.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        if result.logprobs is not None:
            seq.cumulative_logprob += result.logprobs[row]
            if params.logprobs is not None:
                seq.logprobs.append(
                    self._logprob_entry(
                        token,
                        result.logprobs[row],
                        result.ranks[row],
                        result.top_token_ids[row],
                        result.top_logprobs[row],
                    )
                )
        num_out = len(seq.output_token_ids)
        stop_token = num_out >= params.min_tokens and (
            token in seq.sampling.eos_token_ids or token in (params.stop_token_ids or ())
        )
        length = num_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len
        stop_str = None
        if seq.detokenizer is not None:
            step = seq.detokenizer.step(token, finished=stop_token or length, stop_token_terminated=stop_token)
            self.requests[seq.request_id].texts[seq.index] += step.delta
            stop_str = step.stop_str
        if stop_str is not None:
            self._finish(seq, "stop", stop_str)
        elif stop_token:
            self._finish(seq, "stop", token if token in (params.stop_token_ids or ()) else None)
        elif length:
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq)

    def _record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Row j of this chunk's logits predicts the token at position start + j + 1."""
        request = self.requests[seq.request_id]
        start = seq.num_computed_tokens
        stop = min(start + logits.shape[0], seq.num_prompt_tokens - 1)
        if stop <= start or len(request.prompt_logprobs) != start + 1:
            return
        targets = torch.tensor(seq.prompt_token_ids[start + 1 : stop + 1], device=logits.device)
        lps, ranks, top_ids, top_lps = compute_logprobs(logits[: stop - start], targets, seq.params.prompt_logprobs)
        for j, tid in enumerate(targets.tolist()):
            request.prompt_logprobs.append(self._logprob_entry(tid, lps[j], ranks[j], top_ids[j], top_lps[j]))

    def _logprob_entry(
        self, token: int, logprob: float, rank: int, top_ids: list[int], top_lps: list[float]
    ) -> dict[int, Logprob]:
        """vLLM's shape: the chosen token first, then the top-N (which may include it) with ranks 1..N."""
        entry = {token: Logprob(logprob, rank, self._decode_one(token))}
        for top_rank, (tid, lp) in enumerate(zip(top_ids, top_lps, strict=True), 1):
            entry.setdefault(tid, Logprob(lp, top_rank, self._decode_one(tid)))
        return entry

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _output(self, request: Request) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=seq.index,
                text=request.texts[seq.index],
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq in request.seqs
        ]
        first = [seq.first_token_time for seq in request.seqs if seq.first_token_time is not None]
        metrics = {"arrival_time": request.arrival}
        if first:
            metrics["first_token_time"] = min(first)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=request.finished,
            prompt_logprobs=request.prompt_logprobs,
            metrics=metrics,
        )
