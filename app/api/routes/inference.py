"""Inference: OpenAI chat and text completions (plain and SSE streams) and the short /generate.

Handlers validate, resolve the model id (tenant check first) to an adapter version, hand the
request to the engine on app.state and relay its events; torch stays behind the engine."""

import asyncio
import contextvars
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.api.deps import ApiKeyDep, lookup_tenant
from app.core.adapter_files import AdapterFileError, AdapterGone
from app.core.db import get_read_sessionmaker
from app.core.errors import APIError, InvalidRequest, ServiceUnavailable, error_body
from app.core.settings import get_settings
from app.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChunkDelta,
    CompletionChoice,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    SamplingFields,
    TextCompletion,
    Usage,
)
from app.services.models import model_not_found, resolve_model

router = APIRouter(tags=["inference"])

DEFAULT_GENERATE_TOKENS = 128
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
# One thread for the requests' key and model lookups and tokenizing, so they finish in arrival
# order. In a thread pool, requests that arrive together share the GIL in 1 ms slices and all
# finish late, at the pace of the last one (measured: TTFT p50 at 16 concurrent, 98 -> 76 ms mean
# over 4 CPU runs of bench/http_path.py's server). A lookup is well under a millisecond.
_PREPARE = ThreadPoolExecutor(1, thread_name_prefix="request-prepare")


class AdapterUnavailable(APIError):
    status_code = 500
    type = "server_error"


def _engine(request: Request):
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.ready:
        raise ServiceUnavailable("The inference engine is not ready yet; retry shortly.")
    return engine


def _chat_dicts(messages: list[ChatMessage]) -> list[dict]:
    # The base models' chat templates know "system", not OpenAI's newer "developer".
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


async def _submit(
    request: Request,
    api_key: str,
    body: SamplingFields,
    *,
    prompt: str | None,
    messages: list[ChatMessage] | None,
    max_tokens: int | None,
    max_tokens_param: str,
    default_max_tokens: int | None,
):
    """Validate and submit; returns the engine's result stream."""
    from app.inference.adapters import AdapterRef
    from app.inference.engine import EngineStopped, GenerationRequest
    from app.inference.sampling import SamplingParams

    engine = _engine(request)

    def prepare():
        with get_read_sessionmaker()() as session, session.begin():
            resolved = resolve_model(session, get_settings(), lookup_tenant(session, api_key), body.model)
        if resolved.base_model != engine.base_model:
            raise InvalidRequest(
                f"The model '{body.model}' is built on {resolved.base_model}, which this server does "
                f"not serve (it serves {engine.base_model}).",
                param="model",
            )
        if messages is not None:
            return resolved, engine.encode_chat(_chat_dicts(messages))
        return resolved, engine.encode_prompt(prompt)

    # The key and model lookups and the tokenizing, off the event loop in one worker-thread hop:
    # under load each hop waits for the GIL behind the engine thread, and it adds up in time to
    # first token. (So a bad key with an invalid body gets the body's 422; a missing key, 401.)
    loop = asyncio.get_running_loop()
    resolved, prompt_ids = await loop.run_in_executor(_PREPARE, contextvars.copy_context().run, prepare)
    prompt_param = "prompt" if messages is None else "messages"
    context = engine.context_window
    room = context - len(prompt_ids)
    if room < 1:
        raise InvalidRequest(
            f"This model's maximum context length is {context} tokens; the {prompt_param} has "
            f"{len(prompt_ids)} tokens. Shorten it.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(room, default_max_tokens or room)
    elif max_tokens > room:
        raise InvalidRequest(
            f"This model's maximum context length is {context} tokens; {len(prompt_ids)} in the "
            f"{prompt_param} plus {max_tokens} to generate exceed it. Lower {max_tokens_param} to "
            f"at most {room}.",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=stop,
        seed=body.seed,
    )
    adapter = AdapterRef(resolved.version, resolved.adapter_dir) if resolved.version else None
    try:
        return engine.submit(GenerationRequest(resolved.id, prompt_ids, params, adapter))
    except EngineStopped as exc:
        raise ServiceUnavailable(str(exc)) from exc


def _api_error(error: Exception, model_id: str) -> APIError:
    from app.inference.engine import EngineStopped

    if isinstance(error, EngineStopped):
        return ServiceUnavailable(str(error))
    if isinstance(error, AdapterGone):
        return model_not_found(model_id)
    if isinstance(error, AdapterFileError):
        return AdapterUnavailable(
            f"The model '{model_id}' cannot be served: {error}", param="model", code="adapter_invalid"
        )
    return AdapterUnavailable(f"Generation failed: {error}", code="internal_error")


async def _events(stream, model_id: str, first=None) -> AsyncIterator:
    """TextDelta events, then the Completion; a Failure becomes an APIError. Cancels the request
    in the engine if the caller stops listening (client gone)."""
    from app.inference.engine import Completion, Failure

    try:
        event = first or await stream.get()
        while True:
            if isinstance(event, Failure):
                raise _api_error(event.error, model_id)
            yield event
            if isinstance(event, Completion):
                return
            event = await stream.get()
    finally:
        stream.cancel()


class ClientClosedRequest(APIError):
    """The client went away before a non-streamed answer was ready (nginx's 499): nobody reads
    this response, but the request metrics count it."""

    status_code = 499


async def _collect(request: Request, stream, model_id: str) -> tuple[str, object]:
    """The whole text and the Completion. If the client goes away first, the request is cancelled
    in the engine, so its batch row does not run on for nobody."""
    from app.inference.engine import Completion

    async def collect():
        text = []
        async for event in _events(stream, model_id):
            if isinstance(event, Completion):
                return "".join(text), event
            text.append(event.text)
        raise AssertionError("the engine ended a stream without a Completion")

    async def disconnected():
        # The body has been read, so the next ASGI message is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collecting, watching = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            stream.cancel()
            collecting.cancel()
    if collecting.cancelled():
        raise ClientClosedRequest("The client closed the connection before the answer was ready.")
    return collecting.result()


async def _first_event(stream, model_id: str):
    """Wait for the first event so that refusals (bad adapter, deleted model) are HTTP errors
    rather than errors inside a 200 stream."""
    from app.inference.engine import Failure

    try:
        event = await stream.get()
    except BaseException:
        stream.cancel()
        raise
    if isinstance(event, Failure):
        raise _api_error(event.error, model_id)
    return event


def _usage(done) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )


