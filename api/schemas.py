"""Request/response models of the HTTP API (pydantic): what `/docs` and `/openapi.json` show.

The predictor returns plain dicts; these models document them and validate the answer on its
way out (cheap with pydantic 2). Extra keys the predictor may add later pass through.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Asked(_Open):
    """A model whose `_only_when_given` fields are left out of the JSON when None: parts an answer carries only when
    asked (`evidence=true`, ...), so an answer asked without them is the one it always was. OpenAPI still lists them."""

    _only_when_given: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _leave_out_unasked(self, handler: Any):  # no return annotation: OpenAPI keeps the model's own schema
        out = handler(self)
        for k in self._only_when_given:
            if out.get(k, 0) is None:
                del out[k]
        return out


class ErrorResponse(BaseModel):
    """Every failure: a short machine-readable `error` code and a human `detail`."""

    error: str = Field(..., examples=["unsupported_media_type"])
    detail: Any = Field(..., examples=["the upload is a GIF file; send a JPEG, PNG or WebP photo"])


class TopCell(_Open):
    cell_id: int
    lat: float
    lon: float
    country: Optional[str] = None
    iso_a2: Optional[str] = None
    admin1: Optional[str] = None
    probability: float


class AreaProbability(_Open):
    name: Optional[str] = None
    iso_a2: Optional[str] = None
    probability: float


class Refinement(_Open):
    mode: Optional[str] = None
    moved_km: Optional[float] = None
    neighbours: list[Any] = Field(default_factory=list)


class RegionAtAnswer(_Open):
    """The admin-1 region (bundled Natural Earth) that holds the answer point itself; `admin1` above
    ranks regions by summed probability, which can name another one."""

    admin1: str = Field(..., examples=["Split-Dalmatia"])
    country: str = Field(..., examples=["Croatia"])
    iso_a2: str = Field(..., examples=["HR"])
    at_sea: bool = Field(..., description="the answer is in no region: the nearest one is given")


class Reach(_Open):
    """How far the bundle's cells reach: land farther than `max_reach_km` from every training photo is in no cell."""

    max_reach_km: float
    edge_probability: float = Field(..., description="probability in cells that lost land to the reach limit (the edge of "
                                                      "the training photos' coverage): high when the photo may come from beyond it")


class EvidencePhoto(_Asked):
    """A gallery photo that decided the answer's refinement (asked with `evidence=true`): the photos the answer
    was refined from, best first. `url`, `source`, `license`, `author` only when the gallery's data source gave them."""

    _only_when_given: ClassVar[tuple[str, ...]] = ("url", "source", "license", "author")
    key: str = Field(..., description="the photo's key in the gallery's data source (a manifest's `image` value, a WebDataset "
                                      "sample key, an image-Parquet key; the id as text when it has none)", examples=["images/000058.png"])
    id: int = Field(..., description="the photo's gallery id")
    lat: float
    lon: float
    similarity: float = Field(..., description="cosine similarity of the photo's and the query's embeddings (entries in descending order)")
    distance_km: float = Field(..., description="great-circle distance from the answer point")
    cell: int = Field(..., description="the photo's geocell")
    url: Optional[str] = Field(None, description="where the photo can be seen (from the gallery's data source)")
    source: Optional[str] = Field(None, description="the collection the photo comes from (from the data source)")
    license: Optional[str] = Field(None, description="the photo's license (from the data source)")
    author: Optional[str] = Field(None, description="the photo's author (from the data source)")


class ImageInfo(BaseModel):
    format: str = Field(..., description="format detected from the bytes: jpeg | png | webp")
    width: int
    height: int


class CueScore(BaseModel):
    label: str
    caption: str
    cosine: float
    probability: float


class Heatmap(BaseModel):
    png_base64: str = Field(..., description="PNG of the class-activation map blended over the centre crop the model saw")
    width: int
    height: int
    method: str = Field(..., description="grad-cam | grad-x-input")
    layer: Optional[str] = None
    cell_id: int


class Explanation(BaseModel):
    cues: dict[str, list[CueScore]] = Field(..., description="driving_side, hemisphere, country: text-tower captions softmaxed per group")
    heatmap: Heatmap


class CredibleRegion(_Open):
    """The fewest cells, by probability, that hold `level` of the answer's mass, as one land polygon."""

    level: float = Field(..., examples=[0.5])
    probability: float = Field(..., description="the mass the cells actually hold (the level, overshot by at most the last cell)")
    n_cells: int
    cell_ids: list[int] = Field(..., description="the cells, by decreasing probability")
    area_km2: float = Field(..., description="the land area of the cells' union (equal-area, before simplification)")
    contains_answer: bool = Field(..., description="the answer point lies on this land; false when refinement moved it into another "
                                                     "cell, out to sea, or the top cell's centre falls outside its (concave) cell")
    geometry: Optional[dict[str, Any]] = Field(None, description="GeoJSON Polygon or MultiPolygon, lon/lat (RFC 7946: outer rings "
                                                                  "counter-clockwise, split at the antimeridian), simplified as outlines to a few km")


class ExifGps(BaseModel):
    lat: float = Field(..., description="the file's EXIF GPS latitude (degrees, south negative)")
    lon: float = Field(..., description="the file's EXIF GPS longitude (degrees, west negative)")
    distance_km: float = Field(..., description="great-circle distance from the answer's point")


