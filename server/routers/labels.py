"""Zero-shot labels for a photo, from the default label set or the request's own."""
from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from indexer.compose import query_text
from indexer.errors import LookalikeError

from ..deps import READ_AUTH, EngineDep, read_upload
from ..limits import check_labels, one_file
from ..schemas import ERRORS, LabelsResponse
from . import elapsed_ms

router = APIRouter(dependencies=READ_AUTH, responses=ERRORS, tags=["labels"])


@router.post("/v1/labels", response_model=LabelsResponse, summary="Zero-shot labels for a photo")
async def labels_route(
    request: Request,
    engine: EngineDep,
    image: Annotated[UploadFile, File(description="the photo to label")],
    labels: Annotated[list[str] | None, Form(description="labels to choose from instead of the default set; "
                                             "repeat the field or give one comma-separated value")] = None,
    k: Annotated[int, Query(ge=1, le=1000, description="number of labels returned")] = 5,
    closed_set: Annotated[bool, Query(description=(
        "every label names something this catalogue holds (e.g. its own categories): rank labels against "
        "the catalogue's photos they fit best (a hubness correction that lifts words the model never "
        "trained on; harmful for labels that name things the catalogue lacks). Needs >= 100 photos; "
        "the response's closed_set says whether it was applied"))] = False,
) -> LabelsResponse:
    await one_file(request, "image")
    names = [n.strip() for value in labels or [] for n in value.split(",") if n.strip()]
    if labels and not names:  # "labels=,,," asked for a set and named none: not the default set
        raise LookalikeError("labels names no label (only commas or spaces); leave it out for the default set",
                             code="bad_labels", http_status=422)
    check_labels(names, request.app.state.settings)
    for name in names:
        query_text(name, "a label")  # NUL, control characters, undecodable bytes: 422
    data = await read_upload(image, engine.max_upload_bytes)

    def run() -> LabelsResponse:
        t0 = time.perf_counter()
        clf = engine.classifier(names, closed_set)
        vec = engine.embed_upload(data)
        return LabelsResponse(labels=clf.top_k(vec, k)[0], none_of_these=clf.none_of_these(vec)[0],
                              closed_set=clf.reference_term is not None, took_ms=elapsed_ms(t0))

    return await run_in_threadpool(run)
