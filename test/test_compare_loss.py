"""compare_loss.py: the verdict and exit codes, every input format, --skip_first/--last, nan
losses and the plot (its curves found by their colours), on made-up curves. Expected numbers come
from numpy here, not from the tool."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import compare_loss
from helpers import REPO, color_pixels, columns_covered
from util import plots

STEPS = np.arange(1, 201)


def curve(steps=STEPS):
    """A decaying loss with a small deterministic wiggle, rounded to the 6 decimals the console
    prints, so that every format written from it reads back to exactly the same floats."""
    values = 2 * np.exp(-steps / 50) + 0.5 + 0.01 * np.sin(steps * 0.7)
    return np.array([float(f'{v:.6f}') for v in values])


def write_jsonl(path, values, steps=STEPS):
    with open(path, 'w') as f:
        for step, loss in zip(steps, values):
            f.write(json.dumps({'epoch': int((step - 1) // 40), 'step': int(step), 'loss': float(loss),
                                'lr': 1e-4, 'ips': 100.0}) + '\n')
    return str(path)


def write_numbers(path, values):
    with open(path, 'w') as f:
        f.writelines(f'{float(v)!r}\n' for v in values)
    return str(path)


def run_cli(*argv):
    """compare_loss.py in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, 'compare_loss.py', *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def printed(output, name):
    """The value of a `Name: value` line of the tool's output."""
    match = re.search(rf'^{re.escape(name)}: (\S+)$', output, re.MULTILINE)
    assert match, f'no {name} line in:\n{output}'
    return float(match.group(1))


def compared_count(output):
    return int(re.search(r'^steps: (\d+) compared', output, re.MULTILINE).group(1))


def verdict(output):
    return output.strip().splitlines()[-1]


@pytest.fixture
def reference(tmp_path):
    return write_jsonl(tmp_path / 'ref.jsonl', curve())


# ---------------------------------------------------------------------------------------------
# Verdict and exit codes

def test_identical_curves_pass(tmp_path, reference):
    result = run_cli(write_jsonl(tmp_path / 'cand.jsonl', curve()), reference)
    assert result.returncode == 0, result.stdout + result.stderr
    assert printed(result.stdout, 'MeanRelativeError') == 0
    assert printed(result.stdout, 'MeanAbsoluteError') == 0
    assert compared_count(result.stdout) == 200
    assert verdict(result.stdout).startswith('pass')


@pytest.mark.parametrize('factor', [1.10, 0.90])
def test_ten_percent_off_fails_in_either_direction(tmp_path, reference, factor):
    ref = curve()
    result = run_cli(write_numbers(tmp_path / 'cand.txt', ref * factor), reference)
    assert result.returncode == 1, result.stdout + result.stderr
    assert verdict(result.stdout).startswith('fail')
    # the printed means keep their sign; only the verdict uses the magnitude
    cand = ref * factor
    assert printed(result.stdout, 'MeanRelativeError') == pytest.approx(factor - 1, abs=1e-6)
    assert printed(result.stdout, 'MeanAbsoluteError') == pytest.approx(np.mean(cand - ref), rel=1e-5)


def test_one_percent_passes_unless_rel_tol_is_tightened(tmp_path, reference):
    cand = write_numbers(tmp_path / 'cand.txt', curve() * 1.01)
    result = run_cli(cand, reference)
    assert result.returncode == 0, result.stdout + result.stderr
    assert printed(result.stdout, 'MeanRelativeError') == pytest.approx(0.01, abs=1e-6)

    tight = run_cli(cand, reference, '--rel_tol', '0.005')
    assert tight.returncode == 1, tight.stdout + tight.stderr
    assert verdict(tight.stdout).startswith('fail')


def test_tiny_absolute_offset_passes_through_abs_tol(tmp_path, reference):
    ref = curve()
    cand = write_numbers(tmp_path / 'cand.txt', ref + 0.0001)
    # with no relative tolerance at all, only |MeanAbsoluteError| = 1e-4 <= 2e-4 can pass it
    assert compare_loss.main([cand, reference, '--rel_tol', '0']) == 0
    assert compare_loss.main([cand, reference, '--rel_tol', '0', '--abs_tol', '0.00005']) == 1


