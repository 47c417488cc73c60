"""One owner for which rows a command reads (`pigeon.core.splits`), run through every command.

One manifest whose split column holds ` Train`, `VAL` and `test` goes through build-cells, pretrain
(as a manifest and as WebDataset shards), embed, train, build-index and evaluate; each reads exactly
the rows it should. A named split with no rows is the same one-line refusal (exit 2) everywhere:
`pretrain --split val` on data without val rows used to train on every row, test photos included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pigeon.core.errors import UserError
from pigeon.core.splits import normalise, parse, rows_of, select
from worlds import cli

torch.set_num_threads(2)
RAW = {"train": " Train", "val": "VAL", "test": "test"}


# -- the rule itself --------------------------------------------------------------------------------
def test_normalise_strips_lowercases_and_defaults_to_train():
    got = normalise([" Train", "VAL", "test ", None, np.nan, "", "  ", "Holdout"])
    assert got.tolist() == ["train", "val", "test", "train", "train", "train", "train", "holdout"]
    assert normalise(pd.Series(["TRAIN", None])).tolist() == ["train", "train"]


def test_parse_flag_values():
    assert parse("train") == ("train",)
    assert parse(" Train , VAL ") == ("train", "val")
    assert parse(["test", "TEST"]) == ("test",)
    assert parse("all") is None and parse("train,ALL") is None and parse(None) is None
    with pytest.raises(UserError, match="--splits ',': give split names"):
        parse(",")


def test_select_refuses_a_named_split_without_rows_in_one_line():
    values = np.array([" Train", "test", "TEST"], dtype=object)
    assert select(values, "train", "data x").tolist() == [True, False, False]
    assert rows_of(values, ("test",), "data x").tolist() == [1, 2]
    assert select(values, None, "data x").all()
    assert select(values, "train,val", "data x").tolist() == [True, False, False]   # of several named, one is enough
    with pytest.raises(UserError) as e:
        select(values, "val", "manifest m.csv", flag="--split")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == "manifest m.csv has no rows with split in val (its splits: test, train); pass --split with the splits you want, or --split all"
    with pytest.raises(UserError, match="mark those rows in its `split` column"):
        select(values, "val", "the training data", flag=None)


# -- the rule through every command -----------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A synthetic world whose split column reads ' Train', 'VAL', 'test'; the same photos as shards."""
    from pigeon.datasets.shards import write_webdataset
    from pigeon.datasets.synthetic import make_world

    root = tmp_path_factory.mktemp("splits")
    manifest = make_world(root / "world", n_images=72, image_size=32, seed=5)
    df = pd.read_csv(manifest)
    truth = df["split"].to_numpy().copy()
    df["split"] = df["split"].map(RAW)
    df.to_csv(manifest, index=False)
    counts = {s: int((truth == s).sum()) for s in RAW}
    assert min(counts.values()) >= 3, counts
    shards = write_webdataset(df.assign(key=[Path(p).stem for p in df["image"]]), root / "wds", per_shard=12,
                              root=manifest.parent)
    no_val = root / "no_val.csv"
    df[truth != "val"].to_csv(no_val, index=False)
    no_val_shards = write_webdataset(df[truth != "val"].assign(key=[Path(p).stem for p in df["image"][truth != "val"]]),
                                     root / "wds_no_val", per_shard=12, root=manifest.parent)
    keys = {s: set(Path(p).stem for p in df["image"][truth == s]) for s in RAW}
    return {"root": root, "manifest": manifest, "counts": counts, "keys": keys, "shards": root / "wds",
            "n_shards": len(shards), "no_val": no_val, "no_val_shards": root / "wds_no_val", "_": no_val_shards}


@pytest.fixture(scope="module")
def pipeline(mixed):
    """build-cells -> train -> build-index on the mixed manifest; what each reported."""
    from pigeon.indexing import build_index
    from pigeon.commands.cells import build_cells_file
    from pigeon.train import TrainConfig, train

    bundle = mixed["root"] / "bundle"
    cells = build_cells_file(mixed["manifest"], bundle / "cells.parquet", min_size=4, max_size=8, progress=False)
    trained = train(mixed["manifest"], bundle, backbone="tiny",
                    config=TrainConfig(epochs=1, batch_size=16, progress=False, cache_dir=str(mixed["root"] / "cache")))
    index = build_index(mixed["manifest"], bundle, progress=False, batch_size=32, cache_dir=str(mixed["root"] / "cache"))
    return {"bundle": bundle, "cells": cells, "train": trained, "index": index}


def test_build_cells_reads_train_and_val(mixed, pipeline):
    c = mixed["counts"]
    assert pipeline["cells"]["points"] == c["train"] + c["val"]
    assert pipeline["cells"]["left_out_rows"] == c["test"]
    assert pipeline["cells"]["splits"] == ["train", "val"]


