"""The ``method`` section of representation learning (StableRep, SupCon, SimCLR, supervised) and the linear probe."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from selfflow.config.fields import check_choice
from selfflow.config.train import check_device
from selfflow.errors import ConfigError


# ---- representation learning (selfflow.methods.represent; docs/methods.md#stablerep) ----
REPRESENT_ENCODERS = ("vit", "resnet")


@dataclass(frozen=True)
class RepresentConfig:
    """What StableRep, SimCLR and supervised training share: the encoder, its head, the augmentations.

    The trained network is the encoder: ``vit`` is made of the DiT's blocks with the ``model``
    section's depth, width, heads and patch size; ``resnet`` is a small ResNet-style CNN of ``width``
    channels (doubled at each of its three stages)."""

    encoder: str = "vit"  # vit | resnet
    width: int = 32  # resnet only: channels of the first stage
    stem_stride: int = 1  # resnet only: 2 halves the image in the stem (28×28 → stages at 14, 7, 4: ~4× cheaper)
    head_hidden: int = 256  # the MLP head's hidden width (StableRep, SimCLR)
    embed_dim: int = 64  # the head's output: the embedding the contrastive loss compares
    temperature: float = 0.1  # τ of the contrastive losses
    augment_strength: float = 1.0  # 0: no augmentation (selfflow.represent.augment)

    def validate(self, where: str) -> None:
        check_choice(self.encoder, REPRESENT_ENCODERS, f"{where}.encoder")
        for key in ("width", "head_hidden", "embed_dim", "temperature"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        if self.augment_strength < 0:
            raise ConfigError(f"{where}.augment_strength must be >= 0, got {self.augment_strength}")
        check_choice(self.stem_stride, (1, 2), f"{where}.stem_stride")


@dataclass(frozen=True)
class StableRepConfig(RepresentConfig):
    """Multi-positive contrastive loss with caption rows as identities (data: a synth set; its groups)."""

    caption_weight: float = 0.0  # StableRep+: weight of the image–caption term (the paper: 1); 0: plain StableRep
    images_per_caption: int = 0  # k of the set's m images per caption row in each batch, drawn at random; 0: all m

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.caption_weight < 0:
            raise ConfigError(f"{where}.caption_weight must be >= 0, got {self.caption_weight}")
        if self.images_per_caption < 0 or self.images_per_caption == 1:
            raise ConfigError(f"{where}.images_per_caption must be 0 (all) or >= 2 (an anchor needs a positive), "
                              f"got {self.images_per_caption}")


@dataclass(frozen=True)
class SupConConfig(RepresentConfig):
    """Supervised contrastive learning: the multi-positive loss with *class labels* as identities (real labelled
    images, or a synth set's classes) — label-supervised, compared with supervised training, not with SimCLR."""

    images_per_caption: int = 0  # on a synth set: k of its m images per row in each batch; 0: all m

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.images_per_caption < 0:
            raise ConfigError(f"{where}.images_per_caption must be >= 0, got {self.images_per_caption}")


@dataclass(frozen=True)
class SimClrConfig(RepresentConfig):
    """Two augmented views per image, InfoNCE."""


@dataclass(frozen=True)
class SupervisedConfig(RepresentConfig):
    """Cross-entropy on the class labels through a linear classifier on the encoder's features."""


REPRESENT_METHODS = ("stablerep", "supcon", "simclr", "supervised")


@dataclass(frozen=True)
class ProbeConfig:
    """Probes of a frozen encoder on real labelled images (selfflow.represent.probes)."""

    data: str = "digits"  # a data.name with train and test splits
    path: Optional[str] = None
    weights: str = "model"  # model | ema
    max_iter: int = 1000  # linear probe: L-BFGS iterations at most (it stops earlier once converged)
    weight_decays: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # the L2 strengths tried on held-out train images
    holdout: float = 0.1  # the share of the train split held out to choose the L2 strength (never the test split)
    knn_k: int = 20
    knn_temperature: float = 0.07
    few_shot: tuple[int, ...] = (1, 5, 10)  # labelled images per class
    few_shot_trials: int = 5  # random draws of the few labelled images, averaged
    seed: int = 0
    device: str = "auto"

    def validate(self, where: str) -> None:
        check_choice(self.data, ("digits", "mnist", "fashion-mnist", "idx", "folder", "npz"), f"{where}.data")
        if self.data == "digits" and self.path is not None:
            raise ConfigError(f"{where}.path: the digits set takes no path, got {self.path!r}")
        if self.data != "digits" and not self.path:
            raise ConfigError(f"{where}.path: {where}.data={self.data} needs a path")
        check_choice(self.weights, ("model", "ema"), f"{where}.weights")
        for key in ("max_iter", "knn_k", "knn_temperature", "few_shot_trials"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        if not self.weight_decays or any(wd < 0 for wd in self.weight_decays):
            raise ConfigError(f"{where}.weight_decays: one or more L2 strengths >= 0, got {list(self.weight_decays)}")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"{where}.holdout must be in (0, 1), got {self.holdout}")
        if any(k <= 0 for k in self.few_shot):
            raise ConfigError(f"{where}.few_shot: labels per class must be positive, got {list(self.few_shot)}")
        check_device(self.device, f"{where}.device")
