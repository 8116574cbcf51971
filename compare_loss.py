"""Compare the loss curve of a run on a device under test with a reference run's.

    python compare_loss.py npu_run/log.jsonl gpu_run/log.jsonl
    python compare_loss.py train_MAE_loss.txt gpu_run/ --skip_first 20 --plot loss.jpg

Accelerator ports (Ascend NPU, Tecorigin SDAA) show that training on their device matches a GPU
run by comparing the two loss curves step by step. The first file is the CANDIDATE (the device
under test), the second the REFERENCE (e.g. the CUDA run).

Each file's format is found from its content, not its name:
- this project's log.jsonl (`step` and `loss` of one JSON object per line); a directory means
  <dir>/log.jsonl; where a fresh run in the same folder appended its lines after an earlier run's
  (its steps start again from the first), the last run's are read, with a note; a stop's partial
  interval is left out where the resumed run logged the whole one (`without_resumed_parts`);
- this project's console log (`Epoch: [E]  [I/N] ... train.loss : X`; position E * N + I, the
  global step of log.jsonl);
- Tecorigin TCAPPDLL lines (`train.loss : X` or `train.loss_avg : X`, rank 0 only; in console
  lines too, a line of another `rank : N`, or one that torchrun prefixed `[rankN]:` or
  `[defaultN]:` for a rank N other than 0, is left out);
- Ascend loss files (train_<Case>_loss.txt: one number per line);
- as a fallback, lines with `loss: X`, `loss = X`, `loss is X` or `Loss X` (the progress lines
  `Epoch: [0][ 10/5005] ... Loss 6.9077e+00 (6.9120e+00)` of many Ascend ModelZoo models).
Formats without a step number count positions 1, 2, 3, ... so that they line up with a log.jsonl
written at every step (a logged loss is the mean over its logging interval: logs written at
different intervals, or a counted log against one not written at every step from step 1, are
refused rather than compared wrongly).

The curves are compared on the steps both have (after --skip_first, within --last), with a
warning where the candidate stops before the reference (a crashed port, or a log without step
numbers written every few steps), with the signed means of the ModelZoo/Tecorigin tools:
    MeanRelativeError = mean((cand - ref) / ref),   MeanAbsoluteError = mean(cand - ref)
The run passes when |MeanRelativeError| <= --rel_tol or |MeanAbsoluteError| <= --abs_tol. The
magnitudes are judged, unlike the vendors' loss.py (which compares the signed means, so a curve
10% below the reference passes there): a loss lower than the reference is a mismatch too.

Exit codes: 0 pass; 1 fail (the means exceed both tolerances, or the candidate's loss is nan/inf);
2 unusable input (a missing or unreadable file, no loss values, no common steps, nothing left
after --skip_first/--last, a nan/inf reference loss, bad flag values), with one `error:` line.

Only numpy is needed; --plot draws with matplotlib (util/plots.py), imported only then. This file
imports neither torch nor matplotlib.
"""
import argparse
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

from util.errors import UsageError
from util.logger import PARTIAL_MARK, json_records


class UnusableInput(UsageError):
    """The comparison cannot be made: the message says what is wrong and what to do. A UsageError,
    so that it ends with the exit status of bad input (2) like the UsageErrors of util.plots."""


# ---------------------------------------------------------------------------------------------
# Reading loss logs

# A number as the loggers print it: 0.5853, 1.741860, 1.2e-04, .5, nan, inf.
NUMBER = r'[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf(?:inity)?)'
TRAIN_LOSS = re.compile(r'train\.loss\s*:\s*(' + NUMBER + r')(?!\w)', re.IGNORECASE)
TRAIN_LOSS_AVG = re.compile(r'train\.loss_avg\s*:\s*(' + NUMBER + r')(?!\w)', re.IGNORECASE)
CONSOLE_POSITION = re.compile(r'Epoch:\s*\[\s*(\d+)\s*\]\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]')
# `rank : N` (TCAPPDLL), or the `[rankN]:` / `[defaultN]:` that torchrun's --tee and
# --log-line-prefix-template put before each line of a worker
RANK = re.compile(r'\brank\s*:\s*(\d+)|^\s*\[(?:rank|default)(\d+)\]:', re.IGNORECASE)
# `loss` as a word of its own: not `train_loss`, `val_loss`, `lr:` or `Acc@1`; `Loss 6.9e+00 (6.9e+00)`
# is the progress line of the PyTorch ImageNet example that many Ascend ModelZoo models print.
GENERIC_LOSS = re.compile(r'(?<![\w@])loss\s*(?:[:=]|\bis\b)?\s*(' + NUMBER + r')(?!\w)', re.IGNORECASE)

