"""Read torch checkpoint files (``.pt``/``.pth``) without ever running code from them.

A torch file is a zip archive: ``<name>/data.pkl`` (a pickle) plus one raw byte file per storage
(``<name>/data/<key>``). Unpickling runs whatever callables the pickle names, so a file from
elsewhere could run any code; ``torch.load(weights_only=True)`` closes that but also refuses the
``argparse.Namespace`` that SiT and REPA training checkpoints carry in ``"args"``.

:func:`load_torch_file` unpickles ``data.pkl`` with a :class:`pickle.Unpickler` whose
``find_class`` admits only:

* ``collections.OrderedDict`` (state dicts; plain dicts, lists and tuples need no global);
* the storage type names (``torch.FloatStorage``, …), read here as dtypes, never imported;
* ``torch._utils._rebuild_tensor_v2`` and ``_rebuild_parameter``, answered by this module's own
  functions, which view the bytes of a storage file as a tensor (``as_strided``, bounds-checked);
* ``argparse.Namespace``, answered by :class:`PickledNamespace`, a class with no methods of its own,
  so the file's attributes become plain data.

Anything else (``os.system``, ``builtins.eval``, any other class) is refused before it is looked
up, with a one-line :class:`~selfflow.errors.CheckpointError` that names the file and the global.
``.safetensors`` files hold no code at all and are read with the safetensors library.
"""
from __future__ import annotations

import collections
import io
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from selfflow.errors import CheckpointError

__all__ = ["PickledNamespace", "load_torch_file", "read_checkpoint_file", "plain_data"]

STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


class PickledNamespace:
    """What an ``argparse.Namespace`` in a checkpoint becomes: its attributes, nothing else."""

    def __repr__(self) -> str:
        return "PickledNamespace(" + ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items())) + ")"


class _StorageType:
    """A storage type name read from the pickle: only its dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor(storage: torch.Tensor, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    """Our answer to ``torch._utils._rebuild_tensor_v2``: a strided view of a storage's elements."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("a tensor's storage is not a storage record")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or int(offset) < 0:
        raise pickle.UnpicklingError(f"a tensor with an invalid layout: size {size}, stride {stride}, offset {offset}")
    last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else int(offset) - 1
    if last >= storage.numel():
        raise pickle.UnpicklingError(f"a tensor reaches past its storage ({last + 1} > {storage.numel()} elements)")
    return storage.as_strided(size, stride, int(offset))


def _rebuild_parameter(data: torch.Tensor, requires_grad=False, hooks=None) -> torch.Tensor:
    """Our answer to ``torch._utils._rebuild_parameter``: the plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter without a tensor")
    return data


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("argparse", "Namespace"): PickledNamespace,
}


class _Refused(Exception):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"an unknown persistent record {str(pid)[:60]!r}")
        _, kind, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key!r} is missing from the archive") from None
            itemsize = torch.empty(0, dtype=kind.dtype).element_size()
            if len(raw) < int(numel) * itemsize:
                raise pickle.UnpicklingError(f"storage {key!r} holds {len(raw)} bytes, {int(numel) * itemsize} expected")
            raw = raw[: int(numel) * itemsize]
            self.storages[key] = torch.frombuffer(bytearray(raw), dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
        return self.storages[key]


def load_torch_file(path: str | Path) -> Any:
    """The object a ``torch.save`` zip file holds, unpickled without running code (module doc)."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path}: not a torch zip archive (files saved by torch < 1.6 are not read: re-save them with a newer torch)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: not a torch checkpoint archive (no single <name>/data.pkl inside)")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist():
            order = archive.read(f"{prefix}byteorder").decode(errors="replace").strip()
            if order != sys.byteorder:
                raise CheckpointError(f"{path}: saved on a {order}-endian machine; this one is {sys.byteorder}-endian")
        try:
            unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix)
            return unpickler.load()
        except _Refused as exc:
            raise CheckpointError(f"{path}: refused to load: the file asks for {exc}, which is not a tensor, a plain container "
                                  "or an argparse.Namespace (loading it could run code)") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError, AttributeError, IndexError, KeyError) as exc:
            raise CheckpointError(f"{path}: corrupt or unsupported torch file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def read_checkpoint_file(path: str | Path) -> Any:
    """A ``.pt``/``.pth``/``.bin`` torch file (safely, see :func:`load_torch_file`) or a ``.safetensors`` file (a dict)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from selfflow.files import load_tensors

        return load_tensors(path)
    return load_torch_file(path)


def plain_data(value: Any) -> Any:
    """A :class:`PickledNamespace` (nested in lists, tuples, dicts) as dicts, for JSON records; tensors as shapes."""
    if isinstance(value, PickledNamespace):
        return {k: plain_data(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
