"""The API's request and response models, the query parameters several routes share, and the
functions that turn store records into public answers (photos as URLs of this server, never paths)."""
from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import Form, Query
from pydantic import BaseModel, Field

from indexer.ann import MAX_EF_SEARCH, MAX_NPROBE
from indexer.compose import DEFAULT_TEXT_WEIGHT, MAX_BOX_CHARS, MAX_QUERY_TEXT_CHARS, MIN_BOX_SIDE


class ErrorBody(BaseModel):
    code: str = Field(description="short machine-readable reason, e.g. not_an_image, not_found, validation_error")
    message: str = Field(description="what went wrong, in plain words")


class ErrorResponse(BaseModel):
    error: ErrorBody


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="probability: softmax over the label set of logit_scale * cosine; sums to 1")
    cosine: float = Field(description="cosine similarity between the image and the label's prompt-ensemble embedding")


class Result(BaseModel):
    id: str = Field(description="product id")
    score: float = Field(description="cosine similarity of the product's best-matching photo, in [-1, 1]")
    title: str | None = None
    category: str | None = None
    image: str = Field(description="URL of the product photo that matched, on this server "
                       "(`/v1/products/{id}/image?photo_id=N`; add `&size=256` for a thumbnail)")
    photo_id: int = Field(description="id of the matched photo")
    image_metadata: dict = Field(default_factory=dict, description="catalogue columns of the matched photo's row")
    metadata: dict = Field(default_factory=dict, description="the product's other catalogue columns")
    label: str | None = Field(None, description="stored zero-shot label (after 'lookalike label INDEX')")
    label_score: float | None = None


CLOSE_MATCH_DOC = ("whether the best result reaches the model's calibrated threshold for a close match "
                   "(its calibration's `min_score` for photo queries, `label_min_cosine` for text queries; README, "
                   "\"Scores and thresholds\"); false means the catalogue holds nothing close to the query, "
                   "null that the model has no calibration")
NONE_OF_THESE_DOC = ("true when even the best label's cosine is under the model's calibrated `label_min_cosine`: "
                     "none of the labels fits the photo; null when the model has no calibration")


class SearchResponse(BaseModel):
    results: list[Result]
    close_match: bool | None = Field(None, description=CLOSE_MATCH_DOC)
    labels: list[LabelScore] = Field(default_factory=list, description="zero-shot labels of the query photo")
    none_of_these: bool | None = Field(None, description=NONE_OF_THESE_DOC)
    took_ms: float


EF_SEARCH_DOC = ("HNSW index only: candidates explored per query; more gives better recall, slower "
                 "(default: the index's, see `lookalike info`)")
NPROBE_DOC = ("IVF-PQ index only: inverted lists visited per query; more gives better recall, slower "
              "(default: the index's, see `lookalike info`)")
EfSearch = Annotated[int | None, Query(ge=1, le=MAX_EF_SEARCH, description=EF_SEARCH_DOC)]
NProbe = Annotated[int | None, Query(ge=1, le=MAX_NPROBE, description=NPROBE_DOC)]


IMAGE_MIN_SCORE_DOC = ("drop results whose cosine is under this. Default 0: a photo with a negative cosine is unlike "
                       "the query, not a lesser match; -1 keeps every product. (Text queries have no default: "
                       "text-photo cosines sit on a model's own scale, see `close_match`.)")


class TextQuery(BaseModel):
    query: str = Field(min_length=1, max_length=1000, description="words to search for, e.g. 'red running shoes'")
    k: int = Field(10, ge=1, le=1000, description="number of products")
    category: str | None = Field(None, max_length=500, description="only this category or below it")
    min_score: float | None = Field(None, ge=-1, le=1)
    ef_search: int | None = Field(None, ge=1, le=MAX_EF_SEARCH, description=EF_SEARCH_DOC)
    nprobe: int | None = Field(None, ge=1, le=MAX_NPROBE, description=NPROBE_DOC)


