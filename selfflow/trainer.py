"""The one training loop. Methods plug in through ``loss(model, batch)``; they never fork it.

Performance switches in plain sight (nanoGPT-style): bf16 autocast on CUDA, ``torch.compile``,
DDP under torchrun, gradient accumulation, activation checkpointing. Trust: atomic checkpoints,
exact resume (weights, EMA, optimizer, every RNG, data position), SIGTERM/SIGINT save and exit,
a non-finite loss stops before the weights are touched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import selfflow.checkpoint as ckpt
from selfflow.arguments import TqdmLogHandler
from selfflow.config import CUDA_GRAPH_MODES, ConfigError, RunConfig
from selfflow.errors import DataError
from selfflow.files import check_output_folder, lock_folder, mark_output_folder
from selfflow.imageio import uint8_to_float
from selfflow.distributed import DistInfo, all_reduce_mean, any_rank, cleanup, init_distributed
from selfflow.ema import EMA, decay_from_half_life
from selfflow.methods import Batch, BatchRandom, Objective, build_method, build_network
from selfflow.model import DiT

log = logging.getLogger("selfflow")


from selfflow.errors import TrainingDiverged  # noqa: E402,F401  (re-exported)


# --------------------------------------------------------------------------------------------
# set-up helpers
# --------------------------------------------------------------------------------------------
from selfflow.device import autocast_dtype, resolve_device  # noqa: E402,F401  (moved; re-exported)


# A run folder written before markers existed is known by these; a pipeline stage folder by its stage marker.
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "train.log", "stage.pending.json", "stage.json")


def setup_logging(out_dir: Path | None, is_main: bool) -> None:
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = TqdmLogHandler(sys.stdout)  # through tqdm.write: a log line never breaks a progress bar
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if out_dir is not None and is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(out_dir / "train.log")
        file.setFormatter(fmt)
        log.addHandler(file)


def load_data(config: RunConfig):
    from selfflow.data import load_dataset

    d = config.data
    if config.text is not None:  # a missing caption file is named before any images or clips are read or made
        from selfflow.text.data import check_caption_source

        check_caption_source(config.text)
    if config.modality is not None:  # video, audio, audio-video or actions, made from a seed (selfflow.modalities)
        from selfflow.modalities.data import load_modality_dataset

        dataset = load_modality_dataset(config)
        if config.text is not None:  # caption-conditioned video: (clip, caption) pairs, captions as for images
            from selfflow.text.data import captioned_dataset

            return captioned_dataset(dataset, config.text, d.name, d.path)
        return dataset
    if config.text is not None:  # (image, caption) pairs instead of labels, or pairs made from prompts (selfflow.text)
        from selfflow.text.data import load_captioned

        return load_captioned(config.text, d.name, d.path, d.split, d.image_size, d.channels)
    dataset = load_dataset(d.name, path=d.path, split=d.split, image_size=d.image_size, channels=d.channels, crop=d.crop,
                           on_bad_image=d.on_bad_image, image_column=d.image_column, label_column=d.label_column)
    if getattr(dataset, "texts", None) is not None:
        raise DataError(f"data.path={d.path}: pairs made from caption prompts (prompts in set.json), but the run has no "
                        f"text section; add the teacher's text section (and train.init_from the teacher)")
    return dataset


def resolve_config(config: RunConfig, dataset) -> RunConfig:
    """The run's config with the model's image size, channels and classes filled from the data.

    Returns a new (frozen) config; mismatches between a given value and the data name the key.
    Everything after this point reads the config and never writes it.
    """
    m = config.model
    num_classes = dataset.num_classes if config.data.class_conditional else 0
    if config.modality is not None:  # the token layout comes from the modality section, not from image sizes
        if m.num_classes is not None and m.num_classes != num_classes:
            raise ConfigError(f"model.num_classes={m.num_classes} but the modality data gives {num_classes}")
        return dataclasses.replace(config, model=dataclasses.replace(m, num_classes=num_classes))
    filled = {}
    for key, value in (("image_size", dataset.image_size), ("in_channels", dataset.channels), ("num_classes", num_classes)):
        current = getattr(m, key)
        if current is None:
            filled[key] = value
        elif current != value:
            raise ConfigError(f"model.{key}={current} but the data set {config.data.name!r} gives {value}")
    model = dataclasses.replace(m, **filled)
    if model.image_size % model.patch_size != 0:
        raise ConfigError(f"model.patch_size={model.patch_size} does not divide the image size {model.image_size}")
    return dataclasses.replace(config, model=model)


def lr_at(step: int, config: RunConfig) -> float:
    """Linear warm-up to train.lr, then constant (the SiT/REPA recipe)."""
    warmup = config.train.warmup_steps
    return config.train.lr * min(1.0, (step + 1) / warmup) if warmup > 0 else config.train.lr


def compiled_objective(model: torch.nn.Module, method, train, whole_step: bool = True) -> Objective:
    """Model + method, compiled as ``train.compile`` and ``train.compile_mode`` ask.

    A method with a split step (:attr:`Method.splits_step`) has its :meth:`Method.compute` compiled whole,
    ``fullgraph=True``: student and teacher forwards and the losses in one graph (a graph break is an
    error, not a slow step); its draws run eagerly. Other methods, and FSDP, compile the model alone."""
    if not train.compile:
        return Objective(model, method)
    mode = None if train.compile_mode == "default" else train.compile_mode
    if whole_step and method.splits_step:
        return Objective(model, method, torch.compile(method.compute, fullgraph=True, mode=mode))
    return Objective(torch.compile(model, mode=mode), method)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: RunConfig, dataset=None):
        t = config.train
        self.device = resolve_device(t.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if t.batch_size % (self.dist.world_size * t.grad_accum) != 0:
            raise ConfigError(
                f"train.batch_size={t.batch_size} must be divisible by world size ({self.dist.world_size}) × grad_accum ({t.grad_accum})"
            )
        self.out_dir = Path(t.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        if self.dist.is_main:  # the output-folder rule, before anything is loaded or written
            check_output_folder(self.out_dir, "run", recognise=RUN_FILES, flag="train.out_dir")
        self.amp_dtype = autocast_dtype(t.precision, self.device)

        # Data, model and method first: a bad data path or encoder file fails before the run folder exists.
        self.dataset = dataset if dataset is not None else load_data(config)
        self.config = config = resolve_config(config, self.dataset)
        if t.batch_size > len(self.dataset):
            raise ConfigError(f"train.batch_size={t.batch_size} is larger than the data set ({len(self.dataset)} items of "
                              f"data.name={config.data.name!r}); lower train.batch_size or use more data")
        torch.manual_seed(t.seed)
        self.model = build_network(config).to(self.device)  # the DiT; an encoder for representation methods
        if t.init_from:  # the teacher's EMA weights; a checkpoint of this run (maybe_resume) still wins
            from selfflow.methods.one_step import load_init_weights

            load_init_weights(self.model, t.init_from)
        if config.text is not None:  # encode the captions once (disk cache) into the model's caption bank
            from selfflow.text.data import make_encoder

            self.dataset.attach(self.model, make_encoder(config.text))
        self.model.activation_checkpointing = t.activation_checkpointing
        self.method = build_method(config.method, self.model)
        self.method.bind_data(self.dataset)
        self.method.to(self.device)
        decay = decay_from_half_life(t.batch_size, t.ema_half_life_images) if t.ema_half_life_images else t.ema_decay
        self.ema = EMA(self.model, decay, warmup=t.ema_warmup)
        self.method.bind_teacher(self.ema.model)
        try:
            setup_logging(self.out_dir, self.dist.is_main)
        except OSError as exc:  # a file in the way, a read-only or full disk
            raise ConfigError(f"train.out_dir={str(self.out_dir)!r}: cannot create or write the run folder ({exc.strerror or exc})") from None
        if self.amp_dtype is not None and self.device.type == "cpu":
            log.warning("bf16 autocast on CPU is slow; use train.precision=fp32 there")

        # One generator draws every training random number (times, noise, masks, label drop);
        # the same seed on every process — see BatchRandom.
        self.generator = torch.Generator(device=self.device).manual_seed(t.seed + 1)
        from selfflow.data import BatchLoader, IndexStream

        self.stream = IndexStream(len(self.dataset), t.batch_size, seed=t.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        # Sets decoded per batch (folder, webdataset, hf) are read ahead in workers; the stream stays the position's authority.
        self.loader = BatchLoader(self.dataset, self.stream, t.num_workers) if getattr(self.dataset, "streamed", False) else None

        self.sharded = self.dist.enabled and t.distributed == "fsdp"
        self.objective = compiled_objective(self.model, self.method, t, whole_step=not self.sharded)
        if self.sharded:
            from selfflow.fsdp import shard_for_training

            # Before the optimizer exists: fully_shard replaces the parameters by DTensors.
            shard_for_training(self.objective, self.model, self.ema.model, self.device, self.dist.world_size, self.amp_dtype)
        elif self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective = DistributedDataParallel(self.objective, device_ids=ids,
                                                     find_unused_parameters=self.method.leaves_parameters_unused)
        # Parameter groups, each its own AdamW (lr, betas, weight decay) and its own gradient clip: one for
        # most methods; the generator's and the fake score's for DMD/DMD2 (Method.optimizer_groups).
        groups = self.method.optimizer_groups(self.model, t)
        for group in groups:
            group["base_lr"] = group["lr"]
        self.params = [p for group in groups for p in group["params"]]
        # fused on CPUs too: 47 → 14 ms a step at width 256, depth 8 (docs/benchmarks/step_extras_cpu.md)
        self.optimizer = torch.optim.AdamW(groups, fused=not self.sharded)
        self.state = ckpt.TrainingState(model=self.model, ema_model=self.ema.model, method=self.method, optimizer=self.optimizer,
                                        generators={"train": self.generator}, data=self.stream)
        self._saved_step = -1  # the step of the newest checkpoint on disk (not rewritten at the same step)
        self._stop_signal: int | None = None
        self._tb = None
        self._tensorboard = t.tensorboard  # turned off here (never in the config) when tensorboard is missing
        self._wandb = self._start_wandb() if "wandb" in t.loggers and self.dist.is_main else None

    # ---- checkpoints -----------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` atomically (``selfflow.checkpoint``) and prune old ones."""
        target = self.ckpt_dir / ckpt.step_dir_name(self.step)
        ckpt.save_training_checkpoint(self.state, target, run=self.config.to_dict(), dist=self.dist, device=self.device,
                                      sharded=self.sharded)
        if self.dist.is_main:
            ckpt.prune_checkpoints(self.ckpt_dir, self.config.train.keep_last)
            log.info("checkpoint step=%d path=%s", self.step, target)
        self._saved_step = self.step
        if self.dist.enabled:
            torch.distributed.barrier()
        return target

    def load_checkpoint(self, directory: Path) -> None:
        ckpt.load_training_checkpoint(self.state, directory, run=self.config.to_dict(), device=self.device, sharded=self.sharded)
        self._saved_step = self.step
        log.info("resumed step=%d from=%s", self.step, directory)

    def maybe_resume(self) -> None:
        if self.dist.is_main:
            ckpt.remove_stale_temporaries(self.ckpt_dir)
        latest = ckpt.latest_checkpoint(self.ckpt_dir)
        if latest is not None:
            self.load_checkpoint(latest)

    # ---- one optimisation step ----------------------------------------------------------------
    def _micro_batches(self):
        t = self.config.train
        if self.loader is not None:  # decoded ahead (uint8), this process's share of the global batch
            indices, images, labels = self.loader.next_batch()
        else:
            indices = self.stream.next_batch()  # this process's share of the global batch
        local = len(indices) // t.grad_accum
        for m in range(t.grad_accum):
            chunk = indices[m * local : (m + 1) * local]
            if self.loader is not None:
                x0, y = uint8_to_float(images[m * local : (m + 1) * local]), labels[m * local : (m + 1) * local]
            else:
                x0, y = self.dataset.get_batch(chunk)
            noise = self.dataset.get_noise(chunk).to(self.device) if hasattr(self.dataset, "get_noise") else None  # reflow pairs
            rows = slice(self.dist.rank * local, (self.dist.rank + 1) * local)
            yield m, Batch(x0=x0.to(self.device, non_blocking=True), y=y.to(self.device), random=BatchRandom(self.generator, local * self.dist.world_size, rows),
                           noise=noise, step=self.step)

    def train_step(self) -> dict[str, float]:
        t = self.config.train
        lr = lr_at(self.step, self.config)
        for group in self.optimizer.param_groups:  # train.lr's schedule scales every group's own rate
            group["lr"] = group["base_lr"] * lr / t.lr
        self.objective.train()
        totals: dict[str, torch.Tensor] = {}
        for m, batch in self._micro_batches():
            sync = m == t.grad_accum - 1
            no_sync = contextlib.nullcontext()
            if self.dist.enabled and not sync:
                if self.sharded:
                    from selfflow.fsdp import no_gradient_sync

                    no_sync = no_gradient_sync(self.objective)
                else:
                    no_sync = self.objective.no_sync()
            autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
            if t.compile and t.compile_mode in CUDA_GRAPH_MODES and self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: a new micro-batch, the last one's outputs are consumed
            with no_sync:
                with autocast:
                    loss, logs = self.objective(batch)
                (loss / t.grad_accum).backward()
            totals["loss"] = totals.get("loss", 0) + loss.detach() / t.grad_accum
            for key, value in logs.items():
                totals[key] = totals.get(key, 0) + value.detach().float() / t.grad_accum
        stats = {k: all_reduce_mean(v.float(), self.dist) for k, v in totals.items()}
        if not torch.isfinite(stats["loss"]):
            raise TrainingDiverged(
                f"loss is {stats['loss'].item()} at step {self.step + 1}; stopped before updating the weights. "
                f"The last good checkpoint in {self.ckpt_dir} is untouched. Lower train.lr or check the data for NaN."
            )
        norms = {group["name"]: torch.nn.utils.clip_grad_norm_(group["params"], group["clip"] if group["clip"] > 0 else float("inf"))
                 for group in self.optimizer.param_groups}  # each group clipped on its own norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.method.updates_generator(self.step):  # DMD2's fake-score-only steps leave the model and its EMA as they are
            self.ema.update(self.model, self.step)
        self.step += 1
        out = {k: v.item() for k, v in stats.items()}
        for index, (name, norm) in enumerate(norms.items()):  # the first group's is grad_norm; others grad_norm_<name>
            out["grad_norm" if index == 0 else f"grad_norm_{name}"] = float(norm.full_tensor()) if hasattr(norm, "full_tensor") else float(norm)
        out["lr"] = lr
        return out

    # ---- logging and samples ---------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tensorboard:
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
                except ImportError:
                    log.warning("tensorboard is not installed; logging to metrics.jsonl only (pip install selfflow[tensorboard])")
                    self._tensorboard = False
            if self._tb is not None:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self._tb.add_scalar(f"train/{key}", value, record["step"])
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                            step=record["step"])
        log.info("step=%d %s", record["step"], " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))

    def _start_wandb(self):
        """A wandb run (``train.loggers: [wandb]``) named after the run folder, the resolved config attached;
        project, entity and mode (online/offline) come from wandb's own WANDB_* variables."""
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.loggers: wandb is not installed; pip install 'selfflow[wandb]' or leave it out") from None
        return wandb.init(project="selfflow", name=self.out_dir.name, dir=str(self.out_dir),
                          config=self.config.to_dict(), resume="allow")

    def write_samples(self) -> Path | None:
        if self.config.train.num_sample_images == 0 or not isinstance(self.model, DiT):  # an encoder draws nothing
            return None
        generator_model = self.ema.model
        if self.sharded:  # gather the EMA weights on rank 0 (every process takes part)
            from selfflow.fsdp import full_state_dict

            state = full_state_dict(self.ema.model)
            if self.dist.is_main:
                generator_model = build_network(self.config).to(self.device).eval().requires_grad_(False)
                generator_model.load_state_dict(state)
        if not self.dist.is_main:
            return None
        if self.config.modality is not None:  # GIFs, spectrograms and WAVs instead of an image grid
            from selfflow.modalities.sampling import write_preview

            path = write_preview(generator_model, self.config, self.out_dir / "samples" / ckpt.step_dir_name(self.step), self.device)
            if path is not None:
                log.info("samples step=%d path=%s", self.step, path)
            return path
        from selfflow.imageio import save_grid
        from selfflow.sampling import generate

        s = self.config.sample
        n = self.config.train.num_sample_images
        latent = getattr(self.dataset, "is_latent", False)
        result = generate(
            generator_model,
            num_samples=n,
            seeds=list(range(n)),
            sampler=s.sampler,
            steps=s.steps,
            cfg_scale=s.cfg_scale,
            batch_size=min(s.batch_size, n),
            device=self.device,
            image_shape=(self.model.in_channels, self.model.image_size, self.model.image_size),
            progress=False,
            clip=not latent,
        )
        base = self.out_dir / "samples" / ckpt.step_dir_name(self.step)
        images = result.images
        if latent:  # latents are stored, and decoded when the data set's autoencoder is at hand
            from selfflow.autoencoders import decode_latents, decoder_for
            from selfflow.files import save_tensors

            base.parent.mkdir(parents=True, exist_ok=True)
            tensors = {"latents": images, "seeds": torch.tensor(result.seeds, dtype=torch.int64)}
            if result.labels is not None:
                tensors["labels"] = result.labels
            save_tensors(tensors, base.with_suffix(".safetensors"))
            decode = decoder_for(self.dataset.manifest, self.device)
            if decode is None:
                log.info("samples step=%d path=%s", self.step, base.with_suffix(".safetensors"))
                return base.with_suffix(".safetensors")
            images = decode_latents(decode, images, min(s.batch_size, n), self.device)
        path = save_grid(images, base.with_suffix(".png"), nrow=int(math.sqrt(n)) or None)
        log.info("samples step=%d path=%s", self.step, path)
        return path

    # ---- the loop ------------------------------------------------------------------------------
    def _request_stop(self, signum, _frame) -> None:
        self._stop_signal = signum
        log.warning("received %s: saving a checkpoint after this step, then exiting", signal.Signals(signum).name)

    def fit(self) -> dict:
        # One writer per run folder: a second process training into it is refused (naming this one's pid);
        # the OS drops the lock on any exit, kill -9 included.
        with (lock_folder(self.out_dir) if self.dist.is_main else contextlib.nullcontext()):
            return self._fit()

    def _fit(self) -> dict:
        self.maybe_resume()  # first: a checkpoint that does not fit must leave the run folder as it was
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            mark_output_folder(self.out_dir, "run")
            truncate_metrics(self.out_dir / "metrics.jsonl", self.step)
            (self.out_dir / "config.yaml").write_text(_to_yaml(self.config.to_dict()))
        previous = [signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)]
        try:
            return self._loop()
        finally:
            for s, handler in zip((signal.SIGTERM, signal.SIGINT), previous):
                signal.signal(s, handler)
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()
            if self.loader is not None:
                self.loader.close()

    def _loop(self) -> dict:
        t = self.config.train
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and self.dist.is_main), desc="train", dynamic_ncols=True)
        last_time, last_step = time.perf_counter(), self.step
        record: dict = {}
        status = "finished"
        started = time.perf_counter()
        if self.step == 0:
            log.info(
                "start method=%s params=%.2fM device=%s world_size=%d batch=%d steps=%d",
                self.config.method_name(), sum(p.numel() for p in self.model.parameters()) / 1e6,
                self.device, self.dist.world_size, t.batch_size, t.steps,
            )
        while self.step < t.steps:
            stats = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
            if self.step % t.log_every == 0 or self.step == t.steps:
                now = time.perf_counter()
                images = (self.step - last_step) * t.batch_size
                record = {"step": self.step, **stats, "images_per_s": images / max(now - last_time, 1e-9)}
                last_time, last_step = now, self.step
                self._log(record)
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.steps:
                self.save_checkpoint()
            if t.sample_every and self.step % t.sample_every == 0 and self.step < t.steps:
                self.write_samples()
            if any_rank(self._stop_signal is not None, self.dist, self.device):
                status = "interrupted"
                break
            if t.time_limit_minutes and any_rank(time.perf_counter() - started > 60 * t.time_limit_minutes, self.dist, self.device):
                status = "time_limit"
                log.warning("train.time_limit_minutes=%g reached at step %d: stopping early", t.time_limit_minutes, self.step)
                break
        bar.close()
        if self._saved_step != self.step:  # re-saving an existing step would only risk the folder
            self.save_checkpoint()
        if status in ("finished", "time_limit"):
            self.write_samples()
        log.info("%s step=%d out_dir=%s", status, self.step, self.out_dir)
        return {"status": status, "step": self.step, "last": record}

    def close(self) -> None:
        cleanup(self.dist)


def truncate_metrics(path: Path, step: int) -> None:
    """Cut ``metrics.jsonl`` back to the records of steps <= ``step`` (the checkpoint resumed from):
    the steps logged after it are trained again and would otherwise appear twice."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            record_step = None
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        from selfflow.files import atomic_file

        with atomic_file(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in kept))
        log.info("metrics.jsonl: dropped %d records after step %d (the checkpoint resumed from)", dropped, step)


def _to_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def train(config: RunConfig) -> dict:
    """Train ``config`` to the end and leave the process group: fit's result plus ``seconds``, the wall
    time of fit (resume included)."""
    trainer = Trainer(config)
    try:
        start = time.perf_counter()
        return {**trainer.fit(), "seconds": time.perf_counter() - start}
    finally:
        trainer.close()
