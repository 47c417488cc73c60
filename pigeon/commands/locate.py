"""`pigeon locate`: where were these photos taken? Files and folders in, a table or GeoJSON out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from pigeon.core.errors import UserError

if TYPE_CHECKING:
    from pigeon.predictor import AnswerOptions


def locate_files(inputs: list[Path], bundle: Path, out: Path | None = None, top_k: int = 5, batch_size: int = 32, device: str = "cpu",
                 refine: str | None = None, max_refinement_km: float | None = None, strict: bool = False,
                 precision: str | None = None, options: "AnswerOptions | None" = None, fmt: str | None = None) -> tuple[list[dict], list[dict]]:
    """Locate every image in `inputs` (files or folders); write them to `out` (or stdout) as `fmt` (`output_format`).

    Returns (answers, failures): a file that cannot be read is listed in `failures` ({image, error})
    and the others are still answered, unless `strict` (the first bad file raises UserError).
    refine / max_refinement_km: gallery refinement mode (cluster+nn, cluster, nn, none) and PIGEON's
    guard in km (inf = off); None keeps `RefineConfig`'s defaults (the bundle's validated mode, else
    cluster+nn). Used only when the bundle has a gallery index; without one the answer is always the
    top cell's centre. precision: the backbone forwards' (auto/None: bf16 on CUDA, fp32 on CPU; fp32, bf16, fp16).
    options: what each answer carries beyond the default (`pigeon.predictor.AnswerOptions`).
    A file that records an EXIF position or capture time gets `metadata` (`pigeon.exif`: reported, never used).
    fmt: json | geojson | kml | csv (None: `out`'s suffix; neither: nothing written, the caller prints lines)."""
    # imported here, not at module top: `pigeon --help` should not pay for torch and faiss
    from pigeon.core.io import check_writable
    from pigeon.core.progress import progress
    from pigeon.exif import metadata_fields, read_metadata
    from pigeon.geoformats import options_for
    from pigeon.index import RefineConfig
    from pigeon.predictor import DEFAULT_OPTIONS, Predictor, collect_images

    _check_options(out, top_k, batch_size)
    fmt = output_format(out, fmt, options)
    options = options_for(options or DEFAULT_OPTIONS, fmt)
    if out is not None:
        check_writable(out)
    config = RefineConfig.from_options(refine, max_refinement_km)
    files = collect_images(inputs)
    pred = Predictor.from_bundle(bundle, device=device, refine=config, precision=precision)
    answers: list[dict] = []
    failures: list[dict] = []
    for s in progress(range(0, len(files), batch_size), desc="locate", unit="batch", disable=len(files) <= batch_size):
        images, names = _load_batch(files[s : s + batch_size], failures, strict)
        if not images:
            continue
        metas = [read_metadata(im) for im in images]  # the loaded image keeps its file's EXIF block
        for name, meta, a in zip(names, metas, pred.locate(images, top_k=top_k, options=options)):
            a["image"] = name
            a.update(metadata_fields(a, [meta]))
            answers.append(a)
    if fmt is not None and answers:
        _write_answers(answers, out, fmt, pred.regions)
    return answers, failures


def locate_places(inputs: list[Path], bundle: Path, out: Path | None = None, top_k: int = 5, batch_size: int = 32, device: str = "cpu",
                  refine: str | None = None, max_refinement_km: float | None = None, strict: bool = False,
                  group_by: str | None = None, combine: str | None = None, precision: str | None = None,
                  options: "AnswerOptions | None" = None, fmt: str | None = None) -> tuple[list[dict], list[dict]]:
    """One answer per place: every image in `inputs` is a view of one place (group_by None), or `inputs`
    is one manifest whose `group_by` column names each image's place. Views are combined by `combine`
    (mean | product | both; None: the bundle's recorded mode, else mean). Unreadable views are skipped
    and listed in `failures` (or raise, if strict); each answer carries `image` and `place` (the place's
    label), `views` and `combine`, and `metadata`/`view_metadata` when a view records an EXIF position or
    capture time (`pigeon.exif.metadata_fields`). Writes `out` (or stdout) as `fmt` like `locate_files`."""
    # imported here, not at module top: `pigeon --help` should not pay for torch and faiss
    import numpy as np

    from pigeon.core.io import check_writable
    from pigeon.exif import metadata_fields
    from pigeon.geoformats import options_for
    from pigeon.index import RefineConfig
    from pigeon.places import check_combine
    from pigeon.predictor import DEFAULT_OPTIONS, Predictor

    _check_options(out, top_k, batch_size)
    fmt = output_format(out, fmt, options)
    options = options_for(options or DEFAULT_OPTIONS, fmt)
    if combine is not None:
        check_combine(combine, "--combine")
    if out is not None:
        check_writable(out)
    if group_by is None:
        files = _one_place_files(inputs)
        groups = [" + ".join(str(i) for i in inputs)] * len(files)
    else:
        files, groups = _manifest_places(inputs, group_by)
    pred = Predictor.from_bundle(bundle, device=device, refine=RefineConfig.from_options(refine, max_refinement_km), precision=precision)
    failures: list[dict] = []
    emb, kept, metas = _embed_views(pred, files, batch_size, failures, strict)
    if len(kept) == 0:
        return [], failures
    kept_groups = np.asarray(groups, dtype=object)[kept]
    pp = pred.predict_places(emb, kept_groups, combine=combine, top_k=top_k, options=options)
    answers = pred.format_places(pp, top_k=top_k, options=options)
    views: dict = {}
    for g, m in zip(kept_groups, metas):
        views.setdefault(g, []).append(m)
    for a in answers:
        a["image"] = a["place"]
        a.update(metadata_fields(a, views.get(a["place"], []), several=True))
    if fmt is not None and answers:
        _write_answers(answers, out, fmt, pred.regions)
    return answers, failures


def _one_place_files(inputs: list[Path]) -> list[Path]:
    """The image files of `--same-place` inputs; refused when they look like several places: a manifest
    (its rows name places: --group-by), or a folder whose images lie in several subfolders."""
    from pigeon.predictor import collect_images

    for p in inputs:
        if p.is_file() and p.suffix.lower() in (".csv", ".parquet"):
            raise UserError(f"--same-place takes the image files or the folder of ONE place, not a manifest ({p}); "
                            f"for a manifest of several places use --group-by COLUMN (e.g. location_id)")
    files = collect_images(inputs)
    for p in inputs:
        if p.is_dir():
            subs = sorted({f.parent.relative_to(p).as_posix() for f in files if f.is_relative_to(p)})
            if len(subs) > 1:
                raise UserError(f"--same-place: folder {p} holds images in {len(subs)} folders ({', '.join(subs[:3])}{', ...' if len(subs) > 3 else ''}), "
                                f"which looks like several places; give one place's folder per run, or list the photos in a manifest with a place column and use --group-by")
    return files


def _manifest_places(inputs: list[Path], column: str) -> tuple[list[Path], list[str]]:
    """(image files, place label per image) from one manifest (CSV or Parquet: columns image and `column`;
    relative image paths are taken from the manifest's folder). A row without a place is a place of its
    own (`pigeon.places`)."""
    import pandas as pd

    from pigeon.places import place_labels

    if len(inputs) != 1 or inputs[0].suffix.lower() not in (".csv", ".parquet") or not inputs[0].is_file():
        raise UserError(f"--group-by {column} reads a manifest: give one existing .csv or .parquet file with columns image and {column} "
                        f"(got {', '.join(map(str, inputs))}); for loose files of one place use --same-place")
    path = inputs[0]
    df = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path, dtype={column: str})
    missing = [c for c in ("image", column) if c not in df.columns]
    if missing:
        raise UserError(f"manifest {path} lacks column(s) {', '.join(missing)} (it has {', '.join(map(str, df.columns[:8]))}); "
                        f"add them or give --group-by another column")
    root = path.resolve().parent
    files = [Path(f) if Path(f).is_absolute() else root / f for f in df["image"].astype(str)]
    return files, place_labels(df[column]).tolist()