# Stands in for the text of a delta chunk rendered once; see _sse.
_DELTA_MARK = "__tuneforge_delta__"


def _sse(stream, model_id: str, first, delta_chunk, final_chunks: Callable, preamble=()) -> StreamingResponse:
    """The SSE response: preamble chunks, one chunk per text delta, `final_chunks(completion)`.
    `delta_chunk` is rendered once with a marker for its text; each delta's line is that JSON with
    the delta spliced in as a JSON string, which is many times cheaper than a model per token."""
    head, _, tail = delta_chunk.model_dump_json().rpartition(json.dumps(_DELTA_MARK))

    async def body():
        from app.inference.engine import Completion

        for chunk in preamble:
            yield f"data: {chunk.model_dump_json()}\n\n"
        try:
            async for event in _events(stream, model_id, first):
                if not isinstance(event, Completion):
                    yield f"data: {head}{json.dumps(event.text, ensure_ascii=False)}{tail}\n\n"
                    continue
                for chunk in final_chunks(event):
                    yield f"data: {chunk.model_dump_json()}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(error_body(exc.message, exc.type, exc.param, exc.code))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _check_n(n: int | None) -> None:
    if n not in (None, 1):
        raise InvalidRequest("Only n=1 is supported.", param="n", code="invalid_value")


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, api_key: ApiKeyDep):
    _check_n(body.n)
    max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.max_tokens, "max_tokens"
    stream = await _submit(
        request,
        api_key,
        body,
        prompt=None,
        messages=body.messages,
        max_tokens=max_tokens,
        max_tokens_param=param,
        default_max_tokens=None,
    )
    meta = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}
    if not body.stream:
        text, done = await _collect(request, stream, body.model)
        return ChatCompletion(
            **meta,
            usage=_usage(done),
            choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=done.finish_reason)],
        )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    first = await _first_event(stream, body.model)

    def final_chunks(done):
        yield ChatCompletionChunk(
            **meta, choices=[ChatChunkChoice(delta=ChunkDelta(), finish_reason=done.finish_reason)]
        )
        if include_usage:
            yield ChatCompletionChunk(**meta, choices=[], usage=_usage(done))

    def chunk(**delta):
        return ChatCompletionChunk(**meta, choices=[ChatChunkChoice(delta=ChunkDelta(**delta))])

    return _sse(
        stream,
        body.model,
        first,
        chunk(content=_DELTA_MARK),
        final_chunks,
        preamble=[chunk(role="assistant", content="")],
    )


@router.post("/v1/completions", response_model=TextCompletion)
async def completions(body: CompletionRequest, request: Request, api_key: ApiKeyDep):
    _check_n(body.n)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidRequest("Send one prompt per request.", param="prompt")
        prompt = prompt[0]
    stream = await _submit(
        request,
        api_key,
        body,
        prompt=prompt,
        messages=None,
        max_tokens=body.max_tokens,
        max_tokens_param="max_tokens",
        default_max_tokens=DEFAULT_COMPLETION_TOKENS,
    )
    meta = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}
    if not body.stream:
        text, done = await _collect(request, stream, body.model)
        return TextCompletion(
            **meta,
            usage=_usage(done),
            choices=[CompletionChoice(text=text, finish_reason=done.finish_reason)],
        )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    first = await _first_event(stream, body.model)

    def final_chunks(done):
        yield TextCompletion(**meta, choices=[CompletionChoice(text="", finish_reason=done.finish_reason)])
        if include_usage:
            yield TextCompletion(**meta, choices=[], usage=_usage(done))

    delta_chunk = TextCompletion(**meta, choices=[CompletionChoice(text=_DELTA_MARK)])
    return _sse(stream, body.model, first, delta_chunk, final_chunks)


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request, api_key: ApiKeyDep):
    stream = await _submit(
        request,
        api_key,
        body,
        prompt=body.prompt,
        messages=body.messages,
        max_tokens=body.max_new_tokens,
        max_tokens_param="max_new_tokens",
        default_max_tokens=DEFAULT_GENERATE_TOKENS,
    )
    text, done = await _collect(request, stream, body.model)
    return GenerateResponse(model=body.model, text=text, usage=_usage(done), finish_reason=done.finish_reason)
