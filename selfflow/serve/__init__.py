"""``selfflow serve``: a generator behind an HTTP API and a web page.

- :mod:`selfflow.serve.engine`: the loaded generator, request checking, and the batcher that gathers
  concurrent requests into one forward pass (per-request seeds, so batching never changes an image);
- :mod:`selfflow.serve.app`: the FastAPI application (``/health``, ``/v1/generate``, ``/``), one-line
  JSON errors; :mod:`selfflow.serve.page`: the web page (no assets from outside the server);
- :mod:`selfflow.serve.cli`: the command, uvicorn, SIGTERM drain.

FastAPI and uvicorn come with the ``serve`` extra (``pip install "selfflow[serve]"``).
"""
