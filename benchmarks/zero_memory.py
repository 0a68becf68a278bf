"""Peak memory per worker under each ZeRO stage, side by side in one run, on a model whose blocks hold its
parameters (the states, not the item table or the framework, dominate).

    python benchmarks/zero_memory.py [--layers 16] [--hidden 1024] [--items 2000] [--users 32]
        [--batch-size 4] [--setups 0 1 2 3 3+offload 3-deepspeed-buckets]

Each setup trains the same model for one epoch (`--users` synthetic histories of 20 items, batch
`--batch-size` per worker) with `rec-train`'s own path (Ray Train, 2 CPU workers, DeepSpeed, AdamW) and
reports the epoch's peak resident memory per worker (the larger of the two, as `metrics.jsonl` records
it). `3+offload` is ZeRO-3 with the optimizer states and the parameters offloaded to the CPU (on CPU
workers the same memory; it shows what offload costs there); `3-deepspeed-buckets` is ZeRO-3 with
DeepSpeed's own bucket sizes (5e8 elements, 1e9 live parameters and reuse distance) instead of the ones
`rec_train/train/deepspeed_config.py` derives from the model's width. A first run with a one-block model of width
64 measures what the framework alone holds (`base_mb`); beside each setup the script prints the states
the memory model of `rec_train/train/memory.py` predicts (`states_mb`: weights, gradients and AdamW's two
moments, sharded by the stage) and `predicted_mb` = base + states, so the gap is what DeepSpeed keeps
beyond the model (fp32 partition copies, buckets, gathered blocks).

With the `3` setup, its checkpoint is then consolidated into the plain model in a fresh process, twice:
as `rec-train export` does it (`streamed`: each weight gathered from the ranks' partitions when it is
copied into the model) and with a full state dict gathered first (`whole`), with the peak resident MB of
each and the size of the fp32 weights (`consolidation`).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import train_throughput

from rec_train.model import build_config, count_parameters
from rec_train.train.memory import state_bytes

WORKERS = 2
SETUPS = {  # name -> DeepSpeed overrides
    "0": ["deepspeed.zero_stage=0"],
    "1": ["deepspeed.zero_stage=1"],
    "2": ["deepspeed.zero_stage=2"],
    "3": ["deepspeed.zero_stage=3"],
    "3+offload": [
        "deepspeed.zero_stage=3",
        "deepspeed.offload_optimizer=true",
        "deepspeed.offload_params=true",
    ],
    "3-deepspeed-buckets": [  # DeepSpeed's own bucket, live and reuse sizes instead of rayrec's
        "deepspeed.zero_stage=3",
        "deepspeed.bucket_elements=500000000",
        "deepspeed.max_live_parameters=1000000000",
        "deepspeed.max_reuse_distance=1000000000",
    ],
}


def model_overrides(hidden: int, layers: int) -> dict[str, int]:
    return {
        "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64), "max_seq_len": 20,
    }  # fmt: skip


def peak_mb(
    data: str, runs: str, name: str, overrides: dict[str, int], setup: list[str], batch: int
) -> float:
    """The epoch's peak resident MB per worker (the larger of the two workers)."""
    model = "{" + ", ".join(f"{k}: {v}" for k, v in overrides.items()) + "}"
    records = train_throughput.rayrec_run(
        data, runs, name,
        ["model.size=tiny", f"model.overrides={model}", "train.epochs=1", f"train.batch_size={batch}",
         "eval.ks=[10]", "eval.batch_size=16", "run.max_failures=0", f"scaling.num_workers={WORKERS}",
         "scaling.cpus_per_worker=1", "train.torch_threads=1", *setup],
    )  # fmt: skip
    return records[-1]["peak_memory_mb"]


CONSOLIDATE = """
import json, resource, sys
from pathlib import Path
from rec_train.train import checkpoint as ckpt
directory = Path(sys.argv[1])
if sys.argv[2] == "streamed":
    ckpt.model_from_checkpoint(directory)
else:  # every weight gathered into one full state dict first, then copied into the model
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from rec_train.model import RecModel
    from rec_train.model.configuration import RecConfig
    from rec_train.model.peft_utils import load_weights
    with ckpt.safe_load.deepspeed_loads(directory / ckpt.DS_DIR):
        state = get_fp32_state_dict_from_zero_checkpoint(str(directory / ckpt.DS_DIR), tag=ckpt.DS_TAG)
    load_weights(RecModel(RecConfig.from_json_file(str(directory / ckpt.MODEL_CONFIG))), state)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def consolidation_peak_mb(checkpoint: Path, how: str) -> float:
    """Peak resident MB of a fresh process that builds the plain model from a ZeRO checkpoint: `streamed`
    (what `rec-train export` does: each weight gathered when it is copied in) or `whole` (a full state dict
    gathered first)."""
    child = subprocess.run(
        [sys.executable, "-c", CONSOLIDATE, str(checkpoint), how], capture_output=True, text=True, check=True
    )
    return json.loads(child.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    args = parser.parse_args()

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="rayrec-zero-memory-"))
    data = train_throughput.synthetic_dataset(tmp / "data", args.users, args.items, 20)
    runs = str(tmp / "runs")
    overrides = model_overrides(args.hidden, args.layers)
    parameters = count_parameters(build_config("tiny", num_items=args.items, **overrides))["total"]
    ray.init(num_cpus=max(os.cpu_count() or 1, 3), include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    base = peak_mb(data, runs, "base", model_overrides(64, 1), SETUPS["0"], args.batch_size)
    figures: dict[str, object] = {
        "benchmark": "zero_memory", "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "workers": WORKERS, "parameters": parameters, "model": {"size": "tiny", **overrides, "num_items": args.items},
        "users": args.users, "batch_size": args.batch_size, "base_mb": round(base),
    }  # fmt: skip
    results = {}
    for name in args.setups:
        stage = int(name[0])
        states = state_bytes(parameters, parameters, stage, WORKERS) / 2**20
        peak = peak_mb(data, runs, f"zero{name.replace('+', '_')}", overrides, SETUPS[name], args.batch_size)
        results[name] = {
            "peak_mb": round(peak),
            "states_mb": round(states),
            "predicted_mb": round(base + states),
        }
    if "3" in results:  # the ZeRO-3 run's last checkpoint, consolidated both ways
        (checkpoint,) = sorted(p for p in Path(runs, "zero3").glob("checkpoint_*") if p.is_dir())[-1:]
        figures["consolidation"] = {
            how: round(consolidation_peak_mb(checkpoint, how)) for how in ("whole", "streamed")
        }
        figures["consolidation"]["weights_mb"] = round(parameters * 4 / 2**20)
    if "0" in results:
        for result in results.values():
            result["ratio_to_stage_0"] = round(result["peak_mb"] / results["0"]["peak_mb"], 3)
    figures["setups"] = results
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