def _embed_views(pred, files: list[Path], batch_size: int, failures: list[dict], strict: bool) -> tuple["np.ndarray", "np.ndarray", list]:
    """(embeddings of the readable files, their positions in `files`, their `pigeon.exif` metadata), batch
    by batch; unreadable files go to `failures`."""
    import numpy as np
    from pigeon.core.progress import progress
    from pigeon.exif import read_metadata

    embs, kept, metas = [], [], []
    for s in progress(range(0, len(files), batch_size), desc="locate", unit="batch", disable=len(files) <= batch_size):
        images, names = _load_batch(files[s : s + batch_size], failures, strict)
        if images:
            embs.append(pred.embed(images))
            metas += [read_metadata(im) for im in images]
            ok = set(names)
            kept += [s + i for i, f in enumerate(files[s : s + batch_size]) if str(f) in ok]
    return (np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)), np.asarray(kept, dtype=np.int64), metas


def _answer_options(within: str | None, evidence: bool, regions: bool = False) -> "AnswerOptions":
    """The answer options of `--within`, `--evidence` and `--regions`, read before the bundle is loaded: a bad area is
    one line, exit 2."""
    from pigeon.predictor import AnswerOptions

    if within is None:
        return AnswerOptions(evidence=evidence, regions=regions)
    from pigeon.area import read_area

    return AnswerOptions(evidence=evidence, regions=regions, within=read_area(within))


