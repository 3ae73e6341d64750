#!/usr/bin/env bash
# The test command: set-up, then the whole suite on CPU. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/scl_torch_extensions}
exec python3 -m pytest -q -ra "$@"
