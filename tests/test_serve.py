"""selfflow serve: the HTTP API against `selfflow sample`, batching, limits, bad input, SIGTERM drain."""
import base64
import copy
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="selfflow serve needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("httpx", reason="the API tests use httpx (FastAPI's TestClient)")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import selfflow  # noqa: E402
from selfflow.cli import main  # noqa: E402
from selfflow.imageio import to_uint8  # noqa: E402
from selfflow.serve.app import create_app  # noqa: E402
from selfflow.serve.engine import Engine, Limits  # noqa: E402
from support import REPO, TINY_RUN, fit, free_port, one_line_error, tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    """A class-conditional 8×8 digits model, 2 training steps (its saved sampler: euler, 4 steps)."""
    out = tmp_path_factory.mktemp("serve") / "run"
    fit(tiny_run(out, train={"steps": 2}))
    return out


@pytest.fixture(scope="module")
def engine(class_run):
    return Engine.load(class_run, device="cpu")


def pixels(b64: str) -> np.ndarray:
    picture = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert picture.format == "PNG"
    return np.asarray(picture)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 5, 7), (1, 1, 1)])
def test_png_encoding_is_lossless(shape):
    import torch

    from selfflow.serve.engine import png_base64

    image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = image.permute(1, 2, 0).numpy()
    decoded = pixels(png_base64(expected))
    assert np.array_equal(decoded.reshape(expected.shape), expected)


def test_health_describes_the_model_and_its_saved_sampler(engine):
    with TestClient(create_app(engine)) as client:
        health = client.get("/health").json()
    assert health["status"] == "ok"
    assert {k: health["model"][k] for k in ("kind", "classes", "prompts", "image_size", "channels", "sampler", "steps")} == \
        {"kind": "class", "classes": 10, "prompts": False, "image_size": 8, "channels": 1, "sampler": TINY_RUN["sample"].get("sampler", "euler"),
         "steps": TINY_RUN["sample"]["steps"]}


@pytest.mark.parametrize("settings", [{"steps": 3, "sampler": "heun", "labels": [3, 7]},
                                      {},  # the run's saved sampler and steps, labels seed mod 10
                                      {"steps": 2, "cfg_scale": 2.5, "labels": [4]}])
def test_image_k_equals_selfflow_sample(engine, class_run, tmp_path, settings):
    flags = ["--steps", str(settings["steps"])] if "steps" in settings else []
    flags += ["--sampler", settings["sampler"]] if "sampler" in settings else []
    flags += ["--cfg-scale", str(settings["cfg_scale"])] if "cfg_scale" in settings else []
    flags += ["--labels", ",".join(map(str, settings["labels"]))] if "labels" in settings else []
    assert main(["sample", "--ckpt", str(class_run), "--n", "6", "--seed", "11", "--out", str(tmp_path / "s"), "--device", "cpu", *flags]) == 0
    expected = np.load(tmp_path / "s" / "samples.npz")
    with TestClient(create_app(engine)) as client:
        reply = client.post("/v1/generate", json={"n": 6, "seed": 11, **settings}).json()
    assert reply["seeds"] == list(range(11, 17)) and reply["labels"] == expected["labels"].tolist()
    assert reply["nfe"] == (2 if reply["sampler"] == "heun" else 1) * reply["steps"] * (2 if reply.get("cfg_scale", 1) != 1 else 1)
    from_api = to_uint8(selfflow.load(class_run, device="cpu").sample(6, seed=11, **settings)).numpy()
    assert np.array_equal(from_api, expected["images"])
    for k, image in enumerate(reply["images"]):
        assert np.array_equal(pixels(image), expected["images"][k, 0]), f"image {k}"


