"""The optional ``modality`` section: video, audio, audio-video and action data (selfflow.modalities)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from selfflow.config.fields import check_choice
from selfflow.errors import ConfigError


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
