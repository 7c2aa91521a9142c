"""Search over HTTP: ``hihpq serve INDEX`` (FastAPI on uvicorn) with a small web page.

Needs the ``serve`` extra (``pip install 'hihpq[serve]'``): fastapi, uvicorn, python-multipart.
"""

from __future__ import annotations

from pathlib import Path

_INSTALL = "pip install 'hihpq[serve]' (fastapi, uvicorn, python-multipart)"


def create_app(*args, **kwargs):
    """See :func:`hihpq.service.app.create_app` (imported lazily: FastAPI is an optional dependency)."""
    try:
        from hihpq.service.app import create_app as _create_app
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"the search service needs {exc.name}: {_INSTALL}") from None
    return _create_app(*args, **kwargs)


def serve(
    index_path: str | Path,
    model: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **app_options,
) -> None:
    """Load the index and its model, then serve them with uvicorn until interrupted (one process: the model and
    the memory-mapped index are loaded once; concurrency comes from the batching worker)."""
    try:
        import uvicorn
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"the search service needs {exc.name}: {_INSTALL}") from None
    app = create_app(index_path, model, **app_options)
    service = app.state.service
    print(
        f"serving {service.index.ntotal:,} items of {index_path} (model {service.model_path}) "
        f"on http://{host}:{port}/  (API docs: /docs)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
