#!/usr/bin/env bash
# Installs the project and its dependencies into the current Python (idempotent, quick when done).
# torch and torchvision go first, in one call, so pip never resolves torch on its own: the pair
# torch 2.14.1 / torchvision 0.29.1 is the one timm works with on these machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp_dir=${XDG_CACHE_HOME:-$HOME/.cache}/scl-pretrain
stamp="$stamp_dir/setup-$(cat setup.cfg scripts/setup.sh | sha1sum | cut -c1-12)-$(pwd | sha1sum | cut -c1-8)"
# The import check runs outside the checkout (the current directory would hide a missing or stale
# install) and asks that the installed project is this checkout.
root=$PWD
if [ -f "$stamp" ] && (cd / && "$PY" -c "import os, sys, pipeline, deepspeed, timm, webdataset, img2dataset, submitit
sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(pipeline.__file__))) != os.path.realpath(sys.argv[1]))" "$root") >/dev/null 2>&1; then
  exit 0
fi
echo "[setup] installing torch, torchvision and the project (pip)"
"$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q -e '.[test,spark]'
mkdir -p "$stamp_dir" && touch "$stamp"
