"""Logging of a training run, on the main process only:
- the console: one line per logged step, carrying `train.loss : X` and `train.ips : Y` for the
  Tecorigin/Ascend tooling;
- <output_dir>/log.jsonl: one JSON object per logged step (epoch, step, loss, lr, ips, time, ...);
- <output_dir>/log.txt: one JSON object per epoch (the official MAE format);
- TensorBoard scalars (loss, lr, images/s, gradient norm) and images in <log_dir>.
"""
import datetime
import json
import os


def counted(number, noun, plural=None):
    """'1 warm-up epoch', '2 warm-up epochs', '1 process' (plural 'processes'): a count and its noun,
    for console lines."""
    return f'{number} {noun if number == 1 else plural or noun + "s"}'


def named_briefly(names, shown=3):
    """'a, b, c and 5 more': the first of many names in a line."""
    more = f' and {len(names) - shown} more' if len(names) > shown else ''
    return ', '.join(names[:shown]) + more


def read_json_lines(path, offset=0):
    """The JSON objects of a log (log.txt, log.jsonl) from byte `offset` on; [] where there is no file.
    A line that is no object, such as the last one cut short by a killed run or a full disk, is
    skipped: a resumed run appends after it."""
    if not os.path.isfile(path):
        return []
    with open(path, errors='replace') as f:
        f.seek(offset)
        return list(json_records(f))


def json_records(lines):
    """The JSON objects among `lines`, one a line; a line that is no object (cut short, or text of
    another kind) is skipped."""
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def cut_short(path):
    """Whether the file's last line lacks its line break (False for a missing or empty file)."""
    try:
        with open(path, 'rb') as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b'\n'
    except OSError:
        return False


# the end of the console line of a record with `partial` (util.engine): a stop cut its interval
PARTIAL_MARK = '  (partial interval: stopped before its log step)'


def _format(value):
    if isinstance(value, float):
        return f'{value:.6g}'
    return str(value)


class RunLogger:
    def __init__(self, output_dir, log_dir, enabled):
        self.enabled = enabled
        self.output_dir = output_dir
        self.log_dir = log_dir
        self._writer = None
        self._writer_class = None
        self._appended = set()  # the logs appended to by this run
        if not enabled:
            return
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            # a second's import, here: not inside the first timed interval of the loop
            from torch.utils.tensorboard import SummaryWriter
            self._writer_class = SummaryWriter

    @property
    def writer(self):
        """TensorBoard's writer, made at the first value written (a run with nothing left to train
        leaves no empty event file); None without a log_dir."""
        if self._writer is None and self._writer_class is not None:
            self._writer = self._writer_class(log_dir=self.log_dir)
        return self._writer

    def _append(self, name, record):
        if self.output_dir:
            path = os.path.join(self.output_dir, name)
            # a resumed run's first record starts a line of its own after a line a killed run cut short
            start = '\n' if name not in self._appended and cut_short(path) else ''
            self._appended.add(name)
            with open(path, 'a') as f:
                f.write(start + json.dumps(record) + '\n')

    def log_step(self, record, steps_in_epoch, step_in_epoch, eta_seconds):
        """record: {'epoch', 'step', 'loss', 'lr', 'ips', ...}; one console line, one JSON line,
        TensorBoard scalars against the global step."""
        if not self.enabled:
            return
        width = len(str(steps_in_epoch))
        extras = '  '.join(f'{k}: {_format(v)}' for k, v in record.items()
                           if k not in ('epoch', 'step', 'loss', 'lr', 'ips', 'time', 'partial'))
        eta = str(datetime.timedelta(seconds=int(eta_seconds)))
        print(f"Epoch: [{record['epoch']}]  [{step_in_epoch:>{width}}/{steps_in_epoch}]  eta: {eta}  "
              f"lr: {record['lr']:.6e}  {extras + '  ' if extras else ''}"
              f"train.loss : {record['loss']:.6f}  train.ips : {record['ips']:.2f}"
              f"{PARTIAL_MARK if record.get('partial') else ''}", flush=True)
        self._append('log.jsonl', record)
        if self.writer is not None:
            for key in ('loss', 'lr', 'ips', 'grad_norm'):
                if key in record:
                    self.writer.add_scalar(f'train/{key}', record[key], record['step'])

    def log_epoch(self, record):
        """record: {'train_loss', 'train_lr', ..., 'epoch'} in MAE's log.txt format."""
        if not self.enabled:
            return
        self._append('log.txt', record)
        if self.writer is not None:
            for key, value in record.items():
                if key != 'epoch' and isinstance(value, (int, float)):
                    self.writer.add_scalar(f'epoch/{key}', value, record['epoch'])
            self.writer.flush()

    def log_values(self, record):
        """A record of values measured at a step other than the loss (the k-NN monitor's), appended
        to log.jsonl; readers of the loss skip it."""
        if self.enabled:
            self._append('log.jsonl', record)

    def log_evaluation(self, record):
        """A record of an evaluation outside training (main_finetune --knn) appended to log.txt."""
        if self.enabled:
            self._append('log.txt', record)

    def log_image(self, tag, image, epoch):
        """image: (3, H, W) in [0, 1], to TensorBoard at the epoch (nothing without a log_dir)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, epoch)
            self.writer.flush()

    @property
    def draws_images(self):
        return self.enabled and bool(self.log_dir)

    def close(self):
        if self._writer is not None:
            self._writer.close()
