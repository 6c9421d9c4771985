"""Files that are replaced whole or not at all: a crash or an error while writing never
leaves half a file. No TensorFlow or Keras here, so that the device-side tools can use it."""

import contextlib
import os
import pathlib
import tempfile


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """A stream whose content replaces `path` only once the block completes (a crash never
    leaves half a file), with the usual permissions (not mkstemp's 0600)."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as stream:
            yield stream
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text_atomic(path, text):
    """Writes `text` to `path` through a temporary file (`atomic_file`)."""
    with atomic_file(path) as stream:
        stream.write(text)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
