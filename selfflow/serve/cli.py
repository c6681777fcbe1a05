"""``selfflow serve --ckpt PATH``: the application under uvicorn, bound to 127.0.0.1 unless told otherwise.

SIGTERM (or Ctrl-C) stops taking connections, lets every request in flight finish (``--drain-seconds``
at most), then exits with status 0."""
from __future__ import annotations

import gc
import os
import signal
import socket

from selfflow.errors import ConfigError


def add_parser(sub) -> None:
    from selfflow.serve.engine import Limits

    d = Limits()
    p = sub.add_parser("serve", help="serve a generator over HTTP: /v1/generate, /health, a web page at /")
    p.add_argument("--ckpt", required=True, help="checkpoint folder, run folder, or exported model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="which weights of a training checkpoint")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="network precision: auto = bf16 autocast on CUDA, fp32 on the CPU (as selfflow sample)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="images in one forward pass")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="images that may wait; beyond: 503 with Retry-After")
    p.add_argument("--max-n", type=int, default=d.max_n, help="images one request may ask for")
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--max-cfg-scale", type=float, default=d.max_cfg_scale)
    p.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars)
    p.add_argument("--window-ms", type=float, default=d.window_ms,
                   help="how long an idle worker waits for company to a lone request (default 0: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the network on the CPU (default: cores − 1, leaving one to the HTTP loop)")
    p.add_argument("--worker", default="process", choices=["process", "thread"],
                   help="where the network runs: a child process (default; the HTTP loop keeps its own interpreter "
                        "and core) or a thread of the server's process")
    p.add_argument("--drain-seconds", type=float, default=60.0, help="on SIGTERM, how long requests in flight may take")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=cmd_serve)


def limits_of(args):
    from selfflow.serve.engine import Limits

    limits = Limits(max_n=args.max_n, max_steps=args.max_steps, max_cfg_scale=args.max_cfg_scale,
                    max_prompt_chars=args.max_prompt_chars, max_batch=args.max_batch, max_queue=args.max_queue,
                    window_ms=args.window_ms)
    limits.validate()
    return limits


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port is a one-line error."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must lie in [0, 65535]")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from selfflow.serve.app import create_app
    except ImportError as exc:
        raise ConfigError(f"selfflow serve needs FastAPI and uvicorn ({exc.name} is missing): "
                          f"pip install 'selfflow[serve]'") from None
    import torch

    from selfflow.serve.engine import Engine, ProcessWorker

    limits = limits_of(args)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: must be at least 1")
    sock = bind(args.host, args.port)
    threads = args.threads or max(1, (os.cpu_count() or 1) - 1)  # on the CPU, a core left to the HTTP loop
    worker = None
    try:
        if args.worker == "process":
            engine = Engine.load(args.ckpt, args.weights, "cpu", args.precision)  # here only to check requests
            worker = ProcessWorker(args.ckpt, args.weights, args.device, args.precision, threads)
        else:
            engine = Engine.load(args.ckpt, args.weights, args.device, args.precision)
            torch.set_num_threads(threads)
        model = engine.describe() | ({"device": worker.device} if worker else {})
        return _serve(args, sock, create_app(engine, limits, worker), model, uvicorn)
    finally:
        if worker is not None:
            worker.close()
        sock.close()


class _OneSend:
    """A connection's transport that sends a response's head and body together.

    uvicorn writes the status line and headers when the application starts its response and the body
    when it sends it: two sends, two packets on the wire and two wake-ups of the client, for answers
    of a few hundred bytes. Here a head waits for what follows it in the same turn of the event loop
    (the body, which ``POST /v1/generate`` sends at once) and leaves with it in one send; at the latest
    it leaves at the end of that turn, so a response without a body is never held back. Everything else
    is the transport's own."""

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport, loop):
        self._transport, self._loop, self._held = transport, loop, None

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
            self._transport.write(data)
        elif data.startswith(b"HTTP/"):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name):
        return getattr(self._transport, name)


def http_protocol():
    """uvicorn's httptools protocol on a :class:`_OneSend` transport, or ``"auto"`` without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class OneSendProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(_OneSend(transport, self.loop))

    return OneSendProtocol


def _serve(args, sock, app, model: dict, uvicorn) -> int:
    """Run ``app`` on ``sock`` until SIGTERM or Ctrl-C, then drain; 0 once drained."""
    # No proxy-header rewriting (nothing here reads the client's address) and an access log only at
    # info/debug: both cost server CPU on every request of a one-step model.
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.drain_seconds,
                                           proxy_headers=False, access_log=args.log_level in ("debug", "info"),
                                           http=http_protocol()))
    host, port = sock.getsockname()[:2]
    print(f"serving {model['kind']} model {model['checkpoint']} ({model['sampler']}, {model['steps']} step(s)) "
          f"on http://{host}:{port}/ — SIGTERM or Ctrl-C drains and stops", flush=True)
    # Everything loaded so far lives as long as the server: the collector's full passes need not walk it
    # again and again (a model's objects make a full pass take tens of milliseconds).
    gc.freeze()
    # uvicorn re-raises the signal that stopped it once it has drained; ours records it, so a drained
    # shutdown returns 0 instead of dying by the signal.
    stopped = []
    previous = {sig: signal.signal(sig, lambda number, frame: stopped.append(number)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"stopped after {server.server_state.total_requests} request(s)", flush=True)
    return 0
