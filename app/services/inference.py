"""Inference requests: from a chat, completion or /generate body to a request in the engine (the
model resolved after the tenant check, the context-length policy, default max tokens, sampling
settings), and the engine's events back, its failures as API errors."""

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from app.core.adapter_cache import AdapterCache
from app.core.adapter_files import AdapterFileError, AdapterGone
from app.core.db import read_transaction
from app.core.errors import APIError, InvalidRequest, ServiceUnavailable
from app.core.metrics import INFERENCE_SUBMIT_SECONDS
from app.core.settings import Settings, get_settings
from app.core.storage import ArtifactStore, open_store
from app.inference.messages import (
    AdapterRef,
    Completion,
    EngineStopped,
    Failure,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from app.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerateRequest,
    SamplingFields,
)
from app.services.keys import lookup_tenant
from app.services.models import ResolvedModel, model_not_found, resolve_model
from app.services.serving import ServedBases

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


class ClientClosedRequest(APIError):
    """The client went away before a non-streamed answer was ready (nginx's 499): nobody reads
    this response, but the request metrics count it."""

    status_code = 499


@dataclass(frozen=True)
class InferenceInput:
    """What chat, completions and /generate ask of the engine, in one shape."""

    body: SamplingFields  # the model and the sampling settings
    prompt: str | None
    messages: list[ChatMessage] | None
    max_tokens: int | None
    max_tokens_param: str
    default_max_tokens: int | None


def chat_input(body: ChatCompletionRequest) -> InferenceInput:
    max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.max_tokens, "max_tokens"
    return InferenceInput(body, None, body.messages, max_tokens, param, None)


def completion_input(body: CompletionRequest) -> InferenceInput:
    prompt = body.prompt[0] if isinstance(body.prompt, list) else body.prompt  # one, says the schema
    return InferenceInput(body, prompt, None, body.max_tokens, "max_tokens", DEFAULT_COMPLETION_TOKENS)


def generate_input(body: GenerateRequest) -> InferenceInput:
    return InferenceInput(
        body, body.prompt, body.messages, body.max_new_tokens, "max_new_tokens", DEFAULT_GENERATE_TOKENS
    )


def _chat_dicts(messages: list[ChatMessage]) -> list[dict]:
    # The base models' chat templates know "system", not OpenAI's newer "developer".
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


async def submit(served: ServedBases | None, api_key: str, wanted: InferenceInput):
    """Validate and submit to the engine of the model's base (`served` is None while the server
    starts); returns its result stream."""
    if served is None:
        raise ServiceUnavailable("The inference engine is not ready yet; retry shortly.")
    started = time.monotonic()
    body = wanted.body

    settings = get_settings()

    def prepare():
        with read_transaction() as connection:
            resolved = resolve_model(connection, settings, lookup_tenant(connection, api_key), body.model)
        engine = served.engine_for(resolved.base_model, body.model)
        if wanted.messages is not None:
            return engine, resolved, engine.encode_chat(_chat_dicts(wanted.messages))
        return engine, resolved, engine.encode_prompt(wanted.prompt)

    # The key and model lookups and the tokenizing, off the event loop in one worker-thread hop:
    # under load each hop waits for the GIL behind the engine thread, and it adds up in time to
    # first token. (So a bad key with an invalid body gets the body's 400; a missing key, 401.)
    loop = asyncio.get_running_loop()
    engine, resolved, prompt_ids = await loop.run_in_executor(
        _PREPARE, contextvars.copy_context().run, prepare
    )
    max_tokens = _max_tokens(wanted, len(prompt_ids), engine.context_window)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=stop,
        seed=body.seed,
    )
    adapter = None
    if resolved.version:
        store = open_store(settings)
        # On the data dir the engine reads the adapter's own directory; from object storage, this
        # replica's cached, verified copy of the version (downloaded first if need be).
        adapter_dir = store.local_path(resolved.adapter_key) or await loop.run_in_executor(
            _MATERIALIZE, _cached_adapter_dir, settings, store, resolved
        )
        adapter = AdapterRef(resolved.version, adapter_dir)
    try:
        results = engine.submit(GenerationRequest(resolved.id, prompt_ids, params, adapter))
    except EngineStopped as exc:
        raise ServiceUnavailable(str(exc)) from exc
    INFERENCE_SUBMIT_SECONDS.observe(time.monotonic() - started)
    return results


