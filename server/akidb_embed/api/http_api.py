"""The OpenAI-compatible HTTP layer: decode the JSON, call the domain service, encode.

Routes: POST /v1/embeddings, GET /v1/models, GET /v1/models/{model}, GET /info and
GET /health. Errors come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with HTTP codes mapped from the domain's error kinds (the same kinds the gRPC layer maps to
status codes). uvicorn runs it inside the server's event loop, without signal handlers of
its own: EmbeddingServer starts it and drains it with the gRPC server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import socket
import stat
import time
from collections.abc import Awaitable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Message, Receive, Scope, Send

from ..errors import Cancelled, EmbedError, ErrorKind
from ..modeling.engine import EmbedOptions, PromptKind
from ..modeling.tokenization import Truncation
from ..observability.logs import REQUEST_ID
from ..observability.metrics import Metrics
from ..service.service import EmbeddingService, EmbedResult, ModelState
from .interceptor import REQUEST_ID_KEY, request_id_from

log = logging.getLogger(__name__)
# One line per request, as for RPCs: route, status, items, tokens, milliseconds.
access_log = logging.getLogger("akidb_embed.access")
T = TypeVar("T")
# Where a route leaves what it embedded, for the access line.
ITEMS_KEY, TOKENS_KEY = "akidb_embed.items", "akidb_embed.tokens"

# Domain error kinds -> HTTP status codes. FAILED_PRECONDITION (the model is known but not
# downloaded, damaged, or gated) is 400, as in google.rpc.Code's HTTP mapping: the request
# cannot succeed until someone acts (the message names the command), so it must not be a
# 5xx or 409, which the openai SDK and LangChain retry, nor a 503 that takes the instance
# out of a load balancer for a fault of one model.
HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.FAILED_PRECONDITION: 400,
    ErrorKind.RESOURCE_EXHAUSTED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.DEADLINE_EXCEEDED: 504,
    # The client closed the connection first: nginx's "client closed request". Nobody
    # receives it; the metrics and the access log show it.
    ErrorKind.CANCELLED: 499,
    ErrorKind.INTERNAL: 500,
}
RETRY_AFTER_SECONDS = 1
# Float output this large (values) is JSON-encoded off the event loop.
ENCODE_IN_THREAD_VALUES = 65_536
# A body over the limit is read (and dropped) up to this many times the limit, so the
# client gets its 413 instead of a reset connection; past it the connection is closed.
DRAIN_FACTOR = 4

_TRUNCATION = {"end": Truncation.END, "start": Truncation.START, "error": Truncation.ERROR}
_PROMPTS = {
    "prompt_name": PromptKind.NAME,
    "prompt": PromptKind.LITERAL,
    "instruction": PromptKind.INSTRUCTION,
}
_FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "normalize", "truncation")
KNOWN_FIELDS = frozenset(_FIELDS) | frozenset(_PROMPTS)
INPUT_SHAPES = (
    "input must be a string, a list of strings, a list of token ids, or a list of token id "
    "lists (one kind per request)"
)


class HttpError(Exception):
    """An error of the HTTP layer itself (the body, the route, the key)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


class ApiKeyError(Exception):
    """The API key file cannot be used."""