def test_reference_zeros_are_left_out_of_the_relative_mean(tmp_path, capsys):
    ref = np.array([0.0, 1.0, 2.0, 0.0, 4.0])
    cand = np.array([0.5, 1.1, 2.2, 0.1, 4.4])
    code = compare_loss.main([write_numbers(tmp_path / 'c.txt', cand), write_numbers(tmp_path / 'r.txt', ref)])
    out = capsys.readouterr().out
    nonzero = ref != 0
    assert printed(out, 'MeanRelativeError') == pytest.approx(np.mean((cand - ref)[nonzero] / ref[nonzero]))
    assert printed(out, 'MeanAbsoluteError') == pytest.approx(np.mean(cand - ref))
    assert 'reference loss of 0' in out
    assert code == 1  # 10% above, and 0.26 absolute

    zeros = write_numbers(tmp_path / 'z.txt', np.zeros(5))
    assert compare_loss.main([write_numbers(tmp_path / 'c.txt', cand), zeros]) == 2
    assert capsys.readouterr().err.startswith('error: ')


# ---------------------------------------------------------------------------------------------
# Unusable input: exit 2 with one `error:` line

def assert_unusable(result, words):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    assert words in lines[0]
    assert 'Traceback' not in result.stderr


def test_missing_file(tmp_path, reference):
    assert_unusable(run_cli(tmp_path / 'no_such_log.jsonl', reference), 'no_such_log.jsonl')


def test_garbage_file(tmp_path, reference):
    garbage = tmp_path / 'garbage.log'
    garbage.write_text('hello world\nlr: 1.0e-04\n* Acc@1 45.000 Acc@5 90.000\n{"batch_size": 64}\n')
    assert_unusable(run_cli(garbage, reference), 'no loss values found')
    binary = tmp_path / 'binary.bin'
    binary.write_bytes(bytes(range(256)) * 4)
    assert_unusable(run_cli(reference, binary), 'no loss values found')


def test_no_common_steps(tmp_path, reference):
    later = write_jsonl(tmp_path / 'later.jsonl', curve(), steps=STEPS + 1000)
    assert_unusable(run_cli(later, reference), 'no step in common')


def test_logs_written_at_different_intervals_are_refused(tmp_path, reference):
    """A logged loss is the mean over its interval: every 2 steps against every step would
    compare different things, even for the same run."""
    every_two = write_jsonl(tmp_path / 'every2.jsonl', curve()[1::2], steps=STEPS[1::2])
    assert_unusable(run_cli(every_two, reference), 'logged every 2 steps and the reference every 1')
    # --log_freq 20 over an epoch of 31 steps logs steps 20 and 31: every 20 (it was said every 11)
    epoch_tail = write_jsonl(tmp_path / 'tail.jsonl', curve()[:2], steps=np.array([20, 31]))
    assert_unusable(run_cli(epoch_tail, reference), 'logged every 20 steps and the reference every 1')
    # a counted log (one loss a line) lines up only with a log of every step from step 1
    counted = write_numbers(tmp_path / 'loss.txt', curve()[1::2])
    assert_unusable(run_cli(counted, every_two), 'has no step numbers')
    assert run_cli(counted, write_numbers(tmp_path / 'same.txt', curve()[1::2])).returncode == 0
    # one logged step has no interval to check (it was said to be logged every step): compared, with a note
    one = write_jsonl(tmp_path / 'one.jsonl', curve()[3:4], steps=STEPS[3:4])
    result = run_cli(one, every_two)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'note: the candidate logged one step only' in result.stdout and compared_count(result.stdout) == 1


def test_a_candidate_that_stops_before_the_reference_is_warned_of(tmp_path, reference):
    """A port that crashed halfway passed on the steps it logged with a note alone; a loss file without step numbers
    written every few steps (a performance case's) cannot be told from one that stopped, and is named."""
    half = write_jsonl(tmp_path / 'half.jsonl', curve()[:100], steps=STEPS[:100])
    result = run_cli(half, reference)
    assert result.returncode == 0 and compared_count(result.stdout) == 100
    assert ('warning: the candidate stops at step 100 and the reference goes on to step 200: only the steps both ran '
            'are compared, so a candidate that crashed or hung passes on the steps it logged\n') in result.stdout
    every_ten = write_numbers(tmp_path / 'loss.txt', curve()[9::10])  # 20 losses, counted 1 to 20
    assert 'logged every few steps: compare it with a log of the same frequency' in run_cli(every_ten, reference).stdout
    assert 'warning' not in run_cli(reference, half).stdout  # a longer candidate: its own steps are left out


