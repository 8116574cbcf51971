"""Charts of loss curves, drawn with matplotlib's object-oriented API (no GUI backend, no pyplot):
- draw_loss_comparison: compare_loss.py --plot, a candidate's loss curve against a reference's;
- draw_training_curves: visualize.py --logs, the loss, lr (and top-1 accuracy) of one or more runs.

matplotlib is imported inside the functions that draw, so importing this module costs nothing;
it never imports torch. Curves are drawn without antialiasing, so each one's pixels have exactly
its colour below (the tests find the curves by these colours).
"""
import os
from dataclasses import dataclass

import numpy as np

from util.errors import UsageError

FIGSIZE = (10, 7)        # inches; at DPI a raster image of 1000 x 700 pixels
DPI = 100
CAND_COLOR = '#d62728'   # compare_loss: the candidate (device under test), red
REF_COLOR = '#1f77b4'    # the reference (e.g. CUDA), blue
DIFF_COLOR = '#7b3fa0'   # their relative difference, purple
BAND_COLOR = '#d9f2d9'   # the +-rel_tol band, pale green
LIMIT_COLOR = '#2e8b57'  # the band's limits, green
PASS_COLOR, FAIL_COLOR = '#1a7f37', '#b00020'  # the verdict in the title
# visualize.py --logs: one colour per run, in the order given (dashed once the palette is used up)
RUN_COLORS = ('#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf')
FAINT = 0.3              # opacity of the raw curves behind the smoothed ones
GRID_COLOR = '#e3e3e3'
# Agg's formats that need more than matplotlib and Pillow: pgf needs LaTeX
NEEDS_MORE = {'pgf'}


def supported_extensions():
    """The file extensions matplotlib's Agg canvas writes: png, jpg, jpeg, pdf, svg, ..."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    return sorted(set(FigureCanvasAgg.get_supported_filetypes()) - NEEDS_MORE)


def check_plot_path(path):
    """Refuse, before anything is read or drawn, a path of an unknown image type or in a folder
    that does not exist (UsageError)."""
    path = str(path)
    extension = os.path.splitext(path)[1].lower().lstrip('.')
    if extension not in supported_extensions():
        raise UsageError(f'cannot write the figure {path}: unknown image type '
                         f'{"." + extension if extension else "(none)"}; use .png, .jpg, .pdf or .svg')
    folder = os.path.dirname(path)
    if folder and not os.path.isdir(folder):
        raise UsageError(f'cannot write the figure {path}: {folder} is a file, not a folder' if os.path.exists(folder)
                         else f'cannot write the figure {path}: the folder {folder} does not exist')


def smooth(values, k):
    """Centred moving average over k points (fewer at the ends); a nan spoils only its windows."""
    values = np.asarray(values, dtype=np.float64)
    k = max(1, min(int(k), len(values)))
    if k == 1:
        return values
    kernel = np.ones(k)
    return np.convolve(values, kernel, mode='same') / np.convolve(np.ones(len(values)), kernel, mode='same')


def finite_or_nan(values):
    """The values as floats with nan for inf, so that a curve breaks there instead of leaving the axes."""
    values = np.array(values, dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    return values


def short_name(path, width=45):
    """The path, or its last `width` characters for a legend."""
    path = str(path)
    return path if len(path) <= width else '...' + path[-(width - 3):]


def new_figure(rows, height_ratios, figsize=FIGSIZE):
    """A figure (no GUI backend) with `rows` panels stacked, constrained layout."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, dpi=DPI, layout='constrained')
    axes = fig.subplots(rows, 1, squeeze=False, gridspec_kw={'height_ratios': height_ratios})[:, 0]
    for ax in axes:
        ax.grid(True, color=GRID_COLOR, linewidth=0.8)
        ax.set_axisbelow(True)
    return fig, list(axes)


def draw_curve(ax, steps, values, color, label=None, smooth_k=1, linestyle='-'):
    """A curve in exactly `color` (no antialiasing), smoothed over smooth_k points with the raw
    values faintly behind; broken where a value is nan/inf, a finite value between two such (or
    alone) drawn as a dot: a single point is no line."""
    values = finite_or_nan(values)
    if smooth_k > 1:
        ax.plot(steps, values, color=color, alpha=FAINT, linewidth=1)
        values = smooth(values, smooth_k)
    finite = np.isfinite(values)
    isolated = [i for i in np.flatnonzero(finite).tolist()
                if (i == 0 or not finite[i - 1]) and (i == len(values) - 1 or not finite[i + 1])]
    ax.plot(steps, values, color=color, linewidth=1.5, antialiased=False, label=label, linestyle=linestyle,
            marker='o' if isolated else None, markevery=isolated or None)