FORMATS_HINT = ("expected log.jsonl, console lines with 'train.loss : X', TCAPPDLL lines "
                "or one number per line")


class Losses(dict):
    """{step: value} of the last run in a log; `earlier_runs` counts the runs before it in the same
    file."""
    earlier_runs = 0


def last_run(pairs):
    """The last run of a log's (step, value) pairs, in the order they were written. A run resumed
    after a kill logs the steps after its checkpoint again (the later value wins); a fresh run in
    the same --output_dir starts again at or below the first step of the run before it, whose
    values are then left out. None when there are no pairs."""
    run, first, earlier = Losses(), None, 0
    for step, value in pairs:
        if run and step <= first:
            run, earlier = Losses(), earlier + 1
        if not run:
            first = step
        run[step] = value
    run.earlier_runs = earlier
    return run or None


def without_resumed_parts(entries):
    """The (step, value) pairs of (step, value, partial) entries in the order written, less each
    partial one (the record of a stop before its --log_freq interval's log step: util.engine) that
    the log goes on after: the resumed run logs the whole interval at its own step, where the
    uninterrupted run logs it, and that run has no record at the stop's step."""
    return [(step, value) for i, (step, value, partial) in enumerate(entries)
            if not (partial and i + 1 < len(entries))]


def rank_zero_losses(lines, find_loss, kind):
    """The losses that `find_loss` (a line -> match of the value, or None) finds in `lines`, with
    their lines, leaving out the lines of a `rank : N` other than 0 (each rank logs the same steps;
    a line without a rank is rank 0's). returns: [(line, loss)]; an error when every loss line is
    another rank's, since falling through to another format would read them as rank 0's."""
    found, other_ranks = [], set()
    for line in lines:
        match = find_loss(line)
        if not match:
            continue
        rank = RANK.search(line)
        if rank and int(rank.group(1) or rank.group(2)) != 0:
            other_ranks.add(int(rank.group(1) or rank.group(2)))
            continue
        found.append((line, float(match.group(1))))
    if not found and other_ranks:
        raise UnusableInput(f'{kind} lines of rank(s) {", ".join(map(str, sorted(other_ranks)))} but none of '
                            f'rank 0: pass the log of rank 0')
    return found


def parse_tcappdll(text):
    """Tecorigin tcap_dllogger lines: rank 0's losses, at positions 1, 2, 3, ... None when the text
    has no TCAPPDLL loss lines."""
    lines = [line for line in text.splitlines() if 'TCAPPDLL' in line]
    found = rank_zero_losses(lines, lambda line: TRAIN_LOSS.search(line) or TRAIN_LOSS_AVG.search(line),
                             'TCAPPDLL loss')
    return {position: loss for position, (_, loss) in enumerate(found, start=1)} or None


def parse_console(text):
    """This project's console lines `Epoch: [E]  [I/N] ... train.loss : X` at global step
    E * N + I (the step of log.jsonl); a loss line without that pattern counts its position.
    Other lines (prints, argument dumps, evaluation results) and the lines of a `rank : N` other
    than 0 are ignored. None when no line has `train.loss :`."""
    pairs = []
    for position, (line, loss) in enumerate(rank_zero_losses(text.splitlines(), TRAIN_LOSS.search, 'loss'),
                                            start=1):
        epoch_step = CONSOLE_POSITION.search(line)
        step = int(epoch_step.group(1)) * int(epoch_step.group(3)) + int(epoch_step.group(2)) if epoch_step \
            else position
        pairs.append((step, loss, PARTIAL_MARK in line))
    return last_run(without_resumed_parts(pairs))