def test_bad_flags(tmp_path, reference):
    assert_unusable(run_cli(reference, reference, '--rel_tol', '-0.1'), '--rel_tol')
    assert_unusable(run_cli(reference, reference, '--last', '0'), '--last')
    assert_unusable(run_cli(reference, reference, '--skip_first', '200'), 'nothing left')


def test_directory_means_its_log_jsonl(tmp_path, reference):
    run_dir = tmp_path / 'npu_run'
    run_dir.mkdir()
    write_jsonl(run_dir / 'log.jsonl', curve())
    assert compare_loss.main([str(run_dir), reference]) == 0
    assert compare_loss.main([str(tmp_path / 'npu_run'), str(tmp_path)]) == 2  # tmp_path has no log.jsonl


# ---------------------------------------------------------------------------------------------
# Input formats

def write_console(path, values):
    """This project's console log: 5 epochs of 40 steps, with lines that are not losses."""
    lines = ['Namespace(batch_size=64, blr=0.00015, epochs=5)',
             json.dumps({'batch_size': 64, 'lr': 0.001, 'epochs': 5}, indent=2),
             'UserWarning: something about a deprecated argument']
    for step, loss in zip(STEPS, values):
        epoch, in_epoch = (step - 1) // 40, (step - 1) % 40 + 1
        lines.append(f'Epoch: [{epoch}]  [{in_epoch:>2}/40]  eta: 0:00:12  lr: {1e-4 * step:.6e}  '
                     f'grad_norm: 1.5  train.loss : {loss:.6f}  train.ips : 120.50')
        if in_epoch == 40:
            lines.append(f'* Acc@1 {10.0 + epoch:.3f} Acc@5 {50.0 + epoch:.3f} loss {3.0:.3f}')
            lines.append(f'Epoch {epoch} done in 0:00:31')
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def write_tcappdll(path, values):
    """Tecorigin tcap_dllogger lines of ranks 0 and 1, interleaved, in its variants."""
    lines = ['TCAPPDLL 2024-05-01 10:00:00.000000 - PARAMETER batch_size : 64']
    for i, loss in enumerate(values):
        stamp = f'TCAPPDLL 2024-05-01 10:00:{i % 60:02d}.123456 -'
        rank0 = ['rank : 0', 'rank: 0'][i % 2]
        number = f'{loss:.6e}' if i % 3 == 0 else f'{loss:.6f}'
        key = 'train.loss_avg' if i % 5 == 0 else 'train.loss'
        position = f'Epoch: {i // 40} Iteration: {i % 40 + 1} ' if i % 7 else ''
        lines.append(f'{stamp} {position} {rank0}  {key} : {number}  train.ips : 500.1 imgs/s')
        lines.append(f'{stamp} {position} rank : 1  train.loss : {loss * 3 + 1:.6f}  train.ips : 499.0 imgs/s')
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def write_loss_txt(path, values):
    """Ascend train_<Case>_loss.txt: one number per line, with blank lines."""
    path.write_text(''.join(f'{float(v)!r}\n' + ('\n' if i % 17 == 0 else '') for i, v in enumerate(values)))
    return str(path)


@pytest.mark.parametrize('write, name', [(write_jsonl, 'log.jsonl'), (write_console, 'console.log'),
                                         (write_tcappdll, 'tcap.log'), (write_loss_txt, 'train_MAE_loss.txt')])
def test_every_format_reads_the_same_curve(tmp_path, reference, write, name):
    path = write(tmp_path / name, curve())
    assert compare_loss.read_log(path)[1] == dict(zip(STEPS.tolist(), curve().tolist()))
    result = run_cli(path, reference)
    assert result.returncode == 0, result.stdout + result.stderr
    assert printed(result.stdout, 'MeanRelativeError') == 0
    assert compared_count(result.stdout) == 200


def test_a_resumed_run_logs_its_steps_again_and_the_later_values_count(tmp_path):
    """A run stopped after step 5 and resumed from its step-3 checkpoint appends steps 4 and 5
    again: the resumed values are the run's."""
    path = write_jsonl(tmp_path / 'log.jsonl', [5.0, 4.0, 3.0, 2.0, 1.0, 1.5, 0.5],
                       steps=np.array([1, 2, 3, 4, 5, 4, 5]))
    assert compare_loss.read_log(path)[1] == {1: 5.0, 2: 4.0, 3: 3.0, 4: 1.5, 5: 0.5}


