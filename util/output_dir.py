"""One run at a time in an --output_dir: a lock held for the life of the process."""
import atexit
import contextlib
import os
import socket
import tempfile

from util.errors import UsageError, first_line


_OUTPUT_DIR_LOCKS = {}  # real path -> the open lock file, held until the process ends
_MADE_HERE = set()  # the real paths of the output folders this process made


def in_use_by(output_dir):
    """Who holds <output_dir>/.lock ('pid N on host'), or None when no running process does: for a
    tool that must not touch a folder a run is using (the ModelZoo cases), without taking the lock."""
    path = os.path.join(output_dir, '.lock')
    try:
        import fcntl
        handle = open(path)
    except (ImportError, OSError):  # no flock, or no lock file: nobody holds it
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return lock_holder(handle)
    return None


def lock_holder(handle):
    """What the process holding a .lock wrote in it ('pid N on host')."""
    handle.seek(0)
    return handle.read().strip() or 'another process'


def lock_output_dir(output_dir):
    """Hold an flock on <output_dir>/.lock for the life of this process, so that a second run
    started in the same folder refuses instead of interleaving its checkpoints and logs. The
    operating system drops the lock when the process ends, crashed or killed included, so it
    never stays stuck. Taking it again in the same process (runs one after the other) is fine.
    Writing the lock file also proves the folder writable: a path that is a file, lies under a
    file, or is read-only is one line now rather than a traceback at the first checkpoint."""
    key = os.path.realpath(output_dir)
    if key in _OUTPUT_DIR_LOCKS:
        return
    made = not os.path.isdir(output_dir)
    with folder_errors_as_usage('--output_dir', output_dir):
        os.makedirs(output_dir, exist_ok=True)
        handle = open(os.path.join(output_dir, '.lock'), 'a+')
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the folder is checked, but not protected
        handle.close()
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = lock_holder(handle)
        handle.close()
        raise UsageError(f'another run is using --output_dir {output_dir} ({holder}): wait for it to end, stop it, '
                         f'or choose another --output_dir') from None
    handle.truncate(0)
    handle.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    handle.flush()
    _OUTPUT_DIR_LOCKS[key] = handle
    if made:
        _MADE_HERE.add(key)


@contextlib.contextmanager
def folder_errors_as_usage(flag, folder):
    """An OSError while making or writing `folder` becomes the one line that names the flag."""
    try:
        yield
    except OSError as e:
        if os.path.isfile(folder):
            raise UsageError(f'{flag} {folder} is a file: give a folder (a new one is made)') from None
        if os.path.islink(folder) and not os.path.exists(folder):  # makedirs said 'File exists'
            raise UsageError(f'{flag} {folder} is a link to {os.readlink(folder)}, which does not exist: make that '
                             f'folder, or give another {flag}') from None
        raise UsageError(f'{flag} {folder}: cannot write there ({e.strerror or first_line(e)}): give a '
                         f'folder you can write to') from None


def make_log_dir(log_dir):
    """Create --log_dir at start-up, so that a path under a file or a read-only one is one line
    before the model and data are built, not a traceback from TensorBoard's writer."""
    with folder_errors_as_usage('--log_dir', log_dir):
        os.makedirs(log_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=log_dir):  # writable, not merely present
            pass


def current_umask():
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


@atexit.register
def release_output_dir_locks():
    """Drop the output-folder locks this process holds, at exit and for programs that run several
    runs one after the other in one process (the tests, a notebook). A run that ended before it wrote
    anything (a bad flag found after the folder was locked) leaves the folder as it found it: its
    lock file removed, and the folder too where the run made it."""
    for key, handle in _OUTPUT_DIR_LOCKS.items():
        with contextlib.suppress(OSError):  # a folder removed or made unreadable meanwhile: nothing to tidy
            if os.listdir(key) == ['.lock']:
                os.remove(os.path.join(key, '.lock'))
                if key in _MADE_HERE:
                    os.rmdir(key)
        handle.close()
    _OUTPUT_DIR_LOCKS.clear()
    _MADE_HERE.clear()
