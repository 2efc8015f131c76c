"""A request's sampling fields as ``SamplingParams``: omitted ones take the checkpoint's defaults."""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimlm.sampling_params import SamplingParams
from slimlm.serve.errors import APIError, bad_value
from slimlm.serve.schemas import SamplingFields

if TYPE_CHECKING:
    from slimlm.serve.state import ServeState

# Sampling fields a request leaves unset (None) fall back to generation_config.json, as in vLLM.
_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_params(
    request: SamplingFields,
    state: ServeState,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    rename: dict[str, str] | None = None,
) -> SamplingParams:
    if request.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
    max_num_seqs = state.engine.max_num_seqs
    if request.n > max_num_seqs:
        raise APIError(400, f"n must be <= {max_num_seqs} (the server's max_num_seqs), got {request.n}", "n")
    if request.min_tokens and _bans_everything(request, state):
        raise APIError(400, "min_tokens cannot be met: stop_token_ids and EOS cover the whole vocabulary", "min_tokens")
    fields = {name: getattr(request, name) for name in _DEFAULTED}
    fields = {name: getattr(state.defaults, name) if value is None else value for name, value in fields.items()}
    try:
        return SamplingParams(
            **fields,
            n=request.n,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            seed=request.seed,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
            min_tokens=request.min_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
            max_tokens=max_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except ValueError as e:
        raise bad_value(e, rename) from None


def _bans_everything(request: SamplingFields, state: ServeState) -> bool:
    """Before min_tokens, EOS and the stop ids are masked; if that is every token a random row has nothing to
    draw from, and a step that fails fails the whole batch."""
    banned = set(request.stop_token_ids or ())
    if not request.ignore_eos:
        banned.update(state.eos_token_ids)
    return len(banned) >= state.tokens.vocab_size and all(t in banned for t in range(state.tokens.vocab_size))
