"""What the OpenAPI document says about failures: every operation lists the status codes it can
answer with, each with the OpenAI error body, so generated clients and fuzzers see the truth."""

from fastapi import FastAPI
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, the answer of every 4xx and 5xx."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Bad request: the message says which parameter to change.",
    401: "Missing, unknown or revoked API key.",
    404: "No such object for this API key's tenant.",
    409: "The request conflicts with an earlier one (e.g. an Idempotency-Key reused with other parameters).",
    413: "The upload is larger than the size limit.",
    499: "The client closed the connection before the answer was ready.",
    500: "The server failed; the request may be retried.",
    503: "The server is not ready yet; retry shortly.",
}


def error_responses(*status_codes: int) -> dict[int | str, dict]:
    """`responses=` for a route or router: each code with the OpenAI error schema."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in status_codes}


def text_response(media_type: str, description: str, schema: dict | None = None) -> dict[int | str, dict]:
    """`responses=` for a 200 whose body is text in `media_type` rather than JSON."""
    content = {media_type: {"schema": schema or {"type": "string"}}}
    return {200: {"description": description, "content": content}}


def event_stream_response(chunk: type[BaseModel]) -> dict[int | str, dict]:
    """`responses=` adding the answer to `stream: true`: server-sent events. Before OpenAPI 3.2's
    `itemSchema`, the schema of text/event-stream describes one event."""
    data = (
        f"A {chunk.__name__} in JSON (an error object if generation fails midway); "
        "the last event's is `[DONE]`."
    )
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string", "description": data}},
    }
    description = "The answer in JSON; with `stream: true`, server-sent events."
    return text_response("text/event-stream", description, event)


_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install_openapi(app: FastAPI) -> None:
    """Build the document without FastAPI's automatic 422 "Validation Error" answers: this API
    answers invalid requests with 400 and the OpenAI error body (app.core.errors), and each route
    declares its 400 with the rest of its error codes."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in _VALIDATION_SCHEMAS:
                schemas.pop(name, None)
        return app.openapi_schema

    app.openapi = openapi
