#!/usr/bin/env bash
# Run on a lent GPU machine (no internet): install the carried wheels, then `python -m scripts.gpu_smoke`.
# The machine has torch, transformers, tokenizers and safetensors; hivemind, grpcio >= 1.85.1,
# protobuf >= 7.35.1 and the rest travel as Python 3.12 wheels in .whl/ (not committed; carried):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl hivemind==1.1.12 grpcio grpcio-health-checking grpcio-reflection protobuf \
#     prometheus-client cryptography uvloop <and hivemind's own dependencies, see `pip show hivemind`>
#   bash scripts/gpu_smoke.sh [--preset base125m] [--device cuda] [--train-s 120]
#   bash scripts/gpu_smoke.sh scripts.bench_checkpoints --preset base125m --device cuda  # another script
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
# crowdtrain's import namespace over this checkout without pip (the GPU machine has no index):
# crowdtrain.peer -> peer/, crowdtrain.coordinator -> coordinator/, crowdtrain.protos -> protos/
mkdir -p /tmp/ctsrc/crowdtrain
for pkg in peer coordinator protos; do ln -sfn "$ROOT/$pkg" "/tmp/ctsrc/crowdtrain/$pkg"; done
export PYTHONPATH=/tmp/site:/tmp/ctsrc:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 no_proxy=127.0.0.1,localhost
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, hivemind, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'hivemind', hivemind.__version__, 'transformers', transformers.__version__)"
if [[ "${1:-}" == scripts.* ]]; then
  exec python3 -m "$@"
fi
exec python3 -m scripts.gpu_smoke "$@"
