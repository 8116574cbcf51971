"""Helpers for the tests: run an entry point as a user would, read its logs."""
import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(module_name, *argv):
    """An entry point (main_pretrain, main_finetune) with these arguments, in this process.
    returns: what its main() returns"""
    import importlib
    module = importlib.import_module(module_name)
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def run_pretrain(*argv):
    return run_main('main_pretrain', *argv)


def run_finetune(*argv):
    return run_main('main_finetune', *argv)


def run_script(*argv, env=None, timeout=600, cwd=REPO):
    """A command in a subprocess, from the repository root unless `cwd` says; returns CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
