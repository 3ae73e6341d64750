#!/usr/bin/env bash
# The main job: set-up, then the whole pipeline on the embedded default (dataprep -> shards ->
# DeepSpeed pre-training -> TensorBoard logs -> retrieval -> VQA and NLVR2 fine-tuning).
# Extra flags go to `python -m pipeline.demo` (e.g. --no-scl, --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/scl_torch_extensions}
exec python3 -m pipeline.demo "$@"
