"""Products: look one up, find similar ones, serve its photos; add, change and delete products.

Route order matters: ``{product_id:path}`` matches slashes, so ``.../similar`` and ``.../image``
are declared before the bare ``/v1/products/{product_id:path}``, or it would swallow them.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from indexer.compose import composer
from indexer.errors import LookalikeError, NotFound
from indexer.images import ImageError
from indexer.photo_sources import is_url
from indexer.search import PHOTO_QUERY_MIN_SCORE
from indexer.store import Product
from indexer.updates import PhotoUpload, delete_product, patch_product, upsert_product

from ..deps import READ_AUTH, WRITE_AUTH, EngineDep, WriteDeadline, read_photo, read_upload, writable
from ..limits import one_file
from ..schemas import (
    ERRORS,
    IMAGE_MIN_SCORE_DOC,
    EfSearch,
    ErrorResponse,
    NProbe,
    ProductPatch,
    ProductResponse,
    RefineNegativeParam,
    RefineTextParam,
    RefineWeightParam,
    SearchResponse,
    public_hits,
    public_product,
)
from . import elapsed_ms

router = APIRouter()

WRITE_ERRORS = {401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                503: {"model": ErrorResponse,
                      "description": "index_busy: no write slot or write lock came free within "
                                     "write_timeout_s; nothing was written, retry after Retry-After seconds "
                                     "(not_ready: still loading)"}}


@router.get("/v1/products/{product_id:path}/similar", dependencies=READ_AUTH, response_model=SearchResponse,
            responses=ERRORS, tags=["products"], summary="Products that look like a catalogue product")
def similar(
    engine: EngineDep,
    product_id: str,
    k: Annotated[int, Query(ge=1, le=1000)] = 10,
    category: Annotated[str | None, Query(max_length=500)] = None,
    min_score: Annotated[float, Query(ge=-1, le=1, description=IMAGE_MIN_SCORE_DOC)] = PHOTO_QUERY_MIN_SCORE,
    ef_search: EfSearch = None,
    nprobe: NProbe = None,
    text: RefineTextParam = None,
    text_weight: RefineWeightParam = None,
    negative_text: RefineNegativeParam = None,
) -> SearchResponse:
    t0 = time.perf_counter()
    query = composer(engine.model, text, negative_text, text_weight)
    hits = engine.store.similar(product_id, k, category=category, min_score=min_score, ef_search=ef_search,
                                nprobe=nprobe, query=query)
    close = engine.close_match(hits, "image") if query is None else None
    return SearchResponse(results=public_hits(hits), close_match=close, took_ms=elapsed_ms(t0))


@router.get("/v1/products/{product_id:path}/image", dependencies=READ_AUTH,
            responses={**ERRORS, 200: {"content": {"image/jpeg": {}}},
                       503: {"model": ErrorResponse,
                             "description": "photo_read_timeout: the photo's file could not be read, or no photo "
                                            "read slot came free, within photo_read_timeout_s; retry after "
                                            "Retry-After seconds (not_ready: still loading)"}},
            tags=["products"], summary="A product photo (only photos of catalogue products are served)")
async def product_image(
    request: Request,
    engine: EngineDep,
    product_id: str,
    photo_id: Annotated[int | None, Query(description="which photo (default: the product's first)")] = None,
    size: Annotated[int | None, Query(ge=16, le=2048, description="longest side of a thumbnail, in pixels")] = None,
):
    product = await run_in_threadpool(engine.store.get_product, product_id)
    photos = product["images"]
    if photo_id is not None:
        photos = [p for p in photos if p["photo_id"] == photo_id]
    if not photos:
        raise NotFound(f"product {product_id!r} has no photo {photo_id}")
    photo = photos[0]
    if is_url(photo["image"]):
        return RedirectResponse(photo["image"])
    etag = f'"{photo["sha256"][:32]}-{size or 0}"'
    headers = {"Cache-Control": "public, max-age=86400", "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    try:
        data = engine.cached_thumbnail(photo, size)
        if data is None:  # the file is read, on a thread of its own within photo_read_timeout_s
            data = await read_photo(request, functools.partial(engine.thumbnail, photo, size),
                                    f"the photo of {product_id!r}")
    except ImageError as e:
        raise NotFound(f"photo of {product_id!r} is no longer readable: {e}") from None
    return Response(data, media_type="image/jpeg", headers=headers)


@router.get("/v1/products/{product_id:path}", dependencies=READ_AUTH, response_model=ProductResponse,
            responses=ERRORS, tags=["products"], summary="A product with its photos and metadata")
def product(engine: EngineDep, product_id: str) -> ProductResponse:
    return public_product(engine.store.get_product(product_id))


@router.post("/v1/products", response_model=ProductResponse, status_code=201, dependencies=WRITE_AUTH,
             responses={**ERRORS, 200: {"model": ProductResponse, "description": "an existing product was replaced"},
                        **WRITE_ERRORS, 409: {"model": ErrorResponse}},
             tags=["catalogue updates"], summary="Add or replace a product (upsert by id) with its photos")
async def add_product(
    request: Request,
    engine: EngineDep,
    metadata: Annotated[str, Form(description='JSON object: {"id": ..., "title"?, "category"?, any other keys}')],
    deadline: WriteDeadline,
    images: Annotated[list[UploadFile] | None, File(description="the product's photos; they replace its current "
                                                    "photos (none: only the metadata changes)")] = None,
):
    engine = writable(engine)
    await one_file(request, "metadata")  # two metadata fields: which product did the client mean?
    try:
        meta = json.loads(metadata)
    except ValueError as e:
        raise LookalikeError(f"metadata is not valid JSON: {e}", code="bad_product", http_status=422) from None
    except RecursionError:  # json's recursion: thousands of nested brackets
        raise LookalikeError("metadata is nested too deeply", code="bad_product", http_status=422) from None
    if not isinstance(meta, dict):
        raise LookalikeError("metadata must be a JSON object", code="bad_product", http_status=422)
    uploads = [PhotoUpload(await read_upload(f, engine.max_upload_bytes), None, f.filename or "")
               for f in images or []]
    pid = meta.pop("id", None)
    title, category = meta.pop("title", None), meta.pop("category", None)
    for name, value in (("title", title), ("category", category)):
        if value is not None and not isinstance(value, str):
            raise LookalikeError(f"{name} must be a string", code="bad_product", http_status=422)

    def run():
        result = upsert_product(engine.store, engine.model, Product(pid, title, category, meta), uploads,
                                engine.max_pixels, deadline)
        engine.update_gauges()  # SQLite reads: in the thread too, never on the event loop, which serves everyone
        return result

    product, created = await run_in_threadpool(run)
    return JSONResponse(ProductResponse(**public_product(product)).model_dump(), status_code=201 if created else 200)


@router.patch("/v1/products/{product_id:path}", response_model=ProductResponse, dependencies=WRITE_AUTH,
              responses={**ERRORS, **WRITE_ERRORS},
              tags=["catalogue updates"], summary="Change a product's title, category or metadata")
def change_product(engine: EngineDep, product_id: str, body: ProductPatch, deadline: WriteDeadline) -> ProductResponse:
    engine = writable(engine)
    return public_product(patch_product(engine.store, product_id, body.title, body.category, body.metadata,
                                        deadline))


@router.delete("/v1/products/{product_id:path}", status_code=204, dependencies=WRITE_AUTH,
               responses={**ERRORS, **WRITE_ERRORS},
               tags=["catalogue updates"], summary="Delete a product and its photos")
def remove_product(engine: EngineDep, product_id: str, deadline: WriteDeadline) -> Response:
    engine = writable(engine)
    delete_product(engine.store, product_id, deadline)
    engine.update_gauges()
    return Response(status_code=204)
