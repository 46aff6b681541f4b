#!/usr/bin/env bash
# One-shot GPU run of bench/speed.py (ours vs the diffusers + PEFT reference, bf16 and fp32) and of bench/train_memory.py
# (train.py --preset sd21, both stages), on one CUDA GPU.
#
#     bash bench/gpu.sh            # from anywhere; needs python3 (>= 3.10), an NVIDIA driver and internet for pip
#
# Installs the wheels into a throwaway virtual environment (/tmp/flowsr-gpu-venv), writes random SD 2.1-base
# weights (~4 GB, /tmp/flowsr-bench), then times 128->512 (1 and 4 steps), 256->1024 tiled, and ours at
# 256..2048 px; then trains 20 steps of each stage at 512 px, batch 4 (bf16 autocast, gradient checkpointing:
# the preset's settings) and reports each stage's peak GPU memory and time per step. A few minutes on an H100
# (most of it pip and writing the weights). Results: bench/results/speed_cuda.{json,md} (compare ours on
# 128->512 with the paper's 0.14 s) and bench/results/train_memory_cuda.{json,md} (compare with the estimate in
# bench/README.md, "Training memory at the SD 2.1 size").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/flowsr-gpu-venv}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip
pip install -q "torch>=2.1" "torchvision>=0.16" "safetensors>=0.4" "tqdm>=4.60" "pillow>=9.0" \
    "diffusers>=0.30" "transformers>=4.40" "peft>=0.10"
python -c "import torch, diffusers, peft; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
python bench/speed.py --device cuda --dtypes bf16 fp32 --runs 10 --photos 3 \
    --note "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
python bench/train_memory.py --device cuda --crop-sizes 512 --batch-size 4 --steps 20 --num-workers 4 \
    --note "bf16 autocast, gradient checkpointing; $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