def _check_options(out: Path | None, top_k: int, batch_size: int) -> None:
    """Refuse impossible options before the bundle is loaded."""
    if out is not None and out.suffix.lower() not in SUFFIX_FORMATS:
        raise UserError(f"--out {out}: give a file ending in .csv, .json, .geojson or .kml")
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: give 1 or more")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give 1 or more")


def _load_batch(files: list[Path], failures: list[dict], strict: bool) -> tuple[list, list[str]]:
    """The readable images of a batch and their names; the others go to `failures` (or raise, if strict)."""
    from pigeon.datasets import load_image

    images, names = [], []
    for f in files:
        try:
            images.append(load_image(f))
            names.append(str(f))
        except UserError as e:
            if strict:
                raise UserError(f"{e} (--strict stops at the first bad file; drop it to skip bad files)") from e
            failures.append({"image": str(f), "error": str(e)})
    return images, names


SUFFIX_FORMATS = {".csv": "csv", ".geojson": "geojson", ".json": "json", ".kml": "kml"}
OUTPUT_FORMATS = ("json", "geojson", "kml", "csv")


def output_format(out: Path | None, fmt: str | None, options: "AnswerOptions | None" = None) -> str | None:
    """What to write: `fmt` (--format), else `out`'s suffix; None (neither) is the one-line-per-image table.
    Refuses an unknown format, an `out` whose suffix says another one, and --regions where no JSON carries them."""
    if fmt is not None:
        fmt = fmt.strip().lower()
        if fmt not in OUTPUT_FORMATS:
            raise UserError(f"--format {fmt}: give one of {', '.join(OUTPUT_FORMATS)}")
    by_suffix = SUFFIX_FORMATS.get(out.suffix.lower()) if out is not None else None
    if fmt is not None and out is not None and by_suffix != fmt:
        raise UserError(f"--out {out} says {by_suffix or 'no known format'} but --format is {fmt}; "
                        f"name the file {out.with_suffix('.' + fmt).name}, or drop --format to go by the suffix")
    fmt = fmt or by_suffix
    if options is not None and options.regions and fmt in (None, "csv"):
        raise UserError("--regions adds the 50%/90% regions to the JSON answers: add --format json (GeoJSON and KML always carry them)")
    return fmt


