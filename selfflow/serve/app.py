"""The HTTP side of ``selfflow serve``: a FastAPI application around an :class:`~selfflow.serve.engine.Engine`.

Every refusal is a JSON object with one line, ``{"error": "…"}``: 400 malformed JSON or a body too
large, 422 a field of the wrong type, an unknown field or a value out of range, 404/405 a wrong
path or method, 503 (with ``Retry-After``) a full queue. No response carries a traceback.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from selfflow.errors import RequestError
from selfflow.serve.engine import Batcher, Engine, Limits, QueueFull
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


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


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


class _BodyLimit:
    """Refuses a request body over ``limit`` bytes (400) before it is read into memory."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _error(413, f"the body exceeds {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"the body exceeds {self.limit} bytes")
            return message

        return await self.app(scope, counted, send)


def create_app(engine: Engine, limits: Limits = Limits()) -> FastAPI:
    """The application; its batcher runs while the application's lifespan does."""
    limits.validate()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = Batcher(engine, limits)
        app.state.batcher.start()
        yield
        await app.state.batcher.stop()  # uvicorn has finished the requests in flight

    app = FastAPI(title="selfflow serve", version="1", lifespan=lifespan,
                  description="Images from a selfflow generator: one-step students and multi-step teachers.")
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)

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
        return {"status": "ok", "model": engine.describe(),
                "limits": {"max_n": limits.max_n, "max_steps": limits.max_steps, "max_cfg_scale": limits.max_cfg_scale,
                           "max_prompt_chars": limits.max_prompt_chars, "max_batch": limits.max_batch,
                           "max_queue": limits.max_queue},
                "queue": {"waiting_images": batcher.waiting_images, "passes": batcher.passes, "images": batcher.images}}

    # The body is read and checked here, and the answer built and returned as it is (GenerateRequest and
    # GenerateResponse document both in /docs): FastAPI's body machinery and its re-validation of every
    # base64 string cost more server CPU per request than the one-step student's forward pass per image.
    # Any Content-Type is read as JSON (curl -d sends a form type); an empty body asks for the defaults.
    @app.post("/v1/generate", response_model=GenerateResponse,
              openapi_extra={"requestBody": {"required": False, "content": {"application/json": {
                  "schema": GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}},
              responses={400: {"description": "malformed JSON"}, 422: {"description": "a bad field"},
                         503: {"description": "queue full; see Retry-After"}})
    async def generate(request: Request):
        start = time.perf_counter()
        try:
            body = GenerateRequest.model_validate_json((await request.body()).strip() or b"{}")
        except ValidationError as exc:
            return _error(*_validation_message(exc))
        try:
            job = engine.job(limits, **body.model_dump())
            future = app.state.batcher.submit(job)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        except QueueFull as exc:
            return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
        output = await future
        return JSONResponse({"images": output.images, "seeds": list(job.seeds), "labels": list(job.labels) if job.labels else None,
                "prompt": job.prompt, "sampler": job.sampler, "steps": job.steps, "cfg_scale": job.cfg_scale,
                "nfe": round(output.nfe), "ms": round(1000 * (time.perf_counter() - start), 3), "batch": output.batch})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    return app
