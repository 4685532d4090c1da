"""The HTTP routes (SPEC section 3), built per ingress replica around its FluxIngress.

Routes are closures over the replica's ingress object rather than FastAPI class-based views:
Ray Serve 2.60's class-based views leave `self` as a query parameter under FastAPI ≥0.137, and a
per-replica app also takes its middleware settings (body limit, CORS) from that replica's args.
Every error leaves in one envelope: {"error": {"code", "message", "details"}}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Header
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import __version__
from serve_app.engine.images import CONTENT_TYPES
from serve_app.errors import ApiError
from serve_app.schemas import (
    ErrorResponse,
    GenerateResponse,
    InferenceRequest,
    ModelList,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
)
from serve_app.serving.guards import check_api_key, request_timeout
from serve_app.serving.http import BodySizeLimit, ReplicaHeader, api_error_response, validation_error_response

if TYPE_CHECKING:
    from serve_app.serving.ingress import FluxIngress

_STATUS_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}


def build_api(ingress: "FluxIngress") -> FastAPI:
    api = FastAPI(
        title="flux-serve",
        version=__version__,
        description="FLUX.1-dev with ai-toolkit LoRAs on Ray Serve, with the request schema of the "
        "ai-toolkit reference inference server.",
        responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 503)},
    )
    _add_error_handlers(api)
    api.add_middleware(BodySizeLimit, max_bytes=ingress.args.limits.max_body_bytes)
    api.add_middleware(ReplicaHeader, replica=ingress.replica)
    if ingress.args.cors_origins:
        api.add_middleware(CORSMiddleware, allow_origins=ingress.args.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    async def authorized(
        authorization: str | None = Header(None), x_api_key: str | None = Header(None, alias="X-API-Key")
    ) -> None:
        check_api_key(ingress.api_key, authorization, x_api_key)

    async def timeout_s(x_flux_timeout: str | None = Header(None, alias="X-Flux-Timeout")) -> float:
        return request_timeout(ingress.args, x_flux_timeout)

    guarded = [Depends(authorized)]

    @api.post("/v1/inference", response_model=SubmitResponse, dependencies=guarded)
    async def submit(body: InferenceRequest, timeout: float = Depends(timeout_s)):
        """Queue an async job: one image per prompt. Poll `status_url`, then read `result_url`."""
        return await ingress.submit(body, timeout)

    @api.get("/v1/requests/{request_id}/status", response_model=StatusResponse, dependencies=guarded)
    async def status(request_id: str):
        return await ingress.status(request_id)

    @api.get("/v1/requests/{request_id}/result", response_model=ResultResponse, dependencies=guarded)
    async def result(request_id: str):
        return await ingress.result(request_id)

    @api.get(
        "/v1/requests/{request_id}/images/{index}",
        response_class=Response,
        dependencies=guarded,
        responses={200: {"content": {t: {} for t in CONTENT_TYPES.values()}, "description": "The image file"}},
    )
    async def image(request_id: str, index: int):
        return await ingress.image(request_id, index)

    @api.delete("/v1/requests/{request_id}", response_model=StatusResponse, dependencies=guarded)
    async def cancel(request_id: str):
        """Cancel a job: queued work never runs; a running call stops at its next step if it serves no one else."""
        return await ingress.cancel(request_id)

    @api.post("/v1/generate", response_model=GenerateResponse, dependencies=guarded)
    async def generate(body: InferenceRequest, timeout: float = Depends(timeout_s)):
        """Generate synchronously; images come back inline as base64."""
        return await ingress.generate(body, timeout)

    @api.get("/v1/models", response_model=ModelList, dependencies=guarded)
    async def models():
        return await ingress.models()

    @api.get("/health", responses={503: {"description": "A deployment is not ready to generate"}})
    async def health() -> JSONResponse:
        """200 when the generator and the job store answer, else 503."""
        return await ingress.health()

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
        code = _STATUS_CODES.get(exc.status_code, "HTTP_ERROR")
        return api_error_response(ApiError(code, str(exc.detail)), exc.status_code)