def test_train_reads_train_and_val(mixed, pipeline):
    c = mixed["counts"]
    assert (pipeline["train"]["n_train"], pipeline["train"]["n_val"]) == (c["train"], c["val"])


def test_build_index_gallery_is_train_and_val_answers(mixed, pipeline):
    c = mixed["counts"]
    assert pipeline["index"]["images"] == c["train"]
    assert pipeline["index"]["held_out_val"] == c["val"]
    assert pipeline["index"]["left_out_rows"] == c["test"]


def test_evaluate_reads_test_rows(mixed, pipeline):
    from pigeon.evaluate import evaluate

    c = mixed["counts"]
    m = evaluate(pipeline["bundle"], mixed["manifest"], split="TEST", plots=False, progress=False,
                 cache_dir=str(mixed["root"] / "cache"))
    assert (m["n"], m["split"]) == (c["test"], "test")
    assert cli(["evaluate", "--bundle", str(pipeline["bundle"]), "--data", str(mixed["no_val"]), "--split", "val",
                "--cache-dir", str(mixed["root"] / "cache")]) == 2


def test_embed_records_normalised_splits(mixed, tmp_path):
    from pigeon.backbones import create_backbone
    from pigeon.datasets.sources import open_source
    from pigeon.embed import embed_source
    from pigeon.embeddings import EmbeddingStore

    embed_source(open_source(mixed["shards"]), create_backbone("tiny"), tmp_path / "emb", batch_size=32, progress=False)
    got = EmbeddingStore(tmp_path / "emb").rows["split"].value_counts().to_dict()
    assert got == mixed["counts"]


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_pretrain_reads_train_rows(mixed, kind):
    from pigeon.distributed import Dist
    from pigeon.geocells import GeoCells
    from pigeon.pretrain import PretrainConfig, _load_data

    cells = GeoCells.load(_cells(mixed))
    data = mixed["manifest"] if kind == "manifest" else mixed["shards"]
    got = _load_data(data, cells, PretrainConfig(batch_size=4), Dist())
    assert got.n == mixed["counts"]["train"]
    if kind == "manifest":
        assert set(Path(p).stem for p in got.df["image"]) == mixed["keys"]["train"]


def test_pretrain_stream_yields_only_train_samples(mixed):
    from torchvision import transforms

    from pigeon.datasets.sources import open_source
    from pigeon.datasets.stream import ShardStream

    src = open_source(mixed["shards"])
    stream = ShardStream(src, transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()]), batch_size=4,
                         split=" Train", buffer_size=8)
    seen = [k for b in stream for k in b.keys]
    assert len(seen) == len(set(seen)) == mixed["counts"]["train"] // 4 * 4   # whole batches; the remainder waits
    assert set(seen) <= mixed["keys"]["train"]


@pytest.mark.parametrize("kind", ["no_val", "no_val_shards"])
def test_pretrain_split_val_without_val_rows_is_refused(mixed, tmp_path, kind, capsys):
    """The bug: the manifest path skipped the filter when no row matched and trained on every row."""
    code = cli(["pretrain", "--data", str(mixed[kind]), "--cells", str(_cells(mixed)), "--backbone", "tiny",
                "--out", str(tmp_path / "b"), "--split", "val", "--batch-size", "4", "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "has no rows with split in val (its splits: test, train); pass --split with the splits you want, or --split all" in err
    assert not (tmp_path / "b" / "backbone.safetensors").exists()


@pytest.mark.parametrize("command", [
    ["build-cells", "--points", "{manifest}", "--out", "{tmp}/c/cells.parquet", "--splits", "holdout"],
    ["build-index", "--bundle", "{bundle}", "--images", "{manifest}", "--splits", "holdout"],
    ["evaluate", "--bundle", "{bundle}", "--data", "{manifest}", "--split", "holdout"],
])
def test_every_command_refuses_a_split_without_rows_alike(mixed, pipeline, tmp_path, command, capsys):
    args = [a.format(manifest=mixed["manifest"], bundle=pipeline["bundle"], tmp=tmp_path) for a in command]
    if command[0] != "build-cells":
        args += ["--cache-dir", str(mixed["root"] / "cache")]
    assert cli(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("pigeon: error: "), err
    assert "has no rows with split in holdout (its splits: test, train, val); pass --split" in last, last


def _cells(mixed) -> Path:
    path = mixed["root"] / "bundle" / "cells.parquet"
    if not path.exists():
        from pigeon.commands.cells import build_cells_file
        path = mixed["root"] / "cells_only" / "cells.parquet"
        if not path.exists():
            build_cells_file(mixed["manifest"], path, min_size=4, max_size=8, progress=False)
    return path
