"""The model side of ``selfflow serve``: one generator (:func:`selfflow.load`), the requests it answers, and the batcher.

A request for ``n`` images with seed ``s`` asks for images ``s, s+1, …, s+n−1`` exactly as ``selfflow
sample --seed s --n n`` makes them: image k starts from ``noise_for_seeds([s + k])`` and its label is
``labels[k mod len(labels)]`` (``seed mod classes`` when no labels are given). Because every image owns
its seed, concurrent requests with the same sampler settings are concatenated into one
:func:`selfflow.sampling.generate` call (one forward pass per solver step for the whole crowd) and
split again afterwards; an image is the same alone or in a crowd (tests/test_serve.py).

Caption-conditioned models share a forward pass only between requests with the same prompt: the
caption bank pads its tokens to the longest caption it holds, so mixing prompts would change the
padding (and the last bits of the attention sums) with the company a request keeps.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import logging
import struct
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from selfflow.errors import ConfigError, RequestError

log = logging.getLogger("selfflow")
MAX_SEED = 2**62  # seeds are int64 for torch.Generator; the bound leaves room for seed + n


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much work may wait (``selfflow serve --max-…`` flags)."""

    max_n: int = 16  # images per request
    max_steps: int = 250
    max_cfg_scale: float = 20.0
    max_prompt_chars: int = 200
    max_batch: int = 64  # images in one forward pass
    max_queue: int = 512  # images waiting for a forward pass; beyond it: 503 + Retry-After
    window_ms: float = 0.0  # how long an idle worker waits for company to a lone request (0: none)

    def validate(self) -> None:
        for name, value in asdict(self).items():
            if value < 0 or (value == 0 and name != "window_ms"):
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.max_n > self.max_batch:
            raise ConfigError(f"--max-n {self.max_n} exceeds --max-batch {self.max_batch}: a request must fit one forward pass")
        if self.max_queue < self.max_n:
            raise ConfigError(f"--max-queue {self.max_queue} is smaller than --max-n {self.max_n}")


class Job(NamedTuple):
    """One request, checked: the images it asks for and the settings they share. (A named tuple: it
    crosses the pipe to the model worker as a plain tuple, which pickles several times faster than
    a class instance.)"""

    seeds: tuple
    labels: Optional[tuple]  # per image; None: an unconditional or caption model
    prompt: Optional[str]
    sampler: str
    steps: int
    cfg_scale: float

    @property
    def key(self) -> tuple:
        """Jobs with equal keys may share a forward pass. dopri5 never shares: its error control
        measures the whole batch, so an image would depend on its company."""
        alone = id(self) if self.sampler == "dopri5" else None
        return self.sampler, self.steps, self.cfg_scale, self.prompt, alone


class Output(NamedTuple):
    images: list  # base64 PNG strings
    nfe: float  # network evaluations per image
    batch: int  # images in the forward pass that made them


def _chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_base64_batch(images) -> list[str]:
    """(N, H, W, C) uint8 numpy array → N base64 PNGs: grey for one channel, RGB for three (8 bits, no
    filter, zlib level 1).

    Written directly (signature, IHDR, one IDAT, IEND; the PNG specification's chunk layout) rather
    than through Pillow: for the small images one-step models make, Pillow's per-image set-up costs
    more than the network's forward pass per image. The rows of the whole batch get their filter
    byte in one array operation, and the chunks every image shares (signature, IHDR, IEND) are built
    once, so an image costs one zlib call, one CRC and one base64 call."""
    count, height, width, channels = images.shape
    if channels not in (1, 3):
        raise ValueError(f"a PNG holds 1 or 3 channels here, got {channels}")
    raw = np.zeros((count, height, 1 + width * channels), dtype=np.uint8)  # filter type 0 before each row
    raw[:, :, 1:] = images.reshape(count, height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    head, tail = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header), _chunk(b"IEND", b"")
    encoded = []
    for rows in raw:
        png = head + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + tail
        encoded.append(base64.b64encode(png).decode("ascii"))
    return encoded


def png_base64(image) -> str:
    """(H, W, C) uint8 numpy array → one base64 PNG (:func:`png_base64_batch`)."""
    return png_base64_batch(image[None])[0]


