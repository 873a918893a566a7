"""Load test of `keeneye serve`: throughput with and without request batching, bad input, SIGTERM.

Starts the real server (`python -m keeneye serve`) as a subprocess on 127.0.0.1 and drives it with
a bounded load: C concurrent clients (threads with keep-alive http.client connections, default 8)
for D seconds each phase (default 30), after a short unmeasured warm-up. Every request carries one
real casting image (multipart upload). Phases (all by default):

  engine_cost  the model alone (no server), per engine: per-image cost at batch 1, 2, 4, 8 — the
             ceiling on what merging requests into batches can gain on this machine.
  compare    per engine, batching on and off in --repeats interleaved pairs of server runs (same
             bundle, same load): throughput, p50/p99 latency, errors; both modes printed for
             every engine. Target: zero errors, and the server's default mode for the engine
             (BATCHING_BY_ENGINE in keeneye/serving/settings.py) is the faster one by median.
  malformed  batching on; a fraction of the requests is malformed (truncated JPEG, random bytes,
             oversized body, wrong content type, malformed JSON, empty body, decompression bomb,
             mixed good+bad). Target: zero 5xx, zero connection errors, each kind answered with
             its expected status, and afterwards /health and one good prediction succeed.
  hostile    batching on, production body limits (max body 32 MiB); a fraction of the requests is
             hostile: JSON nested 1,000 and 100,000 deep, 31 MB bodies (raw and base64 JSON), 40 MB
             bodies over the limit, and separate slow clients that announce a body and stall after
             3 bytes (within and over the limit). A probe polls /health every 0.25 s and the
             server's RSS is sampled every 0.1 s. Target: zero 5xx, zero connection errors, each
             kind answered with its expected status (408 for stalled bodies), /health answering
             throughout, and peak RSS at most --max-buffered-body-mb above the peak of a run of
             good traffic alone just before (the body budget counts each body's copies, so
             hostile traffic can add no more than it).
  sigterm    batching on; SIGTERM a few seconds into the load. Target: every request in flight
             when the signal arrived completes with 200, the server logs "shutdown complete".

Without --bundle, a small bundle is trained first (subprocess `keeneye train`) on a subset of
../shared/data/casting/casting_data with the shared MobileNetV2 weights, in a temporary folder.

    python benchmarks/load_test.py [--bundle runs/x] [--duration 30] [--clients 8]
                                   [--phases compare,malformed,hostile,sigterm] [--malformed-fraction 0.3]

Prints a table and writes benchmarks/results/load_test.json. Exit status 1 if a check failed.
The CPU is shared with the load generator (and anything else running): absolute numbers are
noisy; the batching/no-batching ratio, measured in the same run, is what counts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CASTING = SHARED / "data" / "casting" / "casting_data"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
HOST = "127.0.0.1"  # loopback only, always
BOUNDARY = "keeneyeloadtestboundary"
SERVER_MAX_BODY_MB = 2  # small, so the "oversized" requests stay cheap for the load generator


# --- bundle -----------------------------------------------------------------------------------


def train_bundle(work: Path, per_class: int, image_size: int) -> Path:
    """Train a bundle on a subset of the casting training images (symlinked, never copied into the repo)."""
    data = work / "data"
    for split, source, count in (("training", "train", per_class), ("testing", "test", max(20, per_class // 3))):
        for label in ("def_front", "ok_front"):
            target = data / split / label
            target.mkdir(parents=True)
            for path in sorted((CASTING / source / label).glob("*.jpeg"))[:count]:
                (target / path.name).symlink_to(path)
    config = {
        "data_folder_path": str(data), "output_dir": str(work / "runs"), "run_name": "loadtest",
        "cache_dir": str(work / "cache"), "positive_class": "def_front",
        "model": {"alpha": 1.0, "image_size": image_size, "weights": str(WEIGHTS)},
        "head": {"dense_units": [64], "dropout": 0.2},
        "training": {"epochs": 30, "batch_size": 32, "validation_fraction": 0.25, "early_stopping_patience": 5, "seed": 0},
    }
    (work / "config.json").write_text(json.dumps(config, indent=2))
    print(f"training a {image_size}px bundle on {2 * per_class} casting images ...", flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "keeneye", "train", "-c", str(work / "config.json")], capture_output=True,
                          text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=900)
    if done.returncode != 0:
        sys.exit(f"training the load-test bundle failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)
    return work / "runs" / "loadtest"


# --- request bodies ----------------------------------------------------------------------------


def multipart(parts: list[tuple[str, bytes]]) -> bytes:
    chunks = []
    for name, data in parts:
        chunks.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
        )
    return b"".join(chunks) + f"--{BOUNDARY}--\r\n".encode()


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of zeros: about 20 KB on the wire, width*height pixels once decoded."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * height, 9)) + chunk(b"IEND", b"")


@dataclass
class RequestSpec:
    kind: str
    content_type: str | None
    body: bytes
    expected: int  # expected HTTP status


def build_requests(images: list[tuple[str, bytes]]) -> tuple[list[RequestSpec], list[RequestSpec]]:
    good = [RequestSpec("good", MULTIPART, multipart([item]), 200) for item in images]
    sample_name, sample = images[0]
    rng = random.Random(0)
    bomb = png_bomb(12_000, 12_000)  # 144 MP > the server's 50 MP default
    bad = [
        RequestSpec("truncated_jpeg", MULTIPART, multipart([("cut.jpeg", sample[: len(sample) // 2])]), 422),
        RequestSpec("random_bytes", MULTIPART, multipart([("noise.jpeg", rng.randbytes(4000))]), 422),
        RequestSpec("oversized", "image/jpeg", sample + rng.randbytes(SERVER_MAX_BODY_MB * 1024 * 1024 + 1000), 413),
        RequestSpec("wrong_content_type", "text/plain", b"this is not an image", 415),
        RequestSpec("malformed_json", "application/json", b'{"images": [{"name": "a", "data": ', 400),
        RequestSpec("empty_body", MULTIPART, b"", 400),
        RequestSpec("decompression_bomb", MULTIPART, multipart([("bomb.png", bomb)]), 422),
        RequestSpec("bad_base64", "application/json", json.dumps({"images": [{"name": "x", "data": "%%%"}]}).encode(), 422),
        RequestSpec("mixed_good_and_bad", MULTIPART, multipart([(sample_name, sample), ("cut.jpeg", sample[:300])]), 200),
    ]
    return good, bad


# --- server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Server:
    """`python -m keeneye serve` in a subprocess, its JSON log in a file."""

    def __init__(self, bundle: Path, batching: bool, log_path: Path, engine: str = "auto", extra: list[str] = (),
                 max_body_mb: float = SERVER_MAX_BODY_MB) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        command = [sys.executable, "-m", "keeneye", "serve", str(bundle), "--host", HOST, "--port", str(self.port),
                   "--batching" if batching else "--no-batching", "--max-body-mb", str(max_body_mb),
                   "--engine", engine, *extra]
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, dict]:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            connection.close()

    def wait_ready(self, timeout: float = 180.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; log: {self.log_path}")
            try:
                if self.get("/ready", timeout=2)[0] == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout:.0f} s; log: {self.log_path}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful), SIGKILL if it has not exited within `timeout`; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log_file.close()
        return self.process.returncode

    def log_records(self) -> list[dict]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return records


# --- load -------------------------------------------------------------------------------------


@dataclass
class Result:
    kind: str
    expected: int
    started: float
    ended: float
    status: int | None  # None: connection-level failure
    error: str | None = None
    request_id: str = ""


@dataclass
class Load:
    results: list[Result] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(port: int, deadline: float, good: list[RequestSpec], bad: list[RequestSpec], fraction: float,
                seed: int, load: Load, measure_from: float, stop_on_refused: bool = False) -> None:
    rng = random.Random(seed)
    connection = None
    index = seed
    while time.monotonic() < deadline:
        if fraction > 0 and rng.random() < fraction:
            spec = rng.choice(bad)
        else:
            spec = good[index % len(good)]
            index += 1
        request_id = uuid.uuid4().hex[:16]
        headers = {"X-Request-ID": request_id, "Content-Length": str(len(spec.body))}
        if spec.content_type:
            headers["Content-Type"] = spec.content_type
        started = time.monotonic()
        status, error = None, None
        try:
            if connection is None:
                connection = http.client.HTTPConnection(HOST, port, timeout=60)
            connection.request("POST", "/predict", body=spec.body, headers=headers)
            response = connection.getresponse()
            response.read()
            status = response.status
            if response.getheader("connection", "").lower() == "close":
                connection.close()
                connection = None
        except (OSError, http.client.HTTPException) as exc:
            error = type(exc).__name__
            if connection is not None:
                connection.close()
            connection = None
        ended = time.monotonic()
        if started >= measure_from:
            with load.lock:
                load.results.append(Result(spec.kind, spec.expected, started, ended, status, error, request_id))
        if error is not None:
            if stop_on_refused and _refused(error):
                break
            time.sleep(0.05)
    if connection is not None:
        connection.close()


def _refused(error: str) -> bool:
    return error in ("ConnectionRefusedError",)


def run_load(port: int, clients: int, duration: float, warmup: float, good, bad, fraction: float,
             stop_on_refused: bool = False, on_start=None) -> tuple[Load, float, float]:
    load = Load()
    start = time.monotonic()
    measure_from = start + warmup
    deadline = measure_from + duration
    threads = [threading.Thread(target=client_loop, args=(port, deadline, good, bad, fraction, i, load, measure_from, stop_on_refused),
                                daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    if on_start is not None:
        on_start(measure_from)
    for thread in threads:
        thread.join(timeout=duration + warmup + 120)  # bounded even if a socket hangs (60 s timeouts)
    return load, measure_from, deadline


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    position = (len(values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def summarise(load: Load, seconds: float) -> dict:
    results = load.results
    good_ok = [r for r in results if r.kind == "good" and r.status == 200]
    latencies = [(r.ended - r.started) * 1000 for r in good_ok]
    by_kind: dict[str, dict] = {}
    for r in results:
        entry = by_kind.setdefault(r.kind, {"expected": r.expected, "n": 0, "statuses": {}})
        entry["n"] += 1
        key = str(r.status) if r.status is not None else f"error:{r.error}"
        entry["statuses"][key] = entry["statuses"].get(key, 0) + 1
    unexpected = sum(1 for r in results if r.status != r.expected)
    return {
        "requests": len(results),
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(good_ok) / seconds, 2),
        "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "p90_ms": round(percentile(latencies, 90), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "good_ok": len(good_ok),
        "n_5xx": sum(1 for r in results if r.status is not None and r.status >= 500),
        "connection_errors": sum(1 for r in results if r.status is None),
        "unexpected_status": unexpected,
        "errors": unexpected,  # any response other than the one expected for that request kind
        "by_kind": by_kind,
    }


# --- phases -----------------------------------------------------------------------------------


def phase_throughput(bundle, batching, args, good, bad, fraction, logs: Path, name: str, engine: str = "auto") -> dict:
    server = Server(bundle, batching, logs / f"{name}.log", engine=engine)
    try:
        ready_s = server.wait_ready()
        print(f"[{name}] server ready in {ready_s:.1f} s (batching {'on' if batching else 'off'}); "
              f"{args.clients} clients x {args.duration:.0f} s ...", flush=True)
        load, start, end = run_load(server.port, args.clients, args.duration, args.warmup, good, bad, fraction)
        summary = summarise(load, end - start)
        summary["batching"] = batching
        status, stats = server.get("/stats")
        summary["engine"] = stats["engine"]
        summary["server_batcher"] = {k: stats["batcher"][k] for k in ("forward_passes", "mean_batch_images", "max_batch_images", "max_requests_per_pass", "model_seconds")}
        summary["server_batcher"]["model_ms_per_image"] = round(1000 * stats["batcher"]["model_seconds"] / max(1, stats["batcher"]["images"]), 2)
        summary["server_responses_by_status"] = stats["responses_by_status"]
        if fraction > 0:  # afterwards: still healthy and still predicting
            health = server.get("/health")[0]
            connection = http.client.HTTPConnection(HOST, server.port, timeout=30)
            connection.request("POST", "/predict", body=good[0].body, headers={"Content-Type": MULTIPART})
            response = connection.getresponse()
            prediction = json.loads(response.read())
            connection.close()
            summary["after"] = {"health": health, "predict_status": response.status,
                                "probability": prediction["results"][0]["probability"] if response.status == 200 else None,
                                "server_alive": server.process.poll() is None}
    finally:
        summary_exit = server.stop()
    summary["server_exit"] = summary_exit
    summary["server_5xx_logged"] = sum(1 for r in server.log_records() if r.get("event") == "request" and r.get("status", 0) >= 500)
    return summary


def phase_compare(bundle, engine: str, args, good, bad, logs: Path) -> tuple[dict, dict]:
    """Batching on and off, `--repeats` pairs interleaved (on/off, then off/on, ...) so a change in the
    machine's load hits both modes alike; medians decide which mode is faster, and whether the
    server's default for this engine (keeneye.serving.settings.BATCHING_BY_ENGINE) is that one."""
    from keeneye.serving.settings import BATCHING_BY_ENGINE

    rps: dict[bool, list[float]] = {True: [], False: []}
    errors = {True: 0, False: 0}
    last: dict[bool, dict] = {}
    for repeat in range(args.repeats):
        for batching in ((True, False) if repeat % 2 == 0 else (False, True)):
            name = f"{'batching' if batching else 'no_batching'}_{engine}_{repeat + 1}"
            run = phase_throughput(bundle, batching, args, good, bad, 0.0, logs, name, engine)
            rps[batching].append(run["throughput_rps"])
            errors[batching] += run["errors"] + run["connection_errors"]
            last[batching] = run
    median = {mode: round(statistics.median(values), 2) for mode, values in rps.items()}
    resolved = last[True]["engine"]
    default = BATCHING_BY_ENGINE.get(resolved, True)
    faster = median[True] > median[False]
    modes = {
        "engine": resolved, "repeats": args.repeats, "rps_batching": rps[True], "rps_no_batching": rps[False],
        "median_rps_batching": median[True], "median_rps_no_batching": median[False],
        "speedup_median": round(median[True] / median[False], 2) if median[False] else None,
        "faster_mode": "batching" if faster else "no_batching", "server_default": "batching" if default else "no_batching",
        "default_is_faster": default == faster, "errors": errors,
    }
    return modes, last


