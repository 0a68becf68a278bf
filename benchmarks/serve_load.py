"""Closed-loop HTTP load on the Serve endpoint beside an echo deployment, printing ONE JSON line of figures.

    python benchmarks/serve_load.py [--model MODEL | --items 1000000] [--seconds 12] [--concurrency 1 16 64]
                                    [--variants batching no_batching bf16 compiled state_cache ivf fp16]
                                    [--wrk] [--plot latency.png]

The model: an exported one (`--model`, e.g. `ml-1m.yaml`'s), or by default one of the MovieLens-1M size
(`build_config("ml-1m")`: 3,706 items, or `--items`; 2 blocks of width 64, histories up to 200 items, 6,040
users) with random weights: serving cost depends on the sizes, not on what the weights learned. One replica
on a local Ray, and in the same cluster a bare Serve deployment (`/echo`) that only returns the JSON body it
gets: the framework's own ceiling. For the echo and each variant of the app (`batching`: max_batch_size 32;
`no_batching`: 1; `bf16` / `compiled`: `--user-tower bf16 | compiled`; `state_cache`: `--state-cache-mb
256`; `ivf` / `fp16`: `--retrieval ivf | fp16`, the index built when the replica loads) and each
concurrency, a separate client process (aiohttp, keep-alive, asyncio) keeps that many requests in flight
for a fixed time over loopback and reports requests per second, latency percentiles, errors and its own
CPU use (with `--wrk`, `wrk` then does the same, one thread and that many keep-alive connections, under
"wrk"); the mean batch size comes from the replica's /v1/model stats. Ratios against the echo at the same
concurrency close the line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
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


def endpoint(url: str) -> str:
    """Where the load goes: `url` itself for the echo deployment, else its /v1/recommend."""
    return url if url.endswith("/echo") else f"{url}/v1/recommend"


async def closed_loop(url: str, concurrency: int, seconds: float, users: list[str]) -> dict[str, Any]:
    """`concurrency` workers, each sending its next request to `endpoint(url)` as soon as the last one is
    answered."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    target = endpoint(url)
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


WRK_SCRIPT = """
local users = {}
for line in io.lines(os.getenv("RAYREC_USERS_FILE")) do users[#users + 1] = line end
math.randomseed(1)
request = function()
  local body = '{"user_id": "' .. users[math.random(#users)] .. '", "k": 10}'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
"""


def _wrk_ms(value: str) -> float:
    """A wrk duration ('850.00us', '2.10ms', '1.02s') in milliseconds."""
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3), ("m", 6e4)):
        if value.endswith(unit):
            return round(float(value[: -len(unit)]) * scale, 2)
    raise ValueError(f"wrk printed a latency without a unit: {value!r}")


def run_wrk(url: str, concurrency: int, seconds: float, users_file: str, script: str) -> dict[str, Any]:
    """The same closed loop from `wrk` (one thread, `concurrency` keep-alive connections, `--latency`)."""
    command = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "60s",
        "-s",
        script,
        endpoint(url),
    ]
    env = {**os.environ, "RAYREC_USERS_FILE": users_file}
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=seconds + 60, env=env
    ).stdout
    percentiles = dict(re.findall(r"^\s*(50|90|99)%\s+(\S+)\s*$", out, flags=re.M))
    if len(percentiles) < 3:
        raise RuntimeError(f"wrk printed no latency distribution:\n{out}")
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        **{f"p{p}_ms": _wrk_ms(percentiles[p]) for p in ("50", "90", "99")},
        "errors": int(failed.group(1) if failed else 0)
        + sum(map(int, socket_errors.groups() if socket_errors else ())),
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
    "compiled": {"max_batch_size": 32, "user_tower": "compiled"},
    "state_cache": {"max_batch_size": 32, "state_cache_mb": 256},
    "ivf": {"max_batch_size": 32, "retrieval": "ivf"},
    "fp16": {"max_batch_size": 32, "retrieval": "fp16"},
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


def against_echo(row: dict[str, Any], echo: dict[str, Any]) -> dict[str, float]:
    """Median latency and requests/s of one level over the echo's at the same concurrency, per client."""
    clients = [("", row, echo)] + ([("wrk_", row["wrk"], echo["wrk"])] if "wrk" in row else [])
    return {
        f"{prefix}{key}_vs_echo": round(mine[field] / max(theirs[field], 1e-9), 2)
        for prefix, mine, theirs in clients
        for key, field in (("p50", "p50_ms"), ("rps", "rps"))
    }


