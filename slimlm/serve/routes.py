"""The HTTP routes; the generation ones hand over to :mod:`completions` and :mod:`chat`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from slimlm.serve.chat import create_chat_completion, template_messages
from slimlm.serve.completions import create_completion
from slimlm.serve.errors import APIError, error_response
from slimlm.serve.metrics import CONTENT_TYPE
from slimlm.serve.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from slimlm.serve.state import state_of

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    if not state_of(request).engine.alive:
        return error_response(503, "the engine is not running")
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    state = state_of(request)
    card = {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "slimlm",
        "root": state.model_path,
        "max_model_len": state.max_model_len,
    }
    return {"object": "list", "data": [card]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await create_completion(body, request, state_of(request))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await create_chat_completion(body, request, state_of(request))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = state_of(request)
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", "prompt")
    if body.prompt is not None:
        ids = state.tokens.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        ids = state.tokens.chat_ids(template_messages(body.messages), body.add_generation_prompt)
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict:
    return state_of(request).tokens.info()


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = state_of(request)
    state.check_model(body.model)
    return {"prompt": state.tokens.decode(state.tokens.check_ids(body.tokens, "tokens"))}


ROUTES = frozenset(route.path for route in router.routes)