def phase_sigterm(bundle, args, images, logs: Path) -> dict:
    # Several images per request, so requests are still being processed when the signal arrives
    # (uvicorn waits 0.1 s before it even looks at open connections).
    k = args.sigterm_images_per_request
    good = [RequestSpec("good", MULTIPART, multipart([images[(i + j) % len(images)] for j in range(k)]), 200) for i in range(0, len(images), k)]
    server = Server(bundle, True, logs / "sigterm.log")
    signal_time: list[float] = []

    def send_sigterm_later(measure_from: float) -> None:
        def fire():
            time.sleep(max(0.0, measure_from + args.sigterm_after - time.monotonic()))
            signal_time.append(time.monotonic())
            server.process.send_signal(signal.SIGTERM)

        threading.Thread(target=fire, daemon=True).start()

    try:
        server.wait_ready()
        print(f"[sigterm] load with {args.clients} clients, SIGTERM after {args.sigterm_after:.0f} s ...", flush=True)
        load, start, _ = run_load(server.port, args.clients, args.sigterm_after + 15, args.warmup, good, [], 0.0,
                                  stop_on_refused=True, on_start=send_sigterm_later)
        exit_status = server.process.wait(60)
        exited_after = time.monotonic() - signal_time[0]
    finally:
        server.stop()
    t_signal = signal_time[0]
    records = server.log_records()
    logged = {r["request_id"]: r["status"] for r in records if r.get("event") == "request"}
    in_flight = [r for r in load.results if r.started < t_signal < r.ended]
    in_flight_ok = [r for r in in_flight if r.status == 200]
    # A request that failed at the connection level but was never seen by the server was not in flight
    # (it reached a connection the server was closing); one the server answered but the client lost is.
    lost = [r for r in in_flight if r.status != 200 and r.request_id in logged]
    never_accepted = [r for r in in_flight if r.status != 200 and r.request_id not in logged]
    after = [r for r in load.results if r.started >= t_signal]
    return {
        "images_per_request": k,
        "requests_before_signal": sum(1 for r in load.results if r.ended <= t_signal),
        "in_flight_started_ms_before_signal": sorted(round((t_signal - r.started) * 1000, 1) for r in in_flight),
        "in_flight_finished_ms_after_signal": sorted(round((r.ended - t_signal) * 1000, 1) for r in in_flight),
        "in_flight_at_signal": len(in_flight),
        "in_flight_completed_200": len(in_flight_ok),
        "in_flight_answered_by_server_but_lost": len(lost),
        "in_flight_never_reached_server": len(never_accepted),
        "in_flight_failures": [{"status": r.status, "error": r.error} for r in in_flight if r.status != 200],
        "sent_after_signal": len(after),
        "sent_after_signal_outcomes": sorted({str(r.status) if r.status else r.error for r in after}),
        "server_exit_status": exit_status,
        "server_exited_after_s": round(exited_after, 2),
        "shutdown_complete_logged": any(r.get("event") == "stopped" for r in records),
        "server_5xx_logged": sum(1 for status in logged.values() if status >= 500),
    }


