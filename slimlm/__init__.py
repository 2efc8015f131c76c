"""slimlm: make open language models small and fast, and prove it with numbers."""

from slimlm.engine.llm import LLM
from slimlm.outputs import CompletionOutput, Logprob, RequestOutput
from slimlm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
