"""`rec-train plot RUN`: a run's loss, NDCG and catalogue curves (its metrics.jsonl) as a PNG."""

from __future__ import annotations

import argparse
import io
import json
import re

from rec_train import storage
from rec_train.errors import RayrecError
from rec_train.train.run_log import read_metrics


def plot_run(run_uri: str, output: str | None = None) -> dict[str, object]:
    """Draw loss, every `*ndcg@K` and the top-K lists' `*coverage@K` and `*gini@K` per epoch; writes
    `RUN/curves.png` unless `output` says otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_uri) if "loss" in r]
    if not records:
        raise RayrecError(
            f"{run_uri} has no metrics.jsonl with epochs; pass a run folder (runs/NAME or s3://...)"
        )
    epochs = [r["epoch"] for r in records]
    keys = {k for r in records for k in r}
    ndcg_keys = sorted(k for k in keys if re.fullmatch(r"(\w+_)?ndcg@\d+", k))
    catalogue_keys = sorted(k for k in keys if re.fullmatch(r"(\w+_)?(coverage|gini)@\d+", k))
    fig, (ax_loss, ax_ndcg, ax_catalogue) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot(epochs, [r["loss"] for r in records], marker="o")
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    for key in ndcg_keys:
        points = [(r["epoch"], r[key]) for r in records if key in r]
        ax_ndcg.plot(*zip(*points, strict=True), marker="o", label=key)
    ax_ndcg.set(title="full-ranking NDCG", xlabel="epoch", ylabel="NDCG")
    for key in catalogue_keys:
        points = [(r["epoch"], r[key]) for r in records if key in r]
        ax_catalogue.plot(*zip(*points, strict=True), marker="o", label=key)
    ax_catalogue.set(title="top-K lists: catalogue coverage and Gini of exposure", xlabel="epoch")
    for ax, drawn in ((ax_ndcg, ndcg_keys), (ax_catalogue, catalogue_keys)):
        if drawn:
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    target = storage.resolve(output) if output else storage.resolve(run_uri).join("curves.png")
    storage.write_bytes(target, buffer.getvalue())
    return {
        "png": target.uri,
        "epochs": len(epochs),
        "last_loss": records[-1]["loss"],
        "curves": ["loss", *ndcg_keys, *catalogue_keys],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder: runs/NAME or s3://bucket/runs/NAME")
    parser.add_argument("--output", help="PNG to write (default: RUN/curves.png)")


def run(args: argparse.Namespace) -> int:
    print(json.dumps(plot_run(args.run, args.output)))
    return 0
