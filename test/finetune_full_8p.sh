#!/usr/bin/env bash
# Fine-tuning with the published recipe (MAE ViT-B: 100 epochs, effective batch 1024) and its top-1 accuracy,
# on 8 devices by default (--nproc= changes it).
#   bash test/finetune_full_8p.sh --data_path=/data/imagenet --model=vit_base_patch16 --device=npu --finetune_pth=mae_pretrain_vit_base.pth
# Keys: --data_path= (required; demo = the built-in set) --model= --device= --batch_size= --nproc=
# --epochs= --max_steps= --finetune_pth= --output_dir= --precision= --accum_iter= --log_freq=;
# anything else goes to the entry point. Reports: see test/modelzoo.py.
. "$(dirname "$(readlink -f "${BASH_SOURCE:-$0}")")/common.sh"  # the real folder of a linked script
run_case finetune full 8 "$@"
