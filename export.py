"""Carry a checkpoint into timm: the encoder of a pre-training checkpoint (MAE, SimMIM, MaskFeat,
MAE-HiViT; this project's or an official release), or a fine-tuned classifier, as a safetensors file,
and the timm.create_model call that loads it.

    python export.py --checkpoint output/checkpoint-last.pth --output encoder.safetensors
"""
import argparse
import os

from util.errors import run_command
from util.export import export_checkpoint


def get_args_parser():
    parser = argparse.ArgumentParser(description='Export a checkpoint as a timm safetensors file', allow_abbrev=False)
    parser.add_argument('--checkpoint', type=os.path.expanduser, required=True,
                        help='a pre-training checkpoint (its encoder is exported) or a fine-tuning one '
                             '(its classifier)')
    parser.add_argument('--output', type=os.path.expanduser, required=True,
                        help='the file to write, ending in .safetensors')
    parser.add_argument('--model', default=None,
                        help="the model that wrote the checkpoint (default: the checkpoint's args, or what its layout "
                             "says): a pre-training model such as mae_vit_base, or the timm classifier it fine-tunes")
    parser.add_argument('--input_size', default=None, type=int,
                        help="the image size a checkpoint that records none was trained at, an official release's "
                             "(default: the checkpoint's args, else the model's own)")
    parser.add_argument('--model_ema', action='store_true',
                        help='export the EMA weights of a fine-tuning run with --model_ema instead of its weights')
    return parser


def main(args):
    call, description, parameters = export_checkpoint(args.checkpoint, args.output, args.model, ema=args.model_ema,
                                                         input_size=args.input_size)
    weights = ' (its EMA weights)' if args.model_ema else ''
    print(f'wrote {args.output}: {description}{weights} as {call.name}, {parameters / 1e6:.2f} M parameters. Load it '
          f'with:\n')
    print(call)
    return call


if __name__ == '__main__':
    run_command(main, get_args_parser)
