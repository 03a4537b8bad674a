#!/usr/bin/env bash
# The loss benchmarks that need one GPU (H100 / H200), in under 8 minutes:
#
#   bash benchmarks/gpu_suite.sh [extra gpu_loss.py flags]
#
# Writes the markdown tables to stdout and to gpu_loss.md.  The GPU machines have torch and triton
# but not open_clip: wheels come from .whl/ (the device tool's carry folder, see
# ../shared/gpu-wheels/README.md) or ../shared/gpu-wheels, installed with --target (no registry
# there).  Inf-CL is included when an inf-cl wheel is in that folder (pure Python; download it here
# with `pip download inf-cl --no-deps --python-version 3.12 --only-binary=:all: -d .whl`).
#
# Not run here: benchmarks/trainer_throughput.py, which compares with open_clip_train on CPU only
# (it passes train.device=cpu and --device cpu to the two trainers).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-}
if [ -z "$WHEELS" ]; then
  if [ -d .whl ]; then WHEELS=.whl; else WHEELS=../shared/gpu-wheels; fi
fi
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  ls "$WHEELS"/inf_cl-*.whl >/dev/null 2>&1 || echo "note: no inf-cl wheel in $WHEELS: Inf-CL is skipped"
else
  echo "note: no wheels in $WHEELS: open_clip and Inf-CL columns only if already installed"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'PY'
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, cuda {torch.cuda.is_available()}",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
# 400 s of cells (the script stops starting new ones then), the tile sweep (~20 s), a hard cap of 470 s.
timeout 470 python3 benchmarks/gpu_loss.py --budget-s 400 --tile-sweep "$@" | tee gpu_loss.md
