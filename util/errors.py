"""Errors that are the user's to fix: printed as one line, never as a traceback."""
import atexit
import builtins
import errno
import gc
import os
import re
import sys


# Exit codes of the entry points (documented in the README, "When things go wrong").
EXIT_USAGE = 2       # bad input: a flag, a path, a data set, a checkpoint
EXIT_DIVERGED = 3    # the loss became NaN or infinite
EXIT_PREEMPTED = 4   # stopped by SIGTERM/SIGUSR1 after writing checkpoint-last.pth: start again to resume
# the advice that ends a training loop's stop message (test/modelzoo.py gives a performance case's instead)
RESUME_ADVICE = 'checkpoint-last.pth is written: run the same command again to resume'


class RunEnded(Exception):
    """A run that ends early with one line for the user; `exit_code` says why."""
    exit_code = 1


class UsageError(RunEnded):
    """Bad input (a flag, a path, a checkpoint): the message says what to do."""
    exit_code = EXIT_USAGE


class Preempted(BaseException):
    """A stop signal (pre-emption, Ctrl-C) ended the run: after it saved checkpoint-last.pth in
    training, at once elsewhere. A BaseException, like KeyboardInterrupt, because the signal's
    handler raises it wherever the program is, and a library's `except Exception` around a
    fallback (the FLOP count's, a device plugin's import) must not swallow it."""
    exit_code = EXIT_PREEMPTED


def run_cli(main, *args):
    """Run an entry point; a RunEnded (bad input, divergence) or a Preempted ends the program with
    its one-line message and its exit code."""
    from util import dist, signals  # import torch: not before the arguments are parsed (--help stays quick)
    signals.catch_signals()
    dist.print_only_on_main_process(dist.main_process_by_env())  # the flags' warnings too, said before the ranks meet
    try:
        return main(*args)
    except (RunEnded, Preempted) as e:
        print_error(usage_message(e), on_every_rank=not isinstance(e, Preempted))  # all ranks stop on a signal
        sys.exit(e.exit_code)
    except BrokenPipeError:
        if not stdout_is_gone():
            raise
        # the reader of stdout went away (`| head -1`): the end of a program that SIGPIPE stops, without a traceback
        stdout_to_devnull()
        sys.exit(1)
    except (RuntimeError, MemoryError, OSError) as e:
        message = disk_full_message(e) if isinstance(e, OSError) else out_of_memory_message(e)
        distributed = int(os.environ.get('WORLD_SIZE', '1') or 1) > 1  # a single process has no peer to lose
        gone = PEER_GONE.search(str(e)) if message is None and distributed and isinstance(e, RuntimeError) else None
        if gone:  # the library's paragraph (Gloo's ends 'GLHF!') says no more than its phrase
            print_error(f'another process of the run ended while this one waited for it in a collective operation '
                        f'({gone.group(0).lower()}): its own error line, or its log, says why')
            sys.exit(1)
        if message is None:
            raise
        print_error(message)
        sys.exit(EXIT_USAGE)


def stdout_to_devnull():
    """Send what is still printed, and the interpreter's flush of stdout at exit (a second
    BrokenPipeError traceback), to /dev/null: for a stdout whose reader has gone."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def stdout_is_gone():
    """Whether stdout is a pipe whose reader has closed it (a BrokenPipeError may be a socket's):
    poll() reports an error condition on such a pipe's end."""
    import select
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), no file descriptor
        return True


# What a collective says when a process of the group has gone (it stopped on an error of its own):
# Gloo's closed connection, NCCL's and HCCL's aborted communicator or lost remote rank.
PEER_GONE = re.compile(r'Connection closed by peer|Connection reset by peer|remote process exited|'
                       r'communicator was aborted|Broken pipe', re.IGNORECASE)


def print_error(message, on_every_rank=True):
    """The error line, on stderr: rank 0's, and with `on_every_rank` every other rank's too (see
    say_on_this_rank), so that an error only one rank met is seen."""
    if on_every_rank:
        say_on_this_rank(message, 'error', file=sys.stderr)
    else:
        print(f'error: {message}', file=sys.stderr, flush=True)


