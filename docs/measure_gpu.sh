#!/usr/bin/env bash
# The GPU figures of docs/PERFORMANCE.md, stage by stage, on one CUDA GPU; each stage's console is
# kept in $LOGS/<stage>.log and each stage is cut at $LIMIT seconds, so that a short lease still
# brings back the stages that finished. Stages (all of them when none is named, in this order):
#   mae          MAE ViT-B's training step, batch 256, bf16: the official loop's step, the official
#                model in this project's step, this project's eager and compiled steps (benchmark.py
#                --official, rounds taken in turns)
#   runs         MAE ViT-B whole runs, batch 256, 3 epochs of 6,400 images: synthetic, then JPEGs
#                (made here first, 500x375 like ImageNet's), 16 loader workers; the log has each
#                interval of 5 steps, so the start of each epoch shows
#   simmim_swin simmim_vit maskfeat mae_hivit vit_finetune   the other families' steps, as mae
#   modes        MAE ViT-B's step compiled in torch.compile's other modes (--compile_mode
#                reduce-overhead: CUDA graphs; max-autotune-no-cudagraphs), each beside the default
# Before: clone the official repositories into official/ (git ignores it):
#   git clone https://github.com/facebookresearch/mae official/mae
#   git clone https://github.com/microsoft/SimMIM official/SimMIM
#   git clone https://github.com/zhangxiaosong18/hivit official/hivit
# Usage: bash docs/measure_gpu.sh [stage ...]      (LOGS=..., LIMIT=..., PYTHON=..., JPEG_DIR=... to change)
# On the device tool's machine the logs go to $OUT, which comes back; the JPEGs stay on the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${LOGS:-${OUT:-output}/gpu_figures}
JPEG_DIR=${JPEG_DIR:-output/gpu_jpegs}  # 6,400 files: not under $LOGS, which may be copied back
LIMIT=${LIMIT:-420}
PYTHON=${PYTHON:-python3}  # the interpreter that holds torch on most GPU images (python may not exist)
mkdir -p "$LOGS"
OFFICIAL=()
for clone in official/mae official/SimMIM official/hivit; do
    [ -d "$clone" ] && OFFICIAL+=("$clone")
done

step() {  # stage model [flags]: the training step, against the official code where there is a clone
    local stage=$1 model=$2; shift 2
    timeout "$LIMIT" "$PYTHON" benchmark.py --model "$model" --device cuda --batch_size 256 --steps 20 \
        --warmup 10 ${OFFICIAL[@]:+--official "${OFFICIAL[@]}"} "$@" 2>&1 | tee "$LOGS/$stage.log"
}

make_jpegs() {  # $JPEGS (6,400) ImageNet-like JPEGs: 500x375, smooth colour fields with texture, quality 90
    [ -d "$JPEG_DIR/train" ] && return
    "$PYTHON" - "$JPEG_DIR" "${JPEGS:-6400}" <<'EOF'
import os, sys
from multiprocessing import get_context
import numpy as np
from PIL import Image

def write(index):
    rng = np.random.default_rng(index)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.int16) + rng.integers(-24, 25, (375, 500, 3))
    folder = os.path.join(sys.argv[1], 'train', f'{index % 100:03d}')
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f'{index}.jpg'), quality=90)

with get_context('fork').Pool() as pool:  # fork: write() is defined in a script read from stdin
    pool.map(write, range(int(sys.argv[2])), chunksize=64)
EOF
}

run() {  # stage data_path: a whole MAE ViT-B run (its checkpoints stay on the machine, its logs go to $LOGS)
    local stage=$1 data=$2 out="output/gpu_runs/$stage"
    rm -rf "$out"
    timeout "$LIMIT" "$PYTHON" main_pretrain.py --model mae_vit_base --data_path "$data" --batch_size 256 --epochs 3 \
        --warmup_epochs 1 --log_freq 5 --num_workers 16 --device cuda --output_dir "$out" 2>&1 \
        | tee "$LOGS/run_$stage.log" | grep -E 'train.ips|steady-state|compile'
    cp "$out/log.jsonl" "$LOGS/run_$stage.jsonl" 2>/dev/null || true
}

stage() {
    case $1 in
        mae) step mae mae_vit_base ;;
        simmim_swin) step simmim_swin simmim_swin_base ;;
        simmim_vit) step simmim_vit simmim_vit_base ;;
        maskfeat) step maskfeat maskfeat_vit_base ;;
        mae_hivit) step mae_hivit mae_hivit_base ;;
        vit_finetune) step vit_finetune vit_base_patch16 ;;
        runs) run synthetic synthetic:6400; make_jpegs && run jpegs "$JPEG_DIR" ;;
        modes) for mode in default reduce-overhead max-autotune-no-cudagraphs; do
                   timeout "$LIMIT" "$PYTHON" benchmark.py --model mae_vit_base --device cuda --batch_size 256 \
                       --steps 20 --warmup 10 --compile_mode $mode 2>&1 | tee "$LOGS/modes_$mode.log"
               done ;;
        *) echo "unknown stage $1: mae runs simmim_swin simmim_vit maskfeat mae_hivit vit_finetune modes" >&2
           return 2 ;;
    esac
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
  echo "official clones: ${OFFICIAL[*]:-none}"; date -u; } 2>&1 | tee "$LOGS/machine.txt"
status=0
for name in "${@:-mae runs simmim_swin simmim_vit maskfeat mae_hivit vit_finetune modes}"; do
    for s in $name; do
        stage "$s" || status=$?
    done
done
exit $status
