"""`rec-train demo`: the whole path on a local Ray with local storage, in a few minutes.

    synthetic log (or a MovieLens folder) -> prepare -> MiniLM item-text embeddings
    -> pre-train (2 workers, ZeRO-2) -> export -> fine-tune on a shifted domain -> export
    -> Ray Serve with 2 replicas -> a few queries printed for a person

By default the demo starts a local Ray cluster with `ray start --head`, so the endpoint stays up
after the command ends (`ray stop` stops it); `--stop` runs in-process and shuts everything down.
The last line is one JSON object with the demo's figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from rec_train.config import validate
from rec_train.errors import RayrecError
from rec_train.ray_session import init_ray

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RAW_EVENTS = ("ratings.dat", "u.data", "ratings.csv", "sequences.txt.gz")
RAW_ITEMS = {
    "ratings.dat": "movies.dat",
    "u.data": "u.item",
    "ratings.csv": "movies.csv",
    "sequences.txt.gz": "movies.dat",
}


def step(title: str) -> float:
    print(f"\n==> {title}", flush=True)
    return time.perf_counter()


def done(started: float, figures: dict[str, Any] | None = None) -> None:
    shown = ", ".join(f"{k}={v}" for k, v in (figures or {}).items())
    print(f"    done in {time.perf_counter() - started:.1f}s{'  ' + shown if shown else ''}", flush=True)


def start_ray(keep_serving: bool) -> None:
    """Connect to RAY_ADDRESS, or start a local cluster (detached when the endpoint should outlive us)."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the demo prints its own steps
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset execution plans
    if os.environ.get("RAY_ADDRESS") or not keep_serving:
        init_ray(num_cpus=4)
        return
    ray_bin = Path(sys.executable).parent / "ray"
    started = subprocess.run(
        [str(ray_bin), "start", "--head", "--num-cpus=4", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
        capture_output=True, text=True,
    )  # fmt: skip
    if started.returncode != 0:
        raise RayrecError(
            "could not start a local Ray cluster (`ray start --head`); if one is already running, stop it with "
            f"`{ray_bin} stop` or point RAY_ADDRESS at it:\n{started.stderr[-2000:]}"
        )
    init_ray(address="auto")


def find_movielens(folder: Path) -> tuple[str, Path, Path | None]:
    """(format, events file, items file) of a MovieLens folder."""
    for name in RAW_EVENTS:
        if (folder / name).is_file():
            items = folder / RAW_ITEMS[name]
            return (
                ("sequences" if name.endswith(".gz") else "movielens"),
                folder / name,
                (items if items.is_file() else None),
            )
    raise RayrecError(f"{folder} holds none of {', '.join(RAW_EVENTS)}: pass a MovieLens folder as --data")


def prepare_data(data: str | None, out: Path, quick: bool) -> tuple[Path, Path, dict[str, Any]]:
    """Prepared pre-training and fine-tuning datasets: (pretrain, finetune, summary of pretrain)."""
    from rec_train.data.config import PrepareConfig
    from rec_train.data.prepare import prepare
    from rec_train.data.synth import SynthConfig, synth

    pre, fine = out / "data" / "pretrain", out / "data" / "finetune"
    common = {"overwrite": True, "max_seq_len": 50}
    if data is None:
        users = 1200 if quick else 2000
        for domain, n_users in ((0, users), (1, users // 2)):
            raw = out / "raw" / f"domain{domain}"
            synth(validate(SynthConfig, {"output": str(raw), "users": n_users, "items": 300 if quick else 500,
                                         "events": n_users * 40, "seed": 7, "domain": domain}))  # fmt: skip
        summary = prepare(validate(PrepareConfig, {
            "format": "parquet", "events": str(out / "raw/domain0/events.parquet"), "columns": {"value": "rating"},
            "items": str(out / "raw/domain0/items.parquet"), "output": str(pre), **common}))  # fmt: skip
        prepare(validate(PrepareConfig, {
            "format": "parquet", "events": str(out / "raw/domain1/events.parquet"), "columns": {"value": "rating"},
            "items": str(out / "raw/domain1/items.parquet"), "output": str(fine), "vocab_from": str(pre), **common}))  # fmt: skip
        return pre, fine, summary
    fmt, events, items = find_movielens(Path(data))
    base = {"format": fmt, "events": str(events), "items": str(items) if items else None, **common}
    summary = prepare(validate(PrepareConfig, {**base, "output": str(pre)}))
    # Fine-tuning "domain": the same users' most recent behaviour, split by time, on the same vocabulary.
    prepare(validate(PrepareConfig, {**base, "output": str(fine), "vocab_from": str(pre), "max_seq_len": 20}))
    return pre, fine, summary


def train(config_file: str, overrides: list[str], init_from: str | None = None) -> dict[str, Any]:
    from rec_train.config import load_config
    from rec_train.train.config import FinetuneSection, TrainConfig
    from rec_train.train.launch import launch

    config = load_config(TrainConfig, REPO_CONFIGS / config_file, overrides)
    if "finetune" in config_file and config.finetune is None:
        config.finetune = FinetuneSection()
    return launch(config, init_from, show_progress=True)


def query(url: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    return answer, (time.perf_counter() - started) * 1000


def show(answer: dict[str, Any], titles: dict[str, str], history: list[str]) -> None:
    seen = ", ".join(titles.get(i, i) for i in history[-3:])
    print(f"    history (last 3): {seen}")
    for rank, item in enumerate(answer["items"], 1):
        because = ", ".join(titles.get(b, b) for b in item.get("because") or []) or "-"
        print(
            f"    {rank}. {item.get('title') or item['item_id']}  score={item['score']:.3f}  because: {because}"
        )


def demo(data: str | None, output: str, port: int, keep_serving: bool, quick: bool) -> dict[str, Any]:
    import pyarrow.parquet as pq
    from ray import serve

    from rec_serve.app import build_app
    from rec_train.data.dataset import read_sequences
    from rec_train.model.text import EMBEDDINGS_FILE, embed_items, read_item_text_embeddings
    from rec_train.train.evaluate import evaluate_model, evaluate_popularity
    from rec_train.train.export import export
    from rec_train.train.saved_model import load_model

    out = Path(output).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    begun = time.perf_counter()

    t = step("Starting a local Ray cluster")
    start_ray(keep_serving)
    done(t)

    t = step(f"Preparing data ({data or 'synthetic interaction log with item titles'})")
    pre, fine, summary = prepare_data(data, out, quick)
    done(t, {k: summary[k] for k in ("users", "items", "events")})

    t = step("Embedding item titles with all-MiniLM-L6-v2")
    emb = embed_items(str(pre), progress=True)
    if pq.read_table(pre / "items.parquet").equals(pq.read_table(fine / "items.parquet")):
        shutil.copy(pre / EMBEDDINGS_FILE, fine / EMBEDDINGS_FILE)  # the same items: the same vectors
    else:
        embed_items(str(fine), progress=True)
    done(t, {"dim": emb["dim"], "items": emb["items"]})

    epochs = 4 if quick else 6
    text = ["model.overrides.item_representation=id+text", f"model.overrides.text_dim={emb['dim']}"]
    t = step("Pre-training: Ray Train, 2 workers, DeepSpeed ZeRO-2")
    pretrained = train("pretrain/synthetic.yaml", [
        f"data.path={pre}", f"run.storage={out / 'runs'}", "run.name=pretrain", f"train.epochs={epochs}",
        "checkpoint.every_epochs=2", "train.batch_size=32", "model.overrides.hidden_size=64", "model.overrides.intermediate_size=128",
        *text])  # fmt: skip
    done(t, {"sequences_per_s": pretrained.get("sequences_per_s")})
    t = step("Exporting the pre-trained model")
    export(pretrained["checkpoint"], str(out / "pretrained-model"), evaluate=False)
    done(t)

    t = step("Fine-tuning on the new domain (item embeddings frozen, the encoder adapts)")
    finetuned = train("finetune/synthetic-domain.yaml", [
        f"data.path={fine}", f"run.storage={out / 'runs'}", "run.name=finetune", f"train.epochs={epochs}",
        "train.batch_size=32", "optim.lr=0.003"],
        init_from=str(out / "pretrained-model"))  # fmt: skip
    done(t)
    t = step("Exporting the fine-tuned model")
    exported = export(finetuned["checkpoint"], str(out / "model"), evaluate=False)
    done(t, {"model_version": exported["model_version"]})

    t = step("Evaluating on the new domain's validation targets (full ranking, history excluded)")
    sequences = read_sequences(str(fine))
    after, _ = load_model(str(out / "model"))
    before, _ = load_model(str(out / "pretrained-model"))
    if before.config.num_items < after.config.num_items:  # items new in the fine-tuning domain
        text = read_item_text_embeddings(str(fine))[0].float() if before.config.uses_text else None
        before.resize_items(after.config.num_items, text)
    figures = {
        "pretrained_valid_ndcg@10": evaluate_model(before, sequences, "valid", [10])["ndcg@10"],
        "finetuned_valid_ndcg@10": evaluate_model(after, sequences, "valid", [10])["ndcg@10"],
        "popularity_valid_ndcg@10": evaluate_popularity(sequences, after.config.num_items, "valid", [10])[
            "ndcg@10"
        ],
    }
    done(t, figures)

    t = step("Serving with Ray Serve: 2 replicas, batching")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": str(out / "model"), "replicas": 2}), name="rayrec", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    done(t, {"url": url})

    items = pq.read_table(out / "model/items.parquet", columns=["item_index", "item_id", "title"])
    titles = {r["item_id"]: r["title"] or r["item_id"] for r in items.to_pylist()}
    item_id = dict(zip(items["item_index"].to_pylist(), items["item_id"].to_pylist(), strict=True))
    histories = pq.read_table(out / "model/histories.parquet").slice(0, 3).to_pylist()
    latencies = []
    for row in histories:
        answer, ms = query(f"{url}/v1/recommend", {"user_id": row["user_id"], "k": 5, "explain": True})
        latencies.append(ms)
        print(f"\n  user {row['user_id']} ({ms:.0f} ms, model {answer['model_version']}):")
        show(answer, titles, [item_id[i] for i in row["items"]])
    for _ in range(20):
        latencies.append(query(f"{url}/v1/recommend", {"user_id": histories[0]["user_id"], "k": 10})[1])

    print(f"\nQuery it yourself:\n  curl -s -X POST {url}/v1/recommend -H 'Content-Type: application/json' "
          f"-d '{{\"user_id\": \"{histories[0]['user_id']}\", \"k\": 5, \"explain\": true}}'")  # fmt: skip
    print(f"  API docs: {url}/docs")
    if keep_serving:
        print(f"The endpoint keeps running; stop it with: {Path(sys.executable).parent / 'ray'} stop")
    else:
        serve.shutdown()
    return {
        **{k: round(v, 4) for k, v in figures.items()},
        "endpoint": url if keep_serving else None,
        "median_latency_ms": round(statistics.median(latencies), 2),
        "seconds": round(time.perf_counter() - begun, 1),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", help="a MovieLens folder (ml-100k, ml-1m, ml-latest-small); default: synthetic"
    )
    parser.add_argument(
        "--output",
        default="/tmp/rayrec-demo",
        help="folder for data, runs and models (replaced); the model is OUTPUT/model",
    )
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the endpoint on 127.0.0.1")
    parser.add_argument("--quick", action="store_true", help="a smaller dataset and fewer epochs")
    parser.add_argument("--stop", action="store_true", help="shut the endpoint and Ray down at the end")


def run(args: argparse.Namespace) -> int:
    figures = demo(args.data, args.output, args.port, keep_serving=not args.stop, quick=args.quick)
    print(json.dumps(figures))
    return 0