# Downloads of adapters from object storage, off the lookup thread: a cold one takes a while.
_MATERIALIZE = ThreadPoolExecutor(4, thread_name_prefix="adapter-fetch")


@lru_cache
def _adapter_cache(root: Path, max_bytes: int, max_entries: int) -> AdapterCache:
    return AdapterCache(root, max_bytes, max_entries)


def _cached_adapter_dir(settings: Settings, store: ArtifactStore, resolved: ResolvedModel) -> Path:
    cache = _adapter_cache(
        settings.adapter_cache_dir, settings.adapter_cache_bytes, settings.adapter_cache_entries
    )
    try:
        return cache.materialize(store, resolved.adapter_key, resolved.version)
    except AdapterFileError as exc:
        raise _api_error(exc, resolved.id) from None


def _max_tokens(wanted: InferenceInput, prompt_tokens: int, context: int) -> int:
    """The tokens to generate: as asked if they fit the context window after the prompt, else a
    400; by default the endpoint's default, capped by the room left."""
    prompt_param = "prompt" if wanted.messages is None else "messages"
    room = context - prompt_tokens
    if room < 1:
        raise InvalidRequest(
            f"This model's maximum context length is {context} tokens; the {prompt_param} has "
            f"{prompt_tokens} tokens. Shorten it.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if wanted.max_tokens is None:
        return min(room, wanted.default_max_tokens or room)
    if wanted.max_tokens > room:
        raise InvalidRequest(
            f"This model's maximum context length is {context} tokens; {prompt_tokens} in the "
            f"{prompt_param} plus {wanted.max_tokens} to generate exceed it. Lower "
            f"{wanted.max_tokens_param} to at most {room}.",
            param=wanted.max_tokens_param,
            code="context_length_exceeded",
        )
    return wanted.max_tokens


def _api_error(error: Exception, model_id: str) -> APIError:
    if isinstance(error, EngineStopped):
        return ServiceUnavailable(str(error))
    if isinstance(error, AdapterGone):
        return model_not_found(model_id)
    if isinstance(error, AdapterFileError):
        return AdapterUnavailable(
            f"The model '{model_id}' cannot be served: {error}", param="model", code="adapter_invalid"
        )
    return AdapterUnavailable(f"Generation failed: {error}", code="internal_error")


async def first_event(stream, model_id: str) -> TextDelta | Completion:
    """Wait for the first event so that refusals (bad adapter, deleted model) are HTTP errors
    rather than errors inside a 200 stream."""
    try:
        event = await stream.get()
    except BaseException:
        stream.cancel()
        raise
    if isinstance(event, Failure):
        raise _api_error(event.error, model_id)
    return event


async def events(stream, model_id: str, first=None, paced=False) -> AsyncIterator[TextDelta | Completion]:
    """TextDelta events, then the Completion; a Failure becomes an APIError. Cancels the request
    in the engine if the caller stops listening (client gone). `paced` (an SSE stream): deltas
    no closer together than TUNEFORGE_STREAM_CHUNKS_PER_S allows with this process's paced
    streams open; the text that comes meanwhile goes out joined in the next one."""
    global _paced_streams
    loop = asyncio.get_running_loop()
    rate = get_settings().stream_chunks_per_s if paced else 0
    _paced_streams += bool(rate)
    try:
        event = first or await stream.get()
        while True:
            if isinstance(event, Failure):
                raise _api_error(event.error, model_id)
            sent = loop.time()
            yield event
            if isinstance(event, Completion):
                return
            if rate:
                # A socket write per stream per decode step would take most of the event loop's
                # time at 64 streams (measured); the end is never held back.
                wait = sent + _paced_streams / rate - loop.time()
                if wait > 0:
                    await stream.pause(wait)
            event = await stream.get()
    finally:
        _paced_streams -= bool(rate)
        stream.cancel()


_paced_streams = 0  # SSE streams open in this process (they all run on its one event loop)


async def collect(stream, model_id: str, client_gone: Awaitable) -> tuple[str, Completion]:
    """The whole text and the Completion. If `client_gone` finishes first, the request is
    cancelled in the engine, so its batch row does not run on for nobody."""

    async def text_and_completion():
        text = []
        async for event in events(stream, model_id):
            if isinstance(event, Completion):
                return "".join(text), event
            text.append(event.text)
        raise AssertionError("the engine ended a stream without a Completion")

    collecting, watching = asyncio.ensure_future(text_and_completion()), asyncio.ensure_future(client_gone)
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
