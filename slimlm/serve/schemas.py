"""Request bodies of the OpenAI-compatible routes (pydantic), as the OpenAPI schema publishes them.

Ranges are declared here so that clients and schema-driven fuzzers see them, and are checked again by
``SamplingParams``; unknown fields are ignored, as OpenAI's and vLLM's servers do. temperature and
repetition_penalty are bounded tighter than ``SamplingParams`` bounds them: the sampler works in float32,
where 1e300 is inf, and a row that turns into inf/NaN fails the step of every request in the batch.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Stop = StrictStr | list[StrictStr] | None
# One prompt, several, one as token ids, or several as token ids: the four shapes OpenAI accepts.
PromptInput = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class SamplingFields(_Body):
    """Fields both generation routes share (the vLLM extensions included)."""

    model: StrictStr | None = None
    n: StrictInt = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=1e4)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: StrictInt | None = None
    stop: Stop = None
    stop_token_ids: list[StrictInt] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=1e-4, le=1e4)
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # Accepted so that a client using them hears "unsupported" instead of being silently ignored.
    logit_bias: dict[str, float] | None = None


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: StrictInt | None = Field(16, ge=0)
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    best_of: StrictInt | None = Field(None, ge=1)
    suffix: StrictStr | None = None


class ChatMessage(_Body):
    role: StrictStr
    content: StrictStr | list[dict] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    add_generation_prompt: StrictBool = True


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[StrictInt]