def test_an_image_is_the_same_alone_or_in_a_crowd(engine):
    """One pass over three requests equals three passes; and through the server, a crowd of concurrent
    requests shares passes (batch > n) while each answer equals the same request made alone."""
    limits = Limits()
    jobs = [engine.job(limits, n=2, seed=5, labels=[1]), engine.job(limits, n=3, seed=40), engine.job(limits, n=1, seed=5, labels=[1])]
    together = engine.run(jobs)
    assert [out.batch for out in together] == [6, 6, 6]
    for job, crowd in zip(jobs, together):
        assert crowd.images == engine.run([job])[0].images
    assert together[0].images[0] == together[2].images[0]  # seed 5, label 1 twice in one batch

    bodies = [{"n": 1 + k % 3, "seed": 100 * k, "labels": [k % 10]} for k in range(12)]
    with TestClient(create_app(engine, Limits(window_ms=150))) as client:
        alone = [client.post("/v1/generate", json=body).json() for body in bodies]
        with ThreadPoolExecutor(len(bodies)) as pool:
            crowd = list(pool.map(lambda body: client.post("/v1/generate", json=body).json(), bodies))
    assert max(reply["batch"] for reply in crowd) > 3  # requests shared a forward pass
    assert all(reply["batch"] == body["n"] for reply, body in zip(alone, bodies))
    for a, c in zip(alone, crowd):
        assert a["images"] == c["images"] and a["seeds"] == c["seeds"]


BAD_BODIES = [
    ('{"n": 2', 400, "malformed JSON"),
    ("[1, 2]", 422, "JSON object"),
    ('{"n": "4"}', 422, "n:"),
    ('{"n": true}', 422, "n:"),
    ('{"seed": 1.5}', 422, "seed:"),
    ('{"labels": "3"}', 422, "labels"),
    ('{"nn": 4}', 422, "unknown field 'nn'"),
    ('{"labels": [10]}', 422, "labels: 10 is out of range [0, 9]"),
    ('{"labels": [-1]}', 422, "labels: -1"),
    ('{"n": 2, "labels": [1, 2, 3]}', 422, "labels: give 1 to n=2"),
    ('{"prompt": "a thick seven"}', 422, "prompt: this is a class-conditional model"),
    ('{"n": 0}', 422, "n=0"),
    ('{"n": 17}', 422, "n=17: must lie in [1, 16]"),
    ('{"steps": 251}', 422, "steps=251"),
    ('{"cfg_scale": 21}', 422, "cfg_scale=21.0"),
    ('{"sampler": "rk9"}', 422, "sampler"),
    ('{"seed": -3}', 422, "seed=-3"),
    ('{"labels": [' + "1," * 40000 + "1]}", 413, "exceeds"),
]


@pytest.mark.parametrize("body,status,words", BAD_BODIES, ids=[b[:24] for b, _, _ in BAD_BODIES])
def test_bad_input_is_one_json_line_and_the_server_keeps_serving(engine, body, status, words):
    with TestClient(create_app(engine), raise_server_exceptions=False) as client:
        reply = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert words in error and "\n" not in error and "Traceback" not in reply.text
        assert client.post("/v1/generate", json={"n": 1}).status_code == 200


