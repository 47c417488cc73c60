"""POST /locate (one photo) and POST /locate/batch (several, one batched forward pass).

The request gate has already checked the API key and given the request a slot before its body
was read (middleware.py); here the form is read, checked and handed to the service."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from ..deps import ServiceDep, SettingsDep, no_query_params
from ..errors import ERROR, ONE_IMAGE, ApiError, too_many_images
from ..schemas import BatchResponse, Location
from ..settings import Settings
from ..uploads import upload_label

LOCATE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**ERROR, "description": "the file is not a decodable image (empty, truncated, corrupt) or the body is malformed"},
    401: {**ERROR, "description": "missing or wrong X-API-Key (only when the server has one); checked before the body is read"},
    408: {**ERROR, "description": "the upload stalled (no body bytes for body_timeout_s)"},
    413: {**ERROR, "description": "body over the size limit, an image over the pixel limit, the request's images over the per-request pixel budget, or too many images"},
    415: {**ERROR, "description": "not JPEG, PNG or WebP (detected from the bytes)"},
    422: {**ERROR, "description": "missing/invalid fields, query parameters (options are form fields), more than one image, top_k over the server's max_top_k, or an image too small to use"},
    503: {**ERROR, "description": "over capacity, decided before the body is read; retry after the Retry-After header's seconds"},
}

router = APIRouter(tags=["locate"], responses=LOCATE_ERRORS, dependencies=[Depends(no_query_params)])

TopK = Annotated[int, Form(ge=1, description="how many top cells to return (1..max_top_k; the server's max_top_k is 50 unless configured)")]

BATCH_200 = ("One entry per uploaded file, in order: `{filename, result}` when it was located, `{filename, error: {error, detail, status}}` "
             "when it was refused (the status it would have had alone). HTTP 200 when at least one file was located; when none was, "
             "the answer is that error (the files' common status, else 400 `bad_image`). A request over the pixel budget or with too "
             "many files is refused as a whole (413).")


def _check_top_k(top_k: int, settings: Settings) -> None:
    """The upper bound is a server setting, so it is checked here rather than in the (static) schema."""
    if top_k > settings.max_top_k:
        raise ApiError(422, "validation_error", [{"loc": ["body", "top_k"], "msg": f"Input should be less than or equal to {settings.max_top_k}",
                                                  "type": "less_than_equal"}])


@router.post("/locate", response_model=Location, summary="Locate one photo")
async def locate(
    request: Request,
    image: Annotated[UploadFile, File(description="the photo: JPEG, PNG or WebP (type read from the bytes)")],
    service: ServiceDep,
    settings: SettingsDep,
    top_k: TopK = 5,
    explain: Annotated[bool, Form(description="add text-tower cue scores and a class-activation heatmap")] = False,
) -> Any:
    _check_top_k(top_k, settings)
    form = await request.form()  # already parsed: FastAPI caches it on the request
    if len(form.getlist("image")) != 1:
        raise ApiError(422, "one_image_expected", ONE_IMAGE)
    data = await image.read()
    return await service.run(service.locate_one, data, upload_label("image", image.filename), top_k, explain)


@router.post("/locate/batch", response_model=BatchResponse, summary="Locate several photos in one batch", response_description=BATCH_200)
async def locate_batch(
    images: Annotated[list[UploadFile], File(description="up to max_batch photos (16 unless the server is configured otherwise)")],
    service: ServiceDep,
    settings: SettingsDep,
    top_k: TopK = 5,
) -> Any:
    _check_top_k(top_k, settings)
    if len(images) > settings.max_batch:
        raise too_many_images(len(images), settings.max_batch)
    if not images:
        raise ApiError(422, "validation_error", "send at least one `images` part")
    blobs = [(f.filename, await f.read()) for f in images]
    return await service.run(service.locate_many, blobs, top_k)
