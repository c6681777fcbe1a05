"""Download the named IDX sets (MNIST, Fashion-MNIST), verifying every byte.

``digits`` ships inside scikit-learn and needs nothing. For a named set each of the four gzip
files is downloaded into a temporary file in the destination folder, its sha256 compared with the
set's published value (:data:`selfflow.data.idx.NAMED_SETS`: of the decompressed bytes for MNIST,
of the ``.gz`` file for Fashion-MNIST), and only then renamed into place with ``os.replace``, so
the destination never holds a partial or wrong file under the real name. Files already present
and valid are kept. Mirrors are tried in order; an error lists what each one did.

The command line ``selfflow data fetch NAME --to DIR [--base-url URL]`` calls :func:`main_fetch`.
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

from selfflow.data.idx import NAMED_SETS
from selfflow.errors import DataError, FetchError

__all__ = ["MIRRORS", "FETCHABLE", "FetchError", "fetch_set", "main_fetch"]

# Public copies of each set's original gzip files, tried in this order.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion-mnist": ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                      "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
}
FETCHABLE = tuple(MIRRORS)
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024  # the largest of these files is under 30 MB
_CHUNK = 1 << 16


def _sha256(file: Path, decompress: bool) -> str:
    """sha256 of ``file``'s bytes, or of its gunzipped content; DataError if that is not valid gzip."""
    digest = hashlib.sha256()
    try:
        with (gzip.open(file, "rb") if decompress else open(file, "rb")) as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"not a valid gzip file: {error}") from error
    return digest.hexdigest()


def _already_valid(dest: Path, stem: str, expected: str, content_hash: bool) -> Path | None:
    """The existing ``stem.gz`` (or, for content hashes, raw ``stem``) in ``dest`` if its hash is
    right. A broken ``.gz`` returns None even beside a good raw file, because the loader reads the
    ``.gz`` first: the download then replaces it."""
    packed, raw = dest / f"{stem}.gz", dest / stem
    if packed.is_file():
        try:
            return packed if _sha256(packed, decompress=content_hash) == expected else None
        except DataError:
            return None
    if content_hash and raw.is_file() and _sha256(raw, decompress=False) == expected:
        return raw
    return None


def _download(url: str, target: Path, timeout: float) -> None:
    """Stream ``url`` into the already-created temporary file ``target``."""
    request = urllib.request.Request(url, headers={"User-Agent": "selfflow-data-fetch"})
    total = 0
    with urllib.request.urlopen(request, timeout=timeout) as response, open(target, "wb") as out:
        while chunk := response.read(_CHUNK):
            total += len(chunk)
            if total > MAX_DOWNLOAD_BYTES:
                raise FetchError(f"more than {MAX_DOWNLOAD_BYTES} bytes; not an IDX file of a named set")
            out.write(chunk)


def fetch_set(name: str, dest_dir: str | os.PathLike,
              base_url: str | Sequence[str] | None = None,
              timeout: float = 60.0,
              sha256: Mapping[str, str] | None = None,
              log: Callable[[str], None] | None = None) -> list[Path]:
    """Download the four gzip files of the named set ``name`` into ``dest_dir`` and verify them.

    Args:
        name: a key of :data:`MIRRORS` (``"mnist"``, ``"fashion-mnist"``).
        dest_dir: created if missing. Files land as ``<stem>.gz`` (e.g.
            ``train-images-idx3-ubyte.gz``), which ``load_dataset(name, dest_dir)`` reads.
        base_url: one mirror URL or a sequence tried in order (default: :data:`MIRRORS`);
            ``<base>/<stem>.gz`` is fetched. ``file://`` URLs work too.
        timeout: seconds per connection attempt (urllib's socket timeout).
        sha256: expected value per stem, hashed as the set's own (decompressed for MNIST, the .gz
            file for Fashion-MNIST); default the published values.
        log: called with one line per file (e.g. ``print``); silent when None.

    Returns:
        The four verified paths (for MNIST an existing valid raw ``<stem>`` counts and is kept).

    Raises:
        FetchError: a file failed on every mirror (network error, invalid gzip or sha256
            mismatch); its temporary file is deleted and nothing is written under its name.
    """
    if name not in MIRRORS:
        raise FetchError(f"cannot fetch {name!r}; fetchable: {', '.join(FETCHABLE)}")
    named = NAMED_SETS[name]
    content_hash = named.hashed == "content"
    sha256 = named.sha256 if sha256 is None else sha256
    base_url = MIRRORS[name] if base_url is None else base_url
    mirrors = [base_url] if isinstance(base_url, str) else list(base_url)
    if not mirrors:
        raise FetchError("no mirror URL given")
    dest = Path(dest_dir)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FetchError(f"cannot create {dest}: {error.strerror or error}") from None
    say = log or (lambda line: None)
    done = []
    for stem, expected in sha256.items():
        existing = _already_valid(dest, stem, expected, content_hash)
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
                digest = _sha256(temp, decompress=content_hash)
                if digest != expected:
                    what = "decompressed data" if content_hash else "file"
                    raise FetchError(f"sha256 mismatch: the {what} has {digest}, expected {expected}")
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
            raise FetchError(f"could not fetch {target.name} into {dest}:\n" + "\n".join(failures))
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
        print(f"selfflow: error: cannot fetch {name!r}; fetchable: {', '.join(FETCHABLE)}", file=sys.stderr)
        return 2
    try:
        fetch_set(name, to, base_url, log=print)
    except DataError as error:
        print(f"selfflow: error: {error}", file=sys.stderr)
        return 1
    print(f"{name} ready in {to}; train with data.name={name} data.path={to}")
    return 0
