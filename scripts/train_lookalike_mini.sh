#!/usr/bin/env bash
# Reproduce the bundled offline model data/models/lookalike-mini from the train splits of
# ../shared/datasets (CIFAR-10 train, Fashion-MNIST train, 80 % of the Magento products),
# from scratch, on a CPU, in at most 85 minutes of training wall time.
#
#   bash scripts/train_lookalike_mini.sh [OUT_DIR]      (default data/models/lookalike-mini)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-data/models/lookalike-mini}
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
lookalike=lookalike; [ -x .venv/bin/lookalike ] && lookalike=.venv/bin/lookalike
"$py" scripts/prepare_training_data.py --out out/train
"$lookalike" finetune out/train/manifest.jsonl --out "$out" --name lookalike-mini \
  --model data/model_configs/lookalike-mini.json --from-scratch \
  --epochs 8 --batch-size 256 --lr 2e-3 --warmup-steps 300 --seed 0 --max-minutes 85 \
  --weight source=magento-train:8 \
  --caption-template 'a photo of a {title}.' \
  --caption-template 'a photo of {phrase}.' \
  --caption-template '{title}' \
  --caption-template 'a product photo of a {title}, {phrase}.' \
  --split-file out/train/magento_split.json