def _csv_text(answers: list[dict]) -> str:
    """One row per image: the answer point, radii, the likeliest country and admin-1, the region at the answer
    (exif_lat, exif_lon, exif_distance_km only when some answer has an EXIF position; the evidence summary with --evidence)."""
    import pandas as pd

    exif = any(_exif_gps(a) for a in answers)

    rows = [{"image": a["image"], "lat": a["lat"], "lon": a["lon"], "confidence": a["confidence"],
             "radius_km_50": a["radius_km_50"], "radius_km_90": a["radius_km_90"],
             "country": a["countries"][0]["name"] if a["countries"] else "",
             "iso_a2": a["countries"][0]["iso_a2"] if a["countries"] else "",
             "country_probability": a["countries"][0]["probability"] if a["countries"] else 0.0,
             "admin1": a["admin1"][0]["name"] if a["admin1"] else "",
             "admin1_at_answer": a["region_at_answer"]["admin1"], "country_at_answer": a["region_at_answer"]["country"],
             **({"views": a["views"]} if "views" in a else {}), **(_exif_columns(a) if exif else {}), **_evidence_columns(a)}
            for a in answers]
    return pd.DataFrame(rows).to_csv(index=False)


def _json_value(x):
    """numpy scalars and arrays as JSON values (an answer's fields are mostly Python already)."""
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _write_answers(answers: list[dict], out: Path | None, fmt: str, regions) -> None:
    """The answers as `fmt` (csv: one row per image; json: the answers; geojson/kml: `pigeon.geoformats`,
    points, regions and top cells), atomically to `out`, or to stdout when `out` is None."""
    import sys

    from pigeon.core.io import atomic_path
    from pigeon.geoformats import feature_collection, kml_document

    if fmt == "csv":
        text = _csv_text(answers)
    elif fmt == "json":
        text = json.dumps(answers, default=_json_value) + "\n"
    else:
        fc = feature_collection(answers, regions, names=[a["image"] for a in answers])
        text = json.dumps(fc, default=_json_value) + "\n" if fmt == "geojson" else kml_document(fc)
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_path(out) as tmp:
        tmp.write_text(text)


def _exif_gps(a: dict) -> dict | None:
    """The answer's EXIF position cross-check ({lat, lon, distance_km}), or None."""
    return (a.get("metadata") or {}).get("exif_gps")


def _exif_columns(a: dict) -> dict:
    g = _exif_gps(a) or {}
    return {"exif_lat": g.get("lat"), "exif_lon": g.get("lon"), "exif_distance_km": g.get("distance_km")}
def _evidence_columns(a: dict) -> dict:
    """A CSV row's summary of the answer's evidence (asked with --evidence): how many gallery photos, the best one's key and similarity."""
    if "evidence" not in a:
        return {}
    best = a["evidence"][0] if a["evidence"] else {}
    return {"evidence_photos": len(a["evidence"]), "evidence_best_key": best.get("key", ""), "evidence_best_similarity": best.get("similarity")}


def _evidence_hint(a: dict) -> str:
    """The one-line output's evidence hint (asked with --evidence): how many gallery photos decided the answer and
    the best similarity, or why none did (the refinement mode)."""
    if "evidence" not in a:
        return ""
    ev = a["evidence"]
    if not ev:
        return f"\tevidence: none (refinement {a['refinement']['mode']})"
    return f"\tevidence: {len(ev)} photos, best {ev[0]['similarity']:.2f} ({ev[0]['key']}, {ev[0]['distance_km']:.0f} km)"