# --- hostile traffic ----------------------------------------------------------------------------

MiB = 1024 * 1024


def nested_json(depth: int) -> bytes:
    return b'{"images": ' + b"[" * depth + b"]" * depth + b"}"


def build_hostile_requests(images: list[tuple[str, bytes]]) -> list[RequestSpec]:
    """Requests that used to crash or bloat the server (issue 9), each with the answer it must get."""
    import base64

    rng = random.Random(2)
    _, sample = images[0]
    large = sample + rng.randbytes(31 * MiB - len(sample))  # under max_body (32 MiB), over max_image (16 MiB)
    large_json = json.dumps({"images": [{"name": "big.jpeg", "data": base64.b64encode(large[: 22 * MiB]).decode()}]}).encode()
    return [
        RequestSpec("nested_json_1k", "application/json", nested_json(1000), 400),
        RequestSpec("nested_json_100k", "application/json", nested_json(100_000), 400),
        RequestSpec("large_body_31mb", "image/jpeg", large, 422),
        RequestSpec("large_json_30mb", "application/json", large_json, 422),
        RequestSpec("oversized_40mb", "image/jpeg", large + rng.randbytes(9 * MiB), 413),
    ]


def stalled_client_loop(port: int, deadline: float, announce: int, expected: int, load: Load, measure_from: float) -> None:
    """Announce `announce` bytes, send 3, then wait for the server's answer (a slow-body attack)."""
    kind = f"stalled_body_{'over' if announce > 32 * MiB else 'under'}_limit"
    while time.monotonic() < deadline:
        started = time.monotonic()
        status, error = None, None
        try:
            with socket.create_connection((HOST, port), timeout=120) as sock:
                sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/jpeg\r\n"
                             f"Content-Length: {announce}\r\n\r\n".encode() + b"abc")
                answer = b""
                while b"\r\n" not in answer:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                status = int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else None
                error = None if status else "no answer"
        except (OSError, ValueError) as exc:
            error = type(exc).__name__
        if started >= measure_from:
            with load.lock:
                load.results.append(Result(kind, expected, started, time.monotonic(), status, error))


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def watch(port: int, pid: int, stop: threading.Event, health: list, rss: list) -> None:
    """/health every 0.25 s on its own keep-alive connection (status, seconds), RSS every 0.1 s."""
    connection = None
    next_health = 0.0
    while not stop.is_set():
        value = rss_bytes(pid)
        if value is not None:
            rss.append(value)
        if time.monotonic() >= next_health:
            next_health = time.monotonic() + 0.25
            started = time.monotonic()
            try:
                connection = connection or http.client.HTTPConnection(HOST, port, timeout=5)
                connection.request("GET", "/health")
                response = connection.getresponse()
                response.read()
                health.append((response.status, time.monotonic() - started))
            except (OSError, http.client.HTTPException) as exc:
                health.append((type(exc).__name__, time.monotonic() - started))
                connection = None
        stop.wait(0.1)


