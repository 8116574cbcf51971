#!/usr/bin/env bash
# The example pictures of docs/MODEL_ZOO.md, made from demo checkpoints: the README's demo
# pre-training of each method's tiny model (seed 0), its reconstructions of 3 validation images,
# and the loss curves of the two MAE runs (the same loss: MSE of normalised pixels). About 12
# minutes on 2 CPU cores; a finished run is not trained again, so a second call only redraws.
#     bash docs/make_pictures.sh            # runs in output/pictures, writes docs/pictures/*.png
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-output/pictures}

pretrain() {
    local model=$1; shift
    python main_pretrain.py --model "$model" --data_path demo --num_workers 2 --log_freq 10 \
        --output_dir "$RUNS/$model" "$@"
}
pretrain mae_vit_tiny --batch_size 64 --epochs 10 --warmup_epochs 1 --blr 1.5e-3
pretrain mae_hivit_tiny --epochs 5 --warmup_epochs 1 --blr 4e-3
pretrain simmim_swin_tiny --epochs 5 --warmup_epochs 1 --blr 1e-3
pretrain simmim_vit_tiny --epochs 5 --warmup_epochs 1 --blr 1e-3
pretrain maskfeat_vit_tiny --epochs 5 --warmup_epochs 1 --blr 1e-3

for model in mae_vit_tiny mae_hivit_tiny simmim_swin_tiny simmim_vit_tiny maskfeat_vit_tiny; do
    python visualize.py --checkpoint "$RUNS/$model/checkpoint-last.pth" --data_path demo --num_images 3 \
        --output "docs/pictures/$model.png"
done
python visualize.py --logs "$RUNS"/mae_vit_tiny "$RUNS"/mae_hivit_tiny --output docs/pictures/mae_demo_curves.png
