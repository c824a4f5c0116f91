"""OpenAI-compatible HTTP server (FastAPI on uvicorn): /v1/models, /v1/completions, /v1/chat/completions
(streaming as server-sent events), and run-time adapter loading from one trusted directory.

The request's `model` picks the adapter; the base model's name picks none. Generation runs on one
worker thread (see batcher.py); HTTP handlers only validate, queue, and relay text as it is produced.
Every failure is answered as an OpenAI-style JSON error and never stops the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from deltatune.errors import UserError
from deltatune.serve.adapters import NAME_PATTERN, MultiAdapterModel
from deltatune.serve.batcher import Batcher, QueueFull, UnknownAdapter
from deltatune.serve.engine import Engine, GenRequest, GenResult, SamplingParams
from deltatune.serve.protocol import (
    AdapterLoadRequest,
    APIError,
    ChatRequest,
    CompletionRequest,
    not_found_model,
    parse,
)


@dataclass
class ServerState:
    """Everything the handlers share; one per server."""

    engine: Engine
    base_name: str
    adapter_dir: Path | None = None
    default_max_tokens: int = 256
    max_batch_size: int = 16
    max_queue: int = 64
    max_body_bytes: int = 16 * 2**20  # a request body past this is a 413, read no further
    lock: threading.Lock = field(default_factory=threading.Lock)
    created: int = field(default_factory=lambda: int(time.time()))
    batcher: Batcher | None = None

    @property
    def multi(self) -> MultiAdapterModel:
        return self.engine.adapters


class _InternalErrors:
    """An unexpected exception answered as OpenAI's 500 JSON, with the connection kept: Starlette's handler for
    Exception answers and then re-raises, and uvicorn closed the keep-alive connection (the client's next request
    on it got a reset). The traceback goes to the log."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # a stream already under way: nothing left to answer with
                raise
            logging.getLogger("deltatune.serve").exception("internal error")
            err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
            await JSONResponse(err.body(), status_code=500)(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.batcher = Batcher(
            state.engine, state.lock, max_batch_size=state.max_batch_size, max_queue=state.max_queue
        )
        state.batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.batcher.stop)

    app = FastAPI(title="deltatune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.serve = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code)

    app.add_middleware(_InternalErrors)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [_model_card(state, state.base_name, None)]
        data += [_model_card(state, name, state.base_name) for name in state.multi.names]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model == state.base_name:
            return _model_card(state, model, None)
        if model in state.multi.names:
            return _model_card(state, model, state.base_name)
        raise not_found_model(model)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse(CompletionRequest, await _json(request))
        adapter = _adapter_for(state, body.model)
        # tokenising a long prompt takes seconds: off the event loop, which serves every other client meanwhile
        prompts = await run_in_threadpool(lambda: [state.engine.encode(p) for p in body.prompts()])
        return await _serve(state, request, body, adapter, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = parse(ChatRequest, await _json(request))
        adapter = _adapter_for(state, body.model)
        loaded = state.multi.adapters.get(adapter) if adapter is not None else None
        chat_template = (loaded.chat_template if loaded is not None else None) or state.engine.tokenizer.chat_template
        if not chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        try:
            ids = await run_in_threadpool(state.engine.encode_chat, messages, chat_template)
        except Exception as exc:  # noqa: BLE001 - a template that rejects these messages (e.g. role order)
            raise APIError(400, f"the chat template rejects these messages: {exc}", param="messages") from None
        return await _serve(state, request, body, adapter, [ids], chat=True)

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(request: Request) -> dict[str, Any]:
        body = parse(AdapterLoadRequest, await _json(request))
        if state.adapter_dir is None:
            raise APIError(
                403,
                "loading adapters at run time is off; start the server with --adapter-dir DIR",
                type="permission_error",
            )
        if body.name == state.base_name or not NAME_PATTERN.fullmatch(body.name):
            raise APIError(400, f"invalid adapter name {body.name!r}", param="name")
        if body.name in state.multi.names:
            raise APIError(409, f"an adapter named '{body.name}' is already loaded", param="name", code="conflict")
        folder = safe_adapter_folder(state.adapter_dir, body.path if body.path is not None else body.name)

        def load() -> None:
            with state.lock:
                state.multi.load(body.name, folder)

        try:
            await run_in_threadpool(load)
        except UserError as exc:
            message = as_the_client_sees_it(str(exc), state.adapter_dir)
            raise APIError(409 if "already loaded" in str(exc) else 400, message, param="path") from None
        return _model_card(state, body.name, state.base_name)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        if state.adapter_dir is None:  # as loading: the adapters the server started with stay
            raise APIError(
                403,
                "unloading adapters at run time is off; start the server with --adapter-dir DIR",
                type="permission_error",
            )
        if name == state.base_name:
            raise APIError(400, "the base model cannot be unloaded", param="name")
        if name not in state.multi.names:
            raise not_found_model(name)

        def unload() -> None:
            with state.lock:
                state.multi.unload(name)

        try:
            await run_in_threadpool(unload)
        except UserError:
            raise not_found_model(name) from None
        return {"id": name, "object": "model", "deleted": True}

    return app


def as_the_client_sees_it(message: str, root: Path) -> str:
    """A load error with paths under the adapter directory relative to it, as the client named them: where the
    directory lies on the server (its users, its disks) is the operator's to know."""
    absolute = {str(p) for p in (root.resolve(), root.absolute(), root) if p.is_absolute()}
    for prefix in sorted(absolute, key=len, reverse=True):  # a relative --adapter-dir ("." or "ad") is no path to hide
        message = message.replace(prefix + os.sep, "")
    return message


def safe_adapter_folder(root: Path, relative: str) -> Path:
    """`root/relative` if it is a folder inside `root` and every file in it stays inside `root`; traversal,
    absolute paths and symlinks out of `root` are refused (400), a missing folder is a 404."""
    if not relative or "\x00" in relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise APIError(400, "path must be a folder name under the server's adapter directory", param="path")
    base = root.resolve()
    folder = (root / relative).resolve()
    if not folder.is_relative_to(base) or folder == base:
        raise APIError(400, "path must stay inside the server's adapter directory", param="path")
    if not folder.is_dir():
        raise APIError(
            404, f"no adapter folder '{relative}' in the adapter directory", param="path", code="adapter_not_found"
        )
    for item in folder.iterdir():
        if not item.resolve().is_relative_to(base):
            raise APIError(400, f"'{relative}/{item.name}' links outside the adapter directory", param="path")
    return folder


async def _json(request: Request) -> Any:
    raw = await _body(request, request.app.state.serve.max_body_bytes)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:  # nested deeper than the parser's recursion limit
        raise APIError(400, "malformed JSON body: nested too deeply") from None


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) once it passes `limit` bytes: declared in Content-Length or counted
    while it streams in (a chunked body declares nothing), so a client cannot make the server hold gigabytes."""
    too_large = APIError(413, f"request body over {limit} bytes (serve --max-request-mb)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # the client left before sending its body: nobody to answer
        raise APIError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


def _model_card(state: ServerState, name: str, parent: str | None) -> dict[str, Any]:
    card = {"id": name, "object": "model", "created": state.created, "owned_by": "deltatune"}
    if parent is not None:
        card["parent"] = parent
    return card


def _adapter_for(state: ServerState, model: str) -> str | None:
    if model == state.base_name:
        return None
    if model in state.multi.names:
        return model
    raise not_found_model(model)


def _params(state: ServerState, body, prompt_len: int, virtual: int = 0) -> SamplingParams:
    """The row's sampling settings; `prompt_len` counts the client's tokens, `virtual` a prompt-tuning adapter's
    (not in the usage the client sees, but in the context)."""
    context = state.engine.context
    budget = body.budget() if isinstance(body, ChatRequest) else body.max_tokens
    if context is not None:
        room = context - prompt_len - virtual
        tokens = f"{prompt_len} tokens" + (f" (and the adapter's {virtual} virtual tokens)" if virtual else "")
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {tokens}; this model's maximum context length is {context} tokens",
                param="messages" if isinstance(body, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        if budget is not None and budget > room:
            field = (
                "max_completion_tokens"
                if isinstance(body, ChatRequest) and body.max_completion_tokens is not None
                else "max_tokens"
            )
            raise APIError(
                400,
                f"{field} {budget} plus the prompt's {tokens} exceed this model's "
                f"maximum context length of {context} tokens",
                param=field,
                code="context_length_exceeded",
            )
        budget = budget if budget is not None else min(state.default_max_tokens, room)
    return SamplingParams(
        max_tokens=budget or state.default_max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stops(),
    )


class _Relay:
    """Carries one request's events from the worker thread into the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the loop is gone (server shutting down)


async def _serve(
    state: ServerState, request: Request, body, adapter: str | None, prompts: list[list[int]], *, chat: bool
):
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
    if len(prompts) > state.max_queue:  # could never be admitted: a 503 would have the client retry forever
        raise APIError(
            400, f"{len(prompts)} prompts in one request; this server takes at most {state.max_queue}", param="prompt"
        )
    relay = _Relay(asyncio.get_running_loop())
    reqs = []
    for i, ids in enumerate(prompts):
        virtual = state.multi.virtual_tokens(adapter)  # prompt tuning's tokens count against the context
        reqs.append(
            GenRequest(
                prompt_ids=ids,
                adapter=adapter,
                params=_params(state, body, len(ids), 0 if virtual is None else virtual.shape[0]),
                on_text=lambda s, i=i: relay.put(("text", i, s)),
                on_finish=lambda r, i=i: relay.put(("finish", i, r)),
                on_error=lambda e, i=i: relay.put(("error", i, e)),
            )
        )
    try:
        state.batcher.submit(reqs)
    except QueueFull as exc:
        raise APIError(503, str(exc), type="overloaded_error", code="queue_full") from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.get("include_usage"))
        return StreamingResponse(
            _stream(state, relay, reqs, body.model, rid, chat, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    watcher = asyncio.create_task(_cancel_on_disconnect(request, reqs))
    try:
        results = await _collect(relay, len(reqs))
    finally:
        watcher.cancel()
        for r in reqs:
            r.cancelled = True  # no-op for finished rows; drops the rest if the client went away
    return _response(state, rid, body.model, results, chat)


def _error_of(exc: Exception) -> APIError:
    if isinstance(exc, UnknownAdapter):
        return not_found_model(str(exc))
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")


async def _cancel_on_disconnect(request: Request, reqs: list[GenRequest], every_s: float = 0.2) -> None:
    """A non-streaming client that goes away (a timeout, a closed connection) stops its rows at the next step
    instead of holding batch places until max_tokens."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    for r in reqs:
        r.cancelled = True


async def _collect(relay: _Relay, n: int) -> list[GenResult]:
    results: dict[int, GenResult] = {}
    while len(results) < n:
        kind, i, value = await relay.queue.get()
        if kind == "finish":
            results[i] = value
        elif kind == "error":
            raise _error_of(value)
    return [results[i] for i in range(n)]


def _usage(results: list[GenResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(reason: str) -> str:
    return "stop" if reason == "stop" else "length"


def _response(state: ServerState, rid: str, model: str, results: list[GenResult], chat: bool) -> dict[str, Any]:
    if chat:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": _finish(r.finish_reason),
                "logprobs": None,
            }
            for i, r in enumerate(results)
        ]
        obj = "chat.completion"
    else:
        choices = [
            {"index": i, "text": r.text, "finish_reason": _finish(r.finish_reason), "logprobs": None}
            for i, r in enumerate(results)
        ]
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(results),
    }


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(
    state: ServerState, relay: _Relay, reqs: list[GenRequest], model: str, rid: str, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            )
            choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}

    results: dict[int, GenResult] = {}
    try:
        if chat:
            for i in range(len(reqs)):
                yield _sse(chunk(i, None, None, first=True))
        while len(results) < len(reqs):
            kind, i, value = await relay.queue.get()
            if kind == "text":
                yield _sse(chunk(i, value, None))
            elif kind == "finish":
                results[i] = value
                yield _sse(chunk(i, None, _finish(value.finish_reason)))
            else:
                yield _sse(_error_of(value).body())
                break
        if include_usage and len(results) == len(reqs):
            yield _sse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage([results[i] for i in range(len(reqs))]),
                }
            )
        yield _sse("[DONE]")
    finally:
        for r in reqs:
            r.cancelled = True  # a client that went away stops its rows at the next step
