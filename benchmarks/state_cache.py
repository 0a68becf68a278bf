"""One new event from a cached encoder state against re-encoding the whole history, printing ONE JSON line.

    python benchmarks/state_cache.py --model runs/models/ml-1m [--users 200] [--length 200]

For the users with the longest histories of an exported model (a causal encoder with state), each history
cut to `--length` items: the time of encoding it whole for one request (`Predictor.encode`, what serving
does without `--state-cache-mb`) against continuing the state of its first length - 1 items by the last
one (`RecModel.extend_user`, what the cache does after one new event), in turn on one thread; and the
largest difference between the two user vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rec_serve.predictor import Predictor  # noqa: E402
from rec_train.data.collate import pad_left  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="exported model folder")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument(
        "--length", type=int, default=200, help="history length (at most the model's max_seq_len)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    predictor = Predictor.load(args.model)
    model = predictor.model
    if not model.keeps_user_state:
        raise SystemExit(f"{args.model}: its {model.config.encoder!r} encoder keeps no state")
    length = min(args.length, predictor.max_seq_len)
    histories = [
        h[-length:] for h in sorted(predictor.histories.values(), key=len, reverse=True)[: args.users]
    ]
    full_ms, step_ms, differences = [], [], []
    with torch.no_grad():
        for history in histories:
            _, state = model.extend_user(torch.tensor(history[:-1]))  # the cached state before the new event
            ids, mask = pad_left([history], predictor.max_seq_len)
            start = time.perf_counter()
            full = predictor.encode(ids, mask)[0]
            full_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            step, _ = model.extend_user(torch.tensor(history[-1:]), state)
            step_ms.append((time.perf_counter() - start) * 1000)
            differences.append(float((full - step).abs().max()))
    full, step = statistics.median(full_ms), statistics.median(step_ms)
    print(json.dumps({
        "benchmark": "state_cache", "model": args.model, "encoder": model.config.encoder,
        "layers": model.config.num_hidden_layers, "width": model.config.backbone_width, "history": length,
        "users": len(histories), "full_encode_ms": round(full, 3), "one_event_from_state_ms": round(step, 3),
        "speedup": round(full / step, 2), "max_abs_difference": max(differences),
        "state_kb_per_user": round(state.nbytes() / 1024, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
