"""A run's configuration: the sections together (:class:`RunConfig`), read from YAML and overrides, checked before any work."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from selfflow.config.data import DataConfig
from selfflow.config.fields import from_dict, parse_scalar, read_yaml_mapping
from selfflow.config.methods import PAIR_METHODS, method_config_from_dict, method_name_of
from selfflow.config.modality import DIGIT_SOURCES, ModalityConfig, POLICY_KINDS
from selfflow.config.model import ModelConfig
from selfflow.config.represent import REPRESENT_METHODS
from selfflow.config.sample import SampleConfig
from selfflow.config.text import TextConfig
from selfflow.config.train import TrainConfig
from selfflow.errors import ConfigError


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
            self._validate_captioned_video()
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

    def _validate_captioned_video(self) -> None:
        """A text section with a modality: captions condition moving-digit video (a text-to-video model)."""
        kind, method, modality = self.modality.kind, self.method_name(), self.modality
        if kind != "video":
            raise ConfigError(f"modality.kind={kind} with a text section: captions condition images or video "
                              f"(modality.kind=video), not {kind}; drop one section")
        if method not in ("flow_matching", "self_flow"):
            raise ConfigError(f"method.name={method}: a caption-conditioned video trains flow_matching or self_flow")
        if not self.data.class_conditional:
            raise ConfigError("text: a caption-conditioned run needs data.class_conditional true (the captions are its condition)")
        if self.model.num_classes:
            raise ConfigError(f"model.num_classes={self.model.num_classes}: a caption-conditioned model has no classes; leave it unset")
        if self.text.captions == "generated" and modality.digits_per_clip != 1:
            raise ConfigError(f"modality.digits_per_clip={modality.digits_per_clip}: generated captions describe one digit "
                              f"per clip; use 1, or a caption file (text.captions) that describes every digit")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


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
