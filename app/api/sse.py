"""Server-sent events: an answer streamed as `data:` chunks, ending in `data: [DONE]`."""

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from app.core.errors import APIError, error_body
from app.inference.messages import Completion, TextDelta

# Stands in for the text of a delta chunk rendered once; see stream_response.
_DELTA_MARK = "__tuneforge_delta__"


def stream_response(events: AsyncIterator[TextDelta | Completion], chunks) -> StreamingResponse:
    """`chunks.opening()`, one `chunks.delta(text)` per TextDelta, `chunks.closing(completion)`,
    then [DONE]; an APIError on the way is sent as an error chunk. The delta chunk is rendered once
    with a marker for its text; each delta's line is that JSON with the text spliced in as a JSON
    string, which is many times cheaper than a model per token."""
    head, _, tail = chunks.delta(_DELTA_MARK).model_dump_json().rpartition(json.dumps(_DELTA_MARK))

    async def body():
        for chunk in chunks.opening():
            yield f"data: {chunk.model_dump_json()}\n\n"
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    yield f"data: {head}{json.dumps(event.text, ensure_ascii=False)}{tail}\n\n"
                    continue
                for chunk in chunks.closing(event):
                    yield f"data: {chunk.model_dump_json()}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(error_body(exc.message, exc.type, exc.param, exc.code))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
