"""POST /locate (one photo) and POST /locate/batch (several, one batched forward pass).

The request gate has already checked the API key and given the request a slot before its body
was read (middleware.py); here the form is read, checked and handed to the service, whose batcher
embeds its images in one forward with those of the other requests in flight."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from pigeon.area import parse_area
from pigeon.geoformats import options_for
from pigeon.places import place_labels
from pigeon.predictor import AnswerOptions

from ..deps import ServiceDep, SettingsDep, bundle_intact, no_query_params
from ..errors import ERROR, ApiError, too_many_images, too_many_views
from ..formats import FORMAT_DESCRIPTION, OTHER_CONTENT, REGIONS_DESCRIPTION, choose_format, respond_batch, respond_one
from ..schemas import BatchResponse, Location
from ..settings import Settings

LOCATE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**ERROR, "description": "the file is not a decodable image (empty, truncated, corrupt) or the body is malformed"},
    401: {**ERROR, "description": "missing or wrong X-API-Key (only when the server has one); checked before the body is read"},
    408: {**ERROR, "description": "the upload did not arrive within body_timeout_s, or trickled in below min_upload_bytes_per_s"},
    413: {**ERROR, "description": "body over the size limit, an image over the pixel limit, the request's images over the per-request pixel budget, or too many images"},
    415: {**ERROR, "description": "not JPEG, PNG or WebP (detected from the bytes)"},
    422: {**ERROR, "description": "missing/invalid fields, query parameters (options are form fields), no image or more views than max_batch "
                                  "(`one_image_expected`), explain with several views or with format geojson/kml, top_k over the server's max_top_k, "
                                  "an unknown `format` (json | geojson | kml), an image too small to use, "
                                  "or `bad_area`: a `within` code that is unknown, a GeoJSON that is not a polygon, or an area that holds no cell of the bundle"},
    503: {**ERROR, "description": "over capacity, decided before the body is read; retry after the Retry-After header's seconds. "
                                  "Or `bundle_damaged`: a bundle part failed its background verification (the detail names it); not worth retrying"},
}

router = APIRouter(tags=["locate"], responses=LOCATE_ERRORS, dependencies=[Depends(no_query_params), Depends(bundle_intact)])

TopK = Annotated[int, Form(ge=1, description="how many top cells to return (1..max_top_k; the server's max_top_k is 50 unless configured)")]

BATCH_200 = ("One entry per uploaded file, in order: `{filename, result}` when it was located, `{filename, error: {error, detail, status}}` "
             "when it was refused (the status it would have had alone). HTTP 200 when at least one file was located; when none was, "
             "the answer is that error (the files' common status, else 400 `bad_image`). A request over the pixel budget or with too "
             "many files is refused as a whole (413). With `place` fields: one entry per place, `{place, filenames, result}` (its "
             "views combined, as POST /locate with same_place=true) or `{place, filenames, error}` (one of its views could not be used); "
             "`filename` is then null, and `place`/`filenames` are null on per-file entries.")
BATCH_DESCRIPTION = ("Photos of different places, one batched forward pass. To send several views per place, give each `images` part a "
                     "`place` form field (the same count, in the same order: the n-th `place` labels the n-th image); images with the "
                     "same label are one place; an empty label is a place of its own. All parts have a `place` field or none does (422 otherwise).")


def _check_top_k(top_k: int, settings: Settings) -> None:
    """The upper bound is a server setting, so it is checked here rather than in the (static) schema."""
    if top_k > settings.max_top_k:
        raise ApiError(422, "validation_error", [{"loc": ["body", "top_k"], "msg": f"Input should be less than or equal to {settings.max_top_k}",
                                                  "type": "less_than_equal"}])


LOCATE_DESCRIPTION = (
    "One `image` part: that photo's answer. Several `image` parts with `same_place=true` (up to max_batch, 16 unless configured): views of ONE place "
    "(a panorama's four directions, a burst, frames of a video), answered once, as PIGEON does with its four street-view images: "
    "`views` says how many were combined, `combine` how (`mean`: the mean of the views' normalised embeddings, PIGEON's; "
    "`product`: the views' cell probabilities multiplied as independent evidence; `both`: the geometric mean of the two; "
    "default: the bundle's recorded mode, else `mean`), `view_images` each view's format and size, `image` the first view's. "
    "A view that cannot be used refuses the whole request with its own status, naming it (`image[2] (c.jpg)`). "
    "Several parts without `same_place=true` are refused (422 `one_image_expected`): photos of different places go to POST /locate/batch.")
Combine = Annotated[Optional[Literal["mean", "product", "both"]],
                    Form(description="how several views combine: mean | product | both (default: the bundle's recorded mode, else mean)")]
Within = Annotated[Optional[str], Form(description=(
    "an area of interest the answer must lie in: ISO 3166-1 alpha-2 country codes and/or ISO 3166-2 admin-1 codes, comma-separated, "
    "any case (`HR`, `HR,SI,BA`, `US-CA`), or GeoJSON text (Polygon, MultiPolygon, Feature or FeatureCollection, [lon, lat]). Cells "
    "outside get probability 0, a cell cut by the border keeps the share of its training photos inside, the rest is renormalised; "
    "refinement uses only gallery photos inside; the answer point, radii, countries and admin-1 respect it, and the answer names it "
    "(`within`). Unknown code, or an area that holds no cell: 422 `bad_area`"))]
WithinGeojson = Annotated[Optional[UploadFile], File(description="the area of interest as a GeoJSON file (instead of `within`), e.g. a polygon drawn in a GIS")]


async def _within(within: str | None, within_geojson: UploadFile | None) -> Any:
    """The area of the `within` / `within_geojson` fields (None when neither is given)."""
    if within_geojson is not None and within and within.strip():
        raise ApiError(422, "bad_area", "give the area of interest once: the `within` field or the `within_geojson` file, not both")
    text = await within_geojson.read() if within_geojson is not None else within
    return None if text is None or not text.strip() else parse_area(text)   # AreaError: 422 bad_area (api.errors)
Evidence = Annotated[bool, Form(description="add `evidence` to each answer: the gallery photos that decided its refinement (key, id, "
                                            "lat/lon, similarity, distance_km to the answer, cell, and url/source/license/author when the "
                                            "gallery's data source gave them); an empty list when no gallery photo did")]
Format = Annotated[Optional[Literal["json", "geojson", "kml"]], Form(alias="format", description=FORMAT_DESCRIPTION)]
Regions = Annotated[bool, Form(description=REGIONS_DESCRIPTION)]
OK_FORMATS = {200: {"content": OTHER_CONTENT}}


def _answer_options(fmt: str, regions: bool, explain: bool = False, *, evidence: bool = False, within: Any = None) -> AnswerOptions:
    """What the answers carry: `evidence`, `within` (a parsed area) and the regions for `format`/`regions`
    (GeoJSON and KML are drawn from the regions)."""
    if explain and fmt != "json":
        raise ApiError(422, "validation_error", f"explain=true comes back only in the JSON answer, and format {fmt} was asked; "
                                                f"ask format=json, or explain=false")
    return options_for(AnswerOptions(evidence=evidence, regions=regions, within=within), fmt)


@router.post("/locate", response_model=Location, summary="Locate one photo, or one place from several views", description=LOCATE_DESCRIPTION,
             responses=OK_FORMATS)
async def locate(
    request: Request,
    image: Annotated[list[UploadFile], File(description="the photo, or 1..max_batch views of one place: JPEG, PNG or WebP (type read from the bytes)")],
    service: ServiceDep,
    settings: SettingsDep,
    top_k: TopK = 5,
    explain: Annotated[bool, Form(description="add text-tower cue scores and a class-activation heatmap (one image only)")] = False,
    same_place: Annotated[bool, Form(description="the `image` parts are views of ONE place: answer them together (needed for more than one part)")] = False,
    combine: Combine = None,
    within: Within = None,
    within_geojson: WithinGeojson = None,
    evidence: Evidence = False,
    fmt: Format = None,
    regions: Regions = False,
) -> Any:
    _check_top_k(top_k, settings)
    fmt = choose_format(fmt, request.headers.get("accept"))
    options = _answer_options(fmt, regions, explain, evidence=evidence, within=await _within(within, within_geojson))
    if len(image) > settings.max_batch or (len(image) > 1 and not same_place):
        raise too_many_views(len(image), settings.max_batch, same_place)
    if len(image) > 1:
        if explain:
            raise ApiError(422, "validation_error", f"explain works on one photo and {len(image)} views were sent; send one `image` part, or explain=false")
        blobs = [(f.filename, await f.read()) for f in image]
        return await respond_one(service, fmt, await service.locate_place(blobs, top_k, combine, options=options), image[0].filename)
    data = await image[0].read()
    return await respond_one(service, fmt, await service.locate_one(data, image[0].filename, top_k, explain, options=options),
                             image[0].filename)


@router.post("/locate/batch", response_model=BatchResponse, summary="Locate several photos (or places) in one batch",
             description=BATCH_DESCRIPTION, response_description=BATCH_200, responses=OK_FORMATS)
async def locate_batch(
    request: Request,
    images: Annotated[list[UploadFile], File(description="up to max_batch photos (16 unless the server is configured otherwise)")],
    service: ServiceDep,
    settings: SettingsDep,
    top_k: TopK = 5,
    place: Annotated[Optional[list[str]], Form(description="one place label per `images` part, in order (optional: all or none)")] = None,
    combine: Combine = None,
    within: Within = None,
    within_geojson: WithinGeojson = None,
    evidence: Evidence = False,
    fmt: Format = None,
    regions: Regions = False,
) -> Any:
    _check_top_k(top_k, settings)
    fmt = choose_format(fmt, request.headers.get("accept"))
    options = _answer_options(fmt, regions, False, evidence=evidence, within=await _within(within, within_geojson))
    if len(images) > settings.max_batch:
        raise too_many_images(len(images), settings.max_batch)
    if not images:
        raise ApiError(422, "validation_error", "send at least one `images` part")
    places = _checked_places(place, len(images))
    blobs = [(f.filename, await f.read()) for f in images]
    if places is None:
        return await respond_batch(service, fmt, await service.locate_many(blobs, top_k, options=options))
    return await respond_batch(service, fmt, await service.locate_places(blobs, places, top_k, combine, options=options))


def _checked_places(place: list[str] | None, n_images: int) -> list[str] | None:
    """The `place` labels when every image has a `place` field, None when none has; 422 otherwise. An
    empty label is a place of its own (`<row N>`: the one policy of `pigeon.places`)."""
    if not place:
        return None
    if len(place) != n_images:
        raise ApiError(422, "validation_error", f"`place` given for {len(place)} of {n_images} images; give every `images` part a "
                                                f"`place` field (in the same order), or none")
    return place_labels([p.strip() for p in place]).tolist()