class Engine:
    """A generator loaded for serving (:func:`selfflow.load`): what it is (``describe``), request checking
    (``job``), and one batched forward pass over jobs with the same key (``run``)."""

    def __init__(self, generator, precision: str = "auto"):
        from selfflow.api import latent_autoencoder

        if generator.kind == "modality":
            raise ConfigError(f"--ckpt {generator.folder}: a {generator.modality.kind} model; selfflow serve serves images")
        autoencoder = latent_autoencoder(generator.folder, None)
        if autoencoder == "":
            raise ConfigError(f"--ckpt {generator.folder}: a latent-space model whose autoencoder is not at hand "
                              f"(the latent set names none that exists here)")
        self.generator, self.model, self.folder = generator, generator.model, generator.folder
        self.settings, self.device, self.text, self.precision = generator.settings, generator.device, generator.text, precision
        self.decoder = None
        if autoencoder:
            from selfflow.autoencoders import load_autoencoder

            self.decoder = load_autoencoder(autoencoder, self.device).decode
        self.encoder = None
        if self.text is not None:
            from selfflow.text.data import make_encoder

            self.encoder = make_encoder(self.text)
        self.num_classes = generator.num_classes
        self._checked: dict = {}  # (sampler, steps, cfg_scale) → settings, or the RequestError they raise
        self.kind = "text" if self.text is not None else ("class" if self.num_classes else "unconditional")

    @classmethod
    def load(cls, path: str | Path, weights: str = "ema", device: str = "auto", precision: str = "auto") -> "Engine":
        """Any generator folder ``selfflow sample --ckpt`` takes: a run, a checkpoint or an exported model."""
        from selfflow.api import load

        return cls(load(path, weights, device), precision)

    def describe(self) -> dict:
        return {"kind": self.kind, "classes": self.num_classes or None, "prompts": self.kind == "text",
                "image_size": int(self.model.image_size), "channels": int(self.model.in_channels),
                "sampler": self.settings.sampler, "steps": self.settings.steps, "cfg_scale": self.settings.cfg_scale,
                "checkpoint": str(self.folder), "device": str(self.device)}

    def _settings(self, sampler, steps, cfg_scale):
        """The saved settings with the request's on top, checked as ``selfflow sample`` checks its flags
        (the run's config.json was read once, at load; the last 256 combinations checked, valid or not,
        are remembered)."""
        key = (sampler, steps, cfg_scale)
        known = self._checked.get(key)
        if known is None:
            if len(self._checked) >= 256:
                self._checked.clear()
            try:
                known = self._checked[key] = self._check_settings(sampler, steps, cfg_scale)
            except RequestError as exc:
                known = self._checked[key] = (exc.args[0], exc.status)
        if isinstance(known, tuple):  # a fresh exception each time (a re-raised one would grow its traceback)
            raise RequestError(*known)
        return known

    def _check_settings(self, sampler, steps, cfg_scale):
        given = {key: value for key, value in (("sampler", sampler), ("steps", steps), ("cfg_scale", cfg_scale)) if value is not None}
        settings = dataclasses.replace(self.settings, **given)
        try:
            settings.validate("sample")
        except ConfigError as exc:
            raise RequestError(str(exc).replace("sample.", "")) from None
        if self.kind == "unconditional" and settings.cfg_scale != 1.0:
            raise RequestError(f"cfg_scale={settings.cfg_scale}: classifier-free guidance needs a conditional model; "
                               f"this one is unconditional (use 1)")
        return settings

    def job(self, limits: Limits, *, n: int = 1, labels=None, prompt=None, seed: int = 0, steps=None, sampler=None,
            cfg_scale=None) -> Job:
        """Check one request against the model and the limits; a :class:`RequestError` names the field."""
        if not 1 <= n <= limits.max_n:
            raise RequestError(f"n={n}: must lie in [1, {limits.max_n}]")
        if not 0 <= seed <= MAX_SEED:
            raise RequestError(f"seed={seed}: must lie in [0, 2^62]")
        if steps is not None and not 1 <= steps <= limits.max_steps:
            raise RequestError(f"steps={steps}: must lie in [1, {limits.max_steps}]")
        if cfg_scale is not None and not 0 <= cfg_scale <= limits.max_cfg_scale:
            raise RequestError(f"cfg_scale={cfg_scale}: must lie in [0, {limits.max_cfg_scale:g}]")
        if self.kind == "text":
            if labels is not None:
                raise RequestError("labels: a caption-conditioned model takes a prompt, not class labels")
            if prompt is None or not prompt.strip():
                raise RequestError("prompt: a caption-conditioned model needs a non-empty prompt")
            if len(prompt) > limits.max_prompt_chars:
                raise RequestError(f"prompt: {len(prompt)} characters, at most {limits.max_prompt_chars}")
        elif prompt is not None:
            raise RequestError(f"prompt: this is a {'class-conditional' if self.num_classes else 'unconditional'} model; "
                               f"it takes {'labels' if self.num_classes else 'no condition'}, not a prompt")
        if labels is not None:
            if not self.num_classes:
                raise RequestError("labels: this model is unconditional; leave labels out")
            if not 1 <= len(labels) <= n:
                raise RequestError(f"labels: give 1 to n={n} labels (cycled over the images), got {len(labels)}")
            if min(labels) < 0 or max(labels) >= self.num_classes:
                bad = next(value for value in labels if not 0 <= value < self.num_classes)
                raise RequestError(f"labels: {bad} is out of range [0, {self.num_classes - 1}]")
        settings = self._settings(sampler, steps, cfg_scale)
        seeds = tuple(range(seed, seed + n))
        per_image = None
        if self.num_classes:
            per_image = tuple((labels * (n // len(labels) + 1))[:n]) if labels else tuple(s % self.num_classes for s in seeds)
        return Job(seeds, per_image, prompt, settings.sampler, settings.steps, float(settings.cfg_scale))

    def run(self, jobs: list[Job]) -> list[Output]:
        """One :func:`generate` call for jobs sharing a key; each job's images as base64 PNGs."""
        return split_pass(jobs, *self.run_pass(jobs))

    def run_pass(self, jobs: list[Job]) -> tuple[list, float, int]:
        """:meth:`run` before the images are dealt to the jobs: (base64 PNGs of every image in job
        order, network evaluations per image, images in the pass) — what the model worker sends back."""
        from selfflow.device import autocast_dtype
        from selfflow.imageio import to_uint8
        from selfflow.sampling import generate

        first = jobs[0]
        assert all(job.key == first.key for job in jobs), "jobs in one pass share their settings"
        seeds = [s for job in jobs for s in job.seeds]
        labels = None
        if self.kind == "class":
            labels = torch.tensor([value for job in jobs for value in job.labels], dtype=torch.long)
        elif self.kind == "text":
            self.model.set_bank(self.encoder.encode([first.prompt]))
            labels = torch.zeros(len(seeds), dtype=torch.long)
        result = generate(self.model, num_samples=len(seeds), seeds=seeds, labels=labels, sampler=first.sampler,
                          steps=first.steps, cfg_scale=first.cfg_scale, batch_size=len(seeds), device=self.device,
                          image_shape=self.generator.sample_shape, clip=self.decoder is None,
                          autocast_dtype=autocast_dtype(self.precision, self.device), progress=False)
        images = result.images
        if self.decoder is not None:  # a latent model: its autoencoder makes the pixels (as selfflow sample)
            from selfflow.autoencoders import decode_latents

            images = decode_latents(self.decoder, images, len(seeds), self.device)
        pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()  # (N, H, W, C), once for the whole pass
        return png_base64_batch(pixels), result.nfe_per_sample, len(seeds)


def split_pass(jobs: list[Job], images: list, nfe: float, batch: int) -> list[Output]:
    """A pass's images (in job order) dealt back to its jobs."""
    outputs, start = [], 0
    for job in jobs:
        count = len(job.seeds)
        outputs.append(Output(images[start:start + count], nfe, batch))
        start += count
    return outputs


class ThreadWorker:
    """``Engine.run`` on one thread of the server's process (``--worker thread``, and the in-process app
    of ``create_app(engine)``): the event loop stays free while a pass runs."""

    def __init__(self, engine: Engine):
        from concurrent.futures import ThreadPoolExecutor

        self.engine = engine
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="selfflow-serve")

    async def run(self, jobs: list[Job]) -> list[Output]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: self.engine.run(jobs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ProcessWorker:
    """``Engine.run`` in a child process (spawned, so CUDA works there too), awaited with :meth:`run`.

    A small model's forward pass is mostly Python (module calls between short kernels), and Python
    runs one thread at a time per process: in the server's own process the network and the HTTP loop
    would take turns (on the quickstart student, a loop busy half the time halves the passes per
    second). In a child process each has its interpreter, and a core. Jobs and images cross a pipe
    between our two processes, once per pass. The child ignores SIGINT and SIGTERM (the server drains
    and then stops it) and exits when the pipe closes, so it never outlives the server."""

    def __init__(self, path: str | Path, weights: str, device: str, precision: str, threads: int):
        self._args = (str(path), weights, device, precision, threads)
        self.restarts = 0  # workers started again after one died (killed, out of memory)
        self._start()

    def _start(self) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_worker_main, args=(child, *self._args),
                                        name="selfflow-serve-worker", daemon=True)
        self._process.start()
        child.close()
        kind, value = self._receive()
        if kind != "ready":
            self.close()
            raise ConfigError(f"--ckpt {self._args[0]}: the model worker could not load it ({value})")
        self.device = value

    def _restart(self) -> None:
        """A worker that died is replaced before the next pass, so one lost process costs one pass's
        requests (a one-line 500 each), never the server."""
        self.close()
        self.restarts += 1
        log.warning("serve: the model worker exited (status %s); starting another (restart %d)",
                    self._process.exitcode, self.restarts)
        self._start()

    def _receive(self) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            return "lost", f"the model worker exited (status {self._process.exitcode})"

    def _send(self, jobs: list[Job]) -> bool:
        try:
            self._conn.send([tuple(job) for job in jobs])  # plain tuples on the wire (see Job)
            return True
        except (OSError, ValueError):
            return False

    @staticmethod
    def _outcome(kind: str, value, jobs: list[Job]) -> list[Output]:
        if kind != "ok":
            raise PassFailed(value)
        return split_pass(jobs, *value)

    async def run(self, jobs: list[Job]) -> list[Output]:
        """One pass, awaited on the event loop: the answer is read when the pipe becomes readable (the
        loop watches it as it watches sockets), so no thread and no lock stand between a pass's end and
        its answers. Restarting a dead worker (seconds: a new process loads the model) runs off the loop."""
        loop = asyncio.get_running_loop()
        if not self._process.is_alive():
            await loop.run_in_executor(None, self._restart)
        if not self._send(jobs):
            kind, value = "lost", "the model worker exited"
        else:
            readable, fd = loop.create_future(), self._conn.fileno()
            loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
            try:
                await readable
            finally:
                loop.remove_reader(fd)
            kind, value = self._receive()
        if kind == "lost":
            await loop.run_in_executor(None, self._restart)
        return self._outcome(kind, value, jobs)

    def close(self) -> None:
        """Stop the worker: it is told to exit and, if it has not within 5 s, killed. The server closes it
        after draining (its batcher has no pass in flight then), so a worker still there after 5 s is
        stuck, and waiting longer would only hold the shutdown up."""
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


def _worker_main(conn, path: str, weights: str, device: str, precision: str, threads: int) -> None:
    """The child of :class:`ProcessWorker`: load the model, then answer passes until told to stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        engine = Engine.load(path, weights, device, precision)
    except Exception as exc:
        conn.send(("error", str(exc)))
        return
    import gc

    gc.freeze()  # the model's objects stay: full collections need not walk them
    conn.send(("ready", str(engine.device)))
    while True:
        try:
            jobs = conn.recv()
        except (EOFError, OSError):
            return
        if jobs is None:
            return
        try:
            conn.send(("ok", engine.run_pass([Job._make(job) for job in jobs])))
        except Exception as exc:  # the pass's requests fail with this line; the worker keeps serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class PassFailed(RuntimeError):
    """A forward pass that gave no images (the model worker died, or the network raised): its requests
    are answered with a one-line 500 naming why; the server goes on."""


class QueueFull(Exception):
    """More images wait than ``Limits.max_queue``: the request is refused (503 + Retry-After)."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the server is busy ({retry_after_s} s estimated); retry later")
        self.retry_after_s = retry_after_s


class Batcher:
    """Gathers jobs into forward passes (continuous batching) and runs them on a worker: a
    :class:`ProcessWorker` (``selfflow serve``'s default) or a :class:`ThreadWorker`.

    Everything here runs on the server's event loop, one pass at a time: when a pass ends, its answers
    are set and the next pass starts from the jobs that arrived meanwhile — the oldest job and, in
    arrival order, every waiting job with the same key while the images fit ``max_batch``. Under load
    passes fill by themselves, with no fixed window spent waiting and no thread hand-over between a
    pass's end and the next one's start. One wait remains (:meth:`_gather`): a pass smaller than the
    crowd the last pass served waits briefly for its clients, who ask again at once; without it a crowd
    of closed-loop clients splits into a lone request and the rest, or two halves, in alternating
    passes (for the Heun-20 teacher of the quickstart, passes of 7.7 images on average instead of 15.4
    for 16 clients). An idle worker may also wait ``window_ms`` (default 0) for company to a lone
    request. Jobs with other keys wait for a later pass; the oldest job is always served next, so none
    starves. At most ``max_queue`` images wait; :meth:`submit` refuses beyond that.
    """

    def __init__(self, engine: Engine, limits: Limits, worker: Optional[ProcessWorker] = None):
        self.limits = limits
        self.worker = worker if worker is not None else ThreadWorker(engine)
        self._own_worker = worker is None
        self._waiting: collections.deque = collections.deque()  # (job, future) in arrival order
        self._waiting_images = 0
        self._busy = False  # a pass runs
        self._timer: Optional[asyncio.TimerHandle] = None  # while a pass waits for company
        self._target = 0  # the waiting images at which that wait ends early
        self._task: Optional[asyncio.Task] = None
        self._idle: Optional[asyncio.Event] = None  # set while no pass runs and no job waits
        self._stopping = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._pass_seconds = 0.05  # a running estimate of one pass, for Retry-After
        self._last_images, self._last_seconds = 0, 0.0  # the last pass: its images, its time
        self._crowd = 0  # images the next pass should hold under steady load (see _pass)
        self.passes = 0
        self.images = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()

    async def stop(self) -> None:
        """After the server stopped taking requests: the waiting jobs are finished first."""
        self._stopping = True
        if self._timer is not None:  # no more waiting for company
            self._launch()
        await self._idle.wait()
        if self._own_worker:
            await asyncio.to_thread(self.worker.close)

    @property
    def waiting_images(self) -> int:
        return self._waiting_images

    def submit(self, job: Job) -> asyncio.Future:
        count = len(job.seeds)
        if self._waiting_images + count > self.limits.max_queue:
            passes = self._waiting_images / self.limits.max_batch + 1
            raise QueueFull(max(1, round(passes * self._pass_seconds + 0.5)))
        future = self._loop.create_future()
        self._waiting.append((job, future))
        self._waiting_images += count
        self._idle.clear()
        if not self._busy:
            if self._timer is None:
                self._gather(idle=True)
            elif self._waiting_images >= self._target:
                self._launch()
        return future

    def _gather(self, idle: bool) -> None:
        """No pass runs and jobs wait: start one now, or wait for company. Under steady load the clients
        the last pass answered ask again at once: a pass that would hold fewer images than that pass's
        crowd (the images it answered plus those that waited meanwhile) waits for them, at most half the
        last pass's time; an idle worker (``idle``: the first job after none waited) waits ``window_ms``
        for company when that is longer. Either wait ends early once enough images wait (:meth:`submit`)."""
        wait, target = self._last_seconds / 2, self._crowd
        window = self.limits.window_ms / 1000
        if idle and window > wait:
            wait, target = window, self.limits.max_batch
        target = min(target, self.limits.max_batch)
        if self._stopping or wait <= 0 or self._waiting_images >= target:
            self._launch()
        else:
            self._target = target
            self._timer = self._loop.call_later(wait, self._launch)

    def _take(self) -> list:
        """The next pass: the oldest job and every waiting job with its key that fits."""
        first_job, _ = self._waiting[0]
        taken, kept, images = [], collections.deque(), 0
        for job, future in self._waiting:
            if job.key == first_job.key and images + len(job.seeds) <= self.limits.max_batch:
                taken.append((job, future))
                images += len(job.seeds)
            else:
                kept.append((job, future))
        self._waiting = kept
        self._waiting_images -= images
        return [(job, future) for job, future in taken if not future.cancelled()]  # clients that left

    def _launch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        taken = self._take() if self._waiting else []
        if not taken:  # every client of that pass left
            self._next()
            return
        self._busy = True
        self._task = self._loop.create_task(self._pass(taken))

    async def _pass(self, taken: list) -> None:
        start = time.perf_counter()
        try:
            outcome = await self.worker.run([job for job, _ in taken])
        except PassFailed as exc:  # a failed pass fails its requests, never the server
            outcome = exc
        except Exception as exc:
            outcome = PassFailed(f"{type(exc).__name__}: {exc}")
        self._last_seconds = time.perf_counter() - start
        self._pass_seconds = 0.8 * self._pass_seconds + 0.2 * self._last_seconds
        self._last_images = images = sum(len(job.seeds) for job, _ in taken)
        # the clients answered now and those already waiting: the pass the crowd makes when all are back
        # (waiting only for the answered ones would let a pass cut short once stay short: 12 + 4 for ever)
        self._crowd = self._last_images + self._waiting_images
        self._answer(taken, outcome, images)
        self._busy = False
        self._next()

    def _next(self) -> None:
        if self._waiting:
            self._gather(idle=False)
        else:
            self._idle.set()

    def _answer(self, taken: list, outcome, images: int) -> None:
        """Each request's images, or the pass's error (``images``: the pass's, for the counters)."""
        if not isinstance(outcome, Exception):
            self.passes += 1
            self.images += images
        for k, (_, future) in enumerate(taken):
            if future.done():  # a request whose client left was cancelled meanwhile
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome[k])
