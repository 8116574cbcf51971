#!/usr/bin/env bash
# Pre-training throughput: a short, fixed number of steps (default 200),
# on 8 devices by default (--nproc= changes it).
#   bash test/pretrain_performance_8p.sh --data_path=/data/imagenet --model=mae_vit_base --device=npu
# Keys: --data_path= (required; demo = the built-in set) --model= --device= --batch_size= --nproc=
# --epochs= --max_steps= --finetune_pth= --output_dir= --precision= --accum_iter= --log_freq=;
# anything else goes to the entry point. Reports: see test/modelzoo.py.
. "$(dirname "$(readlink -f "${BASH_SOURCE:-$0}")")/common.sh"  # the real folder of a linked script
run_case pretrain performance 8 "$@"
