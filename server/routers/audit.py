"""The catalogue audit: reused photos, near-duplicates, category disagreements and outliers
(:func:`indexer.audit.run_audit`) of the served index.

An audit reads every photo's embedding and queries the index once per photo, so it runs in a worker
thread (the event loop keeps answering), refuses an index over ``audit_max_photos`` photos (413),
stops with 422 past ``audit_max_pairs`` near-duplicate pairs (a threshold too low for the model),
and runs one at a time per process: a second request while one runs gets 429 ``audit_busy``.
"""
from __future__ import annotations

import threading
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from indexer.audit import (
    DEFAULT_CATEGORY_MIN_MARGIN,
    DEFAULT_NEIGHBOURS,
    DEFAULT_OUTLIER_MIN_Z,
    PARTS,
    AuditOptions,
    parse_parts,
    run_audit,
)
from indexer.errors import LookalikeError

from ..deps import KEY_IF_CONFIGURED, EngineDep
from ..schemas import ERRORS, AuditResponse, ErrorResponse, public_audit
from . import elapsed_ms

router = APIRouter(dependencies=KEY_IF_CONFIGURED, tags=["audit"],
                   responses={**ERRORS, 401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                              429: {"model": ErrorResponse, "description": "another audit is running"}})
_running = threading.Lock()  # one audit at a time: each may hold every embedding of the index in flight


@router.get("/v1/audit", response_model=AuditResponse,
            summary="Audit the catalogue: reused photos, near-duplicates, wrong categories, outliers")
async def audit(
    request: Request,
    engine: EngineDep,
    near_duplicate_min_cosine: Annotated[float | None, Query(gt=0, le=1, description=(
        "photos of different products at or above this cosine are near-duplicates (default: the model's "
        "calibrated near_duplicate_min_cosine, else 0.95)"))] = None,
    neighbours: Annotated[int, Query(ge=1, le=256, description="nearest photos fetched per photo at first "
                                     "(more while they pass the threshold)")] = DEFAULT_NEIGHBOURS,
    category_min_margin: Annotated[float, Query(ge=0, le=1, description=(
        "zero-shot probability margin over the catalogue category that flags a product"))] = (
        DEFAULT_CATEGORY_MIN_MARGIN),
    outlier_min_z: Annotated[float, Query(gt=0, le=1000, description=(
        "robust z-score of the distance to the category centroid that flags an outlier"))] = DEFAULT_OUTLIER_MIN_Z,
    parts: Annotated[str, Query(max_length=200, description=f"comma-separated parts: {', '.join(PARTS)}")] = (
        ",".join(PARTS)),
) -> AuditResponse:
    options = AuditOptions(near_duplicate_min_cosine, neighbours, category_min_margin, outlier_min_z,
                           max_photos=request.app.state.settings.audit_max_photos,
                           max_pairs=request.app.state.settings.audit_max_pairs,
                           parts=parse_parts(parts))

    def run() -> dict:
        t0 = time.perf_counter()
        if not _running.acquire(blocking=False):
            raise LookalikeError("another audit is running on this server; retry when it is done",
                                 code="audit_busy", http_status=429)
        try:
            report = run_audit(engine.store, engine.model, options)
        finally:
            _running.release()
        return {**public_audit(report), "took_ms": elapsed_ms(t0)}

    return AuditResponse(**await run_in_threadpool(run))