def legend_above(ax, columns=1):
    """The panel's legend above its top right corner, beside its title: never over a curve."""
    ax.legend(loc='lower right', bbox_to_anchor=(1, 1), ncol=columns, frameon=False, borderaxespad=0.2)


def write_figure(fig, path):
    """fig.savefig at the figure's own dpi; a path that cannot be written is one line (UsageError)."""
    try:
        fig.savefig(path, dpi=fig.dpi)
    except (OSError, ValueError) as e:
        raise UsageError(f'cannot write the figure {path}: {getattr(e, "strerror", None) or e}') from None


def save(fig, path, axes):
    """Write the figure (its format from the extension); returns the panels' pixel boxes
    (left, top, right, bottom) in a raster image written at DPI, top to bottom."""
    write_figure(fig, path)
    height = fig.bbox.height
    boxes = []
    for ax in axes:
        box = ax.get_window_extent()
        boxes.append((round(box.x0), round(height - box.y1), round(box.x1), round(height - box.y0)))
    return boxes


# ---------------------------------------------------------------------------------------------
# compare_loss.py --plot

def draw_loss_comparison(path, result, cand_name, ref_name, smooth_k=1):
    """Two panels sharing the step axis: (top) the candidate's and the reference's loss, smoothed
    over smooth_k points with the raw curves faintly behind, in a legend naming the two files;
    (bottom) their relative difference (cand - ref) / ref with the +-rel_tol band shaded and its
    limits drawn. The verdict is the title. The format follows the extension of `path`.

    result: a compare_loss.Result (steps, cand, ref, rel, passed, rel_tol, abs_tol, bad_step,
            mean_rel, mean_abs)
    returns: the pixel boxes (left, top, right, bottom) of the two panels, top first
    """
    check_plot_path(path)
    import matplotlib
    from matplotlib.ticker import PercentFormatter

    steps, rel_tol = np.asarray(result.steps, dtype=np.float64), result.rel_tol
    if result.bad_step is not None:
        title = f'FAIL: the candidate loss is not finite from step {result.bad_step}'
    else:
        title = (f'{"PASS" if result.passed else "FAIL"}   MeanRelativeError {result.mean_rel:.4g}   '
                 f'MeanAbsoluteError {result.mean_abs:.4g}   (rel_tol {rel_tol:g}, abs_tol {result.abs_tol:g})')
    with matplotlib.rc_context({'svg.fonttype': 'none'}):  # SVG text stays text
        fig, (top, bottom) = new_figure(2, [3, 2])
        fig.suptitle(title, color=PASS_COLOR if result.passed else FAIL_COLOR)
        bottom.sharex(top)
        smoothed = f', smoothed over {smooth_k} steps' if smooth_k > 1 else ''
        draw_curve(top, steps, result.ref, REF_COLOR, f'reference: {short_name(ref_name)}', smooth_k)
        draw_curve(top, steps, result.cand, CAND_COLOR, f'candidate: {short_name(cand_name)}', smooth_k)
        top.set_ylabel('loss')
        top.set_title(f'loss{smoothed}', fontsize='medium', loc='left')
        legend_above(top)
        top.tick_params(labelbottom=False)

        bottom.axhspan(-rel_tol, rel_tol, color=BAND_COLOR, linewidth=0, antialiased=False, zorder=0,
                       label=f'±rel_tol ({rel_tol:g})')
        for limit in (-rel_tol, rel_tol):
            bottom.axhline(limit, color=LIMIT_COLOR, linewidth=1, linestyle='--', antialiased=False)
        bottom.axhline(0, color='#808080', linewidth=0.8)
        draw_curve(bottom, steps, result.rel, DIFF_COLOR, None, smooth_k)
        bottom.yaxis.set_major_formatter(PercentFormatter(1.0))
        bottom.set_title(f'relative difference (candidate - reference) / reference{smoothed}', fontsize='medium',
                         loc='left')
        bottom.set_xlabel('step')
        legend_above(bottom)
        return save(fig, path, (top, bottom))


# ---------------------------------------------------------------------------------------------
# visualize.py --logs

@dataclass
class Run:
    name: str          # the run's folder as given (or the log file's path when it is not a log.jsonl)
    loss: dict         # {step: loss} from log.jsonl
    lr: dict           # {step: lr} from log.jsonl
    acc1: dict         # {epoch: top-1} from log.txt beside it: test_acc1 (fine-tuning), else knn_acc1
                       # (pre-training with --knn_freq); {} when neither


