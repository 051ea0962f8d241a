"""Writing output files whole: a reader never sees a partly written one.

Local paths and anything etils.epath opens. gs:// goes epath -> fsspec -> gcsfs (install the
`gcs` extra); with TensorFlow installed epath takes tf.io.gfile instead, unless EPATH_USE_TF=false.
tests/test_gcs.py runs train, sample and eval on a gs:// workdir against a local emulator.
"""

from __future__ import annotations

import os
import tempfile

from etils import epath


def is_remote(path: str) -> bool:
    """gs://, s3://, ...: an object store, where each object is written whole or not at all."""
    return "://" in str(path)


def absolute(path) -> str:
    """A local path made absolute (against the current directory); a remote one as it is."""
    return str(path) if is_remote(str(path)) else os.path.abspath(path)


def write_bytes_atomically(path: str, data: bytes) -> None:
    """Writes `data` to `path` (directories created) so that it appears whole or not at all.

    Local files: a temporary file in the same directory, fsync-ed, given the permissions a
    new file gets under the umask, then renamed over `path`. Object stores (gs://): one write
    of the whole object, which is atomic there.
    """
    path = str(path)
    if is_remote(path):
        target = epath.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def append_text(path: str, text: str) -> None:
    """Appends `text` to `path` (created with its directories if absent).

    Local files: an append. Object stores have no append: the object is read and written again
    whole (fine for a log of a few thousand lines).
    """
    path = str(path)
    target = epath.Path(path)
    if is_remote(path):
        old = target.read_text() if target.exists() else ""
        write_bytes_atomically(path, (old + text).encode())
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a") as f:
        f.write(text)
