"""The HTTP side of ``selfflow serve``: a FastAPI application around an :class:`~selfflow.serve.engine.Engine`.

Every refusal is a JSON object with one line, ``{"error": "…"}``: 400 malformed JSON, 413 a body too
large, 422 a field of the wrong type, an unknown field or a value out of range, 404/405 a wrong
path or method, 503 (with ``Retry-After``) a full queue. No response carries a traceback.
"""
from __future__ import annotations

import functools
import json
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from selfflow.errors import RequestError
from selfflow.serve.engine import Batcher, Engine, Limits, PassFailed, ProcessWorker, QueueFull
from selfflow.serve.page import PAGE

MAX_BODY_BYTES = 64 * 1024


class GenerateRequest(BaseModel):
    """``POST /v1/generate``: image k uses seed ``seed + k`` (as ``selfflow sample --seed``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    n: int = Field(1, description="images to make")
    labels: Optional[list[int]] = Field(None, description="class labels, cycled over the images; null: seed mod classes")
    prompt: Optional[str] = Field(None, description="caption-conditioned models: the caption")
    seed: int = Field(0, description="image k uses seed + k")
    steps: Optional[int] = Field(None, description="solver steps; null: the model's saved setting")
    sampler: Optional[str] = Field(None, description="euler | heun | sde | dopri5 | sit_sde; null: the saved one")
    cfg_scale: Optional[float] = Field(None, description="classifier-free guidance; null: the saved one")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, image k from seed seeds[k]")
    seeds: list[int]
    labels: Optional[list[int]]
    prompt: Optional[str]
    sampler: str
    steps: int
    cfg_scale: float
    nfe: int = Field(description="network evaluations per image")
    ms: float = Field(description="milliseconds from arrival to answer")
    batch: int = Field(description="images in the forward pass that made these")


def _validation_message(exc) -> tuple[int, str]:
    """(status, one line) for a pydantic ``ValidationError`` or FastAPI's ``RequestValidationError``."""
    problem = exc.errors()[0]
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
    kind = problem.get("type", "")
    if kind == "json_invalid":
        return 400, f"malformed JSON: {problem.get('ctx', {}).get('error', problem.get('msg'))}"
    if kind == "extra_forbidden":
        return 422, f"unknown field {where!r} (known: {', '.join(GenerateRequest.model_fields)})"
    if kind == "model_attributes_type" or not where:
        return 422, "the body must be a JSON object"
    return 422, f"{where}: {problem.get('msg', 'invalid value')}"


def _numbers(values) -> bytes:
    return b"[%s]" % b",".join(b"%d" % value for value in values)


@functools.lru_cache(maxsize=256)
def _settings_json(prompt, sampler: str, steps: int, cfg_scale: float) -> bytes:
    return b'"prompt":%s,"sampler":%s,"steps":%d,"cfg_scale":%s' % (
        json.dumps(prompt).encode(), json.dumps(sampler).encode(), steps, repr(float(cfg_scale)).encode())


def generated_json(job, output, ms: float) -> bytes:
    """The answer to a request that got its images, as :class:`GenerateResponse` describes it: the JSON
    ``json.dumps`` would write (tests/test_serve.py parses both), put together from bytes, since on a
    one-step model the generic encoder costs the server as much per request as the network per image.
    The base64 images and the numbers need no escaping; the prompt and the sampler name go through
    ``json.dumps`` (once per combination of settings)."""
    return b'{"images":["%s"],"seeds":%s,"labels":%s,%s,"nfe":%d,"ms":%s,"batch":%d}' % (
        '","'.join(output.images).encode("ascii"), _numbers(job.seeds), _numbers(job.labels) if job.labels else b"null",
        _settings_json(job.prompt, job.sampler, job.steps, job.cfg_scale), round(output.nfe), repr(float(ms)).encode(),
        output.batch)


class _Answer:
    """A response as it goes out: status, JSON body bytes, extra headers."""

    def __init__(self, status: int, body: bytes, headers: Optional[dict] = None):
        self.status, self.body, self.headers = status, body, headers or {}

    def response(self) -> Response:
        return Response(self.body, self.status, self.headers, media_type="application/json")


def _refusal(status: int, message: str, headers: Optional[dict] = None) -> _Answer:
    return _Answer(status, json.dumps({"error": " ".join(str(message).split())}, separators=(",", ":")).encode(), headers)


def _error(status: int, message: str, headers: Optional[dict] = None) -> Response:
    return _refusal(status, message, headers).response()