def test_a_partial_interval_counts_only_while_the_log_ends_with_it(tmp_path):
    """A stop between log steps (--log_freq 3) logs step 5 as partial; the resumed run logs step 6
    with the whole interval's loss: step 5 leaves the curve. A run that ended there keeps it."""
    lines = [{'step': 3, 'loss': 3.0}, {'step': 5, 'loss': 2.5, 'partial': True}, {'step': 6, 'loss': 2.0}]
    text = ''.join(json.dumps(line) + '\n' for line in lines)
    assert compare_loss.parse_jsonl(text) == {3: 3.0, 6: 2.0}
    assert compare_loss.parse_jsonl(''.join(text.splitlines(keepends=True)[:2])) == {3: 3.0, 5: 2.5}


def test_console_positions_are_global_steps(tmp_path):
    """Logging every 10 steps over 31-step epochs: positions E * 31 + I, as log.jsonl's steps."""
    text = ('Epoch: [0]  [10/31]  lr: 1.0e-04  train.loss : 1.5  train.ips : 1\n'
            'Epoch: [0]  [31/31]  lr: 1.0e-04  train.loss : 1.4  train.ips : 1\n'
            'Epoch: [2]  [ 9/31]  lr: 1.0e-04  train.loss : 1.2e-01  train.ips : 1\n')
    assert compare_loss.parse_console(text) == {10: 1.5, 31: 1.4, 71: 0.12}
    assert compare_loss.parse_console('train.loss : 0.9\ntrain.loss : 0.8\n') == {1: 0.9, 2: 0.8}  # counted


def test_a_fresh_run_appended_to_an_old_log_is_read_alone(tmp_path, reference):
    """A fresh run in an old --output_dir appends its lines after the earlier run's: its steps start
    again from step 1. The earlier run (10 % low) must not fill in the steps the new one has not
    reached (they made a 6-step run pass against steps 7..10 of another run)."""
    path = tmp_path / 'log.jsonl'
    write_jsonl(tmp_path / 'old.jsonl', curve()[:10] * 0.9, steps=STEPS[:10])
    write_jsonl(tmp_path / 'new.jsonl', curve()[:6], steps=STEPS[:6])
    path.write_text((tmp_path / 'old.jsonl').read_text() + (tmp_path / 'new.jsonl').read_text())
    assert compare_loss.read_log(str(path))[1] == dict(zip(range(1, 7), curve()[:6]))
    result = run_cli(path, reference)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'holds 2 runs one after another' in result.stdout
    assert compared_count(result.stdout) == 6 and printed(result.stdout, 'MeanRelativeError') == 0


def test_console_lines_of_other_ranks_are_left_out():
    """Each rank logs every step; rank 1's lines read as more steps shifted the whole curve."""
    text = ''.join(f'rank : {rank}  Epoch: [0]  [{i}/3]  train.loss : {loss + rank}\n'
                   for i, loss in enumerate([2.0, 1.5, 1.25], start=1) for rank in (0, 1))
    assert compare_loss.parse_console(text) == {1: 2.0, 2: 1.5, 3: 1.25}
    with pytest.raises(compare_loss.UnusableInput, match='rank.s. 1 but none of rank 0'):
        compare_loss.parse_console(text.replace('rank : 0', 'rank : 1'))


@pytest.mark.parametrize('prefix', ['[rank{}]:', '[default{}]:'])
def test_console_lines_that_torchrun_prefixed_with_their_rank_are_rank_zeros_only(prefix):
    """torchrun --tee (and --log-line-prefix-template) put `[default1]:` or `[rank1]:` before each
    line of rank 1: its losses were read as a second run's."""
    text = ''.join(f'{prefix.format(rank)}Epoch: [0]  [{i}/3]  train.loss : {loss + 8 * rank}\n'
                   for i, loss in enumerate([2.0, 1.5, 1.25], start=1) for rank in (0, 1))
    assert compare_loss.parse_console(text) == {1: 2.0, 2: 1.5, 3: 1.25}


