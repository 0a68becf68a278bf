"""Full-ranking evaluation (HR@K, NDCG@K, MRR over all items, history excluded), and `rec-train evaluate`.

`evaluate_model` is the plain single-process function the benchmarks and the demo call; the training
loop calls `split_histogram` on each worker's share of users and all-reduces the histograms, which
gives exactly the same numbers (see metrics.py).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import torch

from rec_train.model import RecModel
from rec_train.train.batches import SPLITS, EvalBatch, eval_batch, pointwise_eval_batch
from rec_train.train.metrics import metrics_from_histogram, pointwise_metrics, rank_histogram, target_ranks

ScoreFn = Callable[[EvalBatch], torch.Tensor]  # batch -> scores [B, N + 1]


def model_scores(model: RecModel, device: torch.device | str = "cpu") -> ScoreFn:
    """Scores user . item for every item, as `RecModel.score` ranks them (float32)."""
    items = model.item_embeddings().float()  # [N + 1, d]

    def score(batch: EvalBatch) -> torch.Tensor:
        users = model.encode_users(batch.input_ids.to(device), batch.attention_mask.to(device))  # [B, d]
        return (users.float() @ items.T).cpu()  # [B, N + 1]

    return score


def popularity_scores(sequences: pa.Table, split: str, num_items: int) -> ScoreFn:
    """The same score for every user: how often each item occurs in the histories of `split`."""
    seen = pc.list_flatten(sequences["train_items"]).to_numpy()
    counts = torch.bincount(torch.from_numpy(seen.astype("int64")), minlength=num_items + 1).double()
    if split == "test":
        valid = torch.from_numpy(sequences["valid_item"].to_numpy().astype("int64"))
        counts += torch.bincount(valid, minlength=num_items + 1).double()
    counts = counts[: num_items + 1]

    def score(batch: EvalBatch) -> torch.Tensor:
        return counts.expand(len(batch.targets), -1)  # [B, N + 1]

    return score


@torch.no_grad()
def split_histogram(
    score: ScoreFn, batches: Iterable[pa.RecordBatch | pa.Table], split: str, max_len: int, num_items: int
) -> torch.Tensor:
    """Histogram of target ranks (int64 [num_items + 1]) over the users in `batches`."""
    hist = torch.zeros(num_items + 1, dtype=torch.long)
    for rows in batches:
        batch = eval_batch(rows, split, max_len)
        if batch is not None:
            hist += rank_histogram(target_ranks(score(batch), batch.targets, batch.seen), num_items)
    return hist


@torch.no_grad()
def pointwise_predictions(
    model: RecModel,
    batches: Iterable[pa.RecordBatch | pa.Table],
    split: str,
    task: str,
    click_threshold: float,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [U], targets [U]) of the pointwise head on each user's `split` target that has a value."""
    logits, targets = [torch.zeros(0)], [torch.zeros(0)]
    for rows in batches:
        batch = pointwise_eval_batch(rows, split, model.config.max_seq_len, task, click_threshold)
        if batch is not None:
            out = model(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                candidates=batch.candidates.to(device),
            )  # fmt: skip
            logits.append(out.pointwise_logits.float().cpu())
            targets.append(batch.targets.float())
    return torch.cat(logits), torch.cat(targets)


@torch.no_grad()
def evaluate_pointwise(
    model: RecModel,
    sequences: pa.Table,
    split: str = "test",
    click_threshold: float = 0.5,
    batch_size: int = 256,
) -> dict[str, float]:
    """RMSE/MAE (a "rating" head) or AUC/log loss (a "click" head) on `split` of a sequences table."""
    _check_split(split)
    task = model.config.pointwise_head
    if task is None:
        raise ValueError("this model has no pointwise head: fine-tune it with finetune.task=rating or click")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, targets = pointwise_predictions(
        model, sequences.to_batches(batch_size), split, task, click_threshold, device
    )
    model.train(was_training)
    return pointwise_metrics(logits.numpy(), targets.numpy(), task)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


@torch.no_grad()
def evaluate_model(
    model: RecModel,
    sequences: pa.Table,
    split: str = "test",
    ks: Iterable[int] = (10, 50),
    batch_size: int = 256,
) -> dict[str, float]:
    """HR@K, NDCG@K, MRR (and `users`) of `model` on `split` ("valid" or "test") of a sequences table."""
    _check_split(split)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hist = split_histogram(
        model_scores(model, device), sequences.to_batches(batch_size), split, model.config.max_seq_len,
        model.config.num_items,
    )  # fmt: skip
    model.train(was_training)
    return metrics_from_histogram(hist, list(ks))


def evaluate_popularity(
    sequences: pa.Table,
    num_items: int,
    split: str = "test",
    ks: Iterable[int] = (10, 50),
    batch_size: int = 256,
) -> dict[str, float]:
    """The most-popular-items baseline, ranked and averaged exactly as `evaluate_model` does."""
    _check_split(split)
    score = popularity_scores(sequences, split, num_items)
    hist = split_histogram(score, sequences.to_batches(batch_size), split, 1, num_items)
    return metrics_from_histogram(hist, list(ks))


# ---- rec-train evaluate ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="exported model folder or training checkpoint (path or s3://)"
    )
    parser.add_argument("--data", help="prepared dataset (default: the one the model was trained on)")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 50], help="cut-offs K for HR@K and NDCG@K")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--baseline", action="store_true", help="also score the most-popular-items baseline")


def run(args: argparse.Namespace) -> int:
    from rec_train.data.dataset import read_sequences
    from rec_train.errors import RayrecError
    from rec_train.train.checkpoint import load_model

    model, info = load_model(args.model)
    data = args.data or info.get("data_path")
    if not data:
        raise RayrecError(f"{args.model} does not say which dataset it was trained on; pass --data")
    sequences = read_sequences(data)
    result: dict[str, object] = {"model": args.model, "data": data, "split": args.split}
    result.update(evaluate_model(model, sequences, args.split, args.ks, args.batch_size))
    if model.config.pointwise_head is not None:  # fine-tuned for ratings or clicks: the head's metrics too
        threshold = ((info.get("config") or {}).get("finetune") or {}).get("click_threshold", 0.5)
        result.update(evaluate_pointwise(model, sequences, args.split, threshold, args.batch_size))
    if args.baseline:
        popular = evaluate_popularity(sequences, model.config.num_items, args.split, args.ks, args.batch_size)
        result.update({f"popularity_{k}": v for k, v in popular.items()})
    print(json.dumps(result))
    return 0
