"""`rec-train export --checkpoint URI --output URI`: a training checkpoint -> a servable model folder.

The ZeRO shards of any stage are consolidated into full fp32 weights (LoRA folded in), saved with
`save_pretrained`, next to the vocabulary, every known user's history, `rayrec.json` and the
validation/test metrics of exactly these weights (docs/formats.md, "Exported model").
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from rec_train import storage
from rec_train.errors import RayrecError
from rec_train.exported import DEFAULT_SHARD_SIZE, TOKENIZER_DIR, write_model_folder
from rec_train.train import checkpoint as ckpt


def export(
    checkpoint_uri: str,
    output_uri: str,
    evaluate: bool = True,
    batch_size: int = 256,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
) -> dict[str, Any]:
    """Write the exported model folder (weights in safetensors shards of at most `max_shard_size`); returns
    its `rayrec.json` figures and metrics."""
    from rec_train.data.dataset import load_manifest, read_items, read_sequences
    from rec_train.model.item_tower import save_tokenizer
    from rec_train.train.evaluate import evaluate_model, evaluate_pointwise, text_vectors
    from rec_train.train.model_init import tokenizer_source

    src = storage.resolve(checkpoint_uri)
    if not ckpt.is_checkpoint(src):
        raise RayrecError(
            f"{src.uri} is not a training checkpoint ({ckpt.TRAINER_STATE} missing); pass a checkpoint_* folder "
            "of a run (the `checkpoint` figure that `rec-train pretrain` prints)"
        )
    out = storage.resolve(output_uri)
    with tempfile.TemporaryDirectory(prefix="rayrec-export-") as tmp:
        local = storage.local_copy(src, Path(tmp) / "checkpoint")
        model = ckpt.model_from_checkpoint(local)
        run = json.loads((local / ckpt.RUN_INFO).read_text())
        state = json.loads((local / ckpt.TRAINER_STATE).read_text())
        data_path = run["config"]["data"]["path"]

        sequences = read_sequences(data_path)
        metrics: dict[str, Any] = {"checkpoint_metrics": state["metrics"]}
        if evaluate:
            eval_config = run["config"].get("eval", {})
            ks, history = eval_config.get("ks", [10, 50]), eval_config.get("history", "exclude")
            threshold = (run["config"].get("finetune") or {}).get("click_threshold", 0.5)
            vectors = text_vectors(model, data_path)
            metrics["protocol"] = {"history": history, "ks": ks, "ties": "against the target"}
            for split in ("valid", "test"):
                metrics[split] = evaluate_model(
                    model, sequences, split, ks, batch_size, history, vectors=vectors, name=src.uri
                )
                if model.config.pointwise_head is not None:  # the rating / click head's metrics too
                    metrics[split].update(evaluate_pointwise(model, sequences, split, threshold, batch_size))
        histories = pa.table(
            {"user_id": sequences["user_id"], "items": sequences["items"].cast(pa.list_(pa.int32()))}
        )
        info = {
            "created": datetime.now(timezone.utc).isoformat(),
            "checkpoint": src.uri,
            "epoch": state["epoch"],
            "step": state["step"],
            "config": run["config"],
            "init_from": run.get("init_from"),
            "dataset": load_manifest(data_path),
        }
        folder = Path(tmp) / "model"
        info = write_model_folder(
            folder, model, read_items(data_path), histories, info, metrics, max_shard_size
        )
        if model.items.tower is not None:  # its tokenizer, for `rec-train add-items`
            source = (
                tokenizer_source(run["init_from"]) if run.get("init_from") else model.config.item_tower_source
            )
            save_tokenizer(source, str(folder / TOKENIZER_DIR))
        storage.makedirs(out)
        storage.copy_dir(storage.resolve(str(folder)), out)
    figures = {"output": out.uri, "model_version": info["model_version"], "epoch": state["epoch"]}
    for split in ("valid", "test"):
        figures.update({f"{split}_{k}": v for k, v in metrics.get(split, {}).items()})
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoint_* folder (path or s3://)")
    parser.add_argument("--output", required=True, help="model folder to write (path or s3://)")
    parser.add_argument(
        "--no-eval", action="store_true", help="skip computing metrics.json's valid/test metrics"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="users per batch when evaluating")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_SHARD_SIZE,
        help=f"largest safetensors file, e.g. 2GB or 500MB (default {DEFAULT_SHARD_SIZE}); a larger model is "
        "written in shards with an index",
    )


def run(args: argparse.Namespace) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        if convert_file_size_to_int(args.max_shard_size) < 1:
            raise ValueError
    except ValueError:
        raise RayrecError(
            f"--max-shard-size {args.max_shard_size!r} is not a size such as 2GB or 500MB"
        ) from None
    figures = export(
        args.checkpoint, args.output, evaluate=not args.no_eval, batch_size=args.batch_size,
        max_shard_size=args.max_shard_size,
    )  # fmt: skip
    print(json.dumps(figures))
    return 0
