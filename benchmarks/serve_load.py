"""Closed-loop HTTP load on the Serve endpoint, batching on and off, printing ONE JSON line of figures.

    python benchmarks/serve_load.py [--seconds 12] [--concurrency 1 8 32 64]

The model has the MovieLens-1M size (`build_config("ml-1m")`: 3,706 items, 2 blocks of width 64,
histories up to 200 items, 6,040 users) with random weights: serving cost depends on the sizes, not on
what the weights learned. One replica on a local Ray; for each batching setting (`max_batch_size` 32,
then 1 = off) and each concurrency, a separate client process (aiohttp, keep-alive, asyncio) keeps
that many requests in flight for a fixed time over loopback and reports requests per second, latency
percentiles, errors and its own CPU use; the mean batch size comes from the replica's /v1/model stats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- client (its own process)


async def closed_loop(url: str, concurrency: int, seconds: float, num_users: int) -> dict[str, Any]:
    """`concurrency` workers, each sending its next request as soon as the last one is answered."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def worker(seed: int, stop_at: float) -> None:
            nonlocal errors
            rng = random.Random(seed)
            while time.perf_counter() < stop_at:
                body = {"user_id": f"u{rng.randrange(1, num_users)}", "k": 10}
                start = time.perf_counter()
                try:
                    async with session.post(f"{url}/v1/recommend", json=body) as response:
                        await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        warm_until = time.perf_counter() + 1.0
        await asyncio.gather(*(worker(-n - 1, warm_until) for n in range(concurrency)))
        latencies.clear()
        errors = 0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(n, wall0 + seconds) for n in range(concurrency)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0

    latencies.sort()

    def pct(p: float) -> float:
        return (
            round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2) if latencies else 0.0
        )

    return {
        "rps": round(len(latencies) / wall, 1),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "requests": len(latencies),
        "errors": errors,
        "client_cpu_share": round(cpu / wall, 3),
    }


# ---------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_client(url: str, concurrency: int, seconds: float, num_users: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--client", url, "--concurrency", str(concurrency)]
    command += ["--seconds", str(seconds), "--num-users", str(num_users)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def serving_stats(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{url}/v1/model", timeout=60).json()["serving"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="measured time per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--num-users", type=int, default=6040)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(
            json.dumps(
                asyncio.run(closed_loop(args.client, args.concurrency[0], args.seconds, args.num_users))
            )
        )
        return

    import ray
    import torch
    from ray import serve

    from rec_serve.app import APP_NAME, build_app
    from rec_serve.synthetic import write_exported_model
    from rec_train.model import RecModel, build_config

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="rayrec-bench-")) / "ml-1m-random"
    config = build_config("ml-1m")
    write_exported_model(folder, RecModel(config), num_users=args.num_users, max_history=config.max_seq_len)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for label, max_batch_size in (("batching", 32), ("no_batching", 1)):
            app_args = {
                "model": str(folder),
                "replicas": 1,
                "max_batch_size": max_batch_size,
                "batch_wait_timeout_s": 0.005,
                "max_ongoing_requests": 256,
            }
            serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
            rows = []
            for concurrency in args.concurrency:
                before = serving_stats(url)
                row = run_client(url, concurrency, args.seconds, args.num_users)
                after = serving_stats(url)
                batches = after["batches"] - before["batches"]
                batched = (
                    after["mean_batch_size"] * after["batches"]
                    - before["mean_batch_size"] * before["batches"]
                )
                row = {
                    "concurrency": concurrency,
                    **row,
                    "mean_batch_size": round(batched / max(1, batches), 2),
                }
                print(f"{label} {row}", file=sys.stderr, flush=True)
                rows.append(row)
            results[label] = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": 0.005, "levels": rows}
    finally:
        serve.shutdown()
        ray.shutdown()

    print(
        json.dumps(
            {
                "benchmark": "serve_load",
                "model": "ml-1m size, random weights",
                "num_items": config.num_items,
                "num_users": args.num_users,
                "max_seq_len": config.max_seq_len,
                "replicas": 1,
                "seconds_per_level": args.seconds,
                "cpu_cores": os.cpu_count(),
                "load_average_1m": round(os.getloadavg()[0], 1),
                "torch": torch.__version__,
                "ray": ray.__version__,
                **results,
            }
        )
    )


if __name__ == "__main__":
    main()
