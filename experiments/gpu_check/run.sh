#!/usr/bin/env bash
# GPU acceptance check (gpu_check.py beside this file) on one GPU with no network, in under 4 minutes.
# The machine needs torch, lightning and transformers; the project's other imports on this path are
# pure-Python wheels, installed from a folder (default .whl, or $WHEELS) when missing. Make the
# folder once where pip reaches PyPI, from the repository root:
#   python -m pip download --no-deps --only-binary=:all: -d .whl \
#       hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
# then, on the GPU machine, from the repository root:
#   bash experiments/gpu_check/run.sh            # writes $OUT/gpu_check.json (or ./gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site "${WHEELS:-.whl}"/*.whl
  export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec timeout 240 python3 experiments/gpu_check/gpu_check.py --out "${OUT:-.}/gpu_check.json" "$@"
