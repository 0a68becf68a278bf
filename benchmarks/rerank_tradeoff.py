"""Accuracy against the catalogue: NDCG@K and coverage@K of one model under re-ranking settings.

    python benchmarks/rerank_tradeoff.py --model MODEL [--data DATASET] [--split test] [--k 10]
        [--setting PENALTY:DIVERSITY ...] [--png tradeoff.png]

MODEL is an exported model folder or a training checkpoint (`rec-train evaluate --model` takes the same);
each setting is `popularity_penalty:diversity` as `rec-train evaluate --popularity-penalty P --diversity D`
ranks them (the same one scoring pass per setting, full ranking, history excluded, ties against the
target). The most-popular-items baseline is measured beside them. Writes a PNG of NDCG@K against
coverage@K and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from rec_train.train.evaluate import evaluate_model, evaluate_popularity, load_for_evaluation
from rec_train.train.metrics import Rerank

DEFAULT_SETTINGS = ["0:0", "0.25:0", "0.5:0", "1:0", "2:0", "0:0.25", "0:0.5", "0.5:0.25"]
FIGURE = re.compile(r"(hr|ndcg|coverage|gini|popularity|popularity_ratio|novelty|diversity)@\d+")


def parse_setting(text: str) -> Rerank:
    """`P:D` -> Rerank(P, D); a clear error naming the flag otherwise."""
    try:
        penalty, diversity = (float(part) for part in text.split(":"))
        return Rerank(penalty, diversity)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--setting {text!r}: expected PENALTY:DIVERSITY with 0 <= PENALTY <= 10 and 0 <= DIVERSITY <= 1 ({exc})"
        ) from None


def keep(figures: dict[str, float]) -> dict[str, float]:
    """The overall figures at K (not the per-group NDCG), rounded."""
    return {k: round(v, 4) for k, v in figures.items() if FIGURE.fullmatch(k)}


def plot(points: list[dict], popularity: dict, k: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for p in points:
        marker = "o" if not p["diversity"] else "s"
        ax.scatter(p[f"coverage@{k}"], p[f"ndcg@{k}"], marker=marker, color="tab:blue")
        ax.annotate(f"{p['popularity_penalty']:g}:{p['diversity']:g}", (p[f"coverage@{k}"], p[f"ndcg@{k}"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)  # fmt: skip
    ax.scatter(
        popularity[f"coverage@{k}"], popularity[f"ndcg@{k}"], marker="x", color="tab:red", label="popularity"
    )
    ax.set(xlabel=f"catalogue coverage@{k}", ylabel=f"NDCG@{k}",
           title="labels: popularity_penalty:diversity (s: with MMR)")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported model folder or training checkpoint")
    parser.add_argument("--data", help="prepared dataset (default: the one the model was trained on)")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--k", type=int, default=10, help="the cut-off K of every figure")
    parser.add_argument("--setting", type=parse_setting, nargs="+", default=None, metavar="P:D")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--png", type=Path, default=Path("rerank_tradeoff.png"))
    args = parser.parse_args()
    settings = args.setting or [parse_setting(s) for s in DEFAULT_SETTINGS]

    model, _, data, sequences, vectors = load_for_evaluation(args.model, args.data)
    popularity = keep(
        evaluate_popularity(
            sequences, model.config.num_items, args.split, [args.k], args.batch_size, vectors=vectors
        )
    )
    points = []
    for rerank in settings:
        started = time.perf_counter()
        figures = evaluate_model(
            model, sequences, args.split, [args.k], args.batch_size, rerank=rerank, vectors=vectors
        )
        points.append({"popularity_penalty": rerank.popularity_penalty, "diversity": rerank.diversity,
                       **keep(figures), "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
    plot(points, popularity, args.k, args.png)
    print(json.dumps({
        "benchmark": "rerank_tradeoff", "model": args.model, "data": data, "split": args.split, "k": args.k,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "popularity": popularity,
        "settings": points, "png": str(args.png),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
