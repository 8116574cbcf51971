#!/usr/bin/env bash
# Fine-tuning throughput: a short, fixed number of steps (default 200), then one evaluation,
# on 1 device by default (--nproc= changes it).
#   bash test/finetune_performance_1p.sh --data_path=/data/imagenet --model=vit_base_patch16 --device=npu
# Keys: --data_path= (required; demo = the built-in set) --model= --device= --batch_size= --nproc=
# --epochs= --max_steps= --finetune_pth= --output_dir= --precision= --accum_iter= --log_freq=;
# anything else goes to the entry point. Reports: see test/modelzoo.py.
. "$(dirname "$(readlink -f "${BASH_SOURCE:-$0}")")/common.sh"  # the real folder of a linked script
run_case finetune performance 1 "$@"
