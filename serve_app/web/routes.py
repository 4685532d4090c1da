"""The HTTP routes (docs/api.md): thin, typed, and independent of the ingress class.

Each route takes the request's service (`web/service.py`'s IngressService) from `request.app.state` (as
vLLM's routers do) and returns the response model it declares. `build_api` assembles one FastAPI app per
ingress replica (Serve asks each replica for its app), with the middleware its args call for. Every error
leaves in one envelope: {"error": {"code", "message", "details"}} (`errors.ApiError.to_body`). The
playground's routes (`web/playground.py`: `/` and its files) need no key, as /health; nor do /openapi.json
and its page, /docs (`web/apidocs.py`: Swagger UI from the package, so it works offline).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import __version__
from serve_app.config import AppArgs
from serve_app.engine.images import CONTENT_TYPES
from serve_app.errors import ApiError, code_for_status
from serve_app.schemas import (
    ErrorResponse,
    GenerateResponse,
    HealthResponse,
    ImagesRequest,
    ImagesResponse,
    InferenceRequest,
    LoraList,
    ModelList,
    PreviewRequest,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
)
from serve_app.web import apidocs, playground
from serve_app.web.guards import check_api_key, request_timeout
from serve_app.web.middleware import BodySizeLimit, ReplicaHeader, api_error_response, validation_error_response


class ApiService(Protocol):
    """What the routes need from their service: `web/service.IngressService` in the app, or a test's own."""

    async def submit(self, body: InferenceRequest, timeout_s: float) -> SubmitResponse: ...

    async def preview(self, body: PreviewRequest, timeout_s: float) -> SubmitResponse: ...

    async def status(self, request_id: str) -> StatusResponse: ...

    async def result(self, request_id: str) -> ResultResponse: ...

    async def image(self, request_id: str, index: int) -> tuple[bytes, str]: ...

    async def cancel(self, request_id: str) -> StatusResponse: ...

    async def events(self, request_id: str) -> AsyncIterator[bytes]: ...

    async def generate(self, body: InferenceRequest, timeout_s: float) -> GenerateResponse: ...

    async def images(self, body: ImagesRequest, timeout_s: float, origin: str) -> ImagesResponse: ...

    async def models(self) -> ModelList: ...

    async def loras(self) -> LoraList: ...

    async def health(self) -> HealthResponse: ...


def service(request: Request) -> ApiService:
    return request.app.state.service


async def authorized(
    request: Request,
    authorization: str | None = Header(None),
    x_api_key: str | None = Header(None, alias="X-API-Key"),
) -> None:
    check_api_key(request.app.state.api_key, authorization, x_api_key)


async def timeout_s(request: Request, x_flux_timeout: str | None = Header(None, alias="X-Flux-Timeout")) -> float:
    return request_timeout(request.app.state.args, x_flux_timeout)


router = APIRouter(dependencies=[Depends(authorized)])


@router.post("/v1/inference", response_model=SubmitResponse)
async def submit(body: InferenceRequest, timeout: float = Depends(timeout_s), ingress=Depends(service)):
    """Queue an async job: one image per prompt. Poll `status_url` (or stream `/events`), then read `result_url`;
    with `webhook_url`, the result is also POSTed there, signed, when the job ends."""
    return await ingress.submit(body, timeout)


@router.post("/v1/previews", response_model=SubmitResponse)
async def preview(body: PreviewRequest, timeout: float = Depends(timeout_s), ingress=Depends(service)):
    """Reproduce a training run's sample grid: the `sample:` section of an ai-toolkit job config on a preview
    model, one image per sample, seeded and merged-or-hooked as the trainer does. An async job, as /v1/inference."""
    return await ingress.preview(body, timeout)


@router.get("/v1/requests/{request_id}/status", response_model=StatusResponse)
async def status(request_id: str, ingress=Depends(service)):
    return await ingress.status(request_id)


@router.get("/v1/requests/{request_id}/result", response_model=ResultResponse)
async def result(request_id: str, ingress=Depends(service)):
    return await ingress.result(request_id)


