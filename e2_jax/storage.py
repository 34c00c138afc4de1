"""Where runs and models live: a local folder or a bucket (gs://, s3://), one Path type for both.

A training workdir on a TPU pod must be in a bucket: every worker writes checkpoints to it and
a worker's disk does not outlive the VM. Everything that reads or writes a workdir, and every
converted model that is read, goes through `path()`: an `etils.epath.Path`, which is pathlib's
API over local disks and over Google Cloud Storage (through TensorFlow's file system, or fsspec
and gcsfs when `EPATH_USE_TF=false`). Orbax and TFDS take the same paths.

Two things a bucket cannot do are handled here: an object cannot be appended to, and a folder
cannot be renamed atomically. Files that grow (metrics.jsonl, TensorBoard events) are written
locally and uploaded whole (`Mirror`); checkpoints rely on Orbax's own commit protocol, which
on buckets marks a finished checkpoint instead of renaming it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from etils import epath

_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(location: str | os.PathLike) -> bool:
    """True for a bucket URI such as gs://bucket/run."""
    return bool(_REMOTE.match(os.fspath(location)))


def path(location: str | os.PathLike) -> epath.Path:
    """`location` as an epath.Path: a bucket URI as it is, a local path made absolute (Orbax
    wants absolute paths; `absolute()` on a URI would prepend the working directory)."""
    location = os.fspath(location)
    return epath.Path(location) if is_remote(location) else epath.Path(Path(location).absolute())


class Mirror:
    """A local folder whose files are copied whole to `remote` on `upload()`: for files that
    grow by appending, which a bucket object cannot do. For a local `remote`, the folder is
    `remote` itself and `upload` does nothing. Existing files of `remote` listed in `resume`
    are fetched first, so that appending continues them."""

    def __init__(self, remote: str | os.PathLike, resume: tuple[str, ...] = ()) -> None:
        self.remote = path(remote)
        self._staging = Path(tempfile.mkdtemp(prefix="e2_jax_mirror_")) if is_remote(remote) else None
        self.local = self._staging or Path(self.remote)
        self.local.mkdir(parents=True, exist_ok=True)
        if self._staging is not None:
            for name in resume:
                if (self.remote / name).exists():
                    (self.local / name).write_bytes((self.remote / name).read_bytes())
        self._uploaded: dict[Path, tuple[int, int]] = {}

    def upload(self) -> None:
        """Copies every file that changed since the last upload (each object replaced whole)."""
        if self._staging is None:
            return
        for file in sorted(p for p in self._staging.rglob("*") if p.is_file()):
            stat = file.stat()
            if self._uploaded.get(file) == (stat.st_size, stat.st_mtime_ns):
                continue
            target = self.remote / file.relative_to(self._staging).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
            self._uploaded[file] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        self.upload()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def write_text(file: epath.Path | Path, text: str) -> None:
    """`file` holds `text` whole or keeps what it held: on a local disk written beside it and
    renamed over it; a bucket object appears whole when its upload completes."""
    if is_remote(str(file)):
        file.write_text(text)
        return
    partial = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, file)