def parse_jsonl(text, value='loss', position='step', count_missing=True):
    """This project's log.jsonl: one JSON object per line with `loss` and `step` (positions
    1, 2, 3, ... where `step` is missing), of its last run (`last_run`). Lines that are not such
    objects (a line cut short by a killed run) are skipped. None when no line is one. `value` and
    `position` read other keys of such logs: `lr` by step, or log.txt's `test_acc1` by `epoch`
    (with `count_missing` False: a line without an epoch, such as a `--knn` evaluation's appended
    to a run's log.txt, is no point of its curve)."""
    pairs = []
    for record in json_records(text.splitlines()):
        if value not in record:
            continue
        number = record[value]
        if number is None:
            number = math.nan
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        step = record.get(position)
        numbered = isinstance(step, (int, float)) and not isinstance(step, bool)
        if not numbered and not count_missing:
            continue
        step = int(step) if numbered else len(pairs) + 1
        pairs.append((step, float(number), record.get('partial') is True))
    return last_run(without_resumed_parts(pairs))


def parse_numbers(text):
    """Ascend loss files: one number per line (blank lines ignored) at positions 1, 2, 3, ...
    None unless every other line is a single number."""
    values = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if not re.fullmatch(NUMBER, line, re.IGNORECASE):
            return None
        values.append(float(line))
    return {i + 1: v for i, v in enumerate(values)} or None


def parse_generic(text):
    """Any other log: the first `loss: X`, `loss = X`, `loss is X` or `Loss X` of each line, at positions
    1, 2, 3, ... None when there is none."""
    values = [float(m.group(1)) for m in map(GENERIC_LOSS.search, text.splitlines()) if m]
    return {i + 1: v for i, v in enumerate(values)} or None


# In this order: TCAPPDLL lines also carry `train.loss :`, and a console log may contain JSON.
PARSERS = (('TCAPPDLL', parse_tcappdll), ('console', parse_console), ('log.jsonl', parse_jsonl),
           ('one number per line', parse_numbers), ('loss: X lines', parse_generic))
# Formats without step numbers: their losses are counted 1, 2, 3, ...
COUNTED = {'TCAPPDLL', 'one number per line', 'loss: X lines'}


