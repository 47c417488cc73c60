#!/usr/bin/env bash
# `make demo`: the whole pipeline end to end on a synthetic world, then the service.
#   synthetic world -> build-cells -> train (tiny backbone) -> build-index -> evaluate -> locate -> serve
# Everything lands in demo/ (DEMO_DIR); the service listens on 127.0.0.1:${PORT:-8000}.
# DEMO_NO_SERVE=1 stops before serving (used by the tests of this script).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DEMO=${DEMO_DIR:-demo}
N=${DEMO_IMAGES:-2000}
PORT=${PORT:-8000}
BACKBONE=${DEMO_BACKBONE:-tiny}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
rm -rf "$DEMO/bundle"
mkdir -p "$DEMO"

MP16=${MP16:-../shared/data/mp16_gps_100k.csv}
if [ -f "$MP16" ]; then
  echo "== 0/6 geocells for 100K real photo locations (MP-16), PIGEON's 30/60 sizes -> $DEMO/mp16_cells.png"
  "$BIN/pigeon" build-cells --points "$MP16" --out "$DEMO/mp16_cells.parquet" --plot "$DEMO/mp16_cells.png" --quiet
fi

echo "== 1/6 a synthetic world: $N photos whose pixels carry sun, climate, driving side and signpost cues"
"$BIN/python" - "$DEMO" "$N" <<'PY'
import sys
import pandas as pd
from pigeon.datasets.synthetic import make_world
out, n = sys.argv[1], int(sys.argv[2])
m = make_world(f"{out}/world", n_images=n, image_size=64, seed=0)
df = pd.read_csv(m)
df[df["split"] != "test"].to_csv(f"{out}/world/gallery.csv", index=False)   # the index never sees test photos
print(f"{len(df)} photos in {m} ({(df['split'] == 'test').sum()} held out for testing)")
PY

echo "== 2/6 geocells from the photos' coordinates"
"$BIN/pigeon" build-cells --points "$DEMO/world/gallery.csv" --out "$DEMO/bundle/cells.parquet" \
    --min-size 15 --max-size 60 --plot "$DEMO/cells.png"

echo "== 3/6 the geocell head on the $BACKBONE backbone"
"$BIN/pigeon" train --data "$DEMO/world/manifest.csv" --bundle "$DEMO/bundle" --backbone "$BACKBONE"

echo "== 4/6 the gallery index for in-cell refinement (train photos; the val photos choose the refinement mode)"
"$BIN/pigeon" build-index --images "$DEMO/world/gallery.csv" --bundle "$DEMO/bundle"

echo "== 5/6 evaluation on the held-out test photos"
"$BIN/pigeon" evaluate --bundle "$DEMO/bundle" --data "$DEMO/world/manifest.csv" --split test --out "$DEMO/eval"

echo "== 6/6 one photo through \`pigeon locate\`"
PHOTO=$("$BIN/python" -c "import pandas as pd; d=pd.read_csv('$DEMO/world/manifest.csv'); r=d[d.split=='test'].iloc[0]; print('$DEMO/world/'+r.image)")
"$BIN/pigeon" locate "$PHOTO" --bundle "$DEMO/bundle" --top-k 3

cat <<MSG

The bundle is in $DEMO/bundle; the cell map in $DEMO/cells.png; metrics and plots in $DEMO/eval/.
Now serving it. Open http://127.0.0.1:$PORT/ in a browser, or:

  curl -F image=@$PHOTO http://127.0.0.1:$PORT/locate
  curl http://127.0.0.1:$PORT/health

Press Ctrl-C to stop.
MSG
if [ "${DEMO_NO_SERVE:-0}" = "1" ]; then exit 0; fi
exec "$BIN/pigeon" serve --bundle "$DEMO/bundle" --host 127.0.0.1 --port "$PORT"
