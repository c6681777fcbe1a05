"""Training methods: siblings with one interface, ``loss(model, batch) → (loss, logs)``.

Their equations, each with the function that implements it: docs/methods.md.

Add a method by writing its config dataclass in ``selfflow.config`` (listed in ``METHOD_CONFIGS``)
and a module here with a ``Method`` subclass that registers itself.
"""
from __future__ import annotations

from typing import Any

from selfflow.config import method_config_from_dict, method_name_of  # noqa: F401  (re-exported)
from selfflow.methods.base import Batch, BatchRandom, Method, Objective
from selfflow.methods.flow_matching import FlowMatching

METHODS: dict[str, type[Method]] = {FlowMatching.name: FlowMatching}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def _load_optional_methods() -> None:
    # Methods in their own modules register themselves on import.
    import importlib

    for module in ("self_flow", "repa", "reflow", "distill", "dmd", "represent", "regression"):
        try:
            importlib.import_module(f"selfflow.methods.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"selfflow.methods.{module}":
                raise


def build_network(run) -> Any:
    """The network a run trains: the DiT, or the encoder of a representation method."""
    _load_optional_methods()
    return METHODS[method_name_of(run.method)].build_network(run)


def build_method(config: Any, model) -> Method:
    _load_optional_methods()
    return METHODS[method_name_of(config)](config, model)


__all__ = ["Batch", "BatchRandom", "Method", "Objective", "METHODS", "build_method", "build_network", "method_config_from_dict", "register"]