class ListenError(EmbedError):
    kind = ErrorKind.UNAVAILABLE


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_response(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
    out = dict(headers or {})
    if status in (429, 503):
        out.setdefault("retry-after", str(RETRY_AFTER_SECONDS))
    return json_response(body, status, out)


def json_response(
    body: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(dumps(body), status, dict(headers or {}), media_type="application/json")


def dumps(body: object) -> bytes:
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def bug_response() -> Response:
    return error_response(
        500,
        f"internal error (request id {REQUEST_ID.get()}); this is a server bug: report it "
        "with the server's log",
        ErrorKind.INTERNAL.value,
    )


def domain_error_response(error: EmbedError) -> Response:
    return error_response(HTTP_STATUS[error.kind], error.message, error.kind.value)


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    texts: list[str] | None
    token_ids: list[list[int]] | None
    options: EmbedOptions
    base64: bool


def _invalid(message: str, param: str) -> HttpError:
    return HttpError(400, message, "invalid_argument", param)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, float):
        return "a number with a fraction"
    return names.get(type(value), "a number" if _is_int(value) else type(value).__name__)


def decode_input(value: object) -> tuple[list[str] | None, list[list[int]] | None]:
    """`input` -> texts, or token id lists."""
    if isinstance(value, str):
        return [value], None
    if not isinstance(value, list):
        raise _invalid(f"input is {_type_name(value)}; {INPUT_SHAPES}", "input")
    if not value:
        raise _invalid(f"input is an empty list; {INPUT_SHAPES}", "input")
    first = value[0]
    if isinstance(first, str):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise _invalid(
                    f"input[{index}] is {_type_name(item)} in a list of strings; {INPUT_SHAPES}",
                    "input",
                )
        return list(value), None
    if _is_int(first):
        for index, item in enumerate(value):
            if not _is_int(item):
                raise _invalid(
                    f"input[{index}] is {_type_name(item)} in a list of token ids; {INPUT_SHAPES}",
                    "input",
                )
        return None, [list(value)]
    if isinstance(first, list):
        for index, row in enumerate(value):
            if not isinstance(row, list):
                raise _invalid(
                    f"input[{index}] is {_type_name(row)} in a list of token id lists; "
                    f"{INPUT_SHAPES}",
                    "input",
                )
            for position, item in enumerate(row):
                if not _is_int(item):
                    raise _invalid(
                        f"input[{index}][{position}] is {_type_name(item)}, not a token id; "
                        f"{INPUT_SHAPES}",
                        "input",
                    )
        return None, [list(row) for row in value]
    raise _invalid(f"input[0] is {_type_name(first)}; {INPUT_SHAPES}", "input")


def decode_embeddings_request(body: object) -> EmbeddingsRequest:
    if not isinstance(body, dict):
        raise _invalid(
            f'the body is {_type_name(body)}; send a JSON object like {{"input": "some text"}}',
            "body",
        )
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise _invalid(
            f"unrecognized request field {unknown[0]!r}; the fields are: "
            + ", ".join(sorted(KNOWN_FIELDS)),
            unknown[0],
        )
    if "input" not in body:
        raise _invalid(f"input is missing; {INPUT_SHAPES}", "input")
    texts, token_ids = decode_input(body["input"])

    model = body.get("model") or ""
    if not isinstance(model, str):
        raise _invalid(f"model is {_type_name(model)}; send a model name (GET /v1/models)", "model")

    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _invalid(
            f"encoding_format={encoding!r} is not supported; use 'float' or 'base64'",
            "encoding_format",
        )

    dimensions = body.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
        raise _invalid(
            f"dimensions={json.dumps(dimensions)} is not a positive integer; leave it out "
            "for the model's native size",
            "dimensions",
        )

    normalize = body.get("normalize", True)
    if not isinstance(normalize, bool):
        raise _invalid(f"normalize is {_type_name(normalize)}; send true or false", "normalize")

    truncation_name = body.get("truncation") or "end"
    truncation = _TRUNCATION.get(truncation_name) if isinstance(truncation_name, str) else None
    if truncation is None:
        raise _invalid(
            f"truncation={json.dumps(truncation_name)} is not a policy; use 'end' (keep the "
            "start), 'start' (keep the end) or 'error'",
            "truncation",
        )

    prompts = [name for name in _PROMPTS if body.get(name) is not None]
    if len(prompts) > 1:
        raise _invalid(
            f"{' and '.join(prompts)} are both set; send at most one of prompt_name, prompt "
            "and instruction",
            prompts[1],
        )
    prompt_kind, prompt_value = PromptKind.NONE, ""
    if prompts:
        value = body[prompts[0]]
        if not isinstance(value, str):
            raise _invalid(f"{prompts[0]} is {_type_name(value)}; send a string", prompts[0])
        prompt_kind, prompt_value = _PROMPTS[prompts[0]], value

    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid(f"user is {_type_name(user)}; send a string", "user")

    return EmbeddingsRequest(
        model=model,
        texts=texts,
        token_ids=token_ids,
        options=EmbedOptions(
            normalize=normalize,
            dimensions=dimensions or 0,
            truncation=truncation,
            prompt_kind=prompt_kind,
            prompt_value=prompt_value,
        ),
        base64=encoding == "base64",
    )


def encode_embeddings(result: EmbedResult, as_base64: bool) -> dict[str, Any]:
    vectors = result.vectors
    data: list[dict[str, Any]] = []
    if as_base64:
        little = vectors.astype("<f4", copy=False)
        rows: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        rows = vectors.tolist()
    for index, row in enumerate(rows):
        data.append({"object": "embedding", "index": index, "embedding": row})
    return {
        "object": "list",
        "data": data,
        "model": result.model,
        "usage": {"prompt_tokens": result.total_tokens, "total_tokens": result.total_tokens},
    }


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 past `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise too_large(int(declared), limit, close=True)
    body = bytearray()
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_FACTOR * limit:
            raise too_large(size, limit, close=True)
        if size <= limit:
            body += chunk
    if size > limit:
        raise too_large(size, limit, close=False)
    return bytes(body)


def too_large(size: int, limit: int, close: bool) -> HttpError:
    return HttpError(
        413,
        f"the request body has {'at least ' if close else ''}{size} bytes; the limit is "
        f"{limit} (--max-message-mb): split the input into several requests",
        "request_too_large",
        "input",
        {"connection": "close"} if close else None,
    )


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError as error:  # UnicodeDecodeError is one
        raise _invalid(
            f'the request body is not JSON ({error}); send a JSON object like {{"input": '
            '"some text"}',
            "body",
        ) from None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Run `work` while the client is there: if it closes the connection first, cancel the
    work, so its queued texts cost no compute."""
    task = asyncio.ensure_future(work)
    # Once cancelled, nobody awaits it: take its outcome so none is reported as lost.
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise Cancelled("the client closed the connection before the embeddings were ready")
    return task.result()


def load_api_keys(path: Path) -> tuple[str, ...]:
    """Keys from a file: one a line; blank lines and lines starting with # are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as error:
        raise ApiKeyError(f"cannot read the API key file {path}: {error}") from None
    lines = (line.strip() for line in text.splitlines())
    keys = tuple(line for line in lines if line and not line.startswith("#"))
    if not keys:
        raise ApiKeyError(f"the API key file {path} holds no key: write one key a line")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "the API key file %s is open to other users (mode %o): chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    return keys


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 0
    # Bearer tokens that /v1/* and /info accept; empty: no authentication.
    api_keys: tuple[str, ...] = ()
    max_request_bytes: int = 64 * 1024 * 1024
    backend: str = ""
    # What /info reports under "limits".
    limits: Mapping[str, int | float] = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


class HttpFrontEnd:
    """The ASGI application: routes, and around them the request id, authentication, the
    drain's refusals, metrics and the access log."""

    def __init__(self, service: EmbeddingService, metrics: Metrics, settings: HttpSettings):
        self.service = service
        self.metrics = metrics
        self.settings = settings
        self.started_wall = int(time.time())
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._keys = [key.encode() for key in settings.api_keys]
        self.app = Starlette(
            routes=[
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
                Route("/info", self.info, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={
                EmbedError: self._on_domain_error,
                HttpError: self._on_http_error,
                HTTPException: self._on_starlette_error,
                # Starlette answers with this, then re-raises to __call__, which logs it.
                Exception: self._on_bug,
            },
        )

    # --- around every request ---

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = self.route_of(scope)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        request_id = request_id_from(headers)
        REQUEST_ID.set(request_id)
        status = 0
        finished = False

        def finish() -> None:
            """Count the request once: before its last bytes leave (a client that has its
            answer finds it in the metrics), or when it ends without an answer."""
            nonlocal finished
            if finished:
                return
            finished = True
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
            self.metrics.http_in_flight.dec()
            code = str(status or HTTP_STATUS[ErrorKind.CANCELLED])
            seconds = time.perf_counter() - started
            self.metrics.http_requests.labels(scope["method"], route, code).inc()
            self.metrics.http_seconds.labels(scope["method"], route).observe(seconds)
            ms = round(seconds * 1000, 1)
            method = f"{scope['method']} {scope['path']}"
            items, tokens = scope.get(ITEMS_KEY, 0), scope.get(TOKENS_KEY, 0)
            access_log.log(
                logging.DEBUG if route == "/health" else logging.INFO,  # probes: quiet
                "HTTP %s %s items=%d tokens=%d %.1f ms",
                method,
                code,
                items,
                tokens,
                ms,
                extra={
                    "request_id": request_id,
                    "method": method,
                    "status": code,
                    "items": items,
                    "tokens": tokens,
                    "ms": ms,
                },
            )

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(REQUEST_ID_KEY.encode(), request_id.encode())]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finish()
            await send(message)

        self.in_flight += 1
        self._idle.clear()
        self.metrics.http_in_flight.inc()
        try:
            refusal = self.refusal(route, headers)
            if refusal is not None:
                await refusal(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if status == 0:
                await bug_response()(scope, receive, sending)
        finally:
            finish()

    def route_of(self, scope: Scope) -> str:
        for candidate in self.app.routes:
            match, _ = candidate.matches(scope)
            if match is not Match.NONE and isinstance(candidate, Route):
                return candidate.path
        return "unmatched"

    def refusal(self, route: str, headers: Sequence[tuple[str, str]]) -> Response | None:
        if route == "/health":
            return None
        if self._keys and not self.authorized(headers):
            return error_response(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer KEY' with a "
                "key from the server's --api-key-file",
                "invalid_api_key",
                headers={"www-authenticate": "Bearer"},
            )
        if not self.service.accepting:
            return error_response(
                503,
                "the server is shutting down; retry on another instance",
                ErrorKind.UNAVAILABLE.value,
                headers={"connection": "close"},
            )
        return None

    def authorized(self, headers: Sequence[tuple[str, str]]) -> bool:
        for key, value in headers:
            if key == "authorization":
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer":
                    return False
                given = token.strip().encode()
                # Compare with every key, in constant time for each.
                return any([hmac.compare_digest(given, known) for known in self._keys])
        return False

    async def wait_idle(self, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self.in_flight == 0

    # --- errors ---

    async def _on_domain_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, EmbedError)
        return domain_error_response(error)

    async def _on_http_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HttpError)
        return error_response(error.status, error.message, error.code, error.param, error.headers)

    async def _on_bug(self, request: Request, error: Exception) -> Response:
        return bug_response()

    async def _on_starlette_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        where = f"{request.method} {request.url.path}"
        if error.status_code == 404:
            message = f"no route {where}; the routes are {self.route_list()}"
            return error_response(404, message, "route_not_found")
        if error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            message = f"{where} is not allowed; use {allowed}"
            return error_response(405, message, "method_not_allowed", headers=error.headers)
        return error_response(error.status_code, f"{where}: {error.detail}", "http_error")

    def route_list(self) -> str:
        out: list[str] = []
        for route in self.app.routes:
            if isinstance(route, Route):
                out.extend(f"{m} {route.path}" for m in sorted(route.methods or ()) if m != "HEAD")
        return ", ".join(out)

    # --- routes ---

    async def embeddings(self, request: Request) -> Response:
        body = await read_body(request, self.settings.max_request_bytes)
        parsed = decode_embeddings_request(parse_json(body))
        if parsed.token_ids is not None:
            work = self.service.embed_token_ids(parsed.model, parsed.token_ids, parsed.options)
        else:
            assert parsed.texts is not None
            work = self.service.embed(parsed.model, parsed.texts, parsed.options)
        result = await until_disconnected(request.receive, work)
        request.scope[ITEMS_KEY] = len(result.token_counts)
        request.scope[TOKENS_KEY] = result.total_tokens
        size = result.vectors.size
        if not parsed.base64 and size > ENCODE_IN_THREAD_VALUES:
            content = await asyncio.to_thread(
                lambda: dumps(encode_embeddings(result, parsed.base64))
            )
        else:
            content = dumps(encode_embeddings(result, parsed.base64))
        return Response(content, media_type="application/json")

    def _model_object(self, name: str, state: ModelState, is_default: bool) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self.started_wall,
            "owned_by": "akidb-embed",
            "state": state.value,
            "is_default": is_default,
        }

    async def list_models(self, request: Request) -> Response:
        data = [
            self._model_object(s.entry.name, s.state, s.is_default) for s in self.service.statuses()
        ]
        return json_response({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        for status in self.service.statuses():
            if status.entry.name == name:
                return json_response(self._model_object(name, status.state, status.is_default))
        known = ", ".join(s.entry.name for s in self.service.statuses())
        raise HttpError(404, f"unknown model {name!r}; known models: {known}", "not_found")

    async def info(self, request: Request) -> Response:
        models = []
        for status in self.service.statuses():
            model: dict[str, Any] = {
                "name": status.entry.name,
                "source": status.entry.source,
                "state": status.state.value,
                "is_default": status.is_default,
            }
            if status.reason:
                model["reason"] = status.reason
            if status.located is not None:
                model["revision"] = status.located.revision
                model["size_on_disk_bytes"] = status.located.size_bytes
            if status.engine is not None:
                profile = status.engine.profile
                model.update(
                    architecture=profile.architecture,
                    dimensions=profile.dimensions,
                    matryoshka_dimensions=list(profile.matryoshka_dimensions),
                    min_dimensions=profile.min_dimensions,
                    max_tokens=profile.max_tokens,
                    pooling=profile.pooling.value,
                    dtype=profile.dtype,
                    prompts=dict(profile.prompts),
                    memory_bytes=status.engine.memory_bytes,
                )
            models.append(model)
        return json_response(
            {
                "version": self.service.version,
                "backend": self.settings.backend,
                "serving": self.service.ready and self.service.accepting,
                "uptime_seconds": round(self.service.uptime_seconds, 3),
                "default_model": self.service.registry.default_model,
                "models": models,
                "limits": dict(self.settings.limits),
                "auth": bool(self._keys),
            }
        )

    async def health(self, request: Request) -> Response:
        if not self.service.accepting:
            return json_response({"status": "draining"}, 503, {"connection": "close"})
        if not self.service.ready:
            return json_response({"status": "loading"}, 503)
        return json_response({"status": "serving"})


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn in an event loop it does not own: the server's signal handlers drain it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn before 0.29
        pass


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Its protocol must say TCP: asyncio sets TCP_NODELAY on the
    connections only then, and without it a response sent in two writes (head, body) waits
    for the client's delayed ACK, 40 ms on Linux."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(address)
            sock.listen(2048)
        except BaseException:
            sock.close()
            raise
    except OSError as error:
        raise ListenError(
            f"cannot listen for HTTP on {host}:{port}: {error.strerror or error}; "
            "choose another --http-port or --http-host"
        ) from None
    return sock


class HttpEndpoint:
    """The HTTP server on host:port, run as a task in the current event loop."""

    def __init__(self, front: HttpFrontEnd) -> None:
        self.front = front
        self.host = front.settings.host
        self.port = front.settings.port
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        # uvicorn's own lines ("Started server process", "Shutting down") repeat what the
        # server logs; its warnings and errors still come through.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        sock = listen(self.host, self.port)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.front,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=30,
        )
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise ListenError(f"the HTTP server on {self.url} stopped while starting")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP on %s/v1", self.url)
        if not is_loopback(self.host) and not self.front.settings.api_keys:
            log.warning(
                "HTTP listens on %s without --api-key-file: anyone who reaches the port can "
                "use the server",
                self.host,
            )

    async def stop(self, grace: float) -> None:
        """Let in-flight requests finish (new ones get 503 meanwhile), then close."""
        if self._server is None or self._task is None:
            return
        started = time.monotonic()
        if not await self.front.wait_idle(grace):
            log.warning(
                "%d HTTP requests still running after the %.0fs grace: closing them",
                self.front.in_flight,
                grace,
            )
        left = grace - (time.monotonic() - started)
        self._server.config.timeout_graceful_shutdown = max(1, int(left))
        self._server.should_exit = True
        await self._task


__all__ = [
    "HTTP_STATUS",
    "ApiKeyError",
    "HttpEndpoint",
    "HttpFrontEnd",
    "HttpSettings",
    "load_api_keys",
]
