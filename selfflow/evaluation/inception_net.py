"""The FID Inception-v3 as our own network, and its weights read from the TorchScript archive as data.

The FID weights are published only as a TorchScript archive (a zip: ``<name>/data.pkl``, a pickle of
the module tree, plus one raw byte file per tensor under ``<name>/data/``, and the module's code under
``<name>/code/``). ``torch.jit.load`` would compile and run that code, so a crafted file could do
anything. Here the code is never read: :func:`read_archive_weights` unpickles ``data.pkl`` with an
unpickler that knows five harmless globals (the module classes become inert records, tensors are
rebuilt from their bytes after every bound is checked), and :class:`FIDInceptionV3` — the network
defined below, layer for layer the TensorFlow FID Inception — receives the tensors by name.

The architecture (TF Inception-v3 as ported for FID): every convolution is conv (no bias) → batch
norm without scale (ε = 1e-3) → ReLU; the 35×35 blocks average-pool without counting padding; the
last block max-pools its pool tower (the TF graph's quirk); ``pool2`` is an 8×8 average pool, giving
the 2048-d FID features at 299×299.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.errors import DataError

# --------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------
SAME = "same"  # padding (kh // 2, kw // 2)


class ConvBN(nn.Module):
    """conv (no bias) → batch norm with shift only (ε = 1e-3, running statistics) → ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, padding=0) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = (kh // 2, kw // 2) if padding == SAME else (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.weight = nn.Parameter(torch.zeros(cout, cin, kh, kw), requires_grad=False)
        self.beta = nn.Parameter(torch.zeros(cout), requires_grad=False)
        self.mean = nn.Parameter(torch.zeros(cout), requires_grad=False)
        self.var = nn.Parameter(torch.ones(cout), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, [self.stride, self.stride], list(self.padding))
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1, 1e-3))


def _tower(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(collections.OrderedDict(layers))


def _avg_pool() -> nn.Module:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # 35×35
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _tower(("conv", ConvBN(cin, 48, 1)), ("conv_1", ConvBN(48, 64, 5, padding=SAME)))
        self.tower_1 = _tower(("conv", ConvBN(cin, 64, 1)), ("conv_1", ConvBN(64, 96, 3, padding=SAME)),
                              ("conv_2", ConvBN(96, 96, 3, padding=SAME)))
        self.tower_2 = _tower(("pool", _avg_pool()), ("conv", ConvBN(cin, pool_features, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):  # 35×35 → 17×17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = _tower(("conv", ConvBN(cin, 64, 1)), ("conv_1", ConvBN(64, 96, 3, padding=SAME)),
                            ("conv_2", ConvBN(96, 96, 3, stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):  # 17×17, factorised 7×7
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 192, 1)
        self.tower = _tower(("conv", ConvBN(cin, c7, 1)), ("conv_1", ConvBN(c7, c7, (1, 7), padding=SAME)),
                            ("conv_2", ConvBN(c7, 192, (7, 1), padding=SAME)))
        self.tower_1 = _tower(("conv", ConvBN(cin, c7, 1)), ("conv_1", ConvBN(c7, c7, (7, 1), padding=SAME)),
                              ("conv_2", ConvBN(c7, c7, (1, 7), padding=SAME)), ("conv_3", ConvBN(c7, c7, (7, 1), padding=SAME)),
                              ("conv_4", ConvBN(c7, 192, (1, 7), padding=SAME)))
        self.tower_2 = _tower(("pool", _avg_pool()), ("conv", ConvBN(cin, 192, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):  # 17×17 → 8×8
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.tower = _tower(("conv", ConvBN(cin, 192, 1)), ("conv_1", ConvBN(192, 320, 3, stride=2)))
        self.tower_1 = _tower(("conv", ConvBN(cin, 192, 1)), ("conv_1", ConvBN(192, 192, (1, 7), padding=SAME)),
                              ("conv_2", ConvBN(192, 192, (7, 1), padding=SAME)), ("conv_3", ConvBN(192, 192, 3, stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):  # 8×8, expanded; ``max_pool``: the last block's pool tower (TF's graph)
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=SAME)
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=SAME)
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=SAME)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=SAME)
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=SAME)
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg_pool()
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a), self.tower_1_mixed_conv(b),
                          self.tower_1_mixed_conv_1(b), self.tower_2_conv(self.tower_2_pool(x))], 1)


