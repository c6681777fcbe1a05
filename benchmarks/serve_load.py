"""Load on ``selfflow serve``: latency, throughput, errors and memory under concurrent clients, against the
model's own batched ``generate`` throughput measured in the same run.

For each model (a one-step student and its multi-step teacher) a server is started on 127.0.0.1 in a
child process; for each concurrency level c, c clients send ``--requests`` requests in all (each waits
for its answer before sending the next; every request its own seed), then stop. Recorded: p50/p99
latency, images/s, errors (non-200 or no answer), requests lost (sent − answered), the images per
forward pass the server formed, and the server's resident memory (peak after the first 100 requests
and at the end: memory is flat when they agree). The reference is :func:`selfflow.sampling.generate`
on the same model and settings in batches of min(clients × n, --max-batch) images (the fullest pass
the clients can make, so the ratio errs low), timed in this process while the server idles. The two
take turns: each row's requests go in ``--rounds`` slices, each between two reference slices, since a
shared machine's speed drifts by tens of percent within a minute and slices side by side see the same
machine; the model worker and the reference are pinned to one core (``--pin-core``). The served
images/s is each slice's steady part (every client busy: after the clients' first answers, before the
last request is sent): ``ratio = served images/s ÷ batched images/s`` over all slices,
``ratio_min``/``ratio_max`` each slice against the reference slices on either side of it.

The models: ``--student``/``--teacher`` folders, or (default) the quickstart's ``runs/quickstart/student``
and ``teacher`` (``--work``), made by the quickstart pipeline when absent (about 4 minutes on 2 cores;
``--tiny`` for the seconds-long smoke version whose models are smaller).

    python benchmarks/serve_load.py --concurrency 1,16,32 --requests 500
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

COLUMNS = ["model", "sampler", "clients", "n", "requests", "ok", "errors", "lost", "p50_ms", "p99_ms", "images_per_s",
           "images_per_s_whole", "pass_images", "slices", "batched_batch", "batched_images_per_s", "batched_spread", "ratio", "ratio_min", "ratio_max", "server_cpu_ms_per_image", "batched_cpu_ms_per_image", "cpu_ratio", "client_cpu_ms_per_request", "load_1min", "rss_mib_at_100", "rss_mib_end"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def models(args) -> dict:
    if args.student and args.teacher:
        return {"student": Path(args.student), "teacher": Path(args.teacher)}
    root = Path(args.work)
    if not (root / "student").is_dir():
        from selfflow.quickstart import run_quickstart

        print(f"training the quickstart teacher and student into {root} …", flush=True)
        run_quickstart(out_dir=str(root), device=args.device, tiny=args.tiny, say=lambda *a: None)
    return {"student": root / "student", "teacher": root / "teacher"}


class Server:
    """``selfflow serve`` in a child process, with its resident memory sampled every 20 ms."""

    def __init__(self, ckpt: Path, args):
        import httpx
        import psutil

        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=str(harness.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS=str(args.threads))
        self.proc = subprocess.Popen([sys.executable, "-m", "selfflow", "serve", "--ckpt", str(ckpt), "--port", str(self.port),
                                      "--device", args.device, "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
                                      "--window-ms", str(args.window_ms), "--max-n", str(max(args.n)), "--threads", str(args.threads),
                                      "--worker", args.worker],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {self.proc.stderr.read() if self.proc.poll() is not None else 'timeout'}")
            try:
                self.health = httpx.get(self.url + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        self._process = psutil.Process(self.proc.pid)
        if args.pin_core >= 0:  # the model worker on the reference's core (see main)
            for child in self._process.children(recursive=True):
                if "--multiprocessing-fork" in child.cmdline():
                    child.cpu_affinity([args.pin_core])
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _processes(self) -> list:
        """The server and its children (the model worker)."""
        return [self._process, *self._process.children(recursive=True)]

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, sum(process.memory_info().rss for process in self._processes()))
            except Exception:
                return
            time.sleep(0.02)

    def cpu_seconds(self) -> float:
        """CPU time the server and its model worker have used (all their threads, user + system)."""
        return sum(times.user + times.system for times in (process.cpu_times() for process in self._processes()))

    def close(self) -> int:
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


class Connection:
    """A minimal keep-alive HTTP/1.1 client for the load (httpx costs the shared CPU several times more
    per request than the server's own parsing, and would measure the client)."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            self.writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            data = await self.reader.readexactly(int(fields.get("content-length", 0)))
            if fields.get("connection", "").lower() == "close":
                self.close()
            return int(lines[0].split()[1]), data
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(server: Server, clients: int, requests: int, n: int, classes: int, first_seed: int = 0) -> dict:
    """``clients`` closed-loop clients (one connection each), ``requests`` requests in all; per-request seeds
    (request k asks for seed first_seed + 1000 k). Raw figures: :func:`summarise` adds slices up."""
    import httpx

    latencies, statuses, finished = [], [], []  # finished: when each request that got its images was answered
    sent, rss_at_100, last_sent = 0, None, None

    async def client():
        nonlocal sent, rss_at_100, last_sent
        connection = Connection(server.port)
        while sent < requests:
            k = sent
            sent += 1
            if sent == requests:
                last_sent = time.perf_counter()
            body = {"n": n, "seed": first_seed + 1000 * k}
            if classes:
                body["labels"] = [k % classes]
            start = time.perf_counter()
            try:
                status, data = await connection.post("/v1/generate", json.dumps(body).encode())
                if status == 200 and len(json.loads(data)["images"]) != n:
                    status = "short answer"
                statuses.append(status)
                if status == 200:
                    finished.append(time.perf_counter())
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                statuses.append(type(exc).__name__)
            latencies.append(time.perf_counter() - start)
            if len(statuses) == 100:
                rss_at_100 = server.peak_rss
        connection.close()

    before = httpx.get(server.url + "/health").json()["queue"]
    cpu_before, own_cpu = server.cpu_seconds(), time.thread_time()  # this thread runs every client
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    own_cpu = time.thread_time() - own_cpu
    after = httpx.get(server.url + "/health").json()["queue"]
    # The steady part: from the answer that completes the clients' first round (all are busy from then
    # on) to the last request sent (after it, fewer and fewer clients remain); the ramp and the tail of
    # a slice are not the server's throughput under load, only the slice's edges.
    steady_start = finished[clients - 1] if len(finished) >= clients else start
    steady_end = last_sent if last_sent is not None and last_sent > steady_start else start + wall
    steady = sum(1 for t in finished if steady_start < t <= steady_end)
    if steady_end - steady_start <= 0 or steady == 0:  # too few requests for a steady part: the whole slice
        steady_start, steady_end, steady = start, start + wall, len(finished)
    return {"sent": sent, "statuses": statuses, "latencies": latencies, "wall": wall, "client_cpu": own_cpu,
            "steady_answers": steady, "steady_seconds": steady_end - steady_start,
            "server_cpu": server.cpu_seconds() - cpu_before, "images": after["images"] - before["images"],
            "passes": after["passes"] - before["passes"], "rss_at_100": rss_at_100}


def summarise(slices: list[dict], n: int, server: Server) -> dict:
    """One row's figures from its load slices (requests, images and time added up; latencies pooled)."""
    statuses = [s for piece in slices for s in piece["statuses"]]
    latencies = sorted(t for piece in slices for t in piece["latencies"])
    sent, wall = sum(piece["sent"] for piece in slices), sum(piece["wall"] for piece in slices)
    ok = sum(1 for s in statuses if s == 200)
    rss_at_100 = next((piece["rss_at_100"] for piece in slices if piece["rss_at_100"]), None)
    return {"requests": sent, "ok": ok, "errors": len(statuses) - ok, "lost": sent - len(statuses),
            "p50_ms": 1000 * latencies[len(latencies) // 2], "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "images_per_s": sum(piece["steady_answers"] for piece in slices) * n / sum(piece["steady_seconds"] for piece in slices),
            "images_per_s_whole": ok * n / wall,
            "pass_images": sum(piece["images"] for piece in slices) / max(1, sum(piece["passes"] for piece in slices)),
            "rss_mib_at_100": (rss_at_100 or server.peak_rss) / 2**20, "rss_mib_end": server.peak_rss / 2**20, "wall_s": wall,
            "server_cpu_ms_per_image": 1000 * sum(piece["server_cpu"] for piece in slices) / max(1, ok * n),
            "client_cpu_ms_per_request": 1000 * sum(piece["client_cpu"] for piece in slices) / max(1, len(statuses))}


def run_load(*args) -> dict:
    """:func:`load` on uvloop when it is installed (the load generator's own CPU cost, on the server's
    cores, is lower there), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(load(*args))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(load(*args))


def batched_throughput(engine, batch: int, seconds: float, core: int = -1) -> tuple[int, float, float]:
    """(images, seconds, CPU seconds) of ``generate`` on the server's model and saved settings, ``batch``
    images per call, for about ``seconds`` after one untimed call (this process's CPU time: one torch
    thread, nothing else running in it), on CPU ``core`` when it is ≥ 0."""
    import torch

    from selfflow.device import autocast_dtype
    from selfflow.sampling import generate

    model, settings = engine.model, engine.settings
    labels = torch.arange(batch) % model.num_classes if model.num_classes else None

    def once(seed):  # as the server's passes run: its device and precision (bf16 autocast on CUDA by default)
        generate(model, num_samples=batch, seeds=range(seed, seed + batch), labels=labels, sampler=settings.sampler,
                 steps=settings.steps, cfg_scale=settings.cfg_scale, batch_size=batch, device=engine.device,
                 image_shape=engine.generator.sample_shape, progress=False,
                 autocast_dtype=autocast_dtype(engine.precision, engine.device))

    cores = os.sched_getaffinity(0)
    if core >= 0:
        os.sched_setaffinity(0, {core})
    try:
        once(0)
        calls, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds or calls < 3:
            once(batch * (calls + 1))
            calls += 1
        return calls * batch, time.perf_counter() - start, time.process_time() - cpu
    finally:
        os.sched_setaffinity(0, cores)


def shared_interpreter(engine, batch: int, seconds: float = 2.0) -> dict:
    """Images/s of passes run in a thread of this process while the main thread is idle, and while it
    runs Python half the time (1 ms bursts, as an HTTP loop under load): how much a network in the
    server's own process loses to the interpreter lock (why ``selfflow serve`` runs it in a child)."""
    import threading

    from selfflow.serve.engine import Limits

    jobs = [engine.job(Limits(), n=1, seed=k) for k in range(batch)]
    engine.run(jobs)

    def rate(busy: bool) -> float:
        stop, passes = threading.Event(), [0]

        def work():
            while not stop.is_set():
                engine.run(jobs)
                passes[0] += 1

        thread = threading.Thread(target=work)
        thread.start()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            burst = time.perf_counter()
            while busy and time.perf_counter() - burst < 0.001:
                pass
            time.sleep(0.001)
        stop.set()
        thread.join()
        return passes[0] * batch / (time.perf_counter() - start)

    idle, busy = rate(False), rate(True)
    return {"batch": batch, "idle_images_per_s": idle, "busy_images_per_s": busy, "slowdown": idle / busy}


def plot(rows: list[dict], path: Path, device: str = "CPU") -> None:
    """Latency, images/s (served and batched) and their ratio (the worst and best slice as a bar) against
    the number of clients, one colour per model and request size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for (model, n), colour in zip(sorted({(r["model"], r["n"]) for r in rows}), ["C0", "C1", "C2", "C3", "C4", "C5"]):
        mine = [r for r in rows if r["model"] == model and r["n"] == n]
        clients = [r["clients"] for r in mine]
        middle.plot(clients, [r["images_per_s"] for r in mine], "o-", color=colour, label=f"{model}, n={n}: served")
        middle.plot(clients, [r["batched_images_per_s"] for r in mine], "x--", color=colour, label=f"{model}, n={n}: batched generate")
        left.plot(clients, [r["p50_ms"] for r in mine], "o-", color=colour, label=f"{model}, n={n}: p50")
        left.plot(clients, [r["p99_ms"] for r in mine], "^:", color=colour, label=f"{model}, n={n}: p99")
        ratio = [r["ratio"] for r in mine]
        spread = [[max(0.0, r["ratio"] - r.get("ratio_min", r["ratio"])) for r in mine],
                  [max(0.0, r.get("ratio_max", r["ratio"]) - r["ratio"]) for r in mine]]
        right.errorbar(clients, ratio, yerr=spread, fmt="o-", color=colour, capsize=3, label=f"{model}, n={n}")
    right.axhline(0.7, color="grey", linestyle="--", linewidth=1, label="0.7 × batched")
    for axis, label in ((left, "latency (ms)"), (middle, "images / s"), (right, "served ÷ batched generate")):
        axis.set_xscale("log", base=2)
        if axis is not right:
            axis.set_yscale("log")
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(f"selfflow serve under load ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default=None)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--work", default="runs/quickstart", help="the quickstart run to serve (made there when absent)")
    parser.add_argument("--tiny", action="store_true", help="make the quickstart's --tiny models (a smoke run; use another --work)")
    parser.add_argument("--concurrency", default="1,16,32", help="comma-separated client counts")
    parser.add_argument("--n", default="1", help="comma-separated images per request")
    parser.add_argument("--requests", type=int, default=500, help="requests per (model, clients, n)")
    parser.add_argument("--teacher-requests", type=int, default=None, help="requests for the teacher (default: --requests)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=1024)
    parser.add_argument("--window-ms", type=float, default=0.0, help="the server's --window-ms")
    parser.add_argument("--worker", default="process", choices=["process", "thread"], help="the server's --worker")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the batched reference")
    parser.add_argument("--reference-seconds", type=float, default=6.0, help="reference time per row, all slices together")
    parser.add_argument("--rounds", type=int, default=5, help="slices of load per row, each between two reference slices")
    parser.add_argument("--device", default="cpu", help="the server's and the reference's device (cpu, cuda)")
    parser.add_argument("--pin-core", type=int, default=(os.cpu_count() or 1) - 1,
                        help="run the model worker and the reference on this CPU (default: the last; -1: not pinned)")
    parser.add_argument("--models", default="student,teacher", help="which of the two to load (comma-separated)")
    parser.add_argument("--name", default="serve_load_cpu")
    args = parser.parse_args()
    args.n = [int(v) for v in args.n.split(",")]
    args.models = args.models.split(",")
    concurrency = [int(v) for v in args.concurrency.split(",")]
    import torch

    torch.set_num_threads(args.threads)
    rows, rss_notes = [], []
    from selfflow.serve.engine import Engine

    interpreter = {}
    for role, ckpt in models(args).items():
        if role not in args.models:
            continue
        server = Server(ckpt, args)
        engine = Engine.load(ckpt, device=args.device)  # the reference's copy of the same model, in this process
        if role == "student":
            interpreter = shared_interpreter(engine, 16)
            print("one interpreter:", json.dumps(interpreter), flush=True)
        model = server.health["model"]
        requests = args.teacher_requests if role == "teacher" and args.teacher_requests else args.requests
        for n in args.n:
            for clients in concurrency:
                print(f"{role}: {clients} clients × n={n}, {requests} requests …", flush=True)
                # The reference and the load take turns in --rounds slices, reference first and last, while
                # the other side idles: the shared CPU's speed drifts by tens of percent within a minute,
                # and slices side by side see the same machine. Batch: the fullest pass the clients can
                # make (at least the pass the server formed), so the ratio errs low, not high.
                batch = min(clients * n, args.max_batch)
                load_1min = os.getloadavg()[0]
                references, slices = [], []
                rounds = max(1, min(args.rounds, requests // (8 * clients)))  # slices of ≥ 8 rounds of every client
                per_slice = -(-requests // rounds)
                for k in range(rounds):
                    references.append(batched_throughput(engine, batch, args.reference_seconds / (rounds + 1), args.pin_core))
                    count = min(per_slice, requests - k * per_slice)
                    slices.append(run_load(server, clients, count, n, model["classes"] or 0, 1000 * k * per_slice))
                references.append(batched_throughput(engine, batch, args.reference_seconds / (rounds + 1), args.pin_core))
                result = summarise(slices, n, server)
                reference = sum(r[0] for r in references) / sum(r[1] for r in references)
                rates = [r[0] / r[1] for r in references]
                served = [piece["steady_answers"] * n / piece["steady_seconds"] for piece in slices]
                # each slice against the mean of the reference slices on either side of it
                slice_ratios = [rate / ((rates[k] + rates[k + 1]) / 2) for k, rate in enumerate(served)]
                batched_cpu = 1000 * sum(r[2] for r in references) / sum(r[0] for r in references)
                rows.append({"model": role, "sampler": f"{model['sampler']} {model['steps']}", "clients": clients, "n": n,
                             **result, "slices": rounds, "batched_batch": batch, "batched_images_per_s": reference,
                             "batched_spread": min(rates) / max(rates), "ratio": result["images_per_s"] / reference,
                             "ratio_min": min(slice_ratios), "ratio_max": max(slice_ratios),
                             "batched_cpu_ms_per_image": batched_cpu,
                             "cpu_ratio": batched_cpu / result["server_cpu_ms_per_image"], "load_1min": load_1min})
                print(json.dumps(rows[-1]), flush=True)
        rss_notes.append(f"{role}: server exit status {server.close()} after SIGTERM")
    name = args.name
    harness.DOCS.mkdir(parents=True, exist_ok=True)
    path = harness.DOCS / f"{name}.png"
    plot(rows, path, "GPU" if args.device.startswith("cuda") else "CPU")
    pinned = (f"The model worker and the reference run pinned to CPU {args.pin_core} (the two cores of a shared "
              f"machine can differ in speed by a quarter from minute to minute); the HTTP process and the load "
              f"generator are not pinned. ") if args.pin_core >= 0 else ""
    notes = ("ratio = served images/s ÷ batched_images_per_s, the images/s of `generate` on the same model and settings in "
             "batches of batched_batch = min(clients × n, max batch) images (the fullest pass the clients can make; "
             "pass_images is the mean pass the server formed), measured in this process with the same torch threads "
             f"({args.threads}), device ({args.device}) and precision while the server idled. Reference and load take "
             f"turns: each row's requests are sent in `slices` slices (up to {args.rounds}; each slice at least 8 requests "
             f"per client), each between two reference slices ({args.reference_seconds:g} s of reference per row in all), "
             "because a shared machine's speed drifts by tens of percent within a minute and slices side by side see the "
             "same machine. The served images/s is the steady part of each slice, from the answer that completes every "
             "client's first request to the moment the slice's last request is sent (all clients busy throughout), added "
             "up over the slices; images_per_s_whole counts every answer over whole slices, ramp and tail included. "
             "ratio_min and ratio_max are the worst and best slice against the two reference slices beside it; "
             "batched_spread = slowest ÷ fastest reference slice shows how much the machine moved meanwhile. " + pinned +
             "The two sides do not do "
             "the same work: the served figure includes everything a client gets (HTTP, JSON, converting to 8-bit "
             "pixels, PNG and base64 encoding of every image), the batched reference only `generate`'s tensors. The "
             "load generator (one keep-alive HTTP/1.1 connection per client, in one asyncio process on uvloop) runs "
             "on the same CPU as the server and the reference; its own CPU time per request is client_cpu_ms_per_request, "
             "and load_1min is the machine's 1-minute load average when the row started (the CPU is shared with "
             "other jobs). The CPU time per image is the steadier figure on a shared machine: server_cpu_ms_per_image is the "
             "CPU time of the server's two processes (HTTP, JSON in one; the network, PNG in its model worker; every thread) per image served, "
             "batched_cpu_ms_per_image the reference's (over all its slices), and cpu_ratio = batched ÷ "
             "served. Latency is per request (n images), from send to the parsed answer, on 127.0.0.1. rss_mib_at_100: "
             "the server's peak resident memory (both processes together) after the first 100 requests of the row (cumulative over the server's "
             "life); rss_mib_end: the peak at the end of the row. "
             + "; ".join(rss_notes) + f". Plot: [{path.name}]({path.name}). "
             f"Why the network runs in a child process (`--worker process`): the student's passes of 16 images in a "
             f"thread of one process make {interpreter.get('idle_images_per_s', 0):.0f} images/s while the main thread idles "
             f"and {interpreter.get('busy_images_per_s', 0):.0f} while it runs Python half the time in 1 ms bursts, as an "
             f"HTTP loop under load does ({interpreter.get('slowdown', 0):.2f}× slower: the forward pass of a small model "
             f"is mostly Python, which one process runs one thread at a time).")
    md = harness.write_result(name, rows, COLUMNS, "selfflow serve under load", notes=notes)
    print(f"wrote {md} and {path}")


if __name__ == "__main__":
    main()
