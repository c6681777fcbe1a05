"""``selfflow pipeline``: the stages (teacher → student → synthetic set → encoder → probes) and their configs."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from selfflow.config.fields import check_choice, from_dict, parse_scalar, read_yaml_mapping
from selfflow.config.represent import ProbeConfig, REPRESENT_METHODS
from selfflow.config.run import RunConfig, config_from_dict
from selfflow.config.sample import NOISE_INJECTING_SAMPLERS, SAMPLER_NAMES
from selfflow.config.train import check_device
from selfflow.errors import ConfigError


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
