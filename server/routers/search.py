"""Find products by an uploaded photo or by a text."""
from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from indexer.compose import composer, parse_box, query_text
from indexer.search import PHOTO_QUERY_MIN_SCORE

from ..deps import READ_AUTH, EngineDep, read_upload
from ..engine import Engine
from ..limits import one_file
from ..schemas import (
    ERRORS,
    IMAGE_MIN_SCORE_DOC,
    EfSearch,
    NProbe,
    RefineNegative,
    RefineText,
    RefineWeight,
    RegionBox,
    SearchResponse,
    TextQuery,
    public_hits,
)
from . import elapsed_ms

router = APIRouter(dependencies=READ_AUTH, responses=ERRORS, tags=["search"])


@router.post("/v1/search/image", response_model=SearchResponse,
             summary="Find products that look like an uploaded photo (or a box of it), optionally refined by words")
async def search_image(
    request: Request,
    engine: EngineDep,
    image: Annotated[UploadFile, File(description="the query photo (JPEG, PNG, WebP, ...)")],
    k: Annotated[int, Query(ge=1, le=1000, description="number of products")] = 10,
    category: Annotated[str | None, Query(max_length=500, description="only this category or below it")] = None,
    min_score: Annotated[float, Query(ge=-1, le=1, description=IMAGE_MIN_SCORE_DOC)] = PHOTO_QUERY_MIN_SCORE,
    labels: Annotated[bool, Query(description="also return zero-shot labels of the photo")] = True,
    ef_search: EfSearch = None,
    nprobe: NProbe = None,
    text: RefineText = None,
    text_weight: RefineWeight = None,
    negative_text: RefineNegative = None,
    box: RegionBox = None,
) -> SearchResponse:
    await one_file(request, "image")
    data = await read_upload(image, engine.max_upload_bytes)
    return await run_in_threadpool(_search_image, engine, data, k, category, min_score, labels, ef_search, nprobe,
                                   text, text_weight, negative_text, box)


def _search_image(engine: Engine, data: bytes, k, category, min_score, labels, ef_search, nprobe,
                  text=None, text_weight=None, negative_text=None, box=None) -> SearchResponse:
    t0 = time.perf_counter()
    region = parse_box(box) if box is not None else None
    query = composer(engine.model, text, negative_text, text_weight)  # bad words fail before the decode
    vec = engine.embed_upload(data, region)
    hits = engine.search(vec if query is None else query(vec), k, category, min_score, ef_search, nprobe)
    labs = engine.default_labels.top_k(vec, 5)[0] if labels else []
    rejected = engine.default_labels.none_of_these(vec)[0] if labels else None
    close = engine.close_match(hits, "image") if query is None else None
    return SearchResponse(results=public_hits(hits), close_match=close,
                          labels=labs, none_of_these=rejected, took_ms=elapsed_ms(t0))


@router.post("/v1/search/text", response_model=SearchResponse,
             summary="Find products that match a text, e.g. 'red running shoes'")
def search_text(engine: EngineDep, body: TextQuery) -> SearchResponse:
    t0 = time.perf_counter()
    vec = engine.embed_text(query_text(body.query, "query"))  # NUL, control characters, only spaces: 422
    hits = engine.search(vec, body.k, body.category, body.min_score, body.ef_search, body.nprobe)
    return SearchResponse(results=public_hits(hits), close_match=engine.close_match(hits, "text"),
                          took_ms=elapsed_ms(t0))