class PhotoMetadata(BaseModel):
    """What the file says about itself, beside the answer (never used for it). Present only when the file
    recorded an EXIF GPS position or a capture time (or had such tags that could not be used: `ignored`)."""

    exif_gps: Optional[ExifGps] = Field(None, description="EXIF GPSLatitude/GPSLongitude with their refs; null when absent, "
                                                          "out of range, malformed or (0, 0) (see `ignored`)")
    taken_at: Optional[str] = Field(None, examples=["2024-06-01T14:03:00"], description="DateTimeOriginal: local time as the camera recorded it, no zone")
    utc_offset: Optional[str] = Field(None, examples=["+02:00"], description="OffsetTimeOriginal (EXIF 2.31), when recorded")
    taken_at_utc: Optional[str] = Field(None, examples=["2024-06-01T12:03:00Z"],
                                        description="the UTC moment, only from a recorded offset, else from GPSDateStamp+GPSTimeStamp (UTC by definition)")
    utc_from: Optional[str] = Field(None, description="where `taken_at_utc` comes from: OffsetTimeOriginal | GPSDateStamp+GPSTimeStamp")
    sun_elevation_deg: Optional[float] = Field(None, description="the sun's apparent elevation at the PREDICTED place at `taken_at_utc` "
                                                                 "(astral; negative: below the horizon); null without a UTC time")
    note: Optional[str] = Field(None, description="when the EXIF position lies beyond the answer's 90% radius: a sentence stating that either "
                                                  "the prediction is wrong or the metadata was edited")
    ignored: list[str] = Field(default_factory=list, description="recorded tags that were not usable, and why")


class Location(_Asked):
    """One photo's answer, or one place's from several views (`views` > 1). `exif_gps_present` and `metadata` only
    report the files' EXIF (any view's); it is never used for the answer.

    Asked with `within` (an area of interest), the answer also carries `within`: `{"codes": ["HR", "US-CA"], "area_km2"}`
    or `{"geojson": true, "area_km2"}`, the area it was restricted to; `refinement.moved_into_area_km`: how far the
    refined point was moved to lie in the area (0: it already did); and its top cells, countries and admin-1 lists
    leave out what the area gave probability 0 (answers without `within` carry none of these keys)."""

    _only_when_given: ClassVar[tuple[str, ...]] = ("evidence", "metadata", "view_metadata", "regions")

    lat: float
    lon: float
    confidence: float
    radius_km_50: Optional[float] = None
    radius_km_90: Optional[float] = None
    top_cells: list[TopCell]
    countries: list[AreaProbability]
    admin1: list[AreaProbability] = Field(default_factory=list)
    refinement: Optional[Refinement] = None
    region_at_answer: Optional[RegionAtAnswer] = None
    reach: Optional[Reach] = Field(None, description="null when the cells record no reach limit")
    exif_gps_present: bool
    image: ImageInfo
    timings_ms: dict[str, float]
    explain: Optional[Explanation] = None
    views: int = Field(1, ge=1, description="how many views of the place were combined into this answer (1: one photo)")
    combine: Optional[str] = Field(None, description="how the views were combined (mean | product | both); null for one photo")
    view_images: Optional[list[ImageInfo]] = Field(None, description="each view's format and size, in the order sent (several views only)")
    metadata: Optional[PhotoMetadata] = Field(None, description="the file's own EXIF position and capture time checked against the answer "
                                                                "(several views: the first view that has any); absent when no file recorded either")
    view_metadata: Optional[list[Optional[PhotoMetadata]]] = Field(None, description="several views only, when any view has metadata: "
                                                                                     "each view's, in the order sent (null for a view without)")
    evidence: Optional[list[EvidencePhoto]] = Field(None, description="only with evidence=true: the gallery photos that decided the "
                                                                       "refinement, best first; empty when none did (no gallery, or refinement "
                                                                       "answered a cell or a cluster's centre)")
    regions: Optional[dict[str, CredibleRegion]] = Field(
        None,
        description='only with regions=true: the 50% and 90% credible regions, {"50": {...}, "90": {...}}')


class ItemError(BaseModel):
    """Why one file of a batch was refused: the code, a sentence naming the file, and the HTTP status it would have had alone."""

    error: str = Field(..., examples=["bad_image"])
    detail: str = Field(..., examples=["images[1] (b.png) is a damaged PNG: its image data is corrupt; send the complete, original file"])
    status: int = Field(..., examples=[400])


class BatchItem(BaseModel):
    """A located file. With `place` fields: a place (`place`, `filenames`; `filename` null)."""

    model_config = ConfigDict(extra="forbid")
    filename: Optional[str] = None
    place: Optional[str] = Field(None, description="the place's label (batches with `place` fields only)")
    filenames: Optional[list[Optional[str]]] = Field(None, description="the place's files, in the order sent (batches with `place` fields only)")
    result: Location


class BatchItemError(BaseModel):
    """A refused file (the others of the batch are still answered). With `place` fields: a place (`place`, `filenames`; `filename` null)."""

    model_config = ConfigDict(extra="forbid")
    filename: Optional[str] = None
    place: Optional[str] = Field(None, description="the place's label (batches with `place` fields only)")
    filenames: Optional[list[Optional[str]]] = Field(None, description="the place's files, in the order sent (batches with `place` fields only)")
    error: ItemError


class BatchResponse(BaseModel):
    results: list[Union[BatchItem, BatchItemError]] = Field(
        ..., description="one entry per file, in the order sent: a result or an error; with `place` fields, one entry per place, "
                         "in the order of each place's first file")
    timings_ms: dict[str, float]


class Health(BaseModel):
    status: str = Field(..., examples=["ok"], description="ok | verifying (large parts still being hashed in the background) | unhealthy (503)")
    detail: Optional[str] = Field(None, description="only when unhealthy: the part that failed verification, and why")
    in_flight: int
    capacity: int
    cells: int


class Version(BaseModel):
    pigeon_version: str
    backbone: Optional[str] = None
    manifest: dict[str, Any]
