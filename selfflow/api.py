"""The Python API: the few names a library user needs, exported from ``selfflow``.

    import selfflow
    g = selfflow.load("runs/digits_self_flow")          # a run, a checkpoint or an exported folder
    x = g.sample(16, seed=0)                             # (16, C, H, W) in [-1, 1], image k from seed k
    g.save_pretrained("model/")                          # weights + config.json + the sampler settings

:func:`load` reads any generator folder through :func:`selfflow.loader.load_model` and returns a
:class:`Generator`, whose :meth:`Generator.sample` draws exactly what the command line draws for the
same folder, seed and settings (sample k here is ``selfflow sample``'s image k): seeds ``seed + k``,
labels cycled like ``--labels`` (default ``(seed + k) mod classes``), prompts in rows like
``--prompt``, the run's saved ``sample`` section as the defaults.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from selfflow.config import RunConfig, SampleConfig, load_config, sample_settings
from selfflow.errors import ConfigError
from selfflow.loader import LoadedGenerator, load_model
from selfflow.sampling import generate

__all__ = ["Generator", "load", "train", "load_config", "generate"]

Labels = Union[None, int, Sequence[int], torch.Tensor]


def load(path: str | Path, weights: str = "ema", device: str | torch.device = "auto") -> "Generator":
    """The generator in ``path``: a run folder (its newest checkpoint), a training checkpoint folder or
    an exported model folder, of any kind (class-label, unconditional, caption-conditioned, one-step
    student, video/audio/actions). ``weights``: ``"ema"`` (default) or ``"model"`` of a training
    checkpoint; ``device``: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:N"``."""
    from selfflow.device import resolve_device

    device = resolve_device(str(device), "device")
    return Generator(load_model(path, weights, device), device)


def train(config: Union[RunConfig, str, Path, None] = None, overrides: Sequence[str] = ()) -> dict:
    """Train a run: ``config`` is a :class:`~selfflow.config.RunConfig` (from :func:`load_config`) or a
    YAML path; ``overrides`` are ``"key=value"`` strings as for ``selfflow train --set``. Returns the
    trainer's result (``status``, ``step``, ``seconds``, …)."""
    from selfflow.trainer import train as run_training

    if not isinstance(config, RunConfig):
        config = load_config(config, list(overrides))
    elif overrides:
        raise ConfigError("overrides apply to a YAML path; a RunConfig is already resolved (use load_config(path, overrides))")
    return run_training(config)