class _Front:
    """The ASGI application uvicorn calls: ``POST /v1/generate`` is answered here, everything else by
    FastAPI behind it.

    The hot path skips the framework's layers (routing, dependency solving, five middlewares,
    ``Request`` and ``Response`` objects): on a one-step model they cost more server CPU per request
    than the network's forward pass per image. What it does is what the FastAPI route for the same
    path does (the route stays for ``/docs`` and is the same :func:`answer`): the body read with its
    size bounded (413), checked, queued, answered as one-line JSON; an exception of ours is a one-line
    500, never a traceback.
    """

    def __init__(self, app, answer, limit: int):
        self.app, self.answer, self.limit = app, answer, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/generate" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        reply = await self._body(scope, receive)
        if not isinstance(reply, _Answer):
            try:
                reply = await self.answer(reply, time.perf_counter())
            except Exception as exc:  # a bug of ours: one line, no traceback
                reply = _refusal(500, f"internal error ({type(exc).__name__}); the server keeps serving")
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(reply.body))]
        headers += [(key.lower().encode(), str(value).encode()) for key, value in reply.headers.items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def _body(self, scope, receive):
        """The request body, or a 413 once it exceeds ``limit`` bytes (declared or counted)."""
        declared = next((value for key, value in scope["headers"] if key == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return _refusal(413, f"the body exceeds {self.limit} bytes")
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _refusal(400, "the client left before its body arrived")
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                return _refusal(413, f"the body exceeds {self.limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def create_app(engine: Engine, limits: Limits = Limits(), worker: Optional[ProcessWorker] = None) -> "_Front":
    """The ASGI application (FastAPI behind :class:`_Front`); its batcher runs while the lifespan does,
    its passes on ``engine`` in this process or on ``worker``'s copy of the model (whose device
    ``/health`` reports; ``engine`` then only checks requests)."""
    limits.validate()
    model = engine.describe() | ({"device": worker.device} if worker else {})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = Batcher(engine, limits, worker)
        app.state.batcher.start()
        yield
        await app.state.batcher.stop()  # uvicorn has finished the requests in flight

    app = FastAPI(title="selfflow serve", version="1", lifespan=lifespan,
                  description="Images from a selfflow generator: one-step students and multi-step teachers.")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error(*_validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug of ours: one line, no traceback
        return _error(500, f"internal error ({type(exc).__name__}); the server keeps serving")

    @app.get("/health")
    async def health() -> dict:
        batcher = app.state.batcher
        return {"status": "ok", "model": model,
                "limits": {"max_n": limits.max_n, "max_steps": limits.max_steps, "max_cfg_scale": limits.max_cfg_scale,
                           "max_prompt_chars": limits.max_prompt_chars, "max_batch": limits.max_batch,
                           "max_queue": limits.max_queue},
                "queue": {"waiting_images": batcher.waiting_images, "passes": batcher.passes, "images": batcher.images}}

    async def answer(raw: bytes, start: float) -> _Answer:
        """``POST /v1/generate``: the body checked (any Content-Type is read as JSON, since curl -d sends a
        form type; an empty body asks for the defaults), the job queued, its images answered."""
        try:
            body = GenerateRequest.model_validate_json(raw.strip() or b"{}")
        except ValidationError as exc:
            return _refusal(*_validation_message(exc))
        try:
            job = engine.job(limits, n=body.n, labels=body.labels, prompt=body.prompt, seed=body.seed, steps=body.steps,
                             sampler=body.sampler, cfg_scale=body.cfg_scale)
            future = app.state.batcher.submit(job)
        except RequestError as exc:
            return _refusal(exc.status, str(exc))
        except QueueFull as exc:
            return _refusal(503, str(exc), {"Retry-After": exc.retry_after_s})
        try:
            output = await future
        except PassFailed as exc:
            return _refusal(500, f"the forward pass failed ({exc}); the server keeps serving")
        return _Answer(200, generated_json(job, output, round(1000 * (time.perf_counter() - start), 3)))

    # Answered by _Front before FastAPI sees it; declared here for /docs (GenerateRequest and
    # GenerateResponse document the body and the answer), and it answers the same way if reached.
    @app.post("/v1/generate", response_model=GenerateResponse,
              openapi_extra={"requestBody": {"required": False, "content": {"application/json": {
                  "schema": GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}},
              responses={400: {"description": "malformed JSON"}, 413: {"description": "body too large"},
                         422: {"description": "a bad field"}, 503: {"description": "queue full; see Retry-After"}})
    async def generate(request: Request):
        start = time.perf_counter()
        return (await answer(await request.body(), start)).response()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    return _Front(app, answer, MAX_BODY_BYTES)
