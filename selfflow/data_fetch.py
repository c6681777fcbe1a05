"""Download data sets that are not embedded, verifying every byte.

Only MNIST needs fetching (``digits`` ships inside scikit-learn). Each of the four gzip files is
downloaded into a temporary file in the destination folder, decompressed, its sha256 compared
with :data:`selfflow.data.MNIST_SHA256`, and only then renamed into place with ``os.replace`` —
so the destination never holds a partial or wrong file under the real name. Files already
present and valid are kept. Mirrors are tried in order; an error lists what each one did.

The command line ``selfflow data fetch mnist --to DIR [--base-url URL]`` calls :func:`main_fetch`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .data import MNIST_SHA256, DataError

__all__ = ["DEFAULT_MIRRORS", "FETCHABLE", "FetchError", "fetch_mnist", "main_fetch"]

# Public copies of the original MNIST gzip files, tried in this order.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
FETCHABLE = ("mnist",)
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024  # MNIST's largest file is under 10 MB
_CHUNK = 1 << 16


from selfflow.errors import FetchError  # noqa: E402,F401  (re-exported)


def _decompressed_sha256(file: Path) -> str:
    """sha256 of the gunzipped content of ``file``; raises DataError if it is not valid gzip."""
    digest = hashlib.sha256()
    try:
        with gzip.open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"not a valid gzip file: {error}") from error
    return digest.hexdigest()


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _already_valid(dest: Path, stem: str, expected: str) -> Path | None:
    """The existing ``stem.gz`` (or, failing that, raw ``stem``) in ``dest`` if its content
    hash is right. A broken ``.gz`` returns None even beside a good raw file, because the loader
    reads the ``.gz`` first: the download then replaces it."""
    packed, raw = dest / f"{stem}.gz", dest / stem
    if packed.is_file():
        try:
            return packed if _decompressed_sha256(packed) == expected else None
        except DataError:
            return None
    if raw.is_file() and _file_sha256(raw) == expected:
        return raw
    return None


def _download(url: str, target: Path, timeout: float) -> None:
    """Stream ``url`` into the already-open temp path ``target``."""
    request = urllib.request.Request(url, headers={"User-Agent": "selfflow-data-fetch"})
    total = 0
    with urllib.request.urlopen(request, timeout=timeout) as response, open(target, "wb") as out:
        while chunk := response.read(_CHUNK):
            total += len(chunk)
            if total > MAX_DOWNLOAD_BYTES:
                raise FetchError(f"more than {MAX_DOWNLOAD_BYTES} bytes; not an MNIST file")
            out.write(chunk)


def fetch_mnist(dest_dir: str | os.PathLike,
                base_url: str | Sequence[str] = DEFAULT_MIRRORS,
                timeout: float = 60.0,
                sha256: Mapping[str, str] | None = None,
                log: Callable[[str], None] | None = None) -> list[Path]:
    """Download the four MNIST gzip files into ``dest_dir`` and verify them.

    Args:
        dest_dir: created if missing. Files land as ``<stem>.gz`` (e.g.
            ``train-images-idx3-ubyte.gz``), which ``load_dataset("mnist", dest_dir)`` reads.
        base_url: one mirror URL or a sequence tried in order; ``<base>/<stem>.gz`` is fetched.
            ``file://`` URLs work too.
        timeout: seconds per connection attempt (urllib's socket timeout).
        sha256: expected sha256 of each DECOMPRESSED file, by stem; None means the original
            MNIST's (:data:`MNIST_SHA256`); another IDX set with the same names can pass its own.
        log: called with one line per file (e.g. ``print``); silent when None.

    Returns:
        The four verified paths (an existing valid raw ``<stem>`` counts and is kept).

    Raises:
        FetchError: a file failed on every mirror (network error, invalid gzip or sha256
            mismatch); its temporary file is deleted and nothing is written under its name.
    """
    if sha256 is None:
        sha256 = MNIST_SHA256
    mirrors = [base_url] if isinstance(base_url, str) else list(base_url)
    if not mirrors:
        raise FetchError("no mirror URL given")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: None)
    done = []
    for stem, expected in sha256.items():
        existing = _already_valid(dest, stem, expected)
        if existing is not None:
            say(f"{existing}: present, sha256 ok")
            done.append(existing)
            continue
        target = dest / f"{stem}.gz"
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + f"/{stem}.gz"
            handle, temp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".part", dir=dest)
            os.close(handle)
            temp = Path(temp_name)
            try:
                _download(url, temp, timeout)
                digest = _decompressed_sha256(temp)
                if digest != expected:
                    raise FetchError(f"sha256 mismatch: decompressed data has {digest}, "
                                     f"expected {expected}")
                os.replace(temp, target)
            except (OSError, http.client.HTTPException, DataError, ValueError) as error:
                failures.append(f"  {url}: {error}")
                continue
            finally:
                temp.unlink(missing_ok=True)
            say(f"{target}: downloaded from {url}, sha256 ok")
            done.append(target)
            break
        else:
            raise FetchError(f"could not fetch {target.name} into {dest}:\n"
                             + "\n".join(failures))
    return done


def main_fetch(name: str, to: str | os.PathLike, base_url: str | None = None) -> int:
    """Command-line body of ``selfflow data fetch NAME --to DIR [--base-url URL]``.

    Returns the process exit status: 0 on success (messages on stdout), 1 when fetching or
    verification failed, 2 for a data set that cannot be fetched (messages on stderr).
    """
    if name == "digits":
        print("digits ships inside scikit-learn; nothing to fetch")
        return 0
    if name not in FETCHABLE:
        print(f"error: cannot fetch {name!r}; fetchable: {', '.join(FETCHABLE)}",
              file=sys.stderr)
        return 2
    try:
        fetch_mnist(to, DEFAULT_MIRRORS if base_url is None else base_url, log=print)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"mnist ready in {to}")
    return 0