class LabelsResponse(BaseModel):
    labels: list[LabelScore]
    none_of_these: bool | None = Field(None, description=NONE_OF_THESE_DOC)
    closed_set: bool = Field(False, description="whether labels were ranked against the catalogue's photos "
                             "(asked for with ?closed_set=true, and the catalogue holds >= 100 photos)")
    took_ms: float


class ProductImage(BaseModel):
    photo_id: int
    image: str = Field(description="URL of the photo on this server (`/v1/products/{id}/image?photo_id=N`)")
    sha256: str
    width: int | None = None
    height: int | None = None
    metadata: dict = Field(default_factory=dict)


class ProductResponse(BaseModel):
    id: str
    title: str | None = None
    category: str | None = None
    metadata: dict
    label: str | None = None
    label_score: float | None = None
    updated_at: str
    images: list[ProductImage]


class Health(BaseModel):
    status: str
    products: int
    photos: int
    model: str


class ProductPatch(BaseModel):
    title: str | None = Field(None, max_length=2000)
    category: str | None = Field(None, max_length=2000)
    metadata: dict | None = Field(None, description="keys to set; a key set to null is removed")


class CategoryCount(BaseModel):
    category: str
    products: int


# ---------------------------------------------------------------- catalogue audit (GET /v1/audit)
class AuditPhoto(BaseModel):
    photo_id: int
    product_id: str
    image: str = Field(description="URL of the photo on this server (`/v1/products/{id}/image?photo_id=N`; add "
                                   "`&size=128` for a thumbnail)")


class ExactDuplicateGroup(BaseModel):
    sha256: str = Field(description="content hash shared by the photos")
    products: list[str] = Field(description="ids of the products that hold this same photo file")
    cosine: float = Field(description="1.0: the files are byte-identical")
    photos: list[AuditPhoto]


class NearDuplicatePair(BaseModel):
    a: int = Field(description="photo id")
    b: int = Field(description="photo id")
    cosine: float


class NearDuplicateGroup(BaseModel):
    products: list[str]
    max_cosine: float
    min_cosine: float = Field(description="lowest cosine among the pairs that connect the group")
    photos: list[AuditPhoto]
    pairs: list[NearDuplicatePair] = Field(description="every pair of photos of different products at or above "
                                                       "the threshold (byte-identical pairs are exact duplicates)")


class AuditLabelScore(BaseModel):
    label: str
    score: float


class AuditProduct(BaseModel):
    """A flagged product and its first photos (the evidence)."""

    product_id: str
    title: str | None = None
    category: str | None = None
    photos: list[AuditPhoto]


class CategoryDisagreement(AuditProduct):
    catalogue_label: str = Field(description="the label the catalogue category maps to (its last path part)")
    predicted_label: str = Field(description="the most probable label of the product's photos")
    margin: float = Field(description="probability of predicted_label minus that of catalogue_label")
    p_predicted: float
    p_catalogue: float
    cosine_predicted: float
    cosine_catalogue: float
    top_labels: list[AuditLabelScore]


class CategoryOutlier(AuditProduct):
    distance: float = Field(description="cosine distance of the product's mean embedding to its category's centroid")
    robust_z: float = Field(description="0.6745 * (distance - median) / MAD over the category (Iglewicz & Hoaglin)")
    category_median_distance: float
    category_products: int
    nearest_product: str = Field(description="the most similar other product of the category")
    nearest_cosine: float


class AuditThresholds(BaseModel):
    near_duplicate_min_cosine: float
    near_duplicate_threshold_source: str = Field(description="option, calibration (the model's) or default")
    neighbours: int
    category_min_margin: float
    outlier_min_z: float


class AuditResponse(BaseModel):
    model: str
    generated_at: str
    products: int
    photos: int
    thresholds: AuditThresholds
    counts: dict[str, int] = Field(description="findings per part")
    exact_duplicates: list[ExactDuplicateGroup] = Field(default_factory=list)
    near_duplicates: list[NearDuplicateGroup] = Field(default_factory=list)
    category_disagreements: list[CategoryDisagreement] = Field(default_factory=list)
    outliers: list[CategoryOutlier] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="parts skipped and why")
    took_ms: float