def test_runs_on_other_learning_rates_are_named_in_a_warning(tmp_path, reference):
    """Two log.jsonl files of the same losses whose lr columns differ from step 101 on: another
    schedule, so a pass says nothing of a port."""
    cand = tmp_path / 'cand.jsonl'
    with open(cand, 'w') as f:
        for step, loss in zip(STEPS, curve()):
            f.write(json.dumps({'step': int(step), 'loss': float(loss), 'lr': 1e-4 if step <= 100 else 2e-4}) + '\n')
    result = run_cli(cand, reference)
    assert 'warning: the learning rates differ from step 101 on (candidate 2.000000e-04, reference 1.000000e-04)' \
        in result.stdout
    assert 'learning rates differ' not in run_cli(write_jsonl(tmp_path / 'same.jsonl', curve()), reference).stdout


def test_a_modelzoo_summary_points_to_its_loss_file(tmp_path):
    path = tmp_path / 'mae_vit_base_pretrain_bs64_1p_perf.log'
    path.write_text('Network = mae_vit_base_pretrain\nActualFPS = 3166.00\nActualLoss = 0.712345\n')
    with pytest.raises(compare_loss.UnusableInput, match='ModelZoo summary.*train_<CaseName>_loss.txt'):
        compare_loss.read_log(str(path))


def test_tcappdll_lines_without_rank_are_rank_zero():
    text = ('TCAPPDLL 2024 - train.loss : 2.0\n'
            'TCAPPDLL 2024 - rank : 3  train.loss : 9.0\n'
            'TCAPPDLL 2024 - Epoch: 0 Iteration: 2  train.loss_avg : 1.5E+00\n')
    assert compare_loss.parse_tcappdll(text) == {1: 2.0, 2: 1.5}


def test_generic_fallback_ignores_lr_and_accuracy(tmp_path):
    text = ('step 1 lr: 0.001 loss: 2.5\n'
            '* Acc@1 45.0 Acc@5 90.0\n'
            'step 2 lr = 0.002, loss = 2.25\n'
            'epoch: 1 step: 3, loss is 2.0\n'
            'val_loss: 7.0\n')
    path = tmp_path / 'other.log'
    path.write_text(text)
    assert compare_loss.read_log(str(path)) == ('loss: X lines', {1: 2.5, 2: 2.25, 3: 2.0})


def test_progress_lines_of_the_pytorch_imagenet_example(tmp_path):
    """Many Ascend ModelZoo models print the ProgressMeter lines of PyTorch's ImageNet example:
    the current loss, then its running average in brackets."""
    text = ('Epoch: [0][   1/5005]\tTime  2.912 ( 2.912)\tData  1.704 ( 1.704)\tLoss 6.9375e+00 (6.9375e+00)\t'
            'Acc@1   0.00 (  0.00)\tAcc@5   0.39 (  0.39)\n'
            'Epoch: [0][   2/5005]\tTime  0.338 ( 1.625)\tData  0.001 ( 0.853)\tLoss 6.9021e+00 (6.9198e+00)\t'
            'Acc@1   0.39 (  0.20)\tAcc@5   1.17 (  0.78)\n'
            ' * Acc@1 0.120 Acc@5 0.600\n')
    path = tmp_path / 'train_0.log'
    path.write_text(text)
    assert compare_loss.read_log(str(path)) == ('loss: X lines', {1: 6.9375, 2: 6.9021})


# ---------------------------------------------------------------------------------------------
# --skip_first, --last

def test_skip_first_and_last_select_the_points(tmp_path, reference, capsys):
    ref = curve()
    cand = ref * (1 + 0.02 * np.cos(STEPS * 0.3))
    cand[:10] = ref[:10] * 3  # start-up noise
    path = write_numbers(tmp_path / 'cand.txt', cand)
    rel = (cand - ref) / ref

    assert compare_loss.main([path, reference]) == 1
    assert printed(capsys.readouterr().out, 'MeanRelativeError') == pytest.approx(rel.mean(), abs=1e-6)

    assert compare_loss.main([path, reference, '--skip_first', '10']) == 0
    out = capsys.readouterr().out
    assert printed(out, 'MeanRelativeError') == pytest.approx(rel[10:].mean(), abs=1e-6)
    assert compared_count(out) == 190

    assert compare_loss.main([path, reference, '--last', '50']) == 0
    out = capsys.readouterr().out
    assert printed(out, 'MeanRelativeError') == pytest.approx(rel[-50:].mean(), abs=1e-6)
    assert printed(out, 'MeanAbsoluteError') == pytest.approx((cand - ref)[-50:].mean(), abs=1e-6)
    assert compared_count(out) == 50 and '(151..200)' in out

    # --last counts after --skip_first, and more than there are keeps them all
    steps, c, r = compare_loss.align(dict(zip(STEPS.tolist(), cand)), dict(zip(STEPS.tolist(), ref)), 10, 500)
    assert steps.tolist() == list(range(11, 201))
    np.testing.assert_array_equal(c, cand[10:])
    np.testing.assert_array_equal(r, ref[10:])


