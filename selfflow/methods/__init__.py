"""Training methods: siblings with one interface, ``loss(model, batch) → (loss, logs)``.

Add a method by writing a module with a ``Method`` subclass and its ``Config`` dataclass and
listing it in :data:`METHODS`.
"""
from __future__ import annotations

from typing import Any

from selfflow.config import ConfigError, from_dict
from selfflow.methods.base import Batch, BatchRandom, Method, Objective
from selfflow.methods.flow_matching import FlowMatching

METHODS: dict[str, type[Method]] = {FlowMatching.name: FlowMatching}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def _load_optional_methods() -> None:
    # Methods in their own modules register themselves on import.
    import importlib

    for module in ("self_flow", "repa"):
        try:
            importlib.import_module(f"selfflow.methods.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"selfflow.methods.{module}":
                raise


def method_config_from_dict(raw: Any) -> Any:
    _load_optional_methods()
    raw = dict(raw or {})
    name = raw.pop("name", "flow_matching")
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {sorted(METHODS)}")
    return from_dict(METHODS[name].Config, raw, "method")


def method_name_of(config: Any) -> str:
    _load_optional_methods()
    for name, cls in METHODS.items():
        if type(config) is cls.Config:
            return name
    raise ConfigError(f"no method has config type {type(config).__name__}")


def build_method(config: Any, model) -> Method:
    return METHODS[method_name_of(config)](config, model)


__all__ = ["Batch", "BatchRandom", "Method", "Objective", "METHODS", "build_method", "method_config_from_dict", "register"]
