"""util/plots.draw_training_curves (visualize.py --logs): the loss, the lr and the top-1 accuracy
of runs, checked by the pixels of each run's colour in the written image, and its one-line errors."""
import json

import numpy as np
import pytest

from helpers import color_pixels, columns_covered
from util import plots
from util.errors import UsageError

STEPS = np.arange(2, 202, 2)  # logged every 2 steps


def schedule(peak, steps=STEPS, warmup=40):
    """Linear warm-up, then half-cosine to 0, as util/lr_sched."""
    return np.where(steps < warmup, peak * steps / warmup,
                    peak * 0.5 * (1 + np.cos(np.pi * (steps - warmup) / (steps[-1] - warmup))))


def write_run(folder, loss, lr, steps=STEPS, epochs=None):
    """A run's output folder: log.jsonl of every logged step; log.txt of the epochs with their
    test_acc1 when `epochs` ({epoch: accuracy}, in the order written) is given."""
    folder.mkdir(exist_ok=True)
    with open(folder / 'log.jsonl', 'w') as f:
        for step, value, rate in zip(steps, loss, lr):
            f.write(json.dumps({'epoch': int(step // 50), 'step': int(step), 'loss': float(value),
                                'lr': float(rate), 'ips': 100.0}) + '\n')
    if epochs is not None:
        with open(folder / 'log.txt', 'w') as f:
            for epoch, acc in epochs:
                f.write(json.dumps({'train_loss': 1.0, 'train_lr': 1e-4, 'test_loss': 2.0, 'test_acc1': acc,
                                    'test_acc5': acc + 20, 'epoch': epoch, 'step': 50 * (epoch + 1)}) + '\n')
    return folder


def loss_curve(scale):
    return scale * (2 * np.exp(-STEPS / 50) + 0.5)


def mean_row(rows, columns, wanted):
    return rows[np.isin(columns, wanted)].mean()


def test_loss_and_lr_of_each_run_in_its_colour(tmp_path):
    """Two runs (one given by its folder, one by its log.jsonl) drawn across both panels in
    their colours: the second run's loss (50 % higher) above the first's, the first's lr (twice
    the peak) above the second's; the legend names the runs."""
    first = write_run(tmp_path / 'run1', loss_curve(1.0), schedule(1e-3))
    second = write_run(tmp_path / 'run2', loss_curve(1.5), schedule(5e-4))
    png = tmp_path / 'curves.png'
    boxes = plots.draw_training_curves(str(png), [str(first), str(second / 'log.jsonl')])
    assert len(boxes) == 2
    (loss_box, lr_box), (color1, color2) = boxes, plots.RUN_COLORS[:2]
    assert color1 != color2

    for box in (loss_box, lr_box):
        for color in (color1, color2):
            assert columns_covered(color_pixels(png, color, box)[1], box) >= 17, (box, color)
    rows1, columns1 = color_pixels(png, color1, loss_box)
    rows2, columns2 = color_pixels(png, color2, loss_box)
    both = np.intersect1d(columns1, columns2)
    assert mean_row(rows2, columns2, both) < mean_row(rows1, columns1, both) - 10  # rows grow downwards
    # both panels against the same steps: a run's loss and lr begin and end in the same columns (the
    # second run's: drawn last, its lr hides the first's where both near 0)
    lr_columns2 = color_pixels(png, color2, lr_box)[1]
    assert abs(lr_columns2.min() - columns2.min()) <= 2 and abs(lr_columns2.max() - columns2.max()) <= 2
    rows1, columns1 = color_pixels(png, color1, lr_box)
    rows2, columns2 = color_pixels(png, color2, lr_box)
    both = np.intersect1d(columns1, columns2)
    assert mean_row(rows1, columns1, both) < mean_row(rows2, columns2, both)
    # the loss falls: the first run's curve starts high on the left and ends low on the right
    rows1, columns1 = color_pixels(png, color1, loss_box)
    assert mean_row(rows1, columns1, columns1.min()) < mean_row(rows1, columns1, columns1.max()) - 50

    svg = tmp_path / 'curves.svg'
    plots.draw_training_curves(str(svg), [str(first), str(second / 'log.jsonl')])
    text = svg.read_text()
    assert text.lstrip().startswith('<?xml') and '<svg' in text
    assert 'run1</text>' in text and 'run2</text>' in text


def test_finite_losses_between_nan_and_inf_are_drawn(tmp_path):
    """A loss of 1.5, nan, inf, 1.2: no two finite values side by side, so no line; the panel was
    empty. Each finite value is a dot in the run's colour, on the left and on the right."""
    steps = np.array([2, 4, 6, 8])
    run = write_run(tmp_path / 'diverged', [1.5, float('nan'), float('inf'), 1.2], [1e-3] * 4, steps=steps)
    png = tmp_path / 'curves.png'
    loss_box, _ = plots.draw_training_curves(str(png), [str(run)])
    _, columns = color_pixels(png, plots.RUN_COLORS[0], loss_box)
    left, right = loss_box[0], loss_box[2]
    assert columns.size and columns.min() < left + (right - left) / 4 and columns.max() > right - (right - left) / 4


def test_a_resumed_run_draws_its_later_values(tmp_path):
    """A run resumed from step 60 logs steps 62..100 again: those later values are the run's."""
    steps = np.concatenate([STEPS[:50], STEPS[30:]])
    loss = np.concatenate([np.full(50, 9.0), loss_curve(1.0)[30:]])
    run = plots.read_run(str(write_run(tmp_path / 'resumed', loss, np.full(len(steps), 1e-3), steps=steps)))
    assert run.name == str(tmp_path / 'resumed')
    assert sorted(run.loss) == STEPS.tolist()
    assert [run.loss[s] for s in STEPS[30:]] == pytest.approx(loss_curve(1.0)[30:].tolist())
    assert run.lr == {int(s): 1e-3 for s in STEPS}
    assert run.acc1 == {}


def test_accuracy_panel_when_a_run_has_test_acc1(tmp_path):
    """A fine-tuning run's log.txt adds a third panel: its top-1 accuracy per epoch (an epoch
    logged again after a resume counts once, with its later value); a pre-training run there
    draws nothing in it."""
    epochs = [(0, 10.0), (1, 30.0), (2, 99.0), (2, 45.0), (3, 55.0), (4, 60.0), (5, 62.0), (6, 63.0), (7, 64.0)]
    finetune = write_run(tmp_path / 'finetune', loss_curve(1.0), schedule(1e-3), epochs=epochs)
    pretrain = write_run(tmp_path / 'pretrain', loss_curve(1.5), schedule(5e-4))
    assert plots.read_run(str(finetune)).acc1 == {0: 10.0, 1: 30.0, 2: 45.0, 3: 55.0, 4: 60.0, 5: 62.0, 6: 63.0,
                                                  7: 64.0}
    png = tmp_path / 'curves.png'
    boxes = plots.draw_training_curves(str(png), [str(finetune), str(pretrain)])
    assert len(boxes) == 3
    acc_box = boxes[2]
    rows, columns = color_pixels(png, plots.RUN_COLORS[0], acc_box)
    assert columns_covered(columns, acc_box) >= 17
    # the accuracy rises: high on the right, low on the left
    assert mean_row(rows, columns, columns.max()) < mean_row(rows, columns, columns.min()) - 50
    assert not len(color_pixels(png, plots.RUN_COLORS[1], acc_box)[0])


def tick_labels(svg, panel):
    """The x tick labels of a panel ('axes_2': the lr's, over the steps; 'axes_3': the accuracy's,
    over the epochs) of an SVG the plots wrote (their text is kept as text)."""
    import xml.etree.ElementTree as ET
    ns = '{http://www.w3.org/2000/svg}'
    panel = next(g for g in ET.parse(svg).iter(f'{ns}g') if g.get('id') == panel)
    return [''.join(t.itertext()).strip() for g in panel.iter(f'{ns}g') if (g.get('id') or '').startswith('xtick')
            for t in g.iter(f'{ns}text')]


@pytest.mark.parametrize('epochs, labels', [([(0, 30.0)], ['0']), ([(4, 30.0), (5, 35.0)], ['4', '5'])])
def test_steps_and_epochs_are_whole_numbers_however_few(tmp_path, epochs, labels):
    """One evaluated epoch was drawn on an axis from -0.045 to 0.045, one logged step from 3.80 to 4.20."""
    run = write_run(tmp_path / 'run', [1.5], [1e-4], steps=[4], epochs=epochs)
    plots.draw_training_curves(str(tmp_path / 'curves.svg'), [str(run)])
    assert tick_labels(tmp_path / 'curves.svg', 'axes_3') == labels
    assert tick_labels(tmp_path / 'curves.svg', 'axes_2') == ['4']


def test_a_log_holding_two_runs_draws_the_last_and_says_so(tmp_path, capsys):
    """A fresh run in an old --output_dir appends to its log.jsonl: the last run is drawn, with
    compare_loss.py's note (the plots said nothing)."""
    old = write_run(tmp_path / 'old', loss_curve(2.0), schedule(1e-3))
    new = write_run(tmp_path / 'new', loss_curve(1.0)[:10], schedule(1e-3)[:10], steps=STEPS[:10])
    (new / 'log.jsonl').write_text((old / 'log.jsonl').read_text() + (new / 'log.jsonl').read_text())
    run = plots.read_run(str(new))
    assert run.loss == pytest.approx(dict(zip(STEPS[:10].tolist(), loss_curve(1.0)[:10])))
    assert f"note: {new / 'log.jsonl'} holds 2 runs one after another" in capsys.readouterr().out


def test_a_pretraining_runs_knn_curve_is_its_accuracy(tmp_path):
    """main_pretrain --knn_freq writes knn_acc1 at some epochs of log.txt: those are the run's
    accuracy curve (a fine-tuning run's test_acc1 comes first where a log has both)."""
    pretrain = write_run(tmp_path / 'pretrain', loss_curve(1.5), schedule(5e-4))
    with open(pretrain / 'log.txt', 'w') as f:
        for epoch in range(5):
            f.write(json.dumps({'train_loss': 1.0, 'epoch': epoch, **({'knn_acc1': 20.0 + epoch} if epoch % 2 == 0
                                                                       else {})}) + '\n')
        # main_finetune --knn of some weights, appended with the folder as its --output_dir: no epoch of the
        # run (it took the place of the fourth point, epoch 4's)
        f.write(json.dumps({'knn_acc1': 55.0, 'model': 'mae_vit_tiny', 'weights': 'other.pth'}) + '\n')
    assert plots.read_run(str(pretrain)).acc1 == {0: 20.0, 2: 22.0, 4: 24.0}


def test_errors_are_one_line_usage_errors(tmp_path):
    run = write_run(tmp_path / 'run1', loss_curve(1.0), schedule(1e-3))
    empty = tmp_path / 'empty'
    empty.mkdir()
    png = str(tmp_path / 'curves.png')
    with pytest.raises(UsageError, match=r'empty has no log\.jsonl'):
        plots.draw_training_curves(png, [str(run), str(empty)])
    with pytest.raises(UsageError, match='cannot read .*missing'):
        plots.draw_training_curves(png, [str(tmp_path / 'missing')])
    (empty / 'log.jsonl').write_text('{"epoch": 0, "lr": 0.001}\nnot json\n')
    with pytest.raises(UsageError, match='no JSON lines with a loss'):
        plots.draw_training_curves(png, [str(empty)])
    with pytest.raises(UsageError, match='no runs'):
        plots.draw_training_curves(png, [])
    # the image path is refused before any run is read
    with pytest.raises(UsageError, match=r'unknown image type \.xyz'):
        plots.draw_training_curves(str(tmp_path / 'curves.xyz'), [str(tmp_path / 'missing')])
    with pytest.raises(UsageError, match='does not exist'):
        plots.draw_training_curves(str(tmp_path / 'no' / 'curves.png'), [str(tmp_path / 'missing')])
    with pytest.raises(UsageError, match='run1/log.jsonl is a file, not a folder$'):
        plots.draw_training_curves(str(run / 'log.jsonl' / 'curves.png'), [str(tmp_path / 'missing')])
    assert not (tmp_path / 'curves.png').exists()