def normal_traffic_rss(server: "Server", args, good: list[RequestSpec]) -> int:
    """Peak RSS under good traffic alone (same clients, same duration): what hostile traffic is measured against.

    The model's arenas, thread stacks and decode buffers grow on the first batches and wander a few
    MB under load; that memory is the cost of serving at all, bounded by the batch size, not by what
    clients send. Measured over as long as the hostile run, so both peaks see the same wander.
    """
    stop, rss = threading.Event(), []
    sampler = threading.Thread(target=watch, args=(server.port, server.process.pid, stop, [], rss), daemon=True)
    sampler.start()
    run_load(server.port, args.clients, args.duration, args.warmup, good, [], 0.0)
    stop.set()
    sampler.join(10)
    return max(rss) if rss else rss_bytes(server.process.pid)


def phase_hostile(bundle, args, good, images, logs: Path) -> dict:
    hostile = build_hostile_requests(images)
    extra = ["--max-buffered-body-mb", str(args.max_buffered_body_mb), "--body-timeout", str(args.body_timeout)]
    server = Server(bundle, True, logs / "hostile.log", extra=extra, max_body_mb=32)
    stop, health, rss = threading.Event(), [], []
    try:
        server.wait_ready()
        print(f"[hostile] {args.clients} clients ({args.hostile_fraction:.0%} hostile) + {args.stalled_clients} stalled clients "
              f"x {args.duration:.0f} s; max_buffered_body_bytes={args.max_buffered_body_mb} MiB, body_timeout_s={args.body_timeout} ...", flush=True)
        time.sleep(1.0)
        startup = rss_bytes(server.process.pid)
        baseline = normal_traffic_rss(server, args, good)
        watcher = threading.Thread(target=watch, args=(server.port, server.process.pid, stop, health, rss), daemon=True)
        watcher.start()
        load = Load()
        measure_from = time.monotonic() + args.warmup
        deadline = measure_from + args.duration
        stalled = [threading.Thread(target=stalled_client_loop, daemon=True,
                                    args=(server.port, deadline, announce, expected, load, measure_from))
                   for i in range(args.stalled_clients)
                   for announce, expected in [((1000, 408), (40 * MiB, 413))[i % 2]]]
        for thread in stalled:
            thread.start()
        normal, _, _ = run_load(server.port, args.clients, args.duration, args.warmup, good, hostile, args.hostile_fraction)
        for thread in stalled:
            thread.join(timeout=args.body_timeout + 130)
        load.results.extend(normal.results)
        summary = summarise(load, deadline - measure_from)
        stop.set()
        watcher.join(10)
        summary["server_responses_by_status"] = server.get("/stats")[1]["responses_by_status"]
        summary["server_alive"] = server.process.poll() is None
    finally:
        stop.set()
        summary_exit = server.stop()
    slow = [seconds for status, seconds in health if status == 200]
    summary.update({
        "server_exit": summary_exit,
        "server_5xx_logged": sum(1 for r in server.log_records() if r.get("event") == "request" and (r.get("status") or 0) >= 500),
        "health_probes": len(health), "health_failures": sum(1 for status, _ in health if status != 200),
        "health_max_ms": round(1000 * max(slow), 1) if slow else None,
        "health_p99_ms": round(1000 * percentile(slow, 99), 1) if slow else None,
        "rss_startup_mb": round(startup / MiB, 1) if startup else None,
        "rss_baseline_mb": round(baseline / MiB, 1) if baseline else None,
        "rss_peak_mb": round(max(rss) / MiB, 1) if rss else None,
        "rss_growth_mb": round((max(rss) - baseline) / MiB, 1) if rss and baseline else None,
        "rss_bound_mb": args.max_buffered_body_mb,
        "max_buffered_body_mb": args.max_buffered_body_mb, "body_timeout_s": args.body_timeout,
        "stalled_clients": args.stalled_clients, "hostile_fraction": args.hostile_fraction,
    })
    return summary