def read_run(path):
    """A run's curves from its folder (its log.jsonl, and log.txt's test_acc1 or knn_acc1 if any)
    or from the log.jsonl path itself. A resumed run's steps logged again: the later value wins.
    Raises UsageError for a folder without log.jsonl, an unreadable file or one without losses."""
    # the one log.jsonl reader, and its note (compare_loss imports no torch)
    from compare_loss import parse_jsonl, say_if_runs_follow_one_another
    path = str(path)
    if os.path.isdir(path):
        folder, log = path, os.path.join(path, 'log.jsonl')
        if not os.path.isfile(log):
            raise UsageError(f'{path} has no log.jsonl: pass a run\'s --output_dir or its log.jsonl')
        name = os.path.normpath(path)
    else:
        folder, log = os.path.dirname(path), path
        name = os.path.normpath(folder or '.') if os.path.basename(path) == 'log.jsonl' else path
        if name == '.':
            name = os.path.basename(os.getcwd())
    text = read_text(log)
    loss = parse_jsonl(text)
    if not loss:
        raise UsageError(f'{log} has no JSON lines with a loss: expected a run\'s log.jsonl')
    say_if_runs_follow_one_another(log, loss)
    acc1 = {}
    log_txt = os.path.join(folder, 'log.txt')
    if os.path.isfile(log_txt):
        epochs = read_text(log_txt)
        acc1 = (parse_jsonl(epochs, value='test_acc1', position='epoch', count_missing=False) or
                parse_jsonl(epochs, value='knn_acc1', position='epoch', count_missing=False) or {})
    return Run(name, loss, parse_jsonl(text, value='lr') or {}, acc1)


def read_text(path):
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return f.read()
    except OSError as e:
        raise UsageError(f'cannot read {path}: {e.strerror or e}') from None


def draw_training_curves(path, runs):
    """The loss and the lr of one or more runs against the step, in two panels sharing the step
    axis, one colour per run (RUN_COLORS, in order) and a legend naming the runs; a third panel
    shows the top-1 accuracy per epoch when a run's log.txt has one: test_acc1 (fine-tuning) or
    knn_acc1 (the k-NN curve of a pre-training run with --knn_freq).

    path: the image to write; its format follows the extension (.png, .jpg, .pdf, .svg, ...)
    runs: run folders (each with a log.jsonl) or log.jsonl paths
    returns: the pixel boxes (left, top, right, bottom) of the panels, top first
    Raises UsageError (one line for the user) for a bad path, a folder without log.jsonl, no runs.
    """
    check_plot_path(path)
    if not runs:
        raise UsageError('no runs to draw: pass one or more run folders (or their log.jsonl)')
    runs = [read_run(run) for run in runs]
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    with_acc = any(run.acc1 for run in runs)
    with matplotlib.rc_context({'svg.fonttype': 'none'}):
        fig, axes = new_figure(3 if with_acc else 2, [3, 2, 2] if with_acc else [3, 2],
                               figsize=(FIGSIZE[0], 9) if with_acc else FIGSIZE)
        loss_ax, lr_ax = axes[:2]
        lr_ax.sharex(loss_ax)
        for i, run in enumerate(runs):
            color = RUN_COLORS[i % len(RUN_COLORS)]
            style = '-' if i < len(RUN_COLORS) else '--'
            for ax, values, label in ((loss_ax, run.loss, short_name(run.name)), (lr_ax, run.lr, None)):
                steps = sorted(values)
                draw_curve(ax, steps, [values[s] for s in steps], color, label, linestyle=style)
            if with_acc and run.acc1:
                epochs = sorted(run.acc1)
                axes[2].plot(epochs, finite_or_nan([run.acc1[e] for e in epochs]), color=color, linewidth=1.5,
                             antialiased=False, linestyle=style, marker='o', markersize=4)
        loss_ax.set_ylabel('loss')
        legend_above(loss_ax, columns=min(len(runs), 4))
        loss_ax.tick_params(labelbottom=False)
        lr_ax.set_ylabel('lr')
        lr_ax.set_xlabel('step')
        lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one logged step: one tick
        if with_acc:
            axes[2].set_ylabel('top-1 accuracy (%)')
            axes[2].set_xlabel('epoch')
            axes[2].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one epoch: one tick
        return save(fig, path, axes)