def plot_latency(figures: dict[str, Any], variants: list[str], path: str) -> None:
    """Median and p99 latency against requests in flight, the echo and every variant, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {"echo (Serve's ceiling)": figures["echo"], **{v: figures[v]["levels"] for v in variants}}
    for n, (label, rows) in enumerate(series.items()):
        x = [row["concurrency"] for row in rows]
        line = ax.plot(x, [row["p50_ms"] for row in rows], marker="o", label=f"{label} p50", color=f"C{n}")
        ax.plot(x, [row["p99_ms"] for row in rows], ls="--", marker="x", color=line[0].get_color(), alpha=0.6)
    ax.set(xscale="log", yscale="log", xlabel="requests in flight", ylabel="latency, ms (dashed: p99)")
    ax.set_title(f"/v1/recommend, {figures['num_items']:,} items, 1 replica", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="exported model folder (default: a random model of the ml-1m size)")
    parser.add_argument("--seconds", type=float, default=12.0, help="measured time per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--num-users", type=int, default=6040, help="users of the random model")
    parser.add_argument("--items", type=int, default=3706, help="items of the random model")
    parser.add_argument("--wrk", action="store_true", help="also measure every level with wrk (on PATH)")
    parser.add_argument("--plot", help="also write the latency plot to this PNG")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--users-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        users = Path(args.users_file).read_text().split()
        print(json.dumps(asyncio.run(closed_loop(args.client, args.concurrency[0], args.seconds, users))))
        return

    if args.wrk and shutil.which("wrk") is None:
        parser.error("--wrk needs wrk on PATH (Debian/Ubuntu: apt install wrk)")
    import pyarrow.parquet as pq
    import ray
    import torch
    from ray import serve

    from rec_serve.app import APP_NAME, build_app
    from rec_serve.synthetic import write_exported_model
    from rec_train import exported
    from rec_train.model import RecConfig, RecModel, build_config

    work = Path(tempfile.mkdtemp(prefix="rayrec-bench-"))
    if args.model:
        folder, described = Path(args.model), "exported: " + args.model
    else:
        torch.manual_seed(0)
        folder, described = work / "ml-1m-random", f"ml-1m size with {args.items} items, random weights"
        config = build_config("ml-1m", num_items=args.items)
        write_exported_model(
            folder, RecModel(config), num_users=args.num_users, max_history=config.max_seq_len
        )
    histories = pq.read_table(folder / exported.HISTORIES_FILE, columns=["user_id", "items"])
    known = [
        u for u, h in zip(*(histories.column(c).to_pylist() for c in ("user_id", "items")), strict=True) if h
    ]
    served = RecConfig.from_pretrained(str(folder))  # the model's sizes, for the JSON line
    users_file = work / "users.txt"
    users_file.write_text("\n".join(known))
    wrk_script = work / "recommend.lua"
    wrk_script.write_text(WRK_SCRIPT)

    def with_wrk(row: dict[str, Any], target: str, concurrency: int) -> dict[str, Any]:
        if args.wrk:
            row["wrk"] = run_wrk(target, concurrency, args.seconds, str(users_file), str(wrk_script))
        return row

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(echo_app(), name="echo", route_prefix="/echo")
        results["echo"] = [
            with_wrk(
                {"concurrency": c, **run_client(f"{url}/echo", c, args.seconds, str(users_file))},
                f"{url}/echo",
                c,
            )
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
                    with_wrk(
                        {
                            "concurrency": concurrency,
                            **row,
                            "mean_batch_size": round(batched / max(1, batches), 2),
                        },
                        url,
                        concurrency,
                    )
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
            str(row["concurrency"]): against_echo(row, echo[row["concurrency"]])
            for row in results[label]["levels"]
        }
        for label in args.variants
    }
    figures = {
        "benchmark": "serve_load", "model": described, "num_items": served.num_items,
        "num_users": histories.num_rows, "max_seq_len": served.max_seq_len, "replicas": 1,
        "seconds_per_level": args.seconds, "cpu_cores": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 1), "torch": torch.__version__, "ray": ray.__version__,
        **results, "ratios": ratios,
    }  # fmt: skip
    if args.plot:
        plot_latency(figures, args.variants, args.plot)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