# ---------------------------------------------------------------------------------------------
# Non-finite losses

def test_nan_in_candidate_fails(tmp_path, reference):
    cand = curve()
    cand[56] = np.nan
    result = run_cli(write_numbers(tmp_path / 'cand.txt', cand), reference)
    assert result.returncode == 1, result.stdout + result.stderr
    assert verdict(result.stdout).startswith('fail') and 'step 57' in verdict(result.stdout)


def test_nan_in_reference_is_unusable(tmp_path):
    ref = curve()
    ref[56] = np.nan
    result = run_cli(write_jsonl(tmp_path / 'cand.jsonl', curve()), write_jsonl(tmp_path / 'ref.jsonl', ref))
    assert_unusable(result, 'step 57')


# ---------------------------------------------------------------------------------------------
# Plot (util/plots.draw_loss_comparison): curves found by the pixels of their exact colours

def draw(tmp_path, cand, rel_tol=0.05, name='loss.png', smooth_k=5):
    """The plot of a candidate curve against curve(); returns (path, (top box, bottom box))."""
    result = compare_loss.compare(STEPS, np.asarray(cand, dtype=np.float64), curve(), rel_tol, 0.0002)
    path = tmp_path / name
    return path, plots.draw_loss_comparison(str(path), result, 'npu/cand.txt', 'gpu/ref.jsonl', smooth_k)


def rows_at(rows, columns, wanted):
    return rows[np.isin(columns, wanted)]


def test_plot_draws_both_curves_in_the_top_panel(tmp_path):
    """Both loss curves are drawn across the top panel, the candidate (30 % higher) above the
    reference, both falling as the made-up loss does."""
    png, (top, bottom) = draw(tmp_path, curve() * 1.3)
    with Image.open(png) as image:
        assert image.size == (1000, 700)  # 10 x 7 inches at 100 dpi
    assert top[3] < bottom[1]  # the loss panel is above the difference panel
    cand_rows, cand_columns = color_pixels(png, plots.CAND_COLOR, top)
    ref_rows, ref_columns = color_pixels(png, plots.REF_COLOR, top)
    assert columns_covered(cand_columns, top) >= 17 and columns_covered(ref_columns, top) >= 17
    both = np.intersect1d(cand_columns, ref_columns)
    assert len(both) > (top[2] - top[0]) / 2
    above = [rows_at(cand_rows, cand_columns, x).mean() < rows_at(ref_rows, ref_columns, x).mean() for x in both]
    assert np.mean(above) > 0.9  # rows grow downwards
    # the loss falls from 2.5 to 0.5, most of the panel's height
    first, last = ref_columns.min(), ref_columns.max()
    assert rows_at(ref_rows, ref_columns, first).mean() < rows_at(ref_rows, ref_columns, last).mean() - 100


@pytest.mark.parametrize('factor, inside', [(1.03, True), (1.3, False)])
def test_plot_shows_whether_the_difference_stays_inside_the_band(tmp_path, factor, inside):
    """The bottom panel shades the +-rel_tol band across its width with its limits drawn; the
    relative difference (3 % or 30 % against rel_tol 5 %) lies inside the band or above it."""
    png, (top, bottom) = draw(tmp_path, curve() * factor)
    band_rows, band_columns = color_pixels(png, plots.BAND_COLOR, bottom)
    assert columns_covered(band_columns, bottom) == 20
    band_top, band_bottom = band_rows.min(), band_rows.max()
    limit_rows = color_pixels(png, plots.LIMIT_COLOR, bottom)[0]
    assert len(limit_rows) and abs(limit_rows.min() - band_top) <= 2 and abs(limit_rows.max() - band_bottom) <= 2
    diff_rows, diff_columns = color_pixels(png, plots.DIFF_COLOR, bottom)
    assert columns_covered(diff_columns, bottom) >= 17
    if inside:
        # +3 % in a band from +5 % (top) to -5 %: a fifth of the way down
        assert band_top < diff_rows.min() and diff_rows.max() < band_bottom
        assert (diff_rows.mean() - band_top) / (band_bottom - band_top) == pytest.approx(0.2, abs=0.03)
    else:
        assert diff_rows.max() < band_top
    assert not len(color_pixels(png, plots.DIFF_COLOR, top)[0])  # nothing of it in the loss panel


