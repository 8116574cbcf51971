"""Errors that are the user's to fix: printed as one line, never as a traceback."""
import sys


class UsageError(Exception):
    """Bad input (a flag, a path, a checkpoint): the message says what to do."""


def run_cli(main, *args):
    """Run an entry point; a UsageError ends the program with its one-line message."""
    try:
        return main(*args)
    except UsageError as e:
        print(f'error: {usage_message(e)}', file=sys.stderr, flush=True)
        sys.exit(2)


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
