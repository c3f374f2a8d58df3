"""What the server tells about itself: the models served, liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from finegrain.serve.schemas import ModelList
from finegrain.serve.service import ERRORS, Service


def about_router(service: Service) -> APIRouter:
    """`/v1/models` (behind the API key like every `/v1` route), `/healthz`, `/readyz` and `/metrics`."""
    router = APIRouter(tags=["about"])
    state = service.state

    @router.get("/v1/models", response_model=ModelList, response_model_exclude_none=True, responses=ERRORS)
    async def models() -> ModelList:
        """The runs and base models served, with the endpoint each answers on."""
        return ModelList(data=service.registry.describe())

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """200 while the process runs (no key needed)."""
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"description": "Loading, failed or shutting down"}})
    async def readyz() -> Response:
        """200 once the models are loaded and until shutdown begins; 503 otherwise."""
        if state["ready"] and not state["draining"]:
            return JSONResponse({"status": "ready", "queue": service.batcher.depth})
        status = "draining" if state["draining"] else "failed" if state["error"] else "loading"
        return JSONResponse({"status": status, "error": state["error"]}, status_code=503)

    @router.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        """Prometheus text format: requests, latency, batch sizes, queue depth, tokens generated."""
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return router
