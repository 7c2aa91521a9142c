"""Load test of `hihpq serve`: image searches over 1M codes from concurrent clients, on loopback.

Run: ``python bench/serve_load.py`` (options: --n, --requests, --clients, --k, --image-size, --workdir, --out).
Trains a tiny model (1 epoch on 24 generated photos, the default 112-px EfficientNet-Lite0 and 32-bit codes, M = 4,
K = 256) with ``hihpq train`` and encodes the photos with ``hihpq encode``; then writes an index with the same
codebooks and model record holding --n random codes (item paths cycle through the photos), starts
``hihpq serve`` on 127.0.0.1 (a free port, a subprocess) and sends --requests image searches (multipart uploads of
--image-size JPEGs) from --clients concurrent clients, each on its own keep-alive connection, after a warm-up.
It stops by itself. Reference, measured in the same run before the server starts: the same searches in this
process one at a time (decode, embed, scan; no HTTP, no batching). Prints requests/s, p50/p99 latency, the error
count (must be 0), the worker's batch sizes and the ratio served / in-process; the LAST line is the JSON saved in
bench/results/serve_load.json with the command, versions and git commit.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from hihpq.cli import main as hihpq
from hihpq.index import read_index, write_index
from hihpq.runinfo import run_record, write_json


def _photos(root: Path, per_colour: int = 8, size: int = 64) -> Path:
    """Noisy images of three dominant colours (the training set of the tiny model)."""
    rng = np.random.default_rng(0)
    for name, rgb in {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_colour):
            img = np.clip(np.array(rgb) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{k:03d}.png")
    return root


def _query_jpegs(n: int, size: int, seed: int = 1) -> list[bytes]:
    """Photo-like queries: smooth random colour fields plus noise, as JPEG (what a user uploads)."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(n):
        a = rng.uniform(0, 255, (3, 3))
        field = a[:, 0, None, None] + a[:, 1, None, None] * xx + a[:, 2, None, None] * yy
        img = np.clip(field.transpose(1, 2, 0) / 2 + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _multipart(jpeg: bytes, k: int, boundary: str = "hihpqbenchboundary") -> tuple[bytes, str]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + jpeg + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _train_and_encode(work: Path) -> tuple[Path, Path]:
    photos = _photos(work / "photos").resolve()
    run, small = work / "run", work / "photos.hpq"
    if not (run / "model.pt").is_file():
        overrides = {
            "data.dataset": "folder",
            "data.n_query": 4,
            "data.n_train": 20,
            "features.n_views": 2,
            "features.num_workers": 0,
            "features.cache_dir": str(work / "cache"),
            "train.epochs": 1,
            "train.batch_size": 20,
            "hierarchy.levels": "[4,2]",
            "hierarchy.warmup_epochs": 1,
        }
        args = ["train", "cifar10-ii-32", "--out", str(run), "--no-eval", "--data", str(photos)]
        for key, value in overrides.items():
            args += ["-o", f"{key}={value}"]
        assert hihpq(args) == 0, "training the tiny model failed"
    if not small.is_file():
        assert hihpq(["encode", str(run), "--images", str(photos), "--out", str(small)]) == 0
    return run, small


def _big_index(small_path: Path, n: int, path: Path) -> None:
    """--n random codes under the small index's codebooks and model record; paths cycle through its photos."""
    small = read_index(small_path)
    big = type(small)(small.codebooks, small.curvatures, geometry=small.geometry, clip_r=small.clip_r)
    names = small.get_metadata(small.ids)
    codes = np.random.default_rng(0).integers(0, small.K, (n, small.M), dtype=np.uint8)
    big.add_codes(codes, metadata=[names[i % len(names)] for i in range(n)])
    write_index(big, path, metadata=small.user_metadata)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(run: Path, index_path: Path, jpegs: list[bytes], n: int, k: int, threads: int) -> dict:
    """The same searches in this process, one at a time: decode, embed, scan (torch threads as the server's)."""
    import torch

    from hihpq.service._model import load_encoder
    from hihpq.service.uploads import decode_image

    torch.set_num_threads(threads)
    enc, index = load_encoder(run), read_index(index_path)
    index.search(enc.embed([decode_image(jpegs[0])]), k)  # warm-up (kernels compile)
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        index.search(enc.embed([decode_image(jpegs[i % len(jpegs)])]), k)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"requests": n, "requests_per_s": n / wall, "p50_ms": 1000 * statistics.median(lat)}


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hihpq serve exited with {proc.returncode}")
        try:
            return _get_json(port, "/health")
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"hihpq serve did not answer within {timeout:.0f} s")