def public_audit(report: dict) -> dict:
    """An audit report as the API returns it: photos as URLs of this server, no server paths."""
    def photos(items: list[dict]) -> list[dict]:
        return [{"photo_id": p["photo_id"], "product_id": p["product_id"], "image": photo_url(p["product_id"],
                                                                                           p["photo_id"])}
                for p in items]

    out = {k: v for k, v in report.items() if k != "index"}
    for part in ("exact_duplicates", "near_duplicates", "category_disagreements", "outliers"):
        if part in out:
            out[part] = [{**f, "photos": photos(f["photos"])} for f in out[part]]
    return out


# error responses every /v1 route documents
ERRORS = {
    400: {"model": ErrorResponse, "description": "bad input (not an image, empty upload, bad label list)"},
    404: {"model": ErrorResponse, "description": "unknown product"},
    413: {"model": ErrorResponse, "description": "upload or image too large"},
    422: {"model": ErrorResponse, "description": "invalid parameters"},
    503: {"model": ErrorResponse, "description": "the model and index are still loading"},
}


def photo_url(product_id: str, photo_id: int) -> str:
    return f"/v1/products/{quote(product_id, safe='')}/image?photo_id={photo_id}"


def public_hits(hits) -> list[dict]:
    """Search hits as the API returns them: the photo as a URL of this server, never a server path."""
    return [{**h.to_dict(), "image": photo_url(h.product_id, h.photo_id)} for h in hits]


def public_product(product: dict) -> dict:
    return {**product, "images": [{**p, "image": photo_url(product["id"], p["photo_id"])} for p in product["images"]]}


TEXT_DOC = ("composed query: words that refine the photo, e.g. 'in red' or 'a backpack' (\"like this, but ...\"); "
            f"1 to {MAX_QUERY_TEXT_CHARS} characters, with at least one word the model knows (an empty form field "
            "counts as none, as in HTML forms; spaces only are refused). Scores are then cosines with the composed "
            "query, and `close_match` is null")
TEXT_WEIGHT_DOC = ("how much the words count against the photo, 0 to 1 (0: the photo alone, 1: the words alone); "
                   f"the composed query is normalise((1 - w) photo + w text - w negative_text). Default "
                   f"{DEFAULT_TEXT_WEIGHT}, the best of the weights measured on Magento colour variants "
                   "(README, \"Composed queries\")")
NEGATIVE_TEXT_DOC = ("composed query: words to move away from, e.g. 'blue' (subtracted with weight `text_weight`); "
                     f"1 to {MAX_QUERY_TEXT_CHARS} characters")
BOX_DOC = ("region search: only this box of the photo is searched, 'x0,y0,x1,y1' (left, top, right, bottom) on the "
           "photo as it shows upright (after its EXIF orientation). All four values in [0, 1]: fractions of its width "
           "and height ('0.25,0.5,0.75,1'); otherwise pixels ('120,300,480,700'). The box must lie inside the photo "
           f"and be at least {MIN_BOX_SIDE}x{MIN_BOX_SIDE} pixels; values are plain ASCII decimals ('1e3' too)")
# the composed-query fields: form fields of the photo upload, query parameters of similar
RefineText = Annotated[str | None, Form(max_length=MAX_QUERY_TEXT_CHARS, description=TEXT_DOC)]
RefineWeight = Annotated[float | None, Form(ge=0, le=1, description=TEXT_WEIGHT_DOC)]
RefineNegative = Annotated[str | None, Form(max_length=MAX_QUERY_TEXT_CHARS, description=NEGATIVE_TEXT_DOC)]
RegionBox = Annotated[str | None, Form(max_length=MAX_BOX_CHARS, description=BOX_DOC)]
RefineTextParam = Annotated[str | None, Query(max_length=MAX_QUERY_TEXT_CHARS, description=TEXT_DOC)]
RefineWeightParam = Annotated[float | None, Query(ge=0, le=1, description=TEXT_WEIGHT_DOC)]
RefineNegativeParam = Annotated[str | None, Query(max_length=MAX_QUERY_TEXT_CHARS, description=NEGATIVE_TEXT_DOC)]
