"""Logprob values and token strings as the OpenAI response shapes carry them."""

from __future__ import annotations

from slimlm.outputs import Logprob
from slimlm.serve.tokens import Tokens

# JSON has no -inf; vLLM reports impossible tokens at this floor too.
LOGPROB_FLOOR = -9999.0


def clamp(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN fails the test too


def token_string(tokens: Tokens, token_id: int, lp: Logprob | None) -> str:
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else tokens.token_text(token_id)
