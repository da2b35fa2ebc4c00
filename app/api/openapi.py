"""What the OpenAPI document says about failures: every operation lists the status codes it can
answer with, each with the OpenAI error body, so generated clients and fuzzers see the truth."""

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Bad request: the message says which parameter to change.",
    401: "Missing, unknown or revoked API key.",
    404: "No such object for this API key's tenant.",
    409: "The object is not in a state that allows this.",
    413: "The upload is larger than the size limit.",
    499: "The client closed the connection before the answer was ready.",
    500: "The server failed; the request may be retried.",
    503: "The server is not ready yet; retry shortly.",
}


def error_responses(*status_codes: int) -> dict[int | str, dict]:
    """`responses=` for a route or router: each code with the OpenAI error schema."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in status_codes}