# Where util.dist keeps the builtin print() when it silences print() on ranks other than 0.
ORIGINAL_PRINT = '_builtin_print'


def say_on_this_rank(text, kind=None, file=None):
    """`text` printed by this process, named by its rank where it is not rank 0 ('warning: rank 1:
    ...'). Once the processes have met, print() is rank 0's alone (util.dist): what only another
    rank met (an unreadable image in its shard of the data) was never shown, and torchrun then
    said only that rank 0 had been stopped."""
    rank = os.environ.get('RANK', '0')
    label = '' if rank == '0' else f'rank {rank}: '
    unsilenced_print(f'{kind}: {label}{text}' if kind else f'{label}{text}', file=file or sys.stdout, flush=True)


def unsilenced_print(*args, **kwargs):
    """print() on this rank whatever its number: what each process says for itself."""
    builtins.__dict__.get(ORIGINAL_PRINT, builtins.print)(*args, **kwargs)


def disk_full_message(error):
    """One line for a write that found the disk full or the quota used up (a log line, a picture,
    an exported file; a checkpoint's write has its own line); None for any other OSError."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f' writing {error.filename}' if error.filename else ''
    return (f'{error.strerror}{where}: free disk space or write elsewhere (another --output_dir); the checkpoints '
            f'already written are whole, each written to a temporary file and then renamed')


def out_of_memory_message(error):
    """One line for an allocation that failed: CUDA's OutOfMemoryError, another allocator's
    RuntimeError (the CPU's, an NPU's), Python's MemoryError, or one of these in a data-loader
    worker; None for any other error. Its traceback says nothing a user can act on: the batch or
    the image size is too large for the device."""
    text = usage_message(error)
    if not isinstance(error, MemoryError) and not re.search(r"out of memory|can't allocate memory", text, re.I):
        return None
    size = re.search(r'tried to allocate ([\d.]+) ?(bytes|[KMGT]iB)', text, re.I)
    if size and size[2] == 'bytes':
        size = f'{int(size[1]) / 2 ** 30:.2f} GiB'
    elif size:
        size = f'{size[1]} {size[2]}'
    return (f'out of memory{f" allocating {size}" if size else ""}: lower --batch_size (with --accum_iter the '
            f'effective batch, and so the lr, stays as it was), lower the image size, or add --grad_ckpt')


def run_command(main, get_args_parser):
    """An entry point's command line: run_cli on the parsed arguments, the interpreter's last
    collection skipped from the start (so --help and argparse's errors end as quickly)."""
    skip_the_last_collection()
    args = get_args_parser().parse_args()
    code = 1  # an error run_cli leaves to its traceback
    try:
        run_cli(main, args)
        code = 0
    except SystemExit as ended:
        code = ended.code if isinstance(ended.code, int) else int(ended.code is not None)  # as the interpreter reads it
        raise
    finally:
        from util import signals  # imported by run_cli already
        signals.exit_at_once_on_stop_signals(code)


def skip_the_last_collection():
    """At exit, the interpreter's last garbage collection walks the ~400,000 objects that torch, timm
    and their imports made: a second at the end of every command. A command skips it (gc.freeze at
    exit) because nothing left then needs it: its files and checkpoints were closed by the command
    itself, and the data-loader workers are stopped by multiprocessing's own exit handler."""
    atexit.register(gc.freeze)


def usage_message(error):
    """A UsageError's message. One raised in a data-loader worker comes back re-raised with the
    worker's traceback as its message ('Caught UsageError in DataLoader worker process 0. Original
    Traceback ...'), whose last line holds the original message."""
    text = str(error)
    if text.startswith('Caught ') and 'Original Traceback' in text:
        return text.strip().splitlines()[-1].partition(': ')[2]
    return text


def first_line(exc):
    """The first line of an exception's message (its type name when the message is empty), for
    one-line errors that quote what a library said."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
