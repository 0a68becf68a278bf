"""Full-ranking evaluation (HR@K, NDCG@K, MRR over all items, beyond-accuracy figures of the top-K
lists), and `rec-train evaluate`.

`evaluate_model` is the plain single-process function the benchmarks, export and the demo call; the
training loop feeds each worker's users through `rank_split` into a `RankingAccumulator` and merges the
workers' states, which gives exactly the same numbers (see metrics.py).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable

import pyarrow as pa
import torch

from rec_train.model import RecModel
from rec_train.ranking import HISTORY_MODES
from rec_train.train.batches import SPLITS, EvalBatch, eval_batch, item_events, pointwise_eval_batch
from rec_train.train.metrics import (
    Catalogue,
    RankingAccumulator,
    Rerank,
    check_finite,
    pointwise_metrics,
    summarise,
)

ScoreFn = Callable[[EvalBatch], torch.Tensor]  # batch -> scores [B, N + 1]


def model_scores(model: RecModel, device: torch.device | str = "cpu") -> ScoreFn:
    """Scores user . item for every item, as `RecModel.score` ranks them (float32)."""
    items = model.item_embeddings().float()  # [N + 1, d]

    def score(batch: EvalBatch) -> torch.Tensor:
        users = model.encode_users(batch.input_ids.to(device), batch.attention_mask.to(device))  # [B, d]
        return (users.float() @ items.T).cpu()  # [B, N + 1]

    return score


def split_popularity(sequences: pa.Table, split: str, num_items: int) -> torch.Tensor:
    """Events per item [N + 1] (float64) a model evaluated on `split` could have learnt from: the training
    items, plus the validation targets for the test split."""
    _check_split(split)
    return torch.from_numpy(item_events(sequences, num_items, include_valid=split == "test")).double()


def popularity_scores(popularity: torch.Tensor) -> ScoreFn:
    """The same score for every user: the events per item [N + 1]."""

    def score(batch: EvalBatch) -> torch.Tensor:
        return popularity.expand(len(batch.targets), -1)  # [B, N + 1]

    return score


def text_vectors(model: RecModel | None, data_path: str | None) -> torch.Tensor | None:
    """Item text vectors [N + 1, d] for diversity: the model's own (a text model) or the dataset's
    `item_text_embeddings.safetensors`; None when neither has them."""
    from rec_train import storage
    from rec_train.model.text import EMBEDDINGS_FILE, read_item_text_embeddings

    if model is not None and model.config.uses_text:
        return model.items.text_table().detach().float().cpu()
    if data_path and storage.exists(storage.resolve(data_path).join(EMBEDDINGS_FILE)):
        return read_item_text_embeddings(data_path)[0].float()
    return None


@torch.no_grad()
def rank_split(
    score: ScoreFn,
    batches: Iterable[pa.RecordBatch | pa.Table],
    split: str,
    max_len: int,
    accumulator: RankingAccumulator,
) -> RankingAccumulator:
    """Scores the users of `batches` once and adds them to `accumulator` (returned)."""
    for rows in batches:
        batch = eval_batch(rows, split, max_len)
        if batch is not None:
            accumulator.add(score(batch), batch.targets, batch.seen)
    return accumulator


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
    history: str = "exclude",
    rerank: Rerank | None = None,
    vectors: torch.Tensor | None = None,
    name: str = "model",
) -> dict[str, float]:
    """HR@K, NDCG@K, MRR (and `users`) of `model` on `split` ("valid" or "test") of a sequences table, with
    the top-K lists' beyond-accuracy figures (metrics.summarise); `vectors` [N + 1, d] are the item text
    vectors for diversity (default: the model's own, when it reads text)."""
    _check_split(split)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    num_items = model.config.num_items
    catalogue = Catalogue(
        split_popularity(sequences, split, num_items),
        vectors if vectors is not None else text_vectors(model, None),
    )
    accumulator = RankingAccumulator(list(ks), catalogue, history, rerank)
    rank_split(
        model_scores(model, device),
        sequences.to_batches(batch_size),
        split,
        model.config.max_seq_len,
        accumulator,
    )
    model.train(was_training)
    state = accumulator.state()
    check_finite(state, name, split)
    return summarise(state, list(ks), catalogue)


def evaluate_popularity(
    sequences: pa.Table,
    num_items: int,
    split: str = "test",
    ks: Iterable[int] = (10, 50),
    batch_size: int = 256,
    history: str = "exclude",
    vectors: torch.Tensor | None = None,
) -> dict[str, float]:
    """The most-popular-items baseline (events per item in what a model could learn from), ranked and
    averaged exactly as `evaluate_model` does: its ties count against the target like any model's."""
    popularity = split_popularity(sequences, split, num_items)
    catalogue = Catalogue(popularity, vectors)
    accumulator = RankingAccumulator(list(ks), catalogue, history)
    rank_split(popularity_scores(popularity), sequences.to_batches(batch_size), split, 1, accumulator)
    return summarise(accumulator.state(), list(ks), catalogue)


# ---- rec-train evaluate ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"K must be a positive integer, got {text!r}")
    return value


def _bounded(name: str, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0.0 <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} must be a number in [0, {high:g}], got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="exported model folder or training checkpoint (path or s3://)"
    )
    parser.add_argument("--data", help="prepared dataset (default: the one the model was trained on)")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument(
        "--history", default="exclude", choices=HISTORY_MODES,
        help="exclude: items the user already saw are not candidates (the published MovieLens protocol); "
        "keep: they stay candidates (RecBole / UniSRec; catalogues where items come back)",
    )  # fmt: skip
    parser.add_argument(
        "--ks",
        type=_positive_int,
        nargs="+",
        default=[10, 50],
        help="cut-offs K for HR@K, NDCG@K and the list figures",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=256)
    parser.add_argument("--baseline", action="store_true", help="also score the most-popular-items baseline")
    parser.add_argument(
        "--popularity-penalty", type=_bounded("--popularity-penalty", 10.0), default=0.0,
        help="rank by standardised score minus this times standardised log popularity (0: off)",
    )  # fmt: skip
    parser.add_argument(
        "--diversity", type=_bounded("--diversity", 1.0), default=0.0,
        help="MMR weight of item-text dissimilarity when ordering the top max(ks) (0: off; needs text vectors)",
    )  # fmt: skip


