"""Inference: OpenAI chat and text completions (whole or streamed as SSE) and the short /generate.

Each route turns its body into the service's one input shape and answers the same way: submit
to the engine of its base (app.state.served), then the whole answer or an SSE stream in the
endpoint's shapes."""

import secrets
import time

from fastapi import APIRouter, Request

from app.api.deps import ApiKeyDep
from app.api.openapi import error_responses, event_stream_response
from app.api.sse import stream_response
from app.inference.messages import Completion
from app.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkDelta,
    CompletionChoice,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    TextCompletion,
    Usage,
)
from app.services import inference as service

router = APIRouter(tags=["inference"], responses=error_responses(400, 401, 404, 499, 500, 503))


def _usage(done: Completion) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )


class _OpenAIAnswer:
    """An OpenAI answer, whole or as stream chunks: the finish chunk, then usage if asked for."""

    id_prefix: str

    def __init__(self, body: ChatCompletionRequest | CompletionRequest):
        self.meta = {
            "id": f"{self.id_prefix}-{secrets.token_hex(12)}",
            "created": int(time.time()),
            "model": body.model,
        }
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def delta(self, text: str):
        return self.chunk([self.choice(text)])

    def closing(self, done: Completion):
        yield self.chunk([self.choice(finish_reason=done.finish_reason)])
        if self.include_usage:
            yield self.chunk([], _usage(done))


class _ChatAnswer(_OpenAIAnswer):
    id_prefix = "chatcmpl"

    def whole(self, text: str, done: Completion) -> ChatCompletion:
        message = AssistantMessage(content=text)
        choice = ChatChoice(message=message, finish_reason=done.finish_reason)
        return ChatCompletion(**self.meta, usage=_usage(done), choices=[choice])

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.meta, choices=choices, usage=usage)

    def choice(self, text: str | None = None, finish_reason: str | None = None) -> ChatChunkChoice:
        return ChatChunkChoice(delta=ChunkDelta(content=text), finish_reason=finish_reason)

    def opening(self) -> list[ChatCompletionChunk]:
        return [self.chunk([ChatChunkChoice(delta=ChunkDelta(role="assistant", content=""))])]


class _TextAnswer(_OpenAIAnswer):
    id_prefix = "cmpl"

    def whole(self, text: str, done: Completion) -> TextCompletion:
        choice = CompletionChoice(text=text, finish_reason=done.finish_reason)
        return TextCompletion(**self.meta, usage=_usage(done), choices=[choice])

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> TextCompletion:
        return TextCompletion(**self.meta, choices=choices, usage=usage)

    def choice(self, text: str | None = None, finish_reason: str | None = None) -> CompletionChoice:
        return CompletionChoice(text=text or "", finish_reason=finish_reason)

    def opening(self) -> list[TextCompletion]:
        return []


class _GenerateAnswer:
    def __init__(self, body: GenerateRequest):
        self.model = body.model

    def whole(self, text: str, done: Completion) -> GenerateResponse:
        usage = _usage(done)
        return GenerateResponse(model=self.model, text=text, usage=usage, finish_reason=done.finish_reason)


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer(
    request: Request,
    api_key: str,
    wanted: service.InferenceInput,
    answer: _ChatAnswer | _TextAnswer | _GenerateAnswer,
    stream: bool,
):
    """Submit, then the whole answer or, for a stream, its first event before the 200."""
    results = await service.submit(getattr(request.app.state, "served", None), api_key, wanted)
    model = wanted.body.model
    if not stream:
        text, done = await service.collect(results, model, _disconnected(request))
        return answer.whole(text, done)
    first = await service.first_event(results, model)
    return stream_response(service.events(results, model, first, paced=True), answer)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=event_stream_response(ChatCompletionChunk),
)
async def chat_completions(body: ChatCompletionRequest, request: Request, api_key: ApiKeyDep):
    return await _answer(request, api_key, service.chat_input(body), _ChatAnswer(body), body.stream)


@router.post(
    "/v1/completions", response_model=TextCompletion, responses=event_stream_response(TextCompletion)
)
async def completions(body: CompletionRequest, request: Request, api_key: ApiKeyDep):
    return await _answer(request, api_key, service.completion_input(body), _TextAnswer(body), body.stream)


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request, api_key: ApiKeyDep):
    return await _answer(request, api_key, service.generate_input(body), _GenerateAnswer(body), False)
