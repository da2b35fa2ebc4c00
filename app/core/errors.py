"""OpenAI-shaped errors: every failure is {"error": {"message", "type", "param", "code"}}."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import get_route_path


class APIError(Exception):
    status_code = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class InvalidRequest(APIError):
    pass


class NotFound(APIError):
    status_code = 404

    def __init__(self, message: str, *, param: str | None = None, code: str = "not_found"):
        super().__init__(message, param=param, code=code)


class Unauthorized(APIError):
    status_code = 401
    type = "authentication_error"

    def __init__(self, message: str):
        super().__init__(message, code="invalid_api_key")


class Conflict(APIError):
    status_code = 409


class PayloadTooLarge(APIError):
    status_code = 413

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, param=param, code="file_too_large")


class ServiceUnavailable(APIError):
    status_code = 503
    type = "server_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


SOURCES = {"body", "query", "path", "header", "form"}


def _validation_param(loc: tuple) -> str | None:
    # pydantic names each member of a union in the location (e.g. "literal['auto']", "int"):
    # the client only needs the field.
    parts = [str(p) for p in loc if p not in SOURCES and not _is_union_tag(p)]
    return ".".join(parts) or None


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and (
        "[" in part
        or part in {"int", "float", "str", "bool", "list", "dict"}
        or part.startswith("constrained-")
    )


# What pydantic says when the body is missing, is not JSON of an object, or has another content type.
_NOT_AN_OBJECT = {"missing", "model_attributes_type", "dict_type"}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}.", None
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in _NOT_AN_OBJECT:
        return "Send the request body as a JSON object, with 'Content-Type: application/json'.", None
    param = _validation_param(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and param:
        return f"Missing required parameter: '{param}'.", param
    # Every alternative pydantic tried for this field (or inside it), e.g. "'auto'" or "an integer >= 1".
    reasons = []
    for err in errors:
        err_param = _validation_param(tuple(err.get("loc", ())))
        inside = err_param == param or (param and err_param and err_param.startswith(f"{param}."))
        if inside and err["msg"] not in reasons:
            reasons.append(err["msg"])
    reason = " or ".join(reasons)
    return (f"Invalid value for '{param}': {reason}." if param else f"{reason}."), param


def allowed_methods(request: Request) -> str:
    """The methods of every route on this path: Starlette's own 405 names only the first route's,
    and a path such as /v1/files has one route per method."""
    path = get_route_path(request.scope)
    methods = set()
    for route in iter_route_contexts(request.app.routes):
        if route.methods and route.path_regex.match(path):
            methods |= route.methods
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError):
        return JSONResponse(
            error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return JSONResponse(
            error_body(message, "invalid_request_error", param, "invalid_value"), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:
            allow = allowed_methods(request)
            return JSONResponse(
                error_body(
                    f"{request.method} is not allowed on {request.url.path}; use {allow}.",
                    "invalid_request_error",
                    None,
                    "method_not_allowed",
                ),
                status_code=405,
                headers={"Allow": allow},
            )
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(
            error_body(str(exc.detail), type_, None, code), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception):
        return JSONResponse(
            error_body("Internal server error", "server_error", None, "internal_error"),
            status_code=500,
        )
