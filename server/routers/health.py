"""The web page, liveness and readiness probes, Prometheus metrics, and the category list."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import READ_AUTH, EngineDep
from ..schemas import ERRORS, CategoryCount, ErrorResponse, Health

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
def index_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/healthz", tags=["operations"], summary="The process is alive")
async def healthz() -> dict:
    # on the event loop, not in a worker thread: liveness must not depend on the 40 threads that
    # sync routes share (45 updates stuck on a stalled disk once held them all, and /healthz timed out)
    return {"status": "ok"}


@router.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}}, tags=["operations"],
            summary="Model and index loaded (503 until then)")
def readyz(engine: EngineDep) -> Health:
    return Health(status="ready", products=engine.store.count_products(), photos=engine.store.count_photos(),
                  model=engine.model.identity.name)


@router.get("/metrics", tags=["operations"], summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics_route(request: Request) -> Response:
    engine = request.app.state.engine
    if engine is not None:
        engine.update_gauges()
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/categories", dependencies=READ_AUTH, response_model=list[CategoryCount], responses=ERRORS,
            tags=["products"], summary="Every product category with its number of products")
def categories(engine: EngineDep) -> list[CategoryCount]:
    return [CategoryCount(category=c, products=n) for c, n in engine.store.categories()]