def test_plot_of_a_diverged_candidate(tmp_path, reference):
    """The candidate's curve breaks where its loss turns inf (after step 150 of 200, three
    quarters along), while the reference's runs on to the end."""
    cand = curve() * 1.3
    cand[150:] = np.inf
    png, (top, bottom) = draw(tmp_path, cand, smooth_k=1)
    ref_columns = color_pixels(png, plots.REF_COLOR, top)[1]
    left, right = ref_columns.min(), ref_columns.max()  # the first and the last step
    assert columns_covered(ref_columns, top) >= 17
    last_finite = (150 - STEPS[0]) / (STEPS[-1] - STEPS[0])
    for color, box in ((plots.CAND_COLOR, top), (plots.DIFF_COLOR, bottom)):
        columns = color_pixels(png, color, box)[1]
        assert (columns.min() - left) / (right - left) == pytest.approx(0, abs=0.02)
        assert (columns.max() - left) / (right - left) == pytest.approx(last_finite, abs=0.02)
        assert len(np.unique(columns)) > 0.9 * last_finite * (right - left)  # drawn all the way there


def test_plot_option_writes_each_format(tmp_path, reference, capsys):
    """--plot writes PNG, JPEG, PDF and SVG by the extension, with the verdict in the title and
    a legend naming both files; the JPEG holds the PNG's picture up to compression."""
    cand = write_numbers(tmp_path / 'cand.txt', curve() * 1.3)
    for name in ('loss.png', 'loss.jpg', 'loss.pdf', 'loss.svg'):
        plot = tmp_path / name
        assert compare_loss.main([cand, reference, '--rel_tol', '0.5', '--plot', str(plot), '--smooth', '5']) == 0
        assert f'plot: {plot}' in capsys.readouterr().out
    for name, kind in (('loss.png', 'PNG'), ('loss.jpg', 'JPEG')):
        with Image.open(tmp_path / name) as image:
            assert image.format == kind
    assert (tmp_path / 'loss.pdf').read_bytes().startswith(b'%PDF')
    svg = (tmp_path / 'loss.svg').read_text()
    assert '<svg' in svg  # long paths are cut to their ends in the legend
    assert re.search(r'>candidate: [^<]*/cand\.txt</text>', svg) and re.search(r'>reference: [^<]*/ref\.jsonl</text>', svg)
    assert '>PASS ' in svg

    png = tmp_path / 'loss.png'
    # the candidate's curve is the candidate's: above the reference on the left (the legend is at the top right)
    cand_rows, cand_columns = color_pixels(png, plots.CAND_COLOR)
    ref_rows, ref_columns = color_pixels(png, plots.REF_COLOR)
    left = np.intersect1d(cand_columns, ref_columns)
    left = left[left < 0.4 * plots.FIGSIZE[0] * plots.DPI]
    assert len(left) > 250
    assert all(rows_at(cand_rows, cand_columns, x).mean() < rows_at(ref_rows, ref_columns, x).mean() for x in left)
    with Image.open(png) as a, Image.open(tmp_path / 'loss.jpg') as b:
        lossless, jpeg = (np.asarray(i.convert('RGB')).astype(int) for i in (a, b))
    drawn = (lossless != 255).any(axis=-1)
    assert np.abs(jpeg - lossless)[drawn].mean() < np.abs(lossless - 255)[drawn].mean() / 4


def test_plot_path_checked_before_reading(tmp_path, reference):
    missing = tmp_path / 'no_such_log.jsonl'
    assert_unusable(run_cli(missing, reference, '--plot', tmp_path / 'loss.xyz'), 'unknown image type .xyz')
    assert_unusable(run_cli(missing, reference, '--plot', tmp_path / 'no' / 'loss.png'), 'does not exist')


def test_compare_loss_imports_neither_torch_nor_matplotlib():
    code = ('import sys, compare_loss; '
            'print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "matplotlib")))')
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == '[]', result.stdout + result.stderr
