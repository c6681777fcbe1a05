"""selfflow: flow-matching transformers that learn their own representations (Self-Flow),
their samplers, one-step students and StableRep, in one PyTorch toolkit.

    import selfflow
    g = selfflow.load("runs/digits_self_flow")     # run, checkpoint or exported folder, any kind
    x = g.sample(16, seed=0)                        # (16, C, H, W) in [-1, 1]

The public names (``load``, ``train``, ``load_config``, ``generate``, ``Generator``) live in
:mod:`selfflow.api`, ``DiT`` in :mod:`selfflow.model`; they are imported on first use, so
``import selfflow`` stays light.
"""

__version__ = "0.1.0"
__all__ = ["Generator", "load", "train", "load_config", "generate", "DiT", "__version__"]


def __getattr__(name: str):
    if name in ("Generator", "load", "train", "load_config", "generate"):
        from selfflow import api

        return getattr(api, name)
    if name == "DiT":  # the network class (DiT.from_pretrained reads a run, checkpoint or exported folder)
        from selfflow.model import DiT

        return DiT
    raise AttributeError(f"module 'selfflow' has no attribute {name!r}")