def load_for_evaluation(
    model_uri: str, data: str | None
) -> tuple[RecModel, dict, str, pa.Table, torch.Tensor | None]:
    """(model, its info, dataset path, sequences, item text vectors) of a model folder or checkpoint and
    `data` (default: the dataset it was trained on)."""
    from rec_train.data.dataset import read_sequences
    from rec_train.errors import RayrecError
    from rec_train.train.saved_model import load_model

    model, info = load_model(model_uri)
    data = data or info.get("data_path")
    if not data:
        raise RayrecError(f"{model_uri} does not say which dataset it was trained on; pass --data")
    return model, info, data, read_sequences(data), text_vectors(model, data)


def run(args: argparse.Namespace) -> int:
    model, info, data, sequences, vectors = load_for_evaluation(args.model, args.data)
    rerank = Rerank(args.popularity_penalty, args.diversity)
    result: dict[str, object] = {
        "model": args.model, "data": data, "split": args.split,
        "protocol": {
            "split": args.split, "history": args.history, "ks": sorted(set(args.ks)), "candidates": "all items",
            "ties": "against the target", "popularity_penalty": rerank.popularity_penalty,
            "diversity": rerank.diversity, "text_vectors": vectors is not None,
        },
    }  # fmt: skip
    result.update(
        evaluate_model(
            model,
            sequences,
            args.split,
            args.ks,
            args.batch_size,
            args.history,
            rerank,
            vectors,
            name=args.model,
        )
    )
    if model.config.pointwise_head is not None:  # fine-tuned for ratings or clicks: the head's metrics too
        threshold = ((info.get("config") or {}).get("finetune") or {}).get("click_threshold", 0.5)
        result.update(evaluate_pointwise(model, sequences, args.split, threshold, args.batch_size))
    if args.baseline:
        popular = evaluate_popularity(
            sequences, model.config.num_items, args.split, args.ks, args.batch_size, args.history, vectors
        )
        result.update({f"popularity_{k}": v for k, v in popular.items()})
    print(json.dumps(result))
    return 0
