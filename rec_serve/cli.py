"""`rec-serve deploy --model URI [--replicas N]`: serve an exported model over HTTP until stopped;
`rec-serve index --model URI --retrieval ivf|hnsw`: store a faiss index in the model folder.

It connects to the Ray cluster in `RAY_ADDRESS` (or `--address`) or starts a local one, starts Serve
on `--host`/`--port`, deploys `build_app`, prints the URL and a `curl` to try, and blocks until
Ctrl-C or SIGTERM, then shuts Serve down.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import tempfile
import time
from types import FrameType

from rec_serve.retrieval import RETRIEVALS
from rec_serve.schemas import USER_TOWERS
from rec_train import storage
from rec_train.config import ConfigError, validate
from rec_train.errors import RayrecError
from rec_train.ray_session import init_ray
from rec_train.storage import StorageError


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder: path, file:// or s3:// URI")
    parser.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    parser.add_argument(
        "--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas instead of --replicas"
    )
    parser.add_argument(
        "--target-ongoing-requests", type=float, default=8.0, help="autoscaling target per replica"
    )
    parser.add_argument("--max-ongoing-requests", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument(
        "--user-tower", choices=USER_TOWERS, default="fp32",
        help="how histories are encoded: fp32, bf16 autocast, or fp32 through torch.compile (the item matrix "
        "stays fp32)",
    )  # fmt: skip
    parser.add_argument(
        "--retrieval", choices=RETRIEVALS, default="exact",
        help="top-k over every item (exact) or over a faiss index (ivf, hnsw, or fp16 / int8 item vectors; "
        "`rec-serve index` stores one)",
    )  # fmt: skip
    parser.add_argument(
        "--events", default="memory",
        help="where POST /v1/events keeps users' new events: memory (per replica), redis://HOST:PORT/DB (shared, "
        "durable), or none",
    )  # fmt: skip
    parser.add_argument("--max-user-events", type=int, default=200, help="newest events kept per user")
    parser.add_argument(
        "--state-cache-mb", type=float, default=0.0,
        help="MB per replica for recent users' encoder states: a request after new events encodes only those",
    )  # fmt: skip
    parser.add_argument("--nprobe", type=int, default=32, help="ivf: cells searched per query")
    parser.add_argument("--ef-search", type=int, default=128, help="hnsw: candidates kept while searching")
    parser.add_argument(
        "--api-key-env", help="environment variable holding the key clients send as X-API-Key"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a new local cluster)")


def serve_args(ns: argparse.Namespace) -> dict[str, object]:
    """Command-line flags -> the `ServeArgs` fields."""
    args: dict[str, object] = {
        "model": ns.model,
        "replicas": ns.replicas,
        "max_ongoing_requests": ns.max_ongoing_requests,
        "max_batch_size": ns.max_batch_size,
        "batch_wait_timeout_s": ns.batch_wait_timeout_s,
        "num_cpus": ns.num_cpus,
        "api_key_env": ns.api_key_env,
        "user_tower": ns.user_tower,
        "retrieval": ns.retrieval,
        "events": ns.events,
        "max_user_events": ns.max_user_events,
        "state_cache_mb": ns.state_cache_mb,
        "nprobe": ns.nprobe,
        "ef_search": ns.ef_search,
    }
    if ns.autoscale:
        low, sep, high = ns.autoscale.partition(":")
        if not sep or not low.isdigit() or not high.isdigit():
            raise ConfigError(f"--autoscale {ns.autoscale!r} must look like MIN:MAX, e.g. 1:4")
        args["autoscaling"] = {
            "min_replicas": int(low),
            "max_replicas": int(high),
            "target_ongoing_requests": ns.target_ongoing_requests,
        }
    return args


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); any other name or address, 0.0.0.0
    included, can be reached from other machines."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def exposure_warning(host: str, port: int, api_key_env: str | None) -> str | None:
    """The warning for a server that other machines can reach without an API key; None otherwise."""
    if api_key_env or is_loopback(host):
        return None
    return (
        f"rec-serve deploy: warning: --host {host} accepts connections from other machines and no API key is "
        f"set, so anyone who can reach port {port} can query the model and read its API pages; pass "
        "--api-key-env VAR (clients then send the key in the X-API-Key header) or listen on 127.0.0.1"
    )


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def deploy(ns: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from rec_serve.app import APP_NAME, build_app
    from rec_serve.predictor import check_model_folder
    from rec_serve.schemas import ServeArgs

    args = validate(ServeArgs, serve_args(ns), source="rec-serve deploy")
    if warning := exposure_warning(ns.host, ns.port, args.api_key_env):
        print(warning, file=sys.stderr, flush=True)
    check_model_folder(args.model)  # before starting Ray, so a wrong path fails in a second
    init_ray(address=ns.address, log_to_driver=True)
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a parent may have set it to ignored
        signal.signal(stop_signal, _stop)
    try:
        serve.start(http_options={"host": ns.host, "port": ns.port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        url = f"http://{'127.0.0.1' if ns.host == '0.0.0.0' else ns.host}:{ns.port}"
        key = f' -H "X-API-Key: ${args.api_key_env}"' if args.api_key_env else ""
        print(
            f"rayrec is serving {args.model} at {url}\n"
            f"  try:  curl -s -X POST {url}/v1/recommend -H 'Content-Type: application/json'{key}"
            ' -d \'{"history": ["ITEM_ID"], "k": 5}\'\n'
            f"  model: curl -s {url}/v1/model{key}\n"
            f"  API:   {url}/docs{' (send X-API-Key too)' if key else ''}\n"
            "  stop:  Ctrl-C (or kill -TERM this process)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping rayrec", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder: path, file:// or s3:// URI")
    parser.add_argument("--retrieval", choices=RETRIEVALS[1:], required=True, help="the kind of index")
    parser.add_argument("--nlist", type=int, help="ivf: k-means cells (default about 4 sqrt(items))")
    parser.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node")
    parser.add_argument(
        "--ef-construction", type=int, default=80, help="hnsw: candidates kept while building"
    )


def index(ns: argparse.Namespace) -> int:
    """Build the faiss index of an exported model and store it in the model folder."""
    import json

    import torch

    from rec_serve.predictor import check_model_folder
    from rec_serve.retrieval import IndexParams, build_index, index_files, index_meta, write_index
    from rec_train.model import RecModel

    for flag, value in (
        ("--nlist", ns.nlist),
        ("--hnsw-m", ns.hnsw_m),
        ("--ef-construction", ns.ef_construction),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    loc = check_model_folder(ns.model)
    params = IndexParams(nlist=ns.nlist, hnsw_m=ns.hnsw_m, ef_construction=ns.ef_construction)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rayrec-index-") as tmp:
        local = storage.local_copy(loc, tmp)
        info = storage.read_json(storage.resolve(str(local / "rayrec.json")))
        model = RecModel.from_pretrained(str(local), use_safetensors=True).eval()
        with torch.no_grad():
            matrix = model.item_embeddings().float()  # [N + 1, d]
    meta = index_meta(ns.retrieval, params, matrix, str(info.get("model_version", "unknown")))
    write_index(loc, ns.retrieval, build_index(matrix, ns.retrieval, params), meta)
    seconds = round(time.perf_counter() - started, 3)
    print(json.dumps({"output": loc.join(index_files(ns.retrieval)[0]).uri, **meta, "seconds": seconds}))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="rec-serve", description="Serve a rayrec model with Ray Serve.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_deploy_arguments(
        sub.add_parser("deploy", help="deploy an exported model over HTTP and block until stopped")
    )
    add_index_arguments(
        sub.add_parser(
            "index", help="build an approximate-retrieval index (faiss) into an exported model folder"
        )
    )
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        return deploy(ns) if ns.command == "deploy" else index(ns)
    except (RayrecError, ConfigError, StorageError) as exc:
        print(f"rec-serve {ns.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