def log_text(path):
    """(path read, its text) of a loss log; a directory means its log.jsonl."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, 'log.jsonl')):
            raise UnusableInput(f'{path} is a directory without a log.jsonl: pass the loss log itself')
        path = os.path.join(path, 'log.jsonl')
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return path, f.read()
    except OSError as e:
        raise UnusableInput(f'cannot read {path}: {e.strerror or e}') from None


def say_if_runs_follow_one_another(path, losses):
    """A note where a log holds runs one after another, of which only the last is read."""
    if getattr(losses, 'earlier_runs', 0):
        print(f'note: {path} holds {losses.earlier_runs + 1} runs one after another (a fresh run in the same '
              f'--output_dir appends to its logs): the last one is read, from step {min(losses)}')


def read_log(path):
    """(format name, {step: loss}) of a loss log; a directory means its log.jsonl."""
    path, text = log_text(path)
    for name, parser in PARSERS:
        losses = parser(text)
        if losses:
            say_if_runs_follow_one_another(path, losses)
            return name, losses
    hint = " (this looks like MAE's per-epoch log.txt: pass log.jsonl, which has every logged step)" \
        if '"train_loss"' in text else ''
    if 'ActualFPS' in text:
        hint = ' (this looks like a ModelZoo summary, <CaseName>.log: pass train_<CaseName>_loss.txt beside it, or ' \
               'the run folder)'

    raise UnusableInput(f'no loss values found in {path}: {FORMATS_HINT}{hint}')


def learning_rates(path):
    """{step: lr} of a log.jsonl (a directory's), or {} for a log of another format."""
    return parse_jsonl(log_text(path)[1], value='lr') or {}


# ---------------------------------------------------------------------------------------------
# Comparing

def log_interval(steps):
    """The most common gap between the sorted logged steps, counting the first from step 0 (None
    for a single step: unknown). Of gaps as common, the longest: a shorter one is the tail of an
    epoch (steps 20 and 31 of an epoch of 31 are a log every 20 steps, not every 11)."""
    if len(steps) < 2:
        return None
    values, counts = np.unique(np.diff([0, *sorted(steps)]), return_counts=True)
    return int(values[counts == counts.max()].max())


def check_same_steps(cand, cand_format, ref, ref_format):
    """Refuse curves whose positions do not mean the same steps. A logged loss is the mean over
    its logging interval, so two logs written every 1 and every 10 steps differ even for the
    same run; and a format without step numbers (counted 1, 2, 3, ...) lines up only with a log
    written at every step from step 1."""
    logs = (('candidate', cand, cand_format), ('reference', ref, ref_format))
    counted = [(name, losses) for name, losses, fmt in logs if fmt in COUNTED]
    numbered = [(name, losses) for name, losses, fmt in logs if fmt not in COUNTED]
    if len(numbered) == 2:
        (_, a), (_, b) = numbered
        single = [name for name, losses in numbered if len(losses) == 1]
        if single:
            print(f'note: the {" and the ".join(single)} logged one step only, so whether both were logged at the '
                  f'same --log_freq (a logged loss is the mean over its interval) cannot be checked')
        elif log_interval(a) != log_interval(b):
            raise UnusableInput(f'the candidate is logged every {log_interval(a)} steps and the reference every '
                                f'{log_interval(b)}: a logged loss is the mean over its interval, so compare '
                                f'runs logged at the same --log_freq (--align logs every step)')
    elif len(numbered) == 1:
        (counted_name, _), (name, losses) = counted[0], numbered[0]
        if log_interval(losses) not in (1, None) or min(losses) != 1:
            raise UnusableInput(f'the {counted_name} has no step numbers (its losses are counted 1, 2, 3, ...) but '
                                f'the {name} is logged at steps {describe_steps(sorted(losses))}: compare it with '
                                f'a log written at every step from step 1 (--log_freq 1), or with a log of the '
                                f'same kind')
    else:
        print('note: neither log has step numbers; their losses are counted 1, 2, 3, ..., which lines up only '
              'if both were written at the same frequency from the same step')


def align(cand, ref, skip_first=0, last=None):
    """The steps both curves have, sorted, less the first `skip_first`, then the last `last` of
    those. returns: (steps, cand values, ref values) as numpy arrays."""
    common = sorted(set(cand) & set(ref))
    if not common:
        raise UnusableInput(f'the two logs have no step in common (candidate {describe_steps(sorted(cand))}, '
                            f'reference {describe_steps(sorted(ref))}): compare logs of the same run '
                            f'length and logging frequency')
    kept = common[skip_first:]
    if last is not None:
        kept = kept[-last:] if last > 0 else []
    if not kept:
        raise UnusableInput(f'nothing left to compare: {len(common)} common steps, --skip_first {skip_first}'
                            f'{f" --last {last}" if last is not None else ""}: skip fewer steps')
    steps = np.array(kept, dtype=np.int64)
    return (steps, np.array([cand[s] for s in kept], dtype=np.float64),
            np.array([ref[s] for s in kept], dtype=np.float64))


@dataclass
class Result:
    steps: np.ndarray          # the compared steps
    cand: np.ndarray
    ref: np.ndarray
    rel: np.ndarray            # (cand - ref) / ref per step; nan where ref is 0
    passed: bool
    rule: str                  # the verdict line
    rel_tol: float
    abs_tol: float
    bad_step: int | None = None  # the first step where the candidate's loss is nan/inf
    mean_rel: float = math.nan
    mean_abs: float = math.nan
    mean_abs_rel: float = math.nan
    max_abs_rel: float = math.nan
    max_step: int | None = None
    zero_ref: int = 0          # points left out of the relative means (ref == 0)


def compare(steps, cand, ref, rel_tol, abs_tol):
    """The signed means and the verdict on their magnitudes (see the module docstring)."""
    bad = ~np.isfinite(ref)
    if bad.any():
        raise UnusableInput(f'the reference loss is {ref[bad][0]} at step {steps[bad][0]}: the reference run '
                            f'diverged; leave those steps out with --skip_first/--last or use another reference')
    with np.errstate(divide='ignore', invalid='ignore'):
        rel = np.where(ref != 0, (cand - ref) / ref, np.nan)
    bad = ~np.isfinite(cand)
    if bad.any():
        step = int(steps[bad][0])
        return Result(steps, cand, ref, rel, False, f'fail: the candidate loss is {cand[bad][0]} at step {step}: '
                      f'the run diverged', rel_tol, abs_tol, bad_step=step)
    nonzero = ref != 0
    if not nonzero.any():
        raise UnusableInput('every compared reference loss is 0: the relative error is undefined; '
                            'check the reference log')
    mean_rel = float(np.mean(rel[nonzero]))
    mean_abs = float(np.mean(cand - ref))
    abs_rel = np.abs(rel[nonzero])
    worst = int(np.argmax(abs_rel))
    rel_ok, abs_ok = abs(mean_rel) <= rel_tol, abs(mean_abs) <= abs_tol
    passed = rel_ok or abs_ok
    rule = (f'{"pass" if passed else "fail"}: |MeanRelativeError| {abs(mean_rel):.6g} {"<=" if rel_ok else ">"} '
            f'{rel_tol:g} {"or" if passed else "and"} |MeanAbsoluteError| {abs(mean_abs):.6g} '
            f'{"<=" if abs_ok else ">"} {abs_tol:g}')
    return Result(steps, cand, ref, rel, passed, rule, rel_tol, abs_tol, mean_rel=mean_rel, mean_abs=mean_abs,
                  mean_abs_rel=float(abs_rel.mean()), max_abs_rel=float(abs_rel[worst]),
                  max_step=int(steps[nonzero][worst]), zero_ref=int((~nonzero).sum()))


def describe_steps(steps):
    """A short description of sorted steps: '1..200', '10..2000 every 10', '3, 5, 9'."""
    if len(steps) <= 5:
        return ', '.join(map(str, steps))
    strides = set(np.diff(steps).tolist())
    if len(strides) == 1:
        stride = strides.pop()
        return f'{steps[0]}..{steps[-1]}' + (f' every {stride}' if stride != 1 else '')
    return f'{steps[0]}..{steps[-1]} (irregular)'


# ---------------------------------------------------------------------------------------------
# Command line

def get_args_parser():
    parser = argparse.ArgumentParser(
        'compare_loss.py', allow_abbrev=False,
        description='Compare a device run\'s loss curve (CANDIDATE) with a reference run\'s (REFERENCE), e.g. '
                    'NPU/SDAA against CUDA.',
        epilog='Inputs: log.jsonl (or its directory), console logs with "train.loss : X", TCAPPDLL lines, '
               'one number per line. Pass when |MeanRelativeError| <= rel_tol or |MeanAbsoluteError| <= '
               'abs_tol, with MeanRelativeError = mean((cand - ref) / ref) and MeanAbsoluteError = '
               'mean(cand - ref). Exit codes: 0 pass, 1 fail, 2 unusable input.')
    parser.add_argument('candidate', type=os.path.expanduser, help='loss log of the device under test')
    parser.add_argument('reference', type=os.path.expanduser, help='loss log of the reference run (e.g. CUDA)')
    parser.add_argument('--rel_tol', type=float, default=0.05, help='tolerance on |MeanRelativeError| (default 0.05)')
    parser.add_argument('--abs_tol', type=float, default=0.0002,
                        help='tolerance on |MeanAbsoluteError| (default 0.0002)')
    parser.add_argument('--skip_first', type=int, default=0, metavar='N',
                        help='leave out the first N common steps (start-up noise)')
    parser.add_argument('--last', type=int, default=None, metavar='N',
                        help='compare only the last N common steps (after --skip_first)')
    parser.add_argument('--plot', type=os.path.expanduser, default=None, metavar='PATH',
                        help='draw both curves and their relative difference with the +-rel_tol band into an image '
                             '(.png, .jpg, .pdf, .svg; needs matplotlib)')
    parser.add_argument('--smooth', type=int, default=None, metavar='K',
                        help='moving-average window of the plot in points (default: 1/50 of the points)')
    return parser


def check_args(args):
    """Flag values the comparison cannot use, before any file is read."""
    for name in ('rel_tol', 'abs_tol'):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UnusableInput(f'--{name} must be a number >= 0, got {value}')
    if args.skip_first < 0:
        raise UnusableInput(f'--skip_first must be >= 0, got {args.skip_first}')
    if args.last is not None and args.last < 1:
        raise UnusableInput(f'--last must be >= 1, got {args.last}')
    if args.smooth is not None and args.smooth < 1:
        raise UnusableInput(f'--smooth must be >= 1, got {args.smooth}')
    if args.plot:
        from util.plots import check_plot_path
        check_plot_path(args.plot)


def report(args, cand, ref, cand_format, ref_format, steps, result):
    """The comparison's lines on stdout, the verdict last."""
    common = len(set(cand) & set(ref))
    for role, path, fmt, losses in (('candidate', args.candidate, cand_format, cand),
                                    ('reference', args.reference, ref_format, ref)):
        count = f'{len(losses)} loss{"es" if len(losses) != 1 else ""}'
        print(f'{role}: {path} ({fmt}, {count}, steps {describe_steps(sorted(losses))})')
    print(f'steps: {len(steps)} compared ({describe_steps(steps.tolist())}), of {common} in common')
    only_cand, only_ref = len(cand) - common, len(ref) - common
    if only_cand or only_ref:
        print(f'note: {only_cand} candidate and {only_ref} reference steps have no counterpart and are left out')
    if max(cand) < max(ref):
        counted_hint = (' (or, with no step numbers of its own, it was logged every few steps: compare it with a log '
                        'of the same frequency)' if cand_format in COUNTED else '')
        print(f'warning: the candidate stops at step {max(cand)} and the reference goes on to step {max(ref)}: only '
              f'the steps both ran are compared, so a candidate that crashed or hung passes on the steps it '
              f'logged{counted_hint}')
    if result.bad_step is None:
        print(f'MeanRelativeError: {result.mean_rel:.6e}')
        print(f'MeanAbsoluteError: {result.mean_abs:.6e}')
        print(f'mean |relative error|: {result.mean_abs_rel:.6e}')
        print(f'max |relative error|: {result.max_abs_rel:.6e} at step {result.max_step}')
        if result.zero_ref:
            print(f'note: {result.zero_ref} steps with a reference loss of 0 are left out of the relative errors')


def say_where_the_learning_rates_differ(candidate, reference, steps):
    """Two log.jsonl files record the lr of each step: a warning at the first compared step where
    they differ, since runs on other schedules align by chance, not because a port is right."""
    cand_lr, ref_lr = learning_rates(candidate), learning_rates(reference)
    step = next((s for s in steps.tolist() if s in cand_lr and s in ref_lr
                 and not math.isclose(cand_lr[s], ref_lr[s], rel_tol=1e-5, abs_tol=1e-12)), None)
    if step is not None:
        print(f'warning: the learning rates differ from step {step} on (candidate {cand_lr[step]:.6e}, reference '
              f'{ref_lr[step]:.6e}): the runs follow other schedules (another --blr, batch or warm-up), so their '
              f'losses are no measure of a port')


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        check_args(args)
        cand_format, cand = read_log(args.candidate)
        ref_format, ref = read_log(args.reference)
        check_same_steps(cand, cand_format, ref, ref_format)
        steps, cand_values, ref_values = align(cand, ref, args.skip_first, args.last)
        result = compare(steps, cand_values, ref_values, args.rel_tol, args.abs_tol)
        report(args, cand, ref, cand_format, ref_format, steps, result)
        compared = set(steps.tolist())
        elsewhere = [s for s in sorted(cand) if s not in compared and not math.isfinite(cand[s])]
        if elsewhere:
            print(f'note: the candidate loss is {cand[elsewhere[0]]} at step {elsewhere[0]}, '
                  f'outside the compared steps')
        say_where_the_learning_rates_differ(args.candidate, args.reference, steps)
        if args.plot:
            from util.plots import draw_loss_comparison
            smooth_k = args.smooth or max(1, len(steps) // 50)
            draw_loss_comparison(args.plot, result, args.candidate, args.reference, smooth_k)
            print(f'plot: {args.plot}')
        print(result.rule)
        return 0 if result.passed else 1
    except UsageError as e:  # not run_cli: main returns its exit status (0 pass, 1 fail, 2 unusable input)
        print(f'error: {e}', file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == '__main__':
    sys.exit(main())