@router.get(
    "/v1/requests/{request_id}/images/{index}",
    response_class=Response,
    responses={200: {"content": {t: {} for t in CONTENT_TYPES.values()}, "description": "The image file"}},
)
async def image(request_id: str, index: int, ingress=Depends(service)):
    data, fmt = await ingress.image(request_id, index)
    return Response(content=data, media_type=CONTENT_TYPES[fmt])


@router.get(
    "/v1/requests/{request_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "`event: status` with the status JSON at each change, then `event: end`"}},
)
async def events(request_id: str, ingress=Depends(service)):
    """Server-Sent Events of a job: its status (progress included) at each change, a last `end` event
    with the final status, then the stream closes; a finished job gets the `end` event at once."""
    stream = await ingress.events(request_id)
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.delete("/v1/requests/{request_id}", response_model=StatusResponse)
async def cancel(request_id: str, ingress=Depends(service)):
    """Cancel a job: queued work never runs; a running call stops at its next step if it serves no one else."""
    return await ingress.cancel(request_id)


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(body: InferenceRequest, timeout: float = Depends(timeout_s), ingress=Depends(service)):
    """Generate synchronously; images come back inline as base64 (`webhook_url` is refused: 422)."""
    return await ingress.generate(body, timeout)


@router.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
async def images(body: ImagesRequest, request: Request, timeout: float = Depends(timeout_s), ingress=Depends(service)):
    """The OpenAI Images API (the official SDK's `client.images.generate`), run as /v1/generate: the same
    limits and errors. Our own fields (seed, num_inference_steps, guidance_scale, loras, trigger_word) go in
    the body, `extra_body` for the SDK; other Images API fields are ignored."""
    return await ingress.images(body, timeout, str(request.base_url))


@router.get("/v1/models", response_model=ModelList)
async def models(ingress=Depends(service)):
    """Every served model, with its kind, description and defaults."""
    return await ingress.models()


@router.get("/v1/loras", response_model=LoraList)
async def loras(ingress=Depends(service)):
    """The `.safetensors` files under the server's LoRA root, each by the path a request names it with
    (`loras[].path`) and its size: sorted by path, the first 1000 (`truncated` says when there are more).
    Hidden files and folders (a download cache) and symlinks that lead out of the root are never listed."""
    return await ingress.loras()


open_router = APIRouter()  # no API key: load balancers and orchestrators probe it


@open_router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "A model that keeps a replica, or the job store, "
                                                            "does not answer"}},
)
async def health(ingress=Depends(service)):
    """200 when every model that keeps a replica answers and the job store does; a model scaled to zero
    is listed with its state and not woken."""
    answer = await ingress.health()
    return JSONResponse(answer.model_dump(), status_code=200 if answer.status == "healthy" else 503)


def build_api(ingress: ApiService, args: AppArgs, api_key: str | None, replica: str) -> FastAPI:
    """The ASGI app of one ingress replica, over its service (`web/service.IngressService`)."""
    api = FastAPI(
        title="flux-serve",
        docs_url=None,  # apidocs.router serves /docs without a CDN
        redoc_url=None,  # ReDoc comes from a CDN: not served
        version=__version__,
        description="FLUX.1-dev with ai-toolkit LoRAs on Ray Serve, with the request schema of the "
        "ai-toolkit reference inference server.",
        responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 503)},
    )
    api.state.service = ingress
    api.state.args = args
    api.state.api_key = api_key
    api.include_router(router)
    api.include_router(open_router)
    api.include_router(playground.router)  # the page and its files: no key, like /health
    api.include_router(apidocs.router)  # /docs and its files: no key, like /openapi.json
    _add_error_handlers(api)
    api.add_middleware(BodySizeLimit, max_bytes=args.limits.max_body_bytes)
    api.add_middleware(ReplicaHeader, replica=replica)
    if args.cors_origins:
        api.add_middleware(CORSMiddleware, allow_origins=args.cors_origins, allow_methods=["*"], allow_headers=["*"])
    return api


def _add_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError) -> JSONResponse:
        return api_error_response(exc)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException) -> JSONResponse:
        return api_error_response(ApiError(code_for_status(exc.status_code), str(exc.detail)), exc.status_code)