def _get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _load(port: int, bodies: list[tuple[bytes, str]], n: int, clients: int, k: int) -> dict:
    """``n`` searches from ``clients`` threads, each on its own keep-alive connection; latency per request."""
    lock, counter = threading.Lock(), iter(range(n))
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body, ctype = bodies[i % len(bodies)]
            t = time.perf_counter()
            try:
                conn.request("POST", "/search", body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200 and len(json.loads(data)["results"]) == k
                problem = None if ok else f"HTTP {resp.status}: {data[:200]!r}"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            elapsed = time.perf_counter() - t
            with lock:
                if problem:
                    errors.append(problem)
                else:
                    latencies.append(elapsed)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "requests": n,
        "clients": clients,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "max_ms": float(lat.max()) if lat.size else None,
        "errors": len(errors),
        "error_examples": errors[:5],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="codes in the served index")
    ap.add_argument("--requests", type=int, default=2000, help="searches sent (after the warm-up)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=256, help="side of the uploaded JPEG queries")
    ap.add_argument("--reference", type=int, default=100, help="in-process one-at-a-time searches (reference)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (server)")
    ap.add_argument("--workdir", help="where the model and the index go (default: a temporary folder)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = ap.parse_args(argv)

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="hihpq-serve-load-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        run, small = _train_and_encode(work)
        index_path = work / f"random-{args.n}.hpq"
        t = time.perf_counter()
        _big_index(small, args.n, index_path)
        print(f"index of {args.n:,} random codes written in {time.perf_counter() - t:.1f} s", flush=True)
        jpegs = _query_jpegs(32, args.image_size)
        bodies = [_multipart(j, args.k) for j in jpegs]
        ref = _reference(run, index_path, jpegs, args.reference, args.k, args.threads)
        print(f"in-process, one at a time: {ref['requests_per_s']:.1f} searches/s, p50 {ref['p50_ms']:.1f} ms")

        port = _free_port()
        cmd = [sys.executable, "-m", "hihpq.cli", "serve", str(index_path), "--port", str(port), "-k", str(args.k)]
        cmd += ["--threads", str(args.threads)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            t = time.perf_counter()
            health = _wait_healthy(port, proc, timeout=900)
            startup_s = time.perf_counter() - t
            print(f"server up in {startup_s:.1f} s: {health['ntotal']:,} codes, M = {health['M']}, K = {health['K']}")
            _load(port, bodies, 2 * args.clients, args.clients, args.k)  # warm-up
            served = _load(port, bodies, args.requests, args.clients, args.k)
            batches = _get_json(port, "/health")["recent_batch_sizes"]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        if tmp is not None:
            tmp.cleanup()

    ratio = served["requests_per_s"] / ref["requests_per_s"]
    print(
        f"served: {served['requests_per_s']:.1f} requests/s from {args.clients} clients, "
        f"p50 {served['p50_ms']:.1f} ms, p99 {served['p99_ms']:.1f} ms, {served['errors']} errors; "
        f"mean batch {np.mean(batches):.1f}; "
        f"{ratio:.2f}x the in-process one-at-a-time rate"
    )
    extra_versions = {name: _version(name) for name in ("fastapi", "starlette", "uvicorn", "python-multipart")}
    record = run_record(
        None,
        None,
        n=args.n,
        k=args.k,
        image_size=args.image_size,
        threads=args.threads,
        model="tiny (1 epoch), efficientnet-lite0 at 112 px, M = 4, K = 256",
        startup_s=startup_s,
        served=served,
        reference_in_process=ref,
        served_over_reference=ratio,
        recent_batch_sizes=batches,
        cpus=os.cpu_count(),
        load_avg_1min=os.getloadavg()[0],
        service_versions=extra_versions,
    )
    write_json(args.out, record)
    summary = {
        "requests_per_s": served["requests_per_s"],
        "p50_ms": served["p50_ms"],
        "p99_ms": served["p99_ms"],
        "errors": served["errors"],
        "ratio": ratio,
    }
    print(json.dumps(summary))
    if served["errors"]:
        raise SystemExit(f"{served['errors']} requests failed, e.g. {served['error_examples'][:2]}")
    return record


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
