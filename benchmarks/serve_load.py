"""Closed-loop HTTP load on the Serve endpoint beside an echo deployment, printing ONE JSON line of figures.

    python benchmarks/serve_load.py [--model MODEL] [--seconds 12] [--concurrency 1 16 64]
                                    [--variants batching no_batching bf16 state_cache]

The model: an exported one (`--model`, e.g. `ml-1m.yaml`'s), or by default one of the MovieLens-1M size
(`build_config("ml-1m")`: 3,706 items, 2 blocks of width 64, histories up to 200 items, 6,040 users) with
random weights: serving cost depends on the sizes, not on what the weights learned. One replica on a local
Ray, and in the same cluster a bare Serve deployment (`/echo`) that only returns the JSON body it gets: the
framework's own ceiling. For the echo and each variant of the app (`batching`: max_batch_size 32;
`no_batching`: 1; `bf16`: `--user-tower bf16`; `state_cache`: `--state-cache-mb 256`) and each
concurrency, a separate client process (aiohttp, keep-alive, asyncio) keeps that many requests in flight
for a fixed time over loopback and reports requests per second, latency percentiles, errors and its own
CPU use; the mean batch size comes from the replica's /v1/model stats. Ratios against the echo at the same
concurrency close the line.
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


async def closed_loop(url: str, concurrency: int, seconds: float, users: list[str]) -> dict[str, Any]:
    """`concurrency` workers, each sending its next request as soon as the last one is answered (to
    `url`/v1/recommend, or to `url` itself when it ends in /echo)."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    target = url if url.endswith("/echo") else f"{url}/v1/recommend"
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def worker(seed: int, stop_at: float) -> None:
            nonlocal errors
            rng = random.Random(seed)
            while time.perf_counter() < stop_at:
                body = {"user_id": rng.choice(users), "k": 10}
                start = time.perf_counter()
                try:
                    async with session.post(target, json=body) as response:
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


def run_client(url: str, concurrency: int, seconds: float, users_file: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--client", url, "--concurrency", str(concurrency)]
    command += ["--seconds", str(seconds), "--users-file", users_file]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 120)
    return json.loads(out.stdout.strip().splitlines()[-1])


VARIANTS: dict[str, dict[str, Any]] = {
    "batching": {"max_batch_size": 32},
    "no_batching": {"max_batch_size": 1},
    "bf16": {"max_batch_size": 32, "user_tower": "bf16"},
    "state_cache": {"max_batch_size": 32, "state_cache_mb": 256},
}


def echo_app() -> Any:
    """A bare Serve deployment that returns the JSON body it gets (one CPU, as the app's replica)."""
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
    class Echo:
        async def __call__(self, request: Request) -> dict[str, Any]:
            return await request.json()

    return Echo.bind()


def serving_stats(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{url}/v1/model", timeout=60).json()["serving"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="exported model folder (default: a random model of the ml-1m size)")
    parser.add_argument("--seconds", type=float, default=12.0, help="measured time per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--num-users", type=int, default=6040, help="users of the random model")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--users-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        users = Path(args.users_file).read_text().split()
        print(json.dumps(asyncio.run(closed_loop(args.client, args.concurrency[0], args.seconds, users))))
        return

    import ray
    import torch
    from ray import serve

    from rec_serve.app import APP_NAME, build_app
    from rec_serve.predictor import Predictor
    from rec_serve.synthetic import write_exported_model
    from rec_train.model import RecModel, build_config

    work = Path(tempfile.mkdtemp(prefix="rayrec-bench-"))
    if args.model:
        folder, described = Path(args.model), "exported: " + args.model
    else:
        torch.manual_seed(0)
        folder, described = work / "ml-1m-random", "ml-1m size, random weights"
        config = build_config("ml-1m")
        write_exported_model(
            folder, RecModel(config), num_users=args.num_users, max_history=config.max_seq_len
        )
    predictor = Predictor.load(str(folder))
    users_file = work / "users.txt"
    users_file.write_text("\n".join(u for u, h in predictor.histories.items() if h))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(echo_app(), name="echo", route_prefix="/echo")
        results["echo"] = [
            {"concurrency": c, **run_client(f"{url}/echo", c, args.seconds, str(users_file))}
            for c in args.concurrency
        ]
        print(f"echo {results['echo']}", file=sys.stderr, flush=True)
        for label in args.variants:
            app_args = {
                "model": str(folder),
                "replicas": 1,
                "batch_wait_timeout_s": 0.005,
                "max_ongoing_requests": 256,
            }
            serve.run(build_app({**app_args, **VARIANTS[label]}), name=APP_NAME, route_prefix="/")
            rows = []
            for concurrency in args.concurrency:
                before = serving_stats(url)
                row = run_client(url, concurrency, args.seconds, str(users_file))
                after = serving_stats(url)
                batches = after["batches"] - before["batches"]
                batched = (
                    after["mean_batch_size"] * after["batches"]
                    - before["mean_batch_size"] * before["batches"]
                )
                rows.append(
                    {
                        "concurrency": concurrency,
                        **row,
                        "mean_batch_size": round(batched / max(1, batches), 2),
                    }
                )
                print(f"{label} {rows[-1]}", file=sys.stderr, flush=True)
            results[label] = {"settings": VARIANTS[label], "levels": rows}
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()

    echo = {row["concurrency"]: row for row in results["echo"]}
    ratios = {
        label: {
            str(row["concurrency"]): {
                "p50_vs_echo": round(row["p50_ms"] / max(echo[row["concurrency"]]["p50_ms"], 1e-9), 2),
                "rps_vs_echo": round(row["rps"] / max(echo[row["concurrency"]]["rps"], 1e-9), 2),
            }
            for row in results[label]["levels"]
        }
        for label in args.variants
    }
    print(
        json.dumps(
            {
                "benchmark": "serve_load", "model": described, "num_items": predictor.num_items,
                "num_users": len(predictor.histories), "max_seq_len": predictor.max_seq_len, "replicas": 1,
                "seconds_per_level": args.seconds, "cpu_cores": os.cpu_count(),
                "load_average_1m": round(os.getloadavg()[0], 1), "torch": torch.__version__, "ray": ray.__version__,
                **results, "ratios": ratios,
            }
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
