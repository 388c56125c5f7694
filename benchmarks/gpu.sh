#!/usr/bin/env bash
# Real-size benchmarks on one GPU: the SD3.5-Medium and FLUX.1-dev architectures at 512², bf16, LoRA:
# sampling against the stock pipeline, GRPO against the DanceGRPO-structured loop (with the training
# phase's MFU), the DPO/PRDP/DRaFT/NFT step table, and `visalign plan` against measured peak memory.
#
#   bash benchmarks/gpu.sh                                  # prints the tables, writes $OUT/gpu_results.json
#   bash benchmarks/gpu.sh --architectures sd35-medium      # any option of benchmarks/gpu.py
#   bash benchmarks/gpu.sh --device cpu --depth 1 --size 64 --steps 2 --iterations 2   # CPU smoke mode
#
# Needs torch (CUDA), diffusers, transformers, accelerate and peft; nothing is downloaded (random
# weights from visalign/architectures, tiny text encoders). Sized for about 8 minutes on one H100;
# the JSON is rewritten after each architecture, so a run cut short keeps what it finished.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" benchmarks/gpu.py --json "${OUT:-.}/gpu_results.json" "$@"
