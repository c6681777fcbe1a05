"""Typed run configuration: dataclasses, YAML files, ``key=value`` overrides.

A run is described by one :class:`RunConfig` made of sections (``data``, ``model``, ``method``,
``train``, ``sample``). YAML files under ``configs/`` fill it; ``--set train.lr=3e-4`` overrides a
field. Every key is checked against the dataclass it lands in: an unknown key, a wrong type or a
value out of range raises :class:`ConfigError` naming the key *before* any training starts.

The ``method`` section is open-ended: its ``name`` picks a method (``selfflow.methods``), and the
remaining keys are validated against that method's own config dataclass.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


from selfflow.errors import ConfigError  # noqa: E402,F401  (re-exported: the error's old home)


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist | folder | npz
    path: Optional[str] = None  # folder (mnist, folder) or file (npz)
    split: str = "train"
    image_size: Optional[int] = None  # resize to this size; None keeps the native size
    channels: Optional[int] = None  # folder data: 1 or 3; None infers it
    class_conditional: bool = True

    def validate(self, where: str) -> None:
        if self.image_size is not None and self.image_size <= 0:
            raise ConfigError(f"{where}.image_size must be positive, got {self.image_size}")
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"{where}.channels must be 1 or 3, got {self.channels}")


MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (depth, hidden_size, num_heads) — SiT/DiT sizes (SPEC.md §2) plus CPU-sized ones.
    "tiny": (4, 64, 4),
    "mini": (6, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


@dataclass
class ModelConfig:
    size: str = "tiny"
    depth: Optional[int] = None  # overrides the size's depth
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: int = 2
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # label dropout, trains the null class for guidance
    # Filled from the data set when left at None.
    image_size: Optional[int] = None
    in_channels: Optional[int] = None
    num_classes: Optional[int] = None

    def validate(self, where: str) -> None:
        if self.size not in MODEL_SIZES:
            raise ConfigError(f"{where}.size: unknown size {self.size!r}; known: {sorted(MODEL_SIZES)}")
        for key in ("depth", "hidden_size", "num_heads", "patch_size", "image_size", "in_channels"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {value}")
        if self.num_classes is not None and self.num_classes < 0:
            raise ConfigError(f"{where}.num_classes must be >= 0, got {self.num_classes}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"{where}.mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"{where}.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        depth, width, heads = self.resolved_dims()
        if width % heads != 0:
            raise ConfigError(f"{where}: hidden_size {width} is not divisible by num_heads {heads}")
        if (width // heads) % 2 != 0:
            raise ConfigError(f"{where}: head dim {width // heads} must be even")

    def resolved_dims(self) -> tuple[int, int, int]:
        depth, width, heads = MODEL_SIZES[self.size]
        return (self.depth or depth, self.hidden_size or width, self.num_heads or heads)


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128  # global batch (all processes, all accumulation micro-steps)
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 100
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.999
    ema_half_life_images: Optional[float] = None  # if set, overrides ema_decay (batch-size free)
    ema_warmup: bool = True  # decay_k = min(decay, (1 + k) / (10 + k))
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    activation_checkpointing: bool = False
    distributed: str = "ddp"  # ddp | fsdp  (used when launched with torchrun)
    out_dir: str = "runs/default"
    log_every: int = 50
    sample_every: int = 0  # 0: only at the end
    ckpt_every: int = 500  # 0: only at the end
    keep_last: int = 2
    time_limit_minutes: Optional[float] = None  # stop (with a checkpoint) after this much training time
    num_sample_images: int = 64
    tensorboard: bool = True
    progress: bool = True

    def validate(self, where: str) -> None:
        positive = ("steps", "batch_size", "grad_accum", "lr", "log_every", "keep_last")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        for key in ("warmup_steps", "sample_every", "ckpt_every", "weight_decay", "grad_clip", "num_sample_images"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key} must be >= 0, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum != 0:
            raise ConfigError(f"{where}.batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{where}.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            raise ConfigError(f"{where}.time_limit_minutes must be positive, got {self.time_limit_minutes}")
        if self.ema_half_life_images is not None and self.ema_half_life_images <= 0:
            raise ConfigError(f"{where}.ema_half_life_images must be positive, got {self.ema_half_life_images}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{where}.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"{where}.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"{where}.distributed must be ddp or fsdp, got {self.distributed!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"{where}.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class SampleConfig:
    sampler: str = "euler"  # euler | heun | sde | dopri5
    steps: int = 50
    cfg_scale: float = 1.0
    batch_size: int = 256

    def validate(self, where: str) -> None:
        if self.steps <= 0:
            raise ConfigError(f"{where}.steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise ConfigError(f"{where}.batch_size must be positive, got {self.batch_size}")
        if self.cfg_scale < 0:
            raise ConfigError(f"{where}.cfg_scale must be >= 0, got {self.cfg_scale}")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the chosen method's config dataclass (see selfflow.methods)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["method"] = {"name": self.method_name(), **dataclasses.asdict(self.method)}
        return out

    def method_name(self) -> str:
        from selfflow.methods import method_name_of

        return method_name_of(self.method)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce_value(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only the safe cases (int → float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce_value(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {typing.get_args(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [coerce_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; known: {sorted(names)}")
    kwargs = {k: coerce_value(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def parse_scalar(text: str) -> Any:
    """Parse the value side of ``--set key=value`` the way YAML would (``3e-4``, ``true``, ``null``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-3" as a string; accept it as a float.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to the raw YAML mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must be section.key (e.g. train.lr)")
        section, name = parts
        if section not in SECTION_TYPES and section != "method":
            raise ConfigError(f"override {key!r}: unknown section {section!r}; known: {sorted([*SECTION_TYPES, 'method'])}")
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: section {section!r} is not a mapping")
        node[name] = parse_scalar(text)
    return raw


SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "sample": SampleConfig}


def config_from_dict(raw: Any, where: str = "config") -> RunConfig:
    from selfflow.methods import method_config_from_dict

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTION_TYPES) - {"method"})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted([*SECTION_TYPES, 'method'])}")
    sections = {name: from_dict(cls, raw.get(name), name) for name, cls in SECTION_TYPES.items()}
    method = method_config_from_dict(raw.get("method"))
    return RunConfig(method=method, **sections)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw: Any = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: malformed YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return config_from_dict(raw, where)
    except ConfigError as exc:
        if path is not None and not str(exc).startswith(str(path)):
            raise ConfigError(f"{path}: {exc}") from None
        raise
