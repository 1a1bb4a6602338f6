"""`fewtune serve`: fine-tuned runs behind an OpenAI-compatible HTTP API (see api.py and engine.py)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def serve(targets: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          precision: str = "auto", max_queue: int = 64, max_batch: int = 16, window_ms: float = 20.0,
          graceful_s: float = 30.0) -> None:
    """Load the targets and answer requests until SIGINT/SIGTERM (in-flight requests are finished first)."""
    import uvicorn

    from fewtune.serve.api import create_app
    from fewtune.serve.engine import Batcher, load_models

    if not targets:
        raise ValueError("name at least one run directory or model to serve")
    models = load_models(targets, precision)
    app = create_app(models, api_key, Batcher(max_queue=max_queue, window_s=window_ms / 1000, max_batch=max_batch))
    log.info("serving %s on http://%s:%d/v1", ", ".join(models), host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=graceful_s)
