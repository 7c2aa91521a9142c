"""The search service through FastAPI's test client: every route, every bad input, the batching worker."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hihpq.cli import main
from hihpq.index import read_index, write_index
from hihpq.service import create_app
from hihpq.service._model import load_encoder
from hihpq.service.batching import MicroBatcher
from hihpq.service.search import ModelMismatchError
from hihpq.service.uploads import BadImageError, TooManyPixelsError, decode_image


@pytest.fixture(scope="module")
def client(served_index):
    _, _, _, index = served_index
    with TestClient(create_app(index, k_max=20)) as c:
        yield c


def png_bytes(size=(40, 30), colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR announcing width x height, with one tiny IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def upload(c, data: bytes, **form):
    return c.post("/search", files={"image": ("query.png", data, "image/png")}, data=form)


# ------------------------------------------------------------------------------------------------- the routes
def test_health_names_what_is_served(client, served_index):
    _, _, run, index = served_index
    h = client.get("/health").json()
    idx = read_index(index)
    assert h["status"] == "ok"
    assert (h["ntotal"], h["M"], h["K"], h["D"]) == (idx.ntotal, idx.M, idx.K, idx.D)
    assert h["model_fingerprint"] == load_encoder(run).fingerprint


def test_upload_search_equals_embedding_and_scanning_directly(client, served_index):
    _, images, run, index = served_index
    query = sorted((images / "green").iterdir())[2]
    r = upload(client, query.read_bytes(), k="7")
    assert r.status_code == 200, r.text
    body = r.json()
    # the same search done by hand: the model's embedding of the file, scanned over the index file
    idx = read_index(index)
    D, I = idx.search(load_encoder(run).embed([Image.open(query).convert("RGB")]), 7)
    assert [x["id"] for x in body["results"]] == I[0].tolist()
    np.testing.assert_allclose([x["distance"] for x in body["results"]], D[0], rtol=1e-5, atol=1e-6)
    assert [x["path"] for x in body["results"]] == idx.get_metadata(I[0])
    assert all(x["image_url"] == f"/items/{x['id']}/image" for x in body["results"])
    assert body["k"] == 7 and body["took_ms"] > 0


def test_k_defaults_and_can_come_from_the_query_string(client):
    assert len(upload(client, png_bytes()).json()["results"]) == 10
    r = client.post("/search?k=3", files={"image": ("q.png", png_bytes(), "image/png")})
    assert len(r.json()["results"]) == 3


def test_search_by_id_finds_the_item_first_and_matches_its_stored_point(client, served_index):
    idx = read_index(served_index[3])
    item = int(idx.ids[5])
    body = client.post("/search", json={"id": item, "k": 20}).json()
    ids = [x["id"] for x in body["results"]]
    _, I = idx.search(idx.reconstruct(item)[None], 20)
    assert ids == I[0].tolist() and item in ids
    assert body["results"][ids.index(item)]["distance"] == pytest.approx(0.0, abs=1e-4)
    assert body["results"][0]["distance"] == pytest.approx(0.0, abs=1e-4)


def test_k_larger_than_the_index_returns_every_item_once(served_index):
    with TestClient(create_app(served_index[3], k_max=100)) as c:
        ids = [x["id"] for x in c.post("/search", json={"id": 0, "k": 100}).json()["results"]]
    assert sorted(ids) == list(range(24))


def test_item_image_serves_the_indexed_file_only(client, served_index):
    idx = read_index(served_index[3])
    item = int(idx.ids[3])
    r = client.get(f"/items/{item}/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == Path(idx.get_metadata([item])[0]).read_bytes()
    assert client.get("/items/999/image").status_code == 404
    assert client.get("/items/-1/image").status_code == 404
    # ids only: a path in the id slot is not an id (422), an encoded path is not a route (404)
    assert client.get("/items/..%2F..%2Fetc%2Fpasswd/image").status_code in (404, 422)
    assert client.get("/items/../../etc/passwd").status_code == 404
    assert client.get("/items/abc/image").status_code == 422


def test_an_indexed_file_that_is_gone_is_404(tmp_path, served_index):
    _, images, run, _ = served_index
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((images / "red").iterdir())[:3]:
        (photos / p.name).write_bytes(p.read_bytes())
    index = tmp_path / "few.hpq"
    assert main(["encode", str(run), "--images", str(photos), "--out", str(index)]) == 0
    gone = sorted(photos.iterdir())[1]
    gone.unlink()
    with TestClient(create_app(index)) as c:
        r = c.get("/items/1/image")
        assert r.status_code == 404 and "gone" in r.json()["detail"]
        assert c.get("/items/0/image").status_code == 200


def test_page_and_its_assets_are_served_without_any_cdn(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "/static/style.css" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and 'fetch("/search"' in js.text
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_openapi_documents_both_request_kinds(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert "/items/{item_id}/image" in spec["paths"] and "/health" in spec["paths"]
    assert client.get("/docs").status_code == 200


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("k", ["0", "21", "-3", "ten", "2.5"])
def test_k_out_of_range_is_422(client, k):
    r = upload(client, png_bytes(), k=k)
    assert r.status_code == 422 and "k" in r.json()["detail"]


@pytest.mark.parametrize("body", [{"id": 0, "k": 0}, {"id": 0, "k": 21}, {"id": 0, "k": "x"}, {"id": 0, "k": True}])
def test_k_out_of_range_by_id_is_422(client, body):
    assert client.post("/search", json=body).status_code == 422


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"id": 12345}, 404),
        ({"id": -1}, 404),
        ({"id": "3"}, 422),
        ({"id": True}, 422),
        ({"k": 3}, 422),
        ({"id": 1, "path": "/etc/passwd"}, 422),
        ([1, 2], 422),
    ],
)
def test_bad_id_queries(client, body, status):
    r = client.post("/search", json=body)
    assert r.status_code == status and r.json()["detail"]


def test_invalid_json_is_400_and_other_content_types_415(client):
    r = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    r = client.post("/search", content=png_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart" in r.json()["detail"]


def test_form_without_image_field_is_422(client):
    r = client.post("/search", files={"picture": ("q.png", png_bytes(), "image/png")})
    assert r.status_code == 422 and "image" in r.json()["detail"]
    r = client.post("/search", files={"image": (None, "not a file")})  # a plain text field, not a file
    assert r.status_code == 422
    assert client.post("/search", data={"image": "x"}).status_code == 415  # url-encoded: cannot carry a file


def test_not_an_image_is_400(client):
    r = upload(client, b"%PDF-1.4 definitely not a picture")
    assert r.status_code == 400 and "not an image" in r.json()["detail"]
    assert upload(client, b"").status_code == 400


def test_truncated_image_is_400(client):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, format="JPEG")
    r = upload(client, buf.getvalue()[: len(buf.getvalue()) // 2])
    assert r.status_code == 400 and "truncated" in r.json()["detail"]


def test_decompression_bomb_is_refused_before_decoding(client):
    bomb = png_header_only(30_000, 30_000)  # 900 M pixels announced by a file of about 100 bytes
    assert len(bomb) < 200
    r = upload(client, bomb)
    assert r.status_code == 422 and "pixels" in r.json()["detail"]


def test_explicit_pixel_bound(served_index):
    with TestClient(create_app(served_index[3], max_pixels=1000)) as c:
        r = upload(c, png_bytes((40, 30)))  # 1,200 pixels
        assert r.status_code == 422 and "1,000" in r.json()["detail"]
        assert upload(c, png_bytes((30, 30))).status_code == 200


def test_decode_image_errors_carry_their_status():
    with pytest.raises(BadImageError) as e:
        decode_image(b"nope")
    assert e.value.status_code == 400
    with pytest.raises(TooManyPixelsError) as e:
        decode_image(png_header_only(10_000, 10_000), max_pixels=50_000_000)
    assert e.value.status_code == 422
    assert decode_image(png_bytes((5, 4))).size == (5, 4)


def test_upload_over_the_limit_is_413_by_length_and_by_stream(served_index):
    big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)  # ~120 kB as PNG, incompressible
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    data = buf.getvalue()
    with TestClient(create_app(served_index[3], max_upload_mb=0.05)) as c:  # 52 kB
        r = upload(c, data)  # Content-Length says it all
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        boundary = "xyzzy"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )

        def chunks():  # no Content-Length: the server must count what it streams
            for s in range(0, len(body), 8192):
                yield body[s : s + 8192]

        r = c.post("/search", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413
        # a small image behind a large multipart preamble: only the body guard sees the size, by header or stream
        padded = b"x" * 150_000 + b"\r\n" + body.replace(data, png_bytes())
        r = c.post("/search", content=padded, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413
        r = c.post(
            "/search",
            content=(padded[s : s + 8192] for s in range(0, len(padded), 8192)),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert r.status_code == 413
        r = c.post(
            "/search", content=padded[150_002:], headers={"content-type": f"multipart/form-data; boundary={boundary}"}
        )
        assert r.status_code == 200, r.text  # the same form without the padding is fine
        # the image itself over the limit while the body fits the form slack: still 413
        small = data[: 60 * 1024]
        assert upload(c, small).status_code == 413
        assert upload(c, png_bytes()).status_code == 200  # and the server still serves


def test_bad_requests_never_stop_the_worker(client):
    for _ in range(3):
        assert upload(client, b"garbage").status_code == 400
        assert client.post("/search", json={"id": 10**9}).status_code == 404
    assert upload(client, png_bytes()).status_code == 200


def test_a_failing_model_call_fails_that_request_only(served_index, monkeypatch):
    with TestClient(create_app(served_index[3])) as c:
        service = c.app.state.service
        real = service.encoder.embed

        def flaky(images, **kw):
            if any(im.size == (13, 13) for im in images):
                raise RuntimeError("model exploded")
            return real(images, **kw)

        monkeypatch.setattr(service.encoder, "embed", flaky)
        r = upload(c, png_bytes((13, 13)))
        assert r.status_code == 500 and "model exploded" in r.json()["detail"]
        assert upload(c, png_bytes((14, 14))).status_code == 200


def test_concurrent_requests_share_one_model_call_and_the_loop_stays_free(served_index, monkeypatch):
    """While the model is busy, requests queue (the event loop still answers /health); the queued ones then go
    through the model together, each getting its own answer."""
    _, images, run, index = served_index
    queries = [sorted((images / c).iterdir())[i] for c in ("red", "green", "blue") for i in (0, 4)]
    with TestClient(create_app(index, max_batch=16)) as c:
        service = c.app.state.service
        real, gate, calls = service.encoder.embed, threading.Event(), []

        def gated(images, **kw):
            calls.append(len(images))
            gate.wait(60)
            return real(images, **kw)

        monkeypatch.setattr(service.encoder, "embed", gated)
        answers = {}

        def ask(path):
            answers[path] = upload(c, path.read_bytes(), k="5").json()

        threads = [threading.Thread(target=ask, args=(queries[0],))]
        threads[0].start()
        while not calls:  # the worker is now inside the model with the first request
            threading.Event().wait(0.01)
        threads += [threading.Thread(target=ask, args=(q,)) for q in queries[1:]]
        for t in threads[1:]:
            t.start()
        while service.batcher._queue.qsize() < len(queries) - 1:
            assert c.get("/health").status_code == 200  # the loop is free while the model works
            threading.Event().wait(0.01)
        gate.set()
        for t in threads:
            t.join(60)
        assert calls == [1, len(queries) - 1]  # everything that queued went through the model in one call
    idx, enc = read_index(index), load_encoder(run)
    _, I = idx.search(enc.embed([Image.open(q).convert("RGB") for q in queries]), 5)
    for q, row in zip(queries, I, strict=True):
        assert [x["id"] for x in answers[q]["results"]] == row.tolist()


# --------------------------------------------------------------------------------------------- startup checks
def test_a_different_model_fingerprint_refuses_to_start(tmp_path, served_index, capsys):
    _, _, run, index = served_index
    idx = read_index(index)
    other = tmp_path / "other.hpq"
    fake = "0" * 64
    write_index(idx, other, metadata={"model": str(run), "model_fingerprint": fake})
    real = load_encoder(run).fingerprint
    with pytest.raises(ModelMismatchError) as e:
        create_app(other)
    assert fake in str(e.value) and real in str(e.value)
    assert main(["serve", str(other), "--port", "1"]) == 2  # the CLI says so before listening
    err = capsys.readouterr().err
    assert fake in err and real in err


def test_an_index_without_a_model_needs_one(tmp_path, served_index):
    _, _, run, index = served_index
    idx = read_index(index)
    idx.user_metadata = {}
    bare = tmp_path / "bare.hpq"
    write_index(idx, bare)
    with pytest.raises(ValueError, match="--model"):
        create_app(bare)
    with TestClient(create_app(bare, run)) as c:
        assert c.get("/health").json()["ntotal"] == idx.ntotal
    with pytest.raises(FileNotFoundError, match="hihpq encode"):
        create_app(tmp_path / "missing.hpq", run)


# ---------------------------------------------------------------------------------------------- micro-batching
def test_batcher_batches_what_queues_while_it_works_and_isolates_failures():
    release = threading.Event()
    seen: list[list] = []

    def handle(items):
        seen.append(list(items))
        if len(seen) == 1:
            release.wait(10)
        if "bad" in items:
            raise ValueError("bad item")
        return [x * 2 if x != "err" else KeyError("err") for x in items]

    b = MicroBatcher(handle, max_batch=8, max_wait_s=0.0)
    first = b.submit(1)
    while not seen:  # the worker holds the first item alone
        threading.Event().wait(0.001)
    later = [b.submit(x) for x in (2, 3, "bad", 4, "err", 5)]
    release.set()
    assert first.result(10) == 2
    assert [f.result(10) for f in (later[0], later[1], later[3], later[5])] == [4, 6, 8, 10]
    with pytest.raises(ValueError, match="bad item"):
        later[2].result(10)
    with pytest.raises(KeyError):
        later[4].result(10)
    assert seen[1] == [2, 3, "bad", 4, "err", 5]  # one batch of everything that queued; then one by one
    assert b.submit(7).result(10) == 14  # and the worker lives on
    b.close()


def test_batcher_respects_max_batch():
    gate = threading.Event()
    sizes = []

    def handle(items):
        gate.wait(10)
        sizes.append(len(items))
        return list(items)

    b = MicroBatcher(handle, max_batch=3, max_wait_s=0.0)
    futures = [b.submit(i) for i in range(10)]
    gate.set()
    assert [f.result(10) for f in futures] == list(range(10))
    assert max(sizes) <= 3 and sum(sizes) == 10
    b.close()
