#!/usr/bin/env bash
# Does the package work installed, away from the checkout? Builds the wheel from a copy of the project,
# installs it (with its dependencies, from pip's indexes and cache) into a fresh virtual environment
# outside the checkout, then, from an empty temporary folder: indexes generated photos with the bundled
# lookalike-base model, searches them, and starts `lookalike serve` until /readyz answers 200 and a photo
# search returns products and zero-shot labels (the bundled label set).
#
#   scripts/wheel_smoke.sh [PYTHON]     PYTHON builds the wheel (default .venv/bin/python, else python3);
#                                       it needs setuptools (the build runs without build isolation)
# Environment: WHEEL_SMOKE_PIP_ARGS: extra `pip install` arguments for the fresh environment, e.g.
#   "--extra-index-url https://download.pytorch.org/whl/cpu" for the CPU-only torch wheels.
# Prints the time each step took; exits non-zero at the first failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD_PY=${1:-$ROOT/.venv/bin/python}
[ -x "$BUILD_PY" ] || BUILD_PY=python3
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lookalike-wheel-smoke.XXXXXX")
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
step_start=$SECONDS
step() { echo "wheel smoke: $1 ($((SECONDS - step_start)) s)"; step_start=$SECONDS; }

# A copy of the project without what a build must not see (a stale build/ folder's files would end up in
# the wheel) and without what it does not need.
mkdir "$WORK/src"
tar -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./dist --exclude=./out \
  --exclude=./tests --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$WORK/src" -xf -
"$BUILD_PY" -m pip wheel --quiet --no-deps --no-build-isolation "$WORK/src" -w "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/lookalike-*.whl)
step "built $(basename "$WHEEL"), $(du -h "$WHEEL" | cut -f1)"

python3 -m venv "$WORK/venv"
# shellcheck disable=SC2086  # WHEEL_SMOKE_PIP_ARGS holds several arguments
"$WORK/venv/bin/pip" install --quiet ${WHEEL_SMOKE_PIP_ARGS:-} "$WHEEL"
step "installed into a fresh environment, $(du -sh "$WORK/venv" | cut -f1)"

# From here on nothing may come from the checkout: an empty folder, the installed command, no PYTHONPATH.
cd "$(mktemp -d "$WORK/use.XXXXXX")"
unset PYTHONPATH
LOOKALIKE="$WORK/venv/bin/lookalike"
PY="$WORK/venv/bin/python"
"$PY" - <<'EOF'
import indexer
from pathlib import Path
from PIL import Image, ImageDraw

here = Path.cwd().resolve()
assert here not in Path(indexer.__file__).resolve().parents, indexer.__file__  # the installed package
Path("photos").mkdir()
for i, (colour, shape) in enumerate([((200, 30, 30), "ellipse"), ((30, 160, 30), "rectangle"),
                                     ((30, 30, 200), "ellipse"), ((220, 200, 40), "rectangle")]):
    im = Image.new("RGB", (256, 256), "white")
    getattr(ImageDraw.Draw(im), shape)((48, 48, 208, 208), fill=colour)
    im.save(f"photos/p{i}.jpg")
EOF
"$LOOKALIKE" --help >/dev/null
"$LOOKALIKE" index photos --out idx --model lookalike-base -q
step "indexed 4 photos with lookalike-base"
"$LOOKALIKE" search idx --image photos/p0.jpg -k 2 | tee "$WORK/search.txt"
grep -q "p0" "$WORK/search.txt"
step "searched"

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$LOOKALIKE" serve idx --port "$PORT" >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
if ! "$PY" - "$PORT" "$SERVER_PID" <<'EOF'; then
import os
import sys
import time

import httpx

base, pid = f"http://127.0.0.1:{sys.argv[1]}", int(sys.argv[2])
deadline = time.monotonic() + 300
while True:
    try:
        r = httpx.get(base + "/readyz", timeout=5)
        if r.status_code == 200:
            break
    except httpx.TransportError:
        pass
    if time.monotonic() > deadline or not os.path.exists(f"/proc/{pid}"):
        sys.exit("the server did not become ready")
    time.sleep(0.5)
print("readyz:", r.json())
with open("photos/p2.jpg", "rb") as f:
    r = httpx.post(base + "/v1/search/image", params={"k": 2}, files={"image": ("p2.jpg", f, "image/jpeg")},
                   timeout=60)
r.raise_for_status()
body = r.json()
assert body["results"] and body["labels"], body
print("search:", [h["id"] for h in body["results"]], "labels:", [lab["label"] for lab in body["labels"][:3]])
EOF
  echo "wheel smoke: lookalike serve failed; its log:" >&2
  tail -n 40 "$WORK/serve.log" >&2
  exit 1
fi
step "served: /readyz 200, photo search with labels"
echo "wheel smoke: ok"
