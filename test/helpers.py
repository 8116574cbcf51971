"""Helpers for the tests: run an entry point as a user would, read its logs."""
import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_pretrain(*argv):
    """main_pretrain.py with these arguments, in this process."""
    import main_pretrain
    args = main_pretrain.get_args_parser().parse_args([str(a) for a in argv])
    main_pretrain.main(args)
    return args


def run_finetune(*argv):
    """main_finetune.py with these arguments, in this process."""
    import main_finetune
    args = main_finetune.get_args_parser().parse_args([str(a) for a in argv])
    main_finetune.main(args)
    return args


def run_script(*argv, env=None, timeout=600):
    """A command in a subprocess from the repository root; returns CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(a) for a in argv], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
