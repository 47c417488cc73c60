"""Synthetic captions: facts from cells and bundled towns, templates as data, seeded draws."""

from __future__ import annotations

import pytest

from pigeon.captions import CaptionMaker, compass, load_templates, nearest_towns
from pigeon.core.errors import UserError
from pigeon.head import cell_captions

ALL = dict(p_region=1, p_town=1, driving_side=1, facing=1, month=1, hemisphere=1, climate=1)


@pytest.fixture(scope="module")
def cells():
    """Cells = the bundled admin-1 regions of Japan, Australia and France, with their driving side."""
    from pigeon.geocells import GeoCells, bundled

    a = bundled.admin1()
    sub = a[a["adm0_a3"].isin(["JPN", "AUS", "FRA"])].reset_index(drop=True)
    side = bundled.driving_side().set_index("adm0_a3")["driving_side"]
    sub["driving_side"] = side.loc[sub["adm0_a3"]].to_numpy()
    return GeoCells.from_frame(sub)


def test_tokyo_left_north_march(cells):
    c = CaptionMaker(cells, probabilities=ALL).caption(35.68, 139.69, taken_at="2024-03-15T09:00:00", heading=92)
    assert "Tokyo" in c and "Japan" in c
    assert "left side of the road" in c
    assert "northern hemisphere" in c
    assert "March" in c
    assert "facing east" in c
    assert "climate is temperate" in c  # 35.7 N: the temperate belt


def test_climate_belts(cells):
    m = CaptionMaker(cells, probabilities=ALL)
    assert "climate is tropical" in m.caption(-12.46, 130.84)  # Darwin
    assert "climate is subtropical" in m.caption(-33.87, 151.21)  # Sydney
    assert "climate is subtropical" in m.caption(26.2, 127.7)  # Okinawa


def test_sydney_south(cells):
    c = CaptionMaker(cells, probabilities=ALL).caption(-33.87, 151.21, heading=225)
    assert "southern hemisphere" in c and "Australia" in c and "New South Wales" in c
    assert "left side of the road" in c and "south-west" in c
    assert "taken in" not in c  # no timestamp, no month


def test_paris_right_hand(cells):
    c = CaptionMaker(cells, probabilities=ALL).caption(48.86, 2.35, taken_at="2023-07-01")
    assert "right side of the road" in c and "France" in c and "July" in c and "northern" in c


def test_probabilities_and_seed(cells):
    lat, lon = [35.68, -33.87, 48.86] * 50, [139.69, 151.21, 2.35] * 50
    m = CaptionMaker(cells, seed=7)
    a = m.captions(lat, lon, epoch=0)
    assert a == CaptionMaker(cells, seed=7).captions(lat, lon, epoch=0)  # seeded
    assert a != m.captions(lat, lon, epoch=1)  # a fresh draw each epoch
    share_drive = sum("side of the road" in c for c in a) / len(a)
    share_region = sum("region of" in c for c in a) / len(a)
    assert 0.15 < share_drive < 0.45  # p = 0.3 in captions.json
    assert 0.45 < share_region < 0.75  # p = 0.6
    bare = CaptionMaker(cells, probabilities={k: 0 for k in ALL}).caption(35.68, 139.69, taken_at="2024-03-01")
    assert bare == "A photo in Japan."
    with pytest.raises(UserError, match="unknown"):
        CaptionMaker(cells, probabilities={"weather": 1.0})


def test_cell_caption(cells):
    """The zero-shot caption of a cell has one owner: `pigeon.head.cell_captions`."""
    tokyo = int(cells.cell_of([35.68], [139.69])[0])
    caps = cell_captions(cells.gdf)
    assert caps[tokyo] == "A photo taken in Tokyo, Japan." and len(caps) == len(cells)


def test_templates_are_data(cells, tmp_path):
    t = load_templates()
    t["base"]["region"] = "Somewhere in {region} ({country})."
    m = CaptionMaker(cells, templates=t, probabilities={**{k: 0 for k in ALL}, "p_region": 1.0})
    assert m.caption(35.68, 139.69) == "Somewhere in Tokyo (Japan)."
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        CaptionMaker(cells, templates=tmp_path / "bad.json")


def test_nearest_towns_and_compass():
    names, km = nearest_towns([48.8566, -33.8688], [2.3522, 151.2093])
    assert names[0] == "Paris" and km[0] < 5
    assert km[1] < 10
    import numpy as np

    d = compass(np.array([0, 44, 46, 180, 359, np.nan]), load_templates()["directions"])
    assert d.tolist() == ["north", "north-east", "north-east", "south", "north", ""]


def test_captions_use_the_cells_majority_labels():
    """A cell of three Andorran parishes (8 points each) and a Spanish province (16 points) is labelled
    by its majority country and that country's largest admin-1; photo captions and the zero-shot prompt
    name that same pair, never Andorra with a Spanish province."""
    import geopandas as gpd
    import numpy as np
    import shapely

    from pigeon.geocells import build_cells

    rows = [("AND", "AD", "Andorra", "Canillo"), ("AND", "AD", "Andorra", "Encamp"), ("AND", "AD", "Andorra", "Ordino"), ("ESP", "ES", "Spain", "Lleida")]
    b = gpd.GeoDataFrame({"adm0_a3": [r[0] for r in rows], "iso_a2": [r[1] for r in rows], "country": [r[2] for r in rows],
                          "admin1": [r[3] for r in rows], "admin2": ""},
                         geometry=[shapely.box(x, 0, x + 1, 1) for x in range(4)], crs="EPSG:4326")
    rng = np.random.default_rng(0)
    n = [8, 8, 8, 16]
    lon = np.concatenate([rng.uniform(x + 0.1, x + 0.9, k) for x, k in enumerate(n)])
    lat = rng.uniform(0.1, 0.9, sum(n))
    cells = build_cells(lat, lon, b, min_size=30, max_size=100, progress=False)
    assert len(cells) == 1
    m = CaptionMaker(cells, probabilities={**ALL, "p_town": 0})
    assert cell_captions(cells.gdf) == ["A photo taken in Canillo, Andorra."]
    caps = m.captions([0.5, 0.5], [0.5, 3.5])  # in Canillo and in Lleida (a minority country of the cell)
    assert all("region of Canillo in Andorra" in c and "right side of the road" in c for c in caps)
    assert not any("Spain" in c for c in caps)
