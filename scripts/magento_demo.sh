#!/usr/bin/env bash
# The main job in one command: turn the Magento store export into a manifest, index
# every photo, label every product, and serve find-similar on http://127.0.0.1:8000.
#
#   bash scripts/magento_demo.sh [MODEL] [PORT]
#
# MODEL defaults to lookalike-base (the bundled offline model) when it is present,
# else test-tiny; any --model value works (ViT-B-32 needs its weights in the cache).
set -euo pipefail
cd "$(dirname "$0")/.."
bundled=test-tiny
[ -f data/models/lookalike-base/open_clip_config.json ] && bundled=lookalike-base
model=${1:-$bundled}
port=${2:-8000}
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
lookalike=lookalike
[ -x .venv/bin/lookalike ] && lookalike=.venv/bin/lookalike
out=out/magento-$model
mkdir -p out
"$py" scripts/prepare_magento.py --out out/magento.jsonl
"$lookalike" index out/magento.jsonl --out "$out" --model "$model"
"$lookalike" label "$out"
echo "serving $out on http://127.0.0.1:$port (API docs: http://127.0.0.1:$port/docs)"
exec "$lookalike" serve "$out" --port "$port"
