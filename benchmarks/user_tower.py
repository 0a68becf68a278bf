"""The user tower in fp32, bf16 and compiled side by side on one exported model, printing ONE JSON line.

    python benchmarks/user_tower.py --model runs/models/ml-1m [--batch-sizes 1 32] [--repeats 20]

Every known user of the model is ranked by the fp32 Predictor and by ones that encode histories under
bfloat16 autocast (`rec-serve deploy --user-tower bf16`) or in fp32 through `torch.compile` (`--user-tower
compiled`); the figures are the share of users whose top-10
list is the same (in order, and as a set), the mean share of the 10 items both lists hold, and the
seconds one `Predictor.encode` call takes on one thread for a batch of the longest histories, the
towers timed in turn.
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

import torch  # noqa: E402

from rec_serve.predictor import Predictor, RecommendRequest  # noqa: E402
from rec_serve.schemas import USER_TOWERS  # noqa: E402
from rec_train.data.collate import pad_left  # noqa: E402


def top10(predictor: Predictor, users: list[str]) -> list[list[str]]:
    lists = []
    for start in range(0, len(users), 256):
        requests = [RecommendRequest(user_id=u, k=10) for u in users[start : start + 256]]
        lists += [[item.item_id for item in r.items] for r in predictor.recommend_batch(requests)]
    return lists


def encode_seconds(predictors: dict[str, Predictor], batch_size: int, repeats: int) -> dict[str, float]:
    """Median seconds of one `encode_users` call per tower, on the longest histories, towers interleaved."""
    any_predictor = next(iter(predictors.values()))
    users = sorted(any_predictor.histories.values(), key=len, reverse=True)[:batch_size]
    input_ids, mask = pad_left(users, any_predictor.max_seq_len)  # [B, L]
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(repeats + 2):  # the first two calls warm up
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor.encode(input_ids, mask)
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(t[2:]), 5) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="exported model folder")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)

    predictors = {name: Predictor.load(args.model, user_tower=name) for name in USER_TOWERS}
    users = sorted(predictors["fp32"].histories)
    reference = top10(predictors["fp32"], users)
    out: dict[str, Any] = {
        "benchmark": "user_tower",
        "model": args.model,
        "model_version": predictors["fp32"].model_version,
        "users": len(users),
        "encoder": predictors["fp32"].model.config.encoder,
        "max_seq_len": predictors["fp32"].max_seq_len,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": 1,
                    "torch": torch.__version__},
    }  # fmt: skip
    for name in USER_TOWERS[1:]:
        lists = top10(predictors[name], users)
        out[f"{name}_same_top10_list"] = round(
            sum(a == b for a, b in zip(reference, lists, strict=True)) / len(users), 4
        )
        out[f"{name}_same_top10_set"] = round(
            sum(set(a) == set(b) for a, b in zip(reference, lists, strict=True)) / len(users), 4
        )
        out[f"{name}_top10_overlap"] = round(
            sum(len(set(a) & set(b)) / max(len(a), 1) for a, b in zip(reference, lists, strict=True))
            / len(users),
            4,
        )
    for batch_size in args.batch_sizes:
        seconds = encode_seconds(predictors, batch_size, args.repeats)
        out[f"encode_s_batch{batch_size}"] = seconds
        out[f"speedup_batch{batch_size}"] = {
            n: round(seconds["fp32"] / seconds[n], 2) for n in USER_TOWERS[1:]
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