class FIDInceptionV3(nn.Module):
    """The stages (``selfflow.config.INCEPTION_STAGES``, in order) as attributes; (B, 3, 299, 299) in
    [−1, 1] → (B, 2048, 1, 1) after ``pool2``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = ConvBN(3, 32, 3, stride=2)
        self.conv_1 = ConvBN(32, 32, 3)
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.pool0 = nn.MaxPool2d(3, stride=2)
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3)
        self.pool1 = nn.MaxPool2d(3, stride=2)
        self.mixed = InceptionA(192, 32)
        self.mixed_1 = InceptionA(256, 64)
        self.mixed_2 = InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(768, 128)
        self.mixed_5 = InceptionC(768, 160)
        self.mixed_6 = InceptionC(768, 160)
        self.mixed_7 = InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)
        self.mixed_9 = InceptionE(1280, max_pool=False)
        self.mixed_10 = InceptionE(2048, max_pool=True)
        self.pool2 = nn.AvgPool2d(8, stride=8)


# --------------------------------------------------------------------------------------------
# the archive, read as data
# --------------------------------------------------------------------------------------------
_STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                   "BFloat16Storage": torch.bfloat16}
_LIST_BUILDERS = {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"}


class ScriptRecord:
    """A module of the archive as an inert record: its class name and its attributes (never its code)."""

    kind = ""

    def __init__(self) -> None:
        self.state: dict = {}

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.kind}: a module state that is not a dict")
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"a tensor's {what} is not a tuple of non-negative integers")
    return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    """A tensor view of ``storage`` (bytes already read and sized), refused unless it lies inside the
    storage and holds no more elements than it (no zero-stride blow-up); then copied."""
    if not isinstance(storage, torch.Tensor) or not isinstance(offset, int):
        raise pickle.UnpicklingError("a tensor without a storage record")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"a tensor of size {size} with stride {stride}")
    numel = 1
    for s in size:
        numel *= s
    if numel and (numel > storage.numel() or any(st == 0 and s > 1 for s, st in zip(size, stride))
                  or offset + sum((s - 1) * st for s, st in zip(size, stride)) >= storage.numel()):
        raise pickle.UnpicklingError(f"a tensor of size {size}, stride {stride}, offset {offset} does not fit its "
                                     f"storage of {storage.numel()} elements")
    return storage.as_strided(size, stride, offset).clone() if numel else torch.zeros(size, dtype=storage.dtype)


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` knowing only module records, tensors, storages, dicts and lists."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (ScriptRecord,), {"kind": f"{module}.{name}"})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return list
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing the global {module}.{name} (only weights are read from this file)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"an unknown persistent record {str(pid)[:60]!r}")
        _, kind, key, _location, numel = pid
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"a storage record with key {key!r} and size {numel!r}")
        name = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {key!r} is missing from the archive") from None
        nbytes = numel * torch.empty(0, dtype=kind.dtype).element_size()
        if info.file_size != nbytes:  # checked before a byte is read
            raise pickle.UnpicklingError(f"storage {key!r} holds {info.file_size} bytes, {nbytes} expected")
        return torch.frombuffer(bytearray(self.archive.read(name)), dtype=kind.dtype) if nbytes else torch.zeros(0, dtype=kind.dtype)


def _flatten(record: ScriptRecord, prefix: str, out: dict) -> None:
    for key, value in getattr(record, "state", {}).items():
        if key in ("training", "_is_full_backward_hook"):
            continue
        if isinstance(value, ScriptRecord):
            _flatten(value, f"{prefix}{key}.", out)
        else:
            out[f"{prefix}{key}"] = value


def read_archive_weights(path: str | Path) -> dict:
    """Every attribute of a TorchScript archive's module tree by dotted name (tensors, ints, lists),
    read without running the archive's code; DataError naming the file otherwise."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise pickle.UnpicklingError("no single <name>/data.pkl in the archive")
            prefix = pickles[0][: -len("data.pkl")]
            root = _ArchiveUnpickler(archive.read(pickles[0]), archive, prefix).load()
            if not isinstance(root, ScriptRecord):
                raise pickle.UnpicklingError("no module at its root")
            flat: dict = {}
            _flatten(root, "", flat)
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, RecursionError, MemoryError, RuntimeError, OSError) as exc:
        raise DataError(f"{path}: cannot be loaded as a TorchScript Inception weight archive "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return flat


def load_fid_inception(path: str | Path) -> FIDInceptionV3:
    """:class:`FIDInceptionV3` (float32, frozen) with the weights of the archive at ``path``.

    The archive must hold exactly this network (under ``net.layers``): every tensor with its shape,
    every convolution's stride and padding as defined here; all values finite. Anything else is a
    DataError naming the file and the key.
    """
    flat = read_archive_weights(path)
    prefix = "net.layers."
    model = FIDInceptionV3()
    state = model.state_dict()
    found = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    for key, target in state.items():
        value = found.get(key)
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{path}: not the FID Inception layout (no tensor {prefix}{key})")
        if tuple(value.shape) != tuple(target.shape):
            raise DataError(f"{path}: {prefix}{key} has shape {tuple(value.shape)}, the FID Inception's is {tuple(target.shape)}")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise DataError(f"{path}: {prefix}{key} holds NaN or infinite values (or is not floating point)")
        target.copy_(value.float())
    extra = sorted(k for k, v in found.items() if isinstance(v, torch.Tensor) and k not in state)
    if extra:
        raise DataError(f"{path}: not the FID Inception layout (unexpected tensor {prefix}{extra[0]})")
    for name, module in model.named_modules():
        if isinstance(module, ConvBN):
            stride, padding = found.get(f"{name}.stride"), found.get(f"{name}.padding")
            padding = (padding, padding) if isinstance(padding, int) else tuple(padding) if isinstance(padding, list) else None
            if stride != module.stride or padding != module.padding:
                raise DataError(f"{path}: {prefix}{name} has stride {stride} and padding {padding}; the FID Inception's "
                                f"are {module.stride} and {module.padding}")
    return model.float().eval().requires_grad_(False)
