"""The HTTP face of :class:`~hihpq.service.search.SearchService`: a FastAPI app (OpenAPI docs at ``/docs``).

Routes: ``POST /search`` (an uploaded image, or the id of an indexed item), ``GET /items/{id}/image`` (the file
of an indexed item: clients name ids, never paths, so nothing outside the index can be served), ``GET /health``
and ``GET /`` (the web page). The model never runs on the event loop: decoding happens in the thread pool and
the search in the batching worker.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import os
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from hihpq import __version__
from hihpq.service.search import Query, SearchService
from hihpq.service.uploads import DEFAULT_MAX_PIXELS, BadImageError, decode_image

log = logging.getLogger(__name__)

#: bytes a multipart body may carry beyond the image itself (boundaries, part headers, the k field)
_FORM_OVERHEAD = 64 * 1024
_STATIC = {"app.js": "text/javascript", "style.css": "text/css"}


class SearchResult(BaseModel):
    id: int = Field(description="the item's id in the index")
    path: str | None = Field(description="the path stored for the item (None if the index stores none)")
    distance: float = Field(description="product geodesic distance to the query (ADC)")
    image_url: str = Field(description="where the item's image is served")


class SearchResponse(BaseModel):
    results: list[SearchResult]
    k: int
    took_ms: float = Field(description="time from the request's arrival to the answer, in milliseconds")


class _BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413: by Content-Length before reading anything, and by
    counting the streamed bytes (a chunked upload has no Content-Length)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _detail(self) -> str:
        return f"the request body is over the upload limit of {self.max_bytes / 2**20:.1f} MB; send a smaller image"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            code = 413 if length.isdigit() else 400
            detail = self._detail() if code == 413 else "invalid Content-Length header"
            await JSONResponse({"detail": detail}, status_code=code)(scope, receive, send)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._detail())
            return message

        await self.app(scope, limited_receive, send)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def create_app(
    index_path: str | Path,
    model: str | Path | None = None,
    *,
    device: str = "cpu",
    max_upload_mb: float = 10,
    max_batch: int = 16,
    max_wait_ms: float = 4.0,
    k: int = 10,
    k_max: int = 100,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int | None = None,
) -> FastAPI:
    """The search app over ``index_path``; the model (default: the one the index records) and the index are
    loaded here, once, so a wrong model or a bad file stops the server before it listens.

    Args:
        device: where the model runs. max_upload_mb: largest accepted upload (413 above).
        max_batch, max_wait_ms: the worker handles up to ``max_batch`` queued searches together, waiting at most
            ``max_wait_ms`` for more after the first. k: default number of results; k_max: the most a request
            may ask for (422 above). max_pixels: largest accepted image (422 above). threads: torch threads
            (default: the usable cores).
    """
    if not 1 <= k <= k_max:
        raise ValueError(f"need 1 <= k <= k_max, got k = {k}, k_max = {k_max}")
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be > 0, got {max_upload_mb}")
    import torch

    torch.set_num_threads(threads or _usable_cores())
    service = SearchService(index_path, model, device=device, max_batch=max_batch, max_wait_s=max_wait_ms / 1000)
    limit = int(max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        title="hihpq search",
        version=__version__,
        description=f"Image search over {service.index.ntotal:,} items of {service.index_path.name}.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_BodyLimit, max_bytes=limit + _FORM_OVERHEAD)

    def parse_k(value) -> int:
        if value is None or value == "":
            return k
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise HTTPException(422, f"k must be an integer in [1, {k_max}], got {value!r}")
        try:
            n = int(value)
        except ValueError:
            raise HTTPException(422, f"k must be an integer in [1, {k_max}], got {value!r}") from None
        if not 1 <= n <= k_max:
            raise HTTPException(422, f"k must be in [1, {k_max}], got {n}")
        return n

    async def image_query(request: Request) -> Query:
        form = await request.form(max_files=1, max_fields=8)
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise HTTPException(422, "the form has no file field `image`; upload the query image under that name")
            data = await upload.read(limit + 1)
            k_field = form.get("k")
        finally:
            await form.close()
        if len(data) > limit:
            raise HTTPException(413, f"the image is over the upload limit of {max_upload_mb:g} MB")
        n = parse_k(k_field if k_field is not None else request.query_params.get("k"))
        try:
            image = await run_in_threadpool(decode_image, data, max_pixels)
        except BadImageError as exc:
            raise HTTPException(exc.status_code, str(exc)) from None
        return Query(k=n, image=image)

    async def id_query(request: Request) -> Query:
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, 'the body is not valid JSON; send {"id": ITEM_ID, "k": 10}') from None
        if not isinstance(body, dict) or "id" not in body:
            raise HTTPException(422, 'the JSON body must be an object {"id": ITEM_ID, "k": 10}')
        extra = sorted(set(body) - {"id", "k"})
        if extra:
            raise HTTPException(422, f"unknown field(s) {extra}; the JSON body takes only id and k")
        item = body["id"]
        if isinstance(item, bool) or not isinstance(item, int):
            raise HTTPException(422, f"id must be an integer item id, got {item!r}")
        n = parse_k(body.get("k"))
        try:
            point = service.item_point(item)
        except KeyError:
            raise HTTPException(404, f"no item with id {item} in the index") from None
        return Query(k=n, point=point)

    @app.post(
        "/search",
        response_model=SearchResponse,
        responses={
            400: {"description": "not an image, truncated image, unreadable body"},
            404: {"description": "unknown item id"},
            413: {"description": "upload over the size limit"},
            415: {"description": "neither multipart/form-data nor JSON"},
            422: {"description": "k out of range, missing field, too many pixels"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {
                                "image": {"type": "string", "format": "binary"},
                                "k": {"type": "integer", "minimum": 1, "maximum": k_max, "default": k},
                            },
                        }
                    },
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["id"],
                            "properties": {
                                "id": {"type": "integer", "description": "an indexed item's id"},
                                "k": {"type": "integer", "minimum": 1, "maximum": k_max, "default": k},
                            },
                        }
                    },
                },
            }
        },
    )
    async def search(request: Request) -> SearchResponse:
        """The k nearest indexed items of an uploaded image (multipart field `image`) or of an indexed item
        (JSON `{"id": ..., "k": ...}`)."""
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            query = await image_query(request)
        elif ctype == "application/json":
            query = await id_query(request)
        else:
            raise HTTPException(
                415, 'send multipart/form-data with the image in field `image`, or JSON {"id": ITEM_ID, "k": 10}'
            )
        try:
            distances, ids = await asyncio.wrap_future(service.submit(query))
        except Exception as exc:
            log.exception("search failed")
            raise HTTPException(500, f"the search failed: {exc}") from None
        results = [
            SearchResult(id=int(i), path=name, distance=float(d), image_url=f"/items/{int(i)}/image")
            for d, i, name in zip(distances, ids, service.names(ids), strict=True)
        ]
        return SearchResponse(results=results, k=query.k, took_ms=(time.perf_counter() - t0) * 1000)

    @app.get("/items/{item_id}/image", responses={404: {"description": "unknown id, or its file is gone"}})
    def item_image(item_id: int) -> FileResponse:
        """The image file of an indexed item (only files the index records can be served)."""
        try:
            path = service.item_file(item_id)
        except KeyError as exc:
            raise HTTPException(404, exc.args[0]) from None
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @app.get("/health")
    def health() -> dict:
        """Liveness and what is being served."""
        index = service.index
        return {
            "status": "ok",
            "ntotal": index.ntotal,
            "model_fingerprint": service.fingerprint,
            "M": index.M,
            "K": index.K,
            "D": index.D,
            "geometry": index.geometry,
            "device": str(service.encoder.device),
            "k": k,
            "k_max": k_max,
            "max_upload_mb": max_upload_mb,
            "has_paths": index.has_item_metadata,
            "recent_batch_sizes": list(service.batcher.batch_sizes),  # the last 100 batches the worker ran
        }

    pages = {
        name: (resources.files("hihpq.service") / "static" / name).read_bytes() for name in [*_STATIC, "index.html"]
    }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(pages["index.html"])

    def static_route(name: str, media: str):
        @app.get(f"/static/{name}", include_in_schema=False)
        def static() -> Response:
            return Response(pages[name], media_type=media)

    for name, media in _STATIC.items():
        static_route(name, media)
    return app