class Generator:
    """A loaded generator: ``.model`` (the network), ``.folder``, ``.kind`` (image | text | modality),
    ``.settings`` (the saved ``sample`` section), ``.text`` / ``.modality`` where they apply."""

    def __init__(self, loaded: LoadedGenerator, device: torch.device):
        self.loaded = loaded
        self.model = loaded.model
        self.folder, self.kind, self.text, self.modality = loaded.folder, loaded.kind, loaded.text, loaded.modality
        self.device = torch.device(device)
        self.settings: SampleConfig = sample_settings(loaded.folder)
        self._encoder = None

    def __repr__(self) -> str:
        return f"Generator(kind={self.kind!r}, folder={str(self.folder)!r}, sample_shape={self.sample_shape})"

    @property
    def config(self):
        """The network's :class:`~selfflow.config.ModelConfig`."""
        return self.model.config

    @property
    def layout(self):
        """The token layout (:class:`selfflow.modalities.tokens.Layout`): an image is one 2-D part."""
        return self.model.layout

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W) for images, the layout's sample shape for token models."""
        return tuple(self.model.sample_shape)

    @property
    def num_classes(self) -> int:
        """Class labels of an image or modality model (0: unconditional or caption-conditioned)."""
        return 0 if self.text is not None else int(self.model.num_classes or 0)

    # ---- sampling ---------------------------------------------------------------------------
    def sample(self, n: int, labels: Labels = None, prompt: Union[None, str, Sequence[str]] = None, seed: int = 0,
               sampler: Optional[str] = None, steps: Optional[int] = None, cfg_scale: Optional[float] = None,
               device: Union[None, str, torch.device] = None, *, batch_size: Optional[int] = None,
               sampler_options: Optional[dict] = None, precision: str = "auto", decode: bool = True,
               progress: bool = False) -> torch.Tensor:
        """``n`` samples on the CPU, sample k from seed ``seed + k``: (n, C, H, W) in [-1, 1] for images
        (decoded by the run's autoencoder for a latent model when it is at hand, else the latents),
        (n, *sample_shape) for token models.

        ``labels``: one class, or a list cycled over the samples (``selfflow sample --labels``); default
        ``(seed + k) mod classes``. ``prompt``: a caption or a list of them (caption-conditioned models),
        ``ceil(n / P)`` samples per prompt in order (``--prompt``). ``sampler``, ``steps``, ``cfg_scale``,
        ``batch_size`` default to the run's ``sample`` section; ``precision``: auto (bf16 autocast on
        CUDA), fp32 or bf16; ``device`` moves the network there first.
        """
        from selfflow.device import autocast_dtype, resolve_device

        if int(n) < 1:
            raise ConfigError(f"n must be positive, got {n}")
        n = int(n)
        if device is not None:
            self.device = resolve_device(str(device), "device")
            self.model.to(self.device)
        if self.text is not None:  # captions: an image model, or a video model (its clips (n, 1, T, S, S))
            return self._sample_prompts(n, prompt, labels, seed, sampler, steps, cfg_scale, batch_size, sampler_options, precision)
        if prompt is not None:
            raise ConfigError(f"prompt: {self.folder} is not caption-conditioned (no text section); use labels")
        settings = self._settings(sampler, steps, cfg_scale, batch_size, self.num_classes)
        options = self._sampler_options(sampler_options, settings)
        seeds = list(range(seed, seed + n))
        label_tensor = self._labels(labels, n)
        if self.kind == "modality":
            if self.modality.kind in ("actions", "metaworld"):
                raise ConfigError("a policy samples action chunks for observations: use selfflow.modalities.sampling.make_policy(g.model)")
            # as `selfflow modality sample`: float32, at most n per batch
            return generate(self.model, num_samples=n, seeds=seeds, labels=label_tensor, sampler=settings.sampler,
                            steps=settings.steps, cfg_scale=settings.cfg_scale, batch_size=min(settings.batch_size, n),
                            device=self.device, image_shape=self.sample_shape, sampler_options=options, progress=progress).images
        autoencoder = latent_autoencoder(self.folder, None)
        result = generate(self.model, num_samples=n, seeds=seeds, labels=label_tensor, sampler=settings.sampler,
                          steps=settings.steps, cfg_scale=settings.cfg_scale, batch_size=settings.batch_size,
                          device=self.device, image_shape=self.sample_shape, clip=autoencoder is None,
                          autocast_dtype=autocast_dtype(precision, self.device), sampler_options=options, progress=progress)
        if autoencoder and decode:
            from selfflow.autoencoders import decode_latents, load_autoencoder

            return decode_latents(load_autoencoder(autoencoder, self.device).decode, result.images, settings.batch_size, self.device)
        return result.images

    def _settings(self, sampler, steps, cfg_scale, batch_size, num_classes) -> SampleConfig:
        return sample_settings(self.folder, sampler=sampler, steps=steps, cfg_scale=cfg_scale, batch_size=batch_size,
                               num_classes=num_classes)

    @staticmethod
    def _sampler_options(options: Optional[dict], settings: SampleConfig) -> dict:
        from selfflow.sampling import parse_sampler_options

        items = [f"{key}={json.dumps(value)}" for key, value in (options or {}).items()]
        return parse_sampler_options(items, settings.sampler, settings.steps, flag="sampler_options")

    def _labels(self, labels: Labels, n: int) -> Optional[torch.Tensor]:
        """Labels cycled over n samples, checked against the model's classes; None: the default."""
        if labels is None:
            return None
        values = [int(labels)] if isinstance(labels, int) else [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
        if self.num_classes == 0:
            raise ConfigError(f"labels {values[:5]}: {self.folder} is unconditional (no classes)")
        bad = [v for v in values if not 0 <= v < self.num_classes]
        if bad or not values:
            raise ConfigError(f"labels {bad or values} outside 0..{self.num_classes - 1} (the model has {self.num_classes} classes)")
        return torch.tensor([values[k % len(values)] for k in range(n)], dtype=torch.long)

    def _sample_prompts(self, n, prompt, labels, seed, sampler, steps, cfg_scale, batch_size, sampler_options, precision):
        from selfflow.device import autocast_dtype
        from selfflow.text.data import make_encoder

        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts:
            raise ConfigError(f"{self.folder} is caption-conditioned: give prompt=\"…\" (or a list of prompts)")
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ConfigError("prompt: an empty prompt or not a string; write the caption")
        if labels is not None:
            raise ConfigError("labels: a caption-conditioned model takes prompt=, not class labels")
        if self._encoder is None:
            self._encoder = make_encoder(self.text)
        self.model.set_bank(self._encoder.encode(prompts))
        settings = self._settings(sampler, steps, cfg_scale, batch_size, len(prompts))
        per_prompt = -(-n // len(prompts))  # rows of `selfflow sample --prompt`: image k has prompt k // per_prompt
        return generate(self.model, num_samples=n, seeds=list(range(seed, seed + n)),
                        labels=torch.arange(n) // per_prompt, sampler=settings.sampler, steps=settings.steps,
                        cfg_scale=settings.cfg_scale, batch_size=settings.batch_size, device=self.device,
                        image_shape=self.sample_shape, autocast_dtype=autocast_dtype(precision, self.device),
                        sampler_options=self._sampler_options(sampler_options, settings), progress=False).images

    # ---- files ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """``model.safetensors`` + ``config.json`` (the model, its ``sample`` settings, and the ``text`` or
        ``modality`` section it needs) into ``directory``, which :func:`load` reads back."""
        return export_model(self.loaded, directory, self.settings)


def export_model(loaded: LoadedGenerator, directory: str | Path, settings: SampleConfig) -> Path:
    """The exported model folder of ``loaded`` (Hub-ready: ``model.safetensors``, ``config.json`` with the
    sections :func:`load` reads and the run's sampler settings, ``README.md`` the model card)."""
    from selfflow.files import atomic_directory, save_tensors, write_json

    meta = {"model": dataclasses.asdict(loaded.model.config), "sample": dataclasses.asdict(settings)}
    if loaded.text is not None:  # a caption model, image or video: its encoder
        meta.update(text_dim=loaded.model.text_dim, text=dataclasses.asdict(loaded.text))
    if loaded.kind == "modality":
        meta["modality"] = dataclasses.asdict(loaded.modality)
        if loaded.run is not None:
            meta["run"] = loaded.run  # its data and method settings: `selfflow modality eval` reads them
    latent = (loaded.run or {}).get("data", {}) if loaded.run else loaded.meta.get("data")
    if isinstance(latent, dict) and latent.get("name") == "latents":
        meta["data"] = {"name": "latents", "path": latent.get("path")}  # where the autoencoder that decodes is named
    with atomic_directory(directory) as tmp:
        save_tensors(loaded.model.state_dict(), tmp / "model.safetensors")
        write_json(meta, tmp / "config.json")
        (tmp / "README.md").write_text(model_card(loaded, settings))
    return Path(directory)


def _pairs_teacher_data(data: dict, depth: int = 0) -> Optional[dict]:
    """The data section of the teacher whose checkpoint made these pairs (set.json's source), followed through
    pairs of pairs; None when it cannot be read. Pairs of a latent teacher are latents."""
    try:
        source = (json.loads((Path(data.get("path") or "") / "set.json").read_text()).get("source") or {}).get("checkpoint")
        teacher = json.loads((Path(source) / "config.json").read_text())
    except (OSError, json.JSONDecodeError, AttributeError, TypeError):
        return None
    found = (teacher.get("run") or {}).get("data") or teacher.get("data") or {}
    if found.get("name") == "pairs" and depth < 8:
        return _pairs_teacher_data(found, depth + 1)
    return found


def latent_autoencoder(folder: Path, given: Optional[str]) -> Optional[str]:
    """None for a pixel model; for a latent model the autoencoder folder, or "" when none is at hand."""
    try:
        meta = json.loads((folder / "config.json").read_text())
        run = meta.get("run") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        meta, run = {}, {}
    data = run.get("data") or meta.get("data") or {}
    if data.get("name") == "pairs":  # a student of reflow pairs learned from what its teacher learned from
        data = _pairs_teacher_data(data) or data
    if given:  # checked before any sampling
        if (run or meta.get("data")) and data.get("name") != "latents":
            raise ConfigError(f"--autoencoder {given}: {folder} generates pixels, not latents; leave --autoencoder out")
        if not Path(given).is_dir():
            raise ConfigError(f"--autoencoder {given}: no such folder")
        return given
    if data.get("name") != "latents":
        return None
    try:
        latent_set = json.loads((Path(data.get("path") or "") / "set.json").read_text())
        path = (latent_set.get("autoencoder") or {}).get("path") or ""
    except (OSError, json.JSONDecodeError):
        path = ""
    return path if path and Path(path).is_dir() else ""


# --------------------------------------------------------------------------------------------
# the model card: README.md of an exported folder (Hub-ready)
# --------------------------------------------------------------------------------------------
def run_folder_of(folder: Path) -> Optional[Path]:
    """The run folder of a training checkpoint (``<run>/checkpoints/step_N``), else None."""
    return folder.parent.parent if folder.parent.name == "checkpoints" else None


def measured_figures(folder: Path) -> list[str]:
    """What was measured for this checkpoint: the last logged training loss, and every number of an
    ``eval.json`` beside the checkpoint or in its run folder."""
    lines = []
    run = run_folder_of(folder)
    metrics = run / "metrics.jsonl" if run else None
    if metrics is not None and metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().startswith("{")]
        losses = [r for r in records if isinstance(r.get("loss"), (int, float))]
        if losses:
            lines.append(f"- training loss {losses[-1]['loss']:.4g} at step {losses[-1].get('step')} (metrics.jsonl)")
    for candidate in (folder / "eval.json", *([run / "eval.json"] if run else [])):
        if candidate.is_file():
            try:
                report = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            numbers = {k: v for k, v in (report.get("metrics") or report).items() if isinstance(v, (int, float))}
            lines += [f"- {key}: {value:.4g} ({candidate.name})" for key, value in sorted(numbers.items())]
            break
    return lines or ["- none recorded beside this checkpoint (run `selfflow eval --ckpt …` and export again)"]


def model_card(loaded: LoadedGenerator, settings: SampleConfig, fmt: str = "selfflow") -> str:
    """A model card (README.md with Hub metadata): what was trained on what, how, and what was measured."""
    run = loaded.run or {}
    config = loaded.model.config
    data = run.get("data") or {}
    method = (run.get("method") or {}).get("name", "unknown")
    train = run.get("train") or {}
    params = sum(p.numel() for p in loaded.model.parameters())
    depth, width, heads = config.resolved_dims()
    conditioning = {"text": "captions", "modality": f"{loaded.modality.kind if loaded.modality else ''} tokens"}.get(
        loaded.kind, f"{config.num_classes} classes" if config.num_classes else "unconditional")
    if loaded.text is not None and loaded.modality is not None:
        conditioning = f"captions, {loaded.modality.kind} tokens"
    if fmt == "diffusers":
        usage = ("```python\nfrom selfflow.hub import SelfFlowPipeline  # pip install selfflow[diffusers]\n\n"
                 "pipe = SelfFlowPipeline.from_pretrained(\"THIS_FOLDER\")\n"
                 "images = pipe(class_labels=[0, 1, 2], num_inference_steps=50).images  # (3, C, H, W) in [0, 1], Euler\n```\n")
    else:
        usage = ("```python\nimport selfflow\n\ng = selfflow.load(\"THIS_FOLDER\")\n"
                 "x = g.sample(16, seed=0)  # (16, C, H, W) in [-1, 1], the settings below\n```\n")
    tags = list(dict.fromkeys(["selfflow", "flow-matching", method.replace("_", "-")]))  # flow_matching: once
    pipeline_tag = "unconditional-image-generation" if loaded.kind == "image" and not config.num_classes else (
        "text-to-image" if loaded.kind == "text" else "text-to-video" if loaded.text is not None else "image-generation")
    lines = [
        "---", f"library_name: {'diffusers' if fmt == 'diffusers' else 'selfflow'}", f"pipeline_tag: {pipeline_tag}",
        "tags:", *[f"- {t}" for t in tags], "---", "",
        f"# {run_folder_of(loaded.folder).name if run_folder_of(loaded.folder) else loaded.folder.name}", "",
        f"A flow-matching transformer ({loaded.kind} generator, {conditioning}) trained with selfflow.", "",
        "## Training", "",
        f"- data: {data.get('name', 'unknown')}" + (f" ({data.get('path')})" if data.get("path") else ""),
        f"- method: {method}",
        f"- steps: {train.get('steps', 'unknown')}, batch size {train.get('batch_size', 'unknown')}, "
        f"learning rate {train.get('lr', 'unknown')}, EMA weights: {loaded.weights.name == 'ema.safetensors'}",
        f"- network: depth {depth}, width {width}, {heads} heads, patch {config.patch_size}, "
        f"{params / 1e6:.2f} M parameters, sample shape {tuple(getattr(loaded.model, 'sample_shape', None) or (config.in_channels, config.image_size, config.image_size))}",
        "", "## Sampling", "",
        f"- the run's settings: sampler {settings.sampler}, {settings.steps} steps, guidance scale {settings.cfg_scale}",
        "- time convention: x_t = (1 − t)·x0 + t·ε, the network predicts v = ε − x0, sampling runs t = 1 → 0",
        *(["- the diffusers pipeline integrates with Euler (FlowMatchEulerDiscreteScheduler); "
           f"{settings.sampler} is available through selfflow"] if fmt == "diffusers" and settings.sampler != "euler" else []),
        "", "## Measured", "", *measured_figures(loaded.folder), "", "## Use", "", usage,
    ]
    return "\n".join(lines)