def register(app: typer.Typer) -> None:
    @app.command("locate")
    def locate_cmd(
        images: List[Path] = typer.Argument(..., help="image files and/or folders (searched recursively)"),
        bundle: Path = typer.Option(..., "--bundle", help="bundle folder (cells + head)"),
        out: Optional[Path] = typer.Option(None, "--out", help="write results.csv, .json, .geojson or .kml (the suffix picks the format unless --format is given; default: one line per image)"),
        fmt: Optional[str] = typer.Option(None, "--format", help="json | geojson | kml | csv: to --out, or to stdout without it (geojson/kml: the answer point, its 50%/90% regions and top cells)"),
        regions: bool = typer.Option(False, "--regions", help="add each answer's 50% and 90% credible regions (cells, probability, area_km2, polygon) to the JSON"),
        top_k: int = typer.Option(5, "--top-k", help="cells / countries / regions listed per image"),
        batch_size: int = typer.Option(32, "--batch-size", help="images per forward pass"),
        device: str = typer.Option("cpu", help="torch device"),
        refine: Optional[str] = typer.Option(None, "--refine", help="gallery refinement (bundles with an index): cluster+nn | cluster | nn | none (top cell's centre); default: the mode `pigeon build-index` chose on val photos, else cluster+nn"),
        strict: bool = typer.Option(False, "--strict", help="stop at the first unreadable image (default: skip it, list it on stderr, answer the rest)"),
        max_refinement_km: Optional[float] = typer.Option(None, "--max-refinement-km", help="PIGEON's guard: a refined answer farther than this from the top cell's centre is undone (default: PIGEON's 1000 km; inf = off)"),
        same_place: bool = typer.Option(False, "--same-place", help="ALL the given images (every file and folder) are views of ONE place (a panorama, a burst): one answer for them together. Photos of several places: one run per place, or --group-by on a manifest"),
        group_by: Optional[str] = typer.Option(None, "--group-by", help="IMAGES is one manifest (.csv/.parquet, columns image and COLUMN): one answer per value of COLUMN (e.g. location_id), its rows' images combined as views of that place"),
        combine: Optional[str] = typer.Option(None, "--combine", help="how views of one place combine: mean (of normalised embeddings, PIGEON's) | product (of cell probabilities) | both; default: the bundle's recorded mode, else mean"),
        precision: Optional[str] = typer.Option(None, "--precision", help="backbone forwards: fp32 | bf16 | fp16 (default auto: bf16 on CUDA, fp16 on GPUs without bf16, fp32 on CPU)"),
        within: Optional[str] = typer.Option(None, "--within", help="an area of interest the answers must lie in: ISO country codes (HR or HR,SI,BA), ISO 3166-2 admin-1 codes (US-CA), or a GeoJSON file of a (Multi)Polygon; cells outside get probability 0, refinement uses only gallery photos inside"),
        evidence: bool = typer.Option(False, "--evidence", help="list the gallery photos that decided each answer's refinement (key, similarity, distance, url/license/author when the gallery has them): in the JSON/GeoJSON, a summary in CSV and in the one-line output"),
    ) -> None:
        """Guess where each photo was taken: lat/lon, confidence, uncertainty radii, likely countries and regions."""
        if same_place and group_by is not None:
            raise UserError("--same-place and --group-by both say how photos make places; give one (--same-place: all are one place)")
        if combine is not None and not (same_place or group_by):
            raise UserError("--combine only applies to several views of one place; add --same-place or --group-by COLUMN")
        options = _answer_options(within, evidence, regions)
        if same_place or group_by:
            answers, failures = locate_places(list(images), bundle, out=out, top_k=top_k, batch_size=batch_size, device=device, refine=refine,
                                              max_refinement_km=max_refinement_km, strict=strict, group_by=group_by, combine=combine,
                                              precision=precision, options=options, fmt=fmt)
        else:
            answers, failures = locate_files(list(images), bundle, out=out, top_k=top_k, batch_size=batch_size, device=device,
                                             refine=refine, max_refinement_km=max_refinement_km, strict=strict, precision=precision,
                                             options=options, fmt=fmt)
        for f in failures:
            typer.echo(f"pigeon: skipped {f['image']}: {f['error']}", err=True)
        if out is None and fmt is None:
            for a in answers:
                c = a["countries"][0] if a["countries"] else {"name": "?", "probability": 0.0}
                here = a["region_at_answer"]
                views = f"\t{a['views']} views ({a['combine']})" if "views" in a else ""
                gps = _exif_gps(a)
                exif = f"\tEXIF GPS {gps['distance_km']:.0f} km away" if gps else ""
                typer.echo(f"{a['image']}\t{a['lat']:.4f}\t{a['lon']:.4f}\tin {here['admin1']}, {here['country']}\t{c['name']} ({c['probability']:.0%})\t"
                           f"50%: {a['radius_km_50']:.0f} km\t90%: {a['radius_km_90']:.0f} km{views}{exif}{_evidence_hint(a)}")
        elif out is not None:
            what = "places" if same_place or group_by else "images"
            typer.echo(f"{len(answers)} {what} located -> {out}" if answers else "nothing located; nothing written")
        if failures and not answers:
            raise UserError(f"none of the {len(failures)} images could be read; see the lines above")