def hostile_checks(run: dict) -> dict:
    """Issue 9's targets: no 5xx, every kind answered as expected, /health throughout, RSS within the bound."""
    return {
        "hostile_zero_5xx": run["n_5xx"] == 0 and run["server_5xx_logged"] == 0,
        "hostile_zero_connection_errors": run["connection_errors"] == 0,
        "hostile_expected_statuses": run["unexpected_status"] == 0,
        "hostile_health_throughout": run["health_probes"] > 0 and run["health_failures"] == 0 and run["server_alive"],
        "hostile_rss_bounded": run["rss_growth_mb"] is not None and run["rss_growth_mb"] <= run["rss_bound_mb"],
    }


ENGINE_COST_SCRIPT = r"""
import json, sys, time
import numpy as np
from keeneye.data.decode import load_image
from keeneye.inference.predictor import Predictor
bundle, engine, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
predictor = Predictor.from_bundle(bundle, engine=engine)
images = np.stack([load_image(p, predictor.bundle.image_size) for p in paths[:8]])
sizes = (1, 2, 4, 8)
for n in sizes:
    predictor.engine(images[:n]); predictor.engine(images[:n])
times = {n: [] for n in sizes}
for _ in range(25):  # interleaved, so background load hits every batch size alike
    for n in sizes:
        started = time.perf_counter(); predictor.engine(images[:n]); times[n].append((time.perf_counter() - started) / n)
print(json.dumps({"engine": predictor.engine_name, "ms_per_image": {
    str(n): {"median": round(1000 * float(np.median(v)), 2), "min": round(1000 * min(v), 2)} for n, v in times.items()}}))
"""


