"""`rec-train add-items --model MODEL --items new_items.csv --output NEW`: items that appeared after
training get vectors from their text, and a new model version is written that serves them (cold start).

The model must read item text: its LM item tower computes the new items' vectors from their tokens (its
`item_tokenizer` is in the folder), or, for fixed text vectors, the encoder that `rec-train embed-items`
used embeds them (`--text-model`, checked against the model's own vectors of known items). Every known
item keeps its index and vector; the new ones are appended with no events. Nothing is written unless every
new item is valid; an existing output folder is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from rec_train import exported, storage
from rec_train.data.config import CsvOptions, ItemColumns
from rec_train.errors import DataError, RayrecError

REPRODUCED_COSINE = 0.999  # the --text-model must give the model's own vectors of known items, to this cosine


def _read_new_items(uri: str, columns: ItemColumns, csv: CsvOptions, known: set[str]) -> pa.Table:
    from rec_train.data.formats import read_item_file

    table = read_item_file(uri, columns, csv, integer_ids=False)
    if len(table) == 0:
        raise DataError(f"items file {uri} has no rows; list the new items, one per row")
    ids = table["item_id"].to_pylist()
    again = [i for i in ids if i in known]
    if again:
        raise DataError(
            f"items file {uri}: {len(again)} item ids are already in the model (first: {again[0]!r}); add-items "
            "adds new items only: drop those rows"
        )
    texts = [
        text or title
        for text, title in zip(table["text"].to_pylist(), table["title"].to_pylist(), strict=True)
    ]
    empty = [i for i, text in zip(ids, texts, strict=True) if not text]
    if empty:
        text_columns = ", ".join(columns.text) or "none"
        raise DataError(
            f"items file {uri}: {len(empty)} items have no text in columns {text_columns} or {columns.title} "
            f"(first: {empty[0]!r}); a new item is placed by its text, so give each one"
        )
    return table.set_column(2, "text", pa.array(texts, pa.string()))


def _text_vectors(
    model: Any, encoder_name: str, known_texts: list[str | None], texts: list[str]
) -> torch.Tensor:
    """New items' fixed text vectors [n, text_dim] from `encoder_name`, once it reproduces the model's."""
    from rec_train.model.text import TextEncoder

    encoder = TextEncoder(encoder_name)
    if encoder.dim != model.config.text_dim:
        raise RayrecError(
            f"--text-model {encoder_name!r} gives {encoder.dim}-wide vectors, the model's are "
            f"{model.config.text_dim}: pass the encoder that `rec-train embed-items` used for its dataset"
        )
    probe = [i for i, text in enumerate(known_texts, start=1) if text][:8]
    if probe:
        mine = encoder.encode([known_texts[i - 1] for i in probe], progress=False)  # [p, text_dim]
        theirs = model.items.text_embeddings[probe]
        cosine = F.cosine_similarity(mine, theirs, dim=-1).min().item()
        if cosine < REPRODUCED_COSINE:
            raise RayrecError(
                f"--text-model {encoder_name!r} does not reproduce the model's item vectors (cosine {cosine:.3f} "
                f"on a known item): pass the encoder, pooling and normalisation that `rec-train embed-items` used"
            )
    return encoder.encode(texts, progress=False)


def add_items(
    model_uri: str,
    items_uri: str,
    output_uri: str,
    columns: ItemColumns | None = None,
    csv: CsvOptions | None = None,
    text_model: str = "minilm",
) -> dict[str, Any]:
    """Write `output_uri`: the model at `model_uri` with the items of `items_uri` appended; returns a summary."""
    from rec_train.model import RecModel
    from rec_train.model.item_tower import load_tokenizer, tokenize_items

    src, out = storage.resolve(model_uri), storage.resolve(output_uri)
    if not exported.is_model_folder(src):
        raise RayrecError(
            f"{src.uri} is not an exported model ({exported.INFO_FILE} missing); pass a folder written by "
            "`rec-train export`"
        )
    if storage.exists(out) and (not storage.is_dir(out) or storage.list_files(out)):
        raise RayrecError(
            f"{out.uri} already exists; add-items writes a new model version: give a new folder"
        )
    with tempfile.TemporaryDirectory(prefix="rayrec-add-items-") as tmp:
        local = storage.local_copy(src, Path(tmp) / "model")
        model = RecModel.from_pretrained(str(local), use_safetensors=True).eval()
        if not model.config.uses_text:
            raise RayrecError(
                f"{src.uri} represents items by ID only (item_representation={model.config.item_representation!r}), "
                "so it cannot place an item nobody has seen; train with item_representation text or id+text"
            )
        old_items = pq.read_table(local / exported.ITEMS_FILE)
        new = _read_new_items(
            items_uri, columns or ItemColumns(), csv or CsvOptions(), set(old_items["item_id"].to_pylist())
        )
        old, added = model.config.num_items, len(new)
        texts = new["text"].to_pylist()
        if model.items.tower is not None:
            tokenizer = load_tokenizer(str(local / exported.TOKENIZER_DIR))
            ids, counts = tokenize_items(
                tokenizer, texts, model.config.item_text_max_length
            )  # [n + 1, T], [n + 1]
            tower = model.items.tower
            model.resize_items(
                old + added,
                item_tokens=(
                    torch.cat([tower.token_ids, ids[1:]]),
                    torch.cat([tower.token_counts, counts[1:]]),
                ),
            )
        else:
            known = [
                t or title
                for t, title in zip(
                    old_items["text"].to_pylist(), old_items["title"].to_pylist(), strict=True
                )
            ]
            vectors = _text_vectors(model, text_model, known, texts)
            model.resize_items(old + added, torch.cat([model.items.text_embeddings, vectors]))

        appended = pa.table(
            {
                "item_index": pa.array(range(old + 1, old + added + 1), old_items["item_index"].type),
                "item_id": new["item_id"],
                "count": pa.array([0] * added, old_items["count"].type),
                "title": new["title"],
                "text": new["text"],
            }
        )
        items = pa.concat_tables([old_items.select(appended.column_names), appended])
        parent = json.loads((local / exported.INFO_FILE).read_text())
        info = {
            **{k: v for k, v in parent.items() if k != "model_version"},
            "created": datetime.now(timezone.utc).isoformat(),
            "parent": {"model": src.uri, "model_version": parent.get("model_version")},
            "added_items": {"source": storage.resolve(items_uri).uri, "items": added},
        }
        metrics_file = local / exported.METRICS_FILE
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        histories = pq.read_table(local / exported.HISTORIES_FILE)
        folder = Path(tmp) / "new"
        info = exported.write_model_folder(folder, model, items, histories, info, metrics)
        if model.items.tower is not None:
            tokenizer.save_pretrained(str(folder / exported.TOKENIZER_DIR))
        storage.makedirs(out)
        storage.copy_dir(storage.resolve(str(folder)), out)
    return {
        "output": out.uri,
        "model_version": info["model_version"],
        "parent_version": parent.get("model_version"),
        "items_added": added,
        "num_items": old + added,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder (path or s3://)")
    parser.add_argument(
        "--items", required=True, help="new items: CSV or parquet with an id and text columns"
    )
    parser.add_argument("--output", required=True, help="the new model version's folder (path or s3://; new)")
    parser.add_argument("--item-column", default="item_id", help="column of the item ids (default item_id)")
    parser.add_argument(
        "--title-column", default="title", help="column of the titles (default title; '' none)"
    )
    parser.add_argument(
        "--text-columns",
        default="title",
        help="comma-separated columns joined with '. ' into the item text, as `prepare`'s item_columns.text did "
        "for the training data (default title; e.g. title,genres)",
    )
    parser.add_argument("--delimiter", default=",", help="CSV delimiter (default ,)")
    parser.add_argument(
        "--text-model",
        default="minilm",
        help="for a model with fixed text vectors: the encoder `rec-train embed-items` used (default minilm)",
    )


def run(args: argparse.Namespace) -> int:
    from rec_train.config import validate

    columns = ItemColumns(
        item=args.item_column,
        title=args.title_column or None,
        text=[c for c in args.text_columns.split(",") if c],
    )
    csv = validate(CsvOptions, {"delimiter": args.delimiter}, source="--delimiter")
    summary = add_items(args.model, args.items, args.output, columns, csv, args.text_model)
    print(json.dumps(summary))
    return 0