def test_wrong_paths_and_methods_are_json_errors(engine):
    with TestClient(create_app(engine)) as client:
        form = client.post("/v1/generate", content=b'{"n": 2}', headers={"content-type": "application/x-www-form-urlencoded"})
        assert form.status_code == 200 and len(form.json()["images"]) == 2  # curl -d without -H
        assert client.post("/v1/generate").json()["seeds"] == [0]  # no body: the defaults
        schema = client.get("/openapi.json").json()
        body = schema["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(body["properties"]) == {"n", "labels", "prompt", "seed", "steps", "sampler", "cfg_scale"}
        assert client.get("/nowhere").json() == {"error": "Not Found"}
        assert client.get("/v1/generate").status_code == 405
        assert client.get("/").text.count("<script>") == 1


def test_a_full_queue_answers_503_with_retry_after(engine):
    """While one pass runs, at most max_queue images wait; the next request is refused, not queued."""
    release, running = threading.Event(), threading.Event()
    real_run = engine.run

    def slow_run(jobs):
        running.set()
        release.wait(30)
        return real_run(jobs)

    limits = Limits(max_n=4, max_batch=4, max_queue=4, window_ms=0)
    app = create_app(engine, limits)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        engine.run = slow_run
        try:
            first = pool.submit(client.post, "/v1/generate", json={"n": 4, "seed": 0})
            assert running.wait(30)
            second = pool.submit(client.post, "/v1/generate", json={"n": 4, "seed": 4})
            deadline = time.time() + 30
            while client.get("/health").json()["queue"]["waiting_images"] < 4 and time.time() < deadline:
                time.sleep(0.01)
            refused = client.post("/v1/generate", json={"n": 1})
            assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
            assert "busy" in refused.json()["error"]
        finally:
            release.set()
            engine.run = real_run
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert client.post("/v1/generate", json={"n": 1}).status_code == 200


def test_requests_that_arrive_during_a_pass_make_the_next_pass(engine):
    """Continuous batching: a lone request starts a pass at once (no window); the requests that arrive
    while it runs wait, and the next pass takes them all together, each answer still its own images."""
    release, running = threading.Event(), threading.Event()
    real_run, passes = engine.run, []

    def held_run(jobs):
        passes.append([job.seeds for job in jobs])
        running.set()
        if len(passes) == 1:
            release.wait(30)
        return real_run(jobs)

    bodies = [{"n": 2, "seed": 10 * k, "labels": [k]} for k in range(5)]
    with TestClient(create_app(engine)) as client, ThreadPoolExecutor(len(bodies) + 1) as pool:
        alone = [client.post("/v1/generate", json=body).json() for body in bodies]
        engine.run = held_run
        try:
            first = pool.submit(client.post, "/v1/generate", json={"n": 1, "seed": 999})
            assert running.wait(30)  # the first pass started with the lone request
            crowd = [pool.submit(client.post, "/v1/generate", json=body) for body in bodies]
            deadline = time.time() + 30
            while client.get("/health").json()["queue"]["waiting_images"] < 10 and time.time() < deadline:
                time.sleep(0.01)
        finally:
            release.set()
        answers = [reply.result().json() for reply in crowd]
        engine.run = real_run
    assert first.result().json()["batch"] == 1
    assert passes[0] == [(999,)] and len(passes) == 2 and sorted(passes[1]) == sorted(tuple(a["seeds"]) for a in alone)
    assert all(answer["batch"] == 10 for answer in answers)
    assert [a["images"] for a in answers] == [a["images"] for a in alone]


def test_a_caption_model_takes_prompts_not_labels(tmp_path):
    from selfflow.config import config_from_dict
    from support import train_config

    raw = copy.deepcopy(TINY_RUN)
    raw["text"] = {"encoder": "hashed", "hashed_dim": 32, "captions_per_image": 2, "cache_dir": str(tmp_path / "cache")}
    raw["train"].update({"out_dir": str(tmp_path / "text"), "steps": 1})
    train_config(config_from_dict(raw))
    assert main(["sample", "--ckpt", str(tmp_path / "text"), "--prompt", "a thick seven", "--n", "3", "--seed", "2",
                 "--steps", "2", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0
    expected = np.load(tmp_path / "s" / "samples.npz")["images"]
    engine = Engine.load(tmp_path / "text", device="cpu")
    with TestClient(create_app(engine)) as client:
        assert client.get("/health").json()["model"]["prompts"] is True
        reply = client.post("/v1/generate", json={"n": 3, "seed": 2, "steps": 2, "prompt": "a thick seven"}).json()
        assert all(np.array_equal(pixels(image), expected[k, 0]) for k, image in enumerate(reply["images"]))
        assert "prompt" in client.post("/v1/generate", json={"n": 1}).json()["error"]
        assert "labels" in client.post("/v1/generate", json={"labels": [1], "prompt": "x"}).json()["error"]
        assert "201 characters" in client.post("/v1/generate", json={"prompt": "x" * 201}).json()["error"]


def test_serve_refuses_bad_flags_in_one_line(class_run, tmp_path, capsys):
    assert main(["serve", "--ckpt", str(tmp_path / "missing"), "--port", "0"]) == 2
    one_line_error(capsys, "missing")
    assert main(["serve", "--ckpt", str(class_run), "--max-n", "100", "--max-batch", "8"]) == 2
    one_line_error(capsys, "--max-n 100", "--max-batch 8")
    assert main(["serve", "--ckpt", str(class_run), "--threads", "0"]) == 2
    one_line_error(capsys, "--threads 0")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--ckpt", str(class_run), "--port", str(taken.getsockname()[1])]) == 2
        one_line_error(capsys, "--port")


def start_server(ckpt, port: int, *flags) -> subprocess.Popen:
    """``python -m selfflow serve`` on 127.0.0.1:port, returned once /health answers."""
    import httpx

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "selfflow", "serve", "--ckpt", str(ckpt), "--port", str(port),
                             "--device", "cpu", *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.communicate()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not answer /health in 60 s")


def test_the_model_worker_process_answers_as_the_engine_does(class_run, engine):
    """selfflow serve runs the network in a child process: its answers are the in-process engine's, alone
    and in a crowd of concurrent requests."""
    import httpx

    port = free_port()
    proc = start_server(class_run, port)
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health").json()["model"] == engine.describe()
        bodies = [{"n": 1 + k % 3, "seed": 7 * k, "labels": [k % 10]} for k in range(8)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda body: httpx.post(url + "/v1/generate", json=body, timeout=60).json(), bodies))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    limits = Limits()
    for body, reply in zip(bodies, replies):
        assert reply["images"] == engine.run([engine.job(limits, **body)])[0].images


def test_a_model_worker_that_dies_is_replaced_and_serving_goes_on(class_run, engine):
    """A worker killed between passes is restarted before the next one (that pass still answers);
    one killed during a pass fails that pass only, and the pass after it answers again."""
    import os

    from selfflow.serve.engine import ProcessWorker

    limits = Limits()
    jobs = [engine.job(limits, n=2, seed=5, labels=[3])]
    expected = engine.run(jobs)[0].images
    worker = ProcessWorker(class_run, "ema", "cpu", "auto", 1)

    def run(jobs):  # one pass, as the server's event loop awaits it
        import asyncio

        return asyncio.run(worker.run(jobs))

    try:
        assert run(jobs)[0].images == expected
        first = worker._process.pid
        os.kill(first, signal.SIGKILL)
        worker._process.join(10)
        assert run(jobs)[0].images == expected and worker.restarts == 1 and worker._process.pid != first
        worker._conn.close()  # the pipe breaks mid-pass, as when the worker dies while computing
        worker._process.kill()
        with pytest.raises(RuntimeError, match="model worker exited"):
            run(jobs)
        assert worker.restarts == 2 and run(jobs)[0].images == expected
    finally:
        worker.close()


def test_sigterm_drains_requests_in_flight_and_exits_0(class_run):
    import httpx
    import psutil

    port = free_port()
    proc = start_server(class_run, port, "--window-ms", "1500")
    children = psutil.Process(proc.pid).children()  # the model worker (and multiprocessing's resource tracker)
    assert any(child.cmdline()[-1].startswith("--multiprocessing-fork") for child in children)
    try:
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.post, f"http://127.0.0.1:{port}/v1/generate", json={"n": 3, "steps": 50}, timeout=60)
            deadline, waiting = time.time() + 30, 0  # until the request waits in the batcher's window
            while waiting < 3 and time.time() < deadline:
                waiting = httpx.get(f"http://127.0.0.1:{port}/health").json()["queue"]["waiting_images"]
            assert waiting == 3
            proc.send_signal(signal.SIGTERM)
            reply = in_flight.result()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert reply.status_code == 200 and len(reply.json()["images"]) == 3
    assert proc.returncode == 0, err
    time.sleep(1)
    assert all(not child.is_running() or child.status() == psutil.STATUS_ZOMBIE for child in children)  # none outlives the server
    assert "Traceback" not in err and "stopped after" in out


def test_an_unconditional_model_takes_no_labels_and_no_guidance(tmp_path):
    fit(tiny_run(tmp_path / "run", data={"name": "digits", "class_conditional": False}, train={"steps": 1}))
    assert main(["sample", "--ckpt", str(tmp_path / "run"), "--n", "2", "--seed", "4", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0
    expected = np.load(tmp_path / "s" / "samples.npz")["images"]
    with TestClient(create_app(Engine.load(tmp_path / "run", device="cpu"))) as client:
        assert client.get("/health").json()["model"] | {"kind": "unconditional", "classes": None} == client.get("/health").json()["model"]
        reply = client.post("/v1/generate", json={"n": 2, "seed": 4}).json()
        assert reply["labels"] is None
        assert all(np.array_equal(pixels(image), expected[k, 0]) for k, image in enumerate(reply["images"]))
        assert "unconditional" in client.post("/v1/generate", json={"labels": [1]}).json()["error"]
        assert "cfg_scale=2.0" in client.post("/v1/generate", json={"cfg_scale": 2}).json()["error"]
        assert client.post("/v1/generate", json={"prompt": "a seven"}).status_code == 422


def test_dopri5_requests_never_share_a_pass(engine):
    """dopri5's step size is chosen for the whole batch, so its requests run alone; fixed-step ones share."""
    limits = Limits()
    assert engine.job(limits, seed=1, sampler="dopri5").key != engine.job(limits, seed=1, sampler="dopri5").key
    assert engine.job(limits, seed=1, sampler="heun").key == engine.job(limits, seed=9, sampler="heun", labels=[2]).key
    assert engine.job(limits, seed=1, steps=3).key != engine.job(limits, seed=1, steps=4).key


@pytest.mark.parametrize("prompt,labels,seeds", [(None, (3, 3, 7), (5, 6, 7)), ('a "thick" seven\\ — ünïcode\n', None, (0,)),
                                                 (None, None, (2**62 - 1,))])
def test_the_hand_built_answer_is_the_json_the_encoder_writes(prompt, labels, seeds):
    """/v1/generate's answer is put together from bytes (the generic encoder costs too much per request):
    it parses to exactly what json.dumps of the same fields gives, escapes included."""
    from selfflow.serve.app import generated_json
    from selfflow.serve.engine import Job, Output

    job = Job(seeds, labels, prompt, "euler", 4, 1.5)
    output = Output(["iVBORw0KGgo=", "AAAA"][: len(seeds)] * 2, 8.0, 16)
    expected = {"images": output.images, "seeds": list(seeds), "labels": list(labels) if labels else None, "prompt": prompt,
                "sampler": "euler", "steps": 4, "cfg_scale": 1.5, "nfe": 8, "ms": 12.345, "batch": 16}
    assert json.loads(generated_json(job, output, 12.345)) == expected == json.loads(json.dumps(expected))


def test_one_send_holds_a_response_head_for_its_body_and_never_longer():
    """selfflow serve's transport: a response's head leaves with its body in one send; a head alone
    leaves at the end of the event loop's turn; close sends what is held first; other data is not held."""
    import asyncio

    from selfflow.serve.cli import _OneSend

    class Recorder:
        def __init__(self):
            self.writes, self.closed = [], False

        def write(self, data):
            self.writes.append(data)

        def close(self):
            self.closed = True

        def get_extra_info(self, name):
            return ("127.0.0.1", 1) if name == "peername" else None

    async def scenario():
        loop = asyncio.get_running_loop()
        inner = Recorder()
        transport = _OneSend(inner, loop)
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"{}")
        assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")  # no body follows
        assert len(inner.writes) == 1
        await asyncio.sleep(0)
        assert inner.writes[-1] == b"HTTP/1.1 204 No Content\r\n\r\n"
        transport.write(b"chunk")  # not a head: straight through
        assert inner.writes[-1] == b"chunk"
        transport.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
        transport.close()
        assert inner.closed and inner.writes[-1].startswith(b"HTTP/1.1 500")
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else is the transport's

    asyncio.run(scenario())


def test_the_load_benchmark_runs_end_to_end(class_run, tmp_path):
    """benchmarks/serve_load.py on a tiny model: every request answered, slices interleaved with the
    reference, the steady part measured, the report written, the servers stopped with status 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SELFFLOW_BENCH_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--student", str(class_run),
                             "--teacher", str(class_run), "--concurrency", "1,3", "--n", "1,2", "--requests", "60",
                             "--teacher-requests", "12", "--rounds", "2", "--reference-seconds", "0.4", "--name", "serve_load_tiny"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "results" / "serve_load_tiny.json").read_text())["rows"]
    assert len(rows) == 8 and {row["model"] for row in rows} == {"student", "teacher"}
    for row in rows:
        assert row["errors"] == 0 and row["lost"] == 0 and row["ok"] == row["requests"]
        assert row["images_per_s"] > 0 and row["batched_images_per_s"] > 0 and row["ratio_min"] <= row["ratio_max"]
        assert row["slices"] >= 1 and row["pass_images"] >= 1
    assert "student: server exit status 0 after SIGTERM" in (tmp_path / "serve_load_tiny.md").read_text()


def test_closing_a_stuck_model_worker_kills_it_without_holding_up_shutdown(class_run):
    """A worker that cannot answer (stopped here with SIGSTOP) is killed a few seconds after close asks it
    to exit, instead of holding the server's shutdown up."""
    from selfflow.serve.engine import ProcessWorker

    worker = ProcessWorker(class_run, "ema", "cpu", "auto", 1)
    os.kill(worker._process.pid, signal.SIGSTOP)
    start = time.perf_counter()
    worker.close()
    assert time.perf_counter() - start < 15 and not worker._process.is_alive()


def test_the_server_replaces_a_killed_model_worker_between_and_during_passes(class_run, engine):
    """Through the event loop's path (the pipe watched like a socket): a worker killed between requests is
    replaced before the next pass, which answers; one killed during a pass fails that pass's request with a
    one-line 500, and the request after it is answered by a new worker with the same images."""
    import httpx
    import psutil

    port = free_port()
    proc = start_server(class_run, port)
    url = f"http://127.0.0.1:{port}/v1/generate"

    def worker_pid():
        return next(child.pid for child in psutil.Process(proc.pid).children() if "--multiprocessing-fork" in child.cmdline())

    body = {"n": 2, "seed": 5, "labels": [3]}
    expected = engine.run([engine.job(Limits(), **body)])[0].images
    try:
        assert httpx.post(url, json=body, timeout=60).json()["images"] == expected
        first = worker_pid()
        os.kill(first, signal.SIGKILL)
        time.sleep(0.5)
        assert httpx.post(url, json=body, timeout=120).json()["images"] == expected  # a new worker, same images
        second = worker_pid()
        assert second != first
        with ThreadPoolExecutor(1) as pool:  # a long pass (250 Heun steps), killed while it runs
            slow = pool.submit(httpx.post, url, json={"n": 16, "steps": 250, "sampler": "heun"}, timeout=120)
            time.sleep(0.5)
            os.kill(second, signal.SIGKILL)
            reply = slow.result()
        assert reply.status_code == 500 and "model worker exited" in reply.json()["error"] and "\n" not in reply.text
        assert httpx.post(url, json=body, timeout=120).json()["images"] == expected
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_a_failing_pass_answers_a_one_line_500_and_the_server_goes_on(engine):
    real_run = engine.run

    def broken_run(jobs):
        raise FloatingPointError("the network gave NaN\nat step 3")

    with TestClient(create_app(engine)) as client:
        engine.run = broken_run
        try:
            reply = client.post("/v1/generate", json={"n": 2, "seed": 1})
        finally:
            engine.run = real_run
        assert reply.status_code == 500 and "\n" not in reply.text
        assert reply.json() == {"error": "the forward pass failed (FloatingPointError: the network gave NaN at step 3); "
                                         "the server keeps serving"}
        assert client.post("/v1/generate", json={"n": 2, "seed": 1}).status_code == 200