def phase_engine_cost(bundle: Path, engines: list[str], paths: list[Path]) -> dict:
    """The model alone, no server: per-image cost by batch size, the ceiling on what batching can gain."""
    results = {}
    for engine in engines:
        done = subprocess.run([sys.executable, "-c", ENGINE_COST_SCRIPT, str(bundle), engine, *map(str, paths[:8])],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if done.returncode != 0:
            results[engine] = {"error": done.stderr[-2000:]}
            continue
        record = json.loads(done.stdout.strip().splitlines()[-1])
        cost = record["ms_per_image"]
        record["batch8_vs_batch1"] = round(cost["1"]["median"] / cost["8"]["median"], 2)
        results[engine] = record
    return results


# --- main -------------------------------------------------------------------------------------


def table(rows: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="Model bundle to serve (default: train a small one on casting).")
    parser.add_argument("--duration", type=float, default=30.0, help="Measured seconds per phase [30].")
    parser.add_argument("--warmup", type=float, default=3.0, help="Unmeasured seconds of load before each phase [3].")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--phases", default="engine_cost,compare,malformed,hostile,sigterm")
    parser.add_argument("--engines", default="auto,keras",
                        help="Engines for the batching comparison, each compared in its own pair of runs [auto,keras].")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Interleaved on/off pairs per engine in the batching comparison; medians decide [3].")
    parser.add_argument("--malformed-fraction", type=float, default=0.3)
    parser.add_argument("--hostile-fraction", type=float, default=0.3, help="Share of hostile requests in the hostile phase [0.3].")
    parser.add_argument("--stalled-clients", type=int, default=20, help="Slow-body clients in the hostile phase [20].")
    parser.add_argument("--max-buffered-body-mb", type=int, default=96, help="Server's body-memory budget in the hostile phase [96: 3 x the 32 MiB max body, the least it accepts].")
    parser.add_argument("--body-timeout", type=float, default=10.0, help="Server's body_timeout_s in the hostile phase [10].")
    parser.add_argument("--sigterm-after", type=float, default=5.0)
    parser.add_argument("--sigterm-images-per-request", type=int, default=16)
    parser.add_argument("--train-per-class", type=int, default=120)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n-images", type=int, default=64, help="Distinct casting test images used in requests.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load_test.json")
    args = parser.parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - {"engine_cost", "compare", "malformed", "hostile", "sigterm"}
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")

    work = Path(tempfile.mkdtemp(prefix="keeneye-loadtest-"))
    logs = work / "logs"
    logs.mkdir()
    try:
        bundle = args.bundle.resolve() if args.bundle else train_bundle(work, args.train_per_class, args.image_size)
        metadata = json.loads((bundle / "metadata.json").read_text())
        paths = sorted((CASTING / "test" / "def_front").glob("*.jpeg"))[: args.n_images // 2]
        paths += sorted((CASTING / "test" / "ok_front").glob("*.jpeg"))[: args.n_images - len(paths)]
        random.Random(1).shuffle(paths)
        images = [(p.name, p.read_bytes()) for p in paths]
        good, bad = build_requests(images)

        report = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "bundle": {"name": bundle.name, "image_size": metadata["input"]["image_size"], "trained_here": args.bundle is None},
            "load": {"clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup,
                     "images_per_request": 1, "distinct_images": len(images),
                     "mean_image_bytes": round(sum(len(d) for _, d in images) / len(images))},
            "phases": {}, "checks": {},
        }
        checks = report["checks"]
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        if "engine_cost" in phases:
            print("[engine_cost] model alone, per-image cost by batch size ...", flush=True)
            report["engine_cost"] = phase_engine_cost(bundle, engines, paths)
        if "compare" in phases:
            report["batching_speedup"], report["batching_modes"] = {}, {}
            for engine in engines:
                modes, runs = phase_compare(bundle, engine, args, good, bad, logs)
                label = engine if engine == modes["engine"] else f"{engine} ({modes['engine']})"
                report["batching_modes"][label] = modes
                report["phases"][f"batching [{label}]"], report["phases"][f"no_batching [{label}]"] = runs[True], runs[False]
                report["batching_speedup"][label] = modes["speedup_median"]
                checks[f"zero_errors_with_batching [{label}]"] = modes["errors"][True] == 0
                checks[f"zero_errors_without_batching [{label}]"] = modes["errors"][False] == 0
                checks[f"default_batching_is_the_faster_mode [{label}]"] = modes["default_is_faster"]
        if "malformed" in phases:
            bad_run = phase_throughput(bundle, True, args, good, bad, args.malformed_fraction, logs, "malformed")
            report["phases"]["malformed"] = bad_run
            report["load"]["malformed_fraction"] = args.malformed_fraction
            checks["malformed_zero_5xx"] = bad_run["n_5xx"] == 0 and bad_run["server_5xx_logged"] == 0
            checks["malformed_zero_connection_errors"] = bad_run["connection_errors"] == 0
            checks["malformed_expected_statuses"] = bad_run["unexpected_status"] == 0
            after = bad_run["after"]
            checks["healthy_after_malformed"] = after["health"] == 200 and after["predict_status"] == 200 and after["server_alive"]
        if "hostile" in phases:
            report["phases"]["hostile"] = run = phase_hostile(bundle, args, good, images, logs)
            checks.update(hostile_checks(run))
        if "sigterm" in phases:
            term = phase_sigterm(bundle, args, images, logs)
            report["phases"]["sigterm"] = term
            checks["sigterm_in_flight_completed"] = term["in_flight_at_signal"] > 0 and term["in_flight_answered_by_server_but_lost"] == 0 \
                and term["in_flight_completed_200"] + term["in_flight_never_reached_server"] == term["in_flight_at_signal"]
            checks["sigterm_clean_exit"] = term["shutdown_complete_logged"] and term["server_5xx_logged"] == 0
    finally:
        kept = REPO / "benchmarks" / "results" / "load_test_logs"
        if logs.exists():
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(logs, kept)
        shutil.rmtree(work, ignore_errors=True)

    rows = [("phase", "engine", "requests", "good rps", "p50 ms", "p99 ms", "errors", "5xx", "conn err", "mean batch")]
    for name, phase in report["phases"].items():
        if name in ("sigterm", "hostile"):
            continue
        rows.append((name, phase["engine"], phase["requests"], phase["throughput_rps"], phase["p50_ms"],
                     phase["p99_ms"], phase["errors"], phase["n_5xx"], phase["connection_errors"], phase["server_batcher"]["mean_batch_images"]))
    print()
    print(table(rows))
    for engine, record in report.get("engine_cost", {}).items():
        if "ms_per_image" in record:
            cost = ", ".join(f"batch {n}: {v['median']} ms" for n, v in record["ms_per_image"].items())
            print(f"\nmodel alone ({record['engine']}), median per image: {cost} -> batch 8 is {record['batch8_vs_batch1']}x batch 1")
    for label, modes in report.get("batching_modes", {}).items():
        print(f"\nengine {label}, {args.clients} clients, {modes['repeats']} interleaved pairs: requests/s with batching "
              f"{modes['rps_batching']} (median {modes['median_rps_batching']}), without {modes['rps_no_batching']} "
              f"(median {modes['median_rps_no_batching']}) -> {modes['faster_mode']} faster ({modes['speedup_median']}x); "
              f"server default: {modes['server_default']}")
    if "malformed" in report["phases"]:
        print("\nmalformed run, statuses by request kind:")
        for kind, entry in report["phases"]["malformed"]["by_kind"].items():
            print(f"  {kind:20s} expected {entry['expected']}  got {entry['statuses']}")
    if "hostile" in report["phases"]:
        run = report["phases"]["hostile"]
        print(f"\nhostile run: {run['requests']} requests, {run['n_5xx']} 5xx, {run['connection_errors']} connection errors; "
              f"/health {run['health_probes'] - run['health_failures']}/{run['health_probes']} ok (max {run['health_max_ms']} ms); "
              f"RSS startup {run['rss_startup_mb']}, good traffic {run['rss_baseline_mb']} -> peak {run['rss_peak_mb']} MB with hostile traffic (growth {run['rss_growth_mb']} MB, bound {run['rss_bound_mb']} MB)")
        for kind, entry in run["by_kind"].items():
            print(f"  {kind:28s} expected {entry['expected']}  got {entry['statuses']}")
    if "sigterm" in report["phases"]:
        term = report["phases"]["sigterm"]
        print(f"\nSIGTERM: {term['in_flight_at_signal']} requests in flight, {term['in_flight_completed_200']} completed with 200, "
              f"{term['in_flight_never_reached_server']} never reached the server, {term['in_flight_answered_by_server_but_lost']} lost; "
              f"server exited {term['server_exited_after_s']} s after the signal (status {term['server_exit_status']})")
    print("\nchecks:")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.out} (server logs in {REPO / 'benchmarks' / 'results' / 'load_test_logs'})")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
