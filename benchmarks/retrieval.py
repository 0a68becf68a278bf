"""Exact against approximate top-k (faiss IVF, HNSW, fp16 / int8 item vectors; `rec-serve --retrieval`),
printing ONE JSON line.

    python benchmarks/retrieval.py --model runs/models/ml-1m --synthetic 1000000 10000000 [--k 10 100]
        [--kinds ivf hnsw fp16 int8]

For each catalogue: the item matrix of an exported model (its known users' vectors are the queries), or a
synthetic one of N unit vectors around 1,000 centres (`--noise`: their spread; the queries drawn the same
way). Each query is
searched alone on one thread, exact search and every index in turn on the same queries; the figures are
the median and p99 milliseconds per query, the index's build seconds and size, and recall@k: the share of
the exact top-k that the index returns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss  # noqa: E402
import torch  # noqa: E402

from rec_serve.predictor import Predictor  # noqa: E402
from rec_serve.retrieval import (  # noqa: E402
    RETRIEVALS,
    ExactRetriever,
    FaissRetriever,
    IndexParams,
    Retriever,
    build_index,
)
from rec_train.data.collate import pad_left  # noqa: E402


def clustered(items: int, dim: int, seed: int, noise: float = 0.5, clusters: int = 1000) -> torch.Tensor:
    """[items + 1, dim]: unit vectors around `clusters` centres (`noise`: the spread around a centre, whose
    norm is about sqrt(dim)), row 0 padding; built in chunks."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(clusters, dim, generator=g)
    g.manual_seed(seed)
    out = torch.zeros(items + 1, dim)
    for start in range(1, items + 1, 1_000_000):
        n = min(1_000_000, items + 1 - start)
        rows = centres[torch.randint(clusters, (n,), generator=g)] + noise * torch.randn(n, dim, generator=g)
        out[start : start + n] = torch.nn.functional.normalize(rows, dim=-1)
    return out


def model_catalogue(path: str, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(item matrix [N + 1, d], user vectors [Q, d]) of an exported model."""
    predictor = Predictor.load(path)
    histories = [h for h in predictor.histories.values() if h][:queries]
    users = []
    for start in range(0, len(histories), 256):
        ids, mask = pad_left(histories[start : start + 256], predictor.max_seq_len)
        users.append(predictor.encode(ids, mask))
    return predictor.item_matrix, torch.cat(users)


def timed_search(retriever: Retriever, users: torch.Tensor, k: int) -> tuple[torch.Tensor, list[float]]:
    """Every query alone: (ids [Q, k], milliseconds per query)."""
    ids, times = [], []
    for row in users.split(1):
        start = time.perf_counter()
        found, _ = retriever.search(row, k, None)
        times.append((time.perf_counter() - start) * 1000)
        ids.append(found)
    return torch.cat(ids), times


def latency(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 3),
    }


def recall(found: torch.Tensor, exact: torch.Tensor, k: int) -> float:
    hits = sum(len(set(f[:k].tolist()) & set(e[:k].tolist())) for f, e in zip(found, exact, strict=True))
    return round(hits / (k * len(exact)), 4)


def settings(kind: str, index: Any, params: IndexParams) -> dict[str, Any]:
    if kind == "ivf":
        return {"nlist": index.nlist, "nprobe": params.nprobe}
    if kind == "hnsw":
        return {"hnsw_m": params.hnsw_m, "ef_search": params.ef_search}
    return {"bytes_per_item": index.code_size}


def measure(
    name: str, matrix: torch.Tensor, users: torch.Tensor, ks: list[int], kinds: list[str], params: IndexParams
) -> dict[str, Any]:
    k = max(ks)
    exact_ids, exact_times = timed_search(ExactRetriever(matrix), users, k)
    row: dict[str, Any] = {
        "catalogue": name, "items": matrix.shape[0] - 1, "dim": matrix.shape[1], "queries": len(users),
        "exact": latency(exact_times),
    }  # fmt: skip
    for kind in kinds:
        started = time.perf_counter()
        index = build_index(matrix, kind, params)
        build_s = time.perf_counter() - started
        retriever = FaissRetriever(index, kind, params)
        ids, times = timed_search(retriever, users, k)
        row[kind] = {
            "build_s": round(build_s, 1),
            "index_mb": round(faiss.serialize_index(index).nbytes / 2**20, 1),
            **settings(kind, index, params),
            **latency(times),
            **{f"recall@{kk}": recall(ids, exact_ids, kk) for kk in ks},
            "speedup_median": round(row["exact"]["median_ms"] / statistics.median(times), 2),
        }
        del index, retriever
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="exported model folder: its item matrix and users")
    parser.add_argument("--synthetic", type=int, nargs="*", default=[], help="synthetic catalogue sizes")
    parser.add_argument("--dim", type=int, default=64, help="width of the synthetic item vectors")
    parser.add_argument(
        "--noise", type=float, default=0.5, help="spread of synthetic vectors around their centre"
    )
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--kinds", nargs="+", default=["ivf", "hnsw"], choices=RETRIEVALS[1:])
    parser.add_argument("--nlist", type=int, help="ivf cells (default about 4 sqrt(items))")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="threads per query (torch and faiss)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    params = IndexParams(nlist=args.nlist, nprobe=args.nprobe, ef_search=args.ef_search)
    started = time.perf_counter()
    rows = []
    if args.model:
        matrix, users = model_catalogue(args.model, args.queries)
        rows.append(
            measure(os.path.basename(args.model.rstrip("/")), matrix, users, args.k, args.kinds, params)
        )
    for n in args.synthetic:
        matrix = clustered(n, args.dim, seed=1, noise=args.noise)
        users = clustered(args.queries, args.dim, seed=2, noise=args.noise)[1:]
        rows.append(measure(f"synthetic-{n}-noise{args.noise:g}", matrix, users, args.k, args.kinds, params))
        del matrix
    print(json.dumps({
        "benchmark": "retrieval", "threads": args.threads, "catalogues": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "faiss": faiss.__version__},
        "load_avg_1m": round(os.getloadavg()[0], 1), "wall_s": round(time.perf_counter() - started, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
