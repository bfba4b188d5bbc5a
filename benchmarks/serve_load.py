"""Load benchmark: blipserve's server against the one-request-at-a-time baseline.

Both serve Azure ML's ``POST /score`` on loopback from the same checkpoint, each in its
own process, one after the other. A bounded client sends ``--requests`` requests (one
photo each, greedy, ``--max-new-tokens``) from 1, 4 and 16 concurrent workers and reports
throughput and p50/p99 latency, and whether both servers answered the same texts.

    python benchmarks/serve_load.py --checkpoint src/blipserve/demo_model
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from photos import photo_batch

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: list[str], url: str, env: dict) -> subprocess.Popen:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code in (200, 404):
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


async def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    latencies: list[float] = []
    texts: list[str] = [""] * len(bodies)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            response = await client.post(url + "/score", json=bodies[i])
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            texts[i] = response.json()[0]["text"]

    async with httpx.AsyncClient(timeout=600) as client:
        await client.post(url + "/score", json=bodies[0])  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "throughput_rps": round(len(bodies) / wall, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "texts": texts,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    bodies = []
    for image in photo_batch(args.requests):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        b64 = base64.b64encode(buffer.getvalue()).decode()
        frame = {"columns": ["image"], "data": [[b64]]}
        bodies.append({"input_data": frame, "params": {"max_new_tokens": args.max_new_tokens}})

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    servers = {
        "blipserve": [
            sys.executable, "-m", "blipserve", "serve", "--model", args.checkpoint,
            "--device", "cpu", "--dtype", "float32", "--max-waiting", "1024",
            "--log-level", "warning",
        ],
        "baseline": [
            sys.executable, str(HERE / "baseline_server.py"), "--checkpoint", args.checkpoint,
        ],
    }  # fmt: skip
    results: dict[str, list[dict]] = {}
    for name, command in servers.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = start([*command, "--port", str(port)], url, env)
        try:
            results[name] = [asyncio.run(load(url, bodies, c)) for c in args.concurrency]
        finally:
            stop(process)

    print("| clients | blipserve req/s | baseline req/s | ratio | blipserve p50/p99 s "
          "| baseline p50/p99 s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for ours, base in zip(results["blipserve"], results["baseline"], strict=True):
        ratio = ours["throughput_rps"] / base["throughput_rps"]
        print(
            f"| {ours['concurrency']} | {ours['throughput_rps']} | {base['throughput_rps']} | "
            f"{ratio:.2f}x | {ours['p50_s']}/{ours['p99_s']} | {base['p50_s']}/{base['p99_s']} |"
        )
    same = sum(
        a == b
        for ours, base in zip(results["blipserve"], results["baseline"], strict=True)
        for a, b in zip(ours["texts"], base["texts"], strict=True)
    )
    total = sum(len(r["texts"]) for r in results["blipserve"])
    print(f"same text from both servers: {same}/{total}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
