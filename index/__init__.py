"""The gallery side of pigeon: a FAISS index of image embeddings, in-cell location clusters, and
PIGEON's refinement (top cells -> best cluster -> nearest images), compiled, over a batch.

Imports pigeon.core and pigeon.geocells (OPTICS) only; never the model, api or cli layers.
"""

from .build import (GALLERY_COLUMNS, GALLERY_SOURCE_COLUMNS, Gallery, StackedRows, append_gallery, build_gallery, gallery_keys,
                    index_in_cluster_order, read_gallery_frame, remove_from_gallery, write_gallery_frame)
from .clusters import ClusterTable, cluster_points, optics_params
from .gallery import IVFPQ_MIN_TRAIN, KINDS, GeoIndex, check_meta, default_pq_m, normalise
from .refine import DEFAULT_MODE, MODES, TEMPERATURE, GalleryRefiner, RefineConfig, RefineResult, Refiner, centre_answers

__all__ = [
    "GeoIndex", "KINDS", "IVFPQ_MIN_TRAIN", "default_pq_m", "normalise", "check_meta",
    "ClusterTable", "cluster_points", "optics_params",
    "Gallery", "GALLERY_COLUMNS", "build_gallery", "StackedRows", "index_in_cluster_order", "append_gallery", "remove_from_gallery",
    "read_gallery_frame", "write_gallery_frame", "GALLERY_SOURCE_COLUMNS", "gallery_keys",
    "Refiner", "RefineResult", "RefineConfig", "GalleryRefiner", "centre_answers", "MODES", "DEFAULT_MODE", "TEMPERATURE",
]
