"""Top-k items for user vectors, exact or approximate, behind one interface:
`search(users [B, d], k, exclude [B, E] 0-padded | None) -> (ids [B, k], scores [B, k])`, best first,
score -inf (id 0) past the candidates there are.

- `exact`: a product with every item vector; the default, and right for catalogues up to about a million.
- `ivf`, `hnsw`: a faiss index (inner product) over the item vectors: an inverted file of `nlist` k-means
  cells of which `nprobe` are searched, or an HNSW graph of `hnsw_m` links searched with `ef_search`.
- `fp16`, `int8`: every item scored, as `exact`, from item vectors stored in 2 or 1 bytes per value (a
  faiss scalar quantizer; int8 with a per-dimension range learnt from the items): a half or a quarter of
  the bytes a search reads, scores rounded accordingly.

An index is stored in the model folder as `index-KIND.faiss` next to `index-KIND.json` (model version,
items, width, build parameters): `rec-serve index` writes it after export; a replica that finds none (or
one of another model version) builds it at load and writes it into a local folder for the next replica.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch

from rec_train import storage
from rec_train.errors import RayrecError
from rec_train.ranking import candidate_scores

logger = logging.getLogger("rayrec.retrieval")

Retrieval = Literal["exact", "ivf", "hnsw", "fp16", "int8"]
RETRIEVALS: tuple[str, ...] = get_args(Retrieval)
SCALAR_TYPES = {"fp16": "QT_fp16", "int8": "QT_8bit"}  # faiss scalar quantizer of each stored-matrix kind
TRAINING_POINTS_PER_CELL = 64  # k-means sample for an IVF index: this many item vectors per cell


@dataclass(frozen=True)
class IndexParams:
    """How an approximate index is built (`nlist`, `hnsw_m`, `ef_construction`) and searched (`nprobe`,
    `ef_search`); `nlist` None: about 4 sqrt(items)."""

    nlist: int | None = None
    nprobe: int = 32
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128

    def cells(self, items: int) -> int:
        default = int(4 * math.sqrt(items))
        return max(1, min(self.nlist or default, items // 39 or 1))  # faiss wants 39 points per cell


class Retriever(Protocol):
    kind: str

    def search(
        self, users: torch.Tensor, k: int, exclude: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class ExactRetriever:
    """Every item's score: users [B, d] @ matrix.T [d, N + 1], then top-k."""

    kind = "exact"

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix  # [N + 1, d], row 0 padding

    def search(
        self, users: torch.Tensor, k: int, exclude: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = candidate_scores(users @ self.matrix.T, exclude)  # [B, N + 1]
        top = scores.topk(min(k, self.matrix.shape[0] - 1), dim=-1)
        return top.indices, top.values


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise RayrecError(
            "approximate retrieval needs faiss: pip install 'rayrec[ann]' (faiss-cpu), or use retrieval exact"
        ) from exc
    return faiss


class FaissRetriever:
    """A faiss index over items 1..N (faiss label j is item j + 1): IVF, HNSW or scalar-quantised flat."""

    def __init__(self, index: Any, kind: str, params: IndexParams) -> None:
        self.index, self.kind, self.params = index, kind, params
        if kind == "ivf":
            index.nprobe = params.nprobe
        elif kind == "hnsw":
            index.hnsw.efSearch = params.ef_search

    def search(
        self, users: torch.Tensor, k: int, exclude: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        extra = exclude.shape[1] if exclude is not None else 0
        want = min(k + extra, self.index.ntotal)  # enough that k survive the exclusions
        queries = np.ascontiguousarray(users.detach().float().cpu().numpy())
        scores, labels = self.index.search(queries, want)  # [B, want] each; label -1 past the candidates
        ids = torch.from_numpy(labels + 1)  # [B, want], 0 where faiss found none
        values = torch.from_numpy(scores).masked_fill(ids == 0, float("-inf"))
        if extra:
            dropped = (ids[:, :, None] == exclude[:, None, :].to(ids)).any(-1) & (ids != 0)  # [B, want]
            values = values.masked_fill(dropped, float("-inf"))
        top = values.topk(min(k, want), dim=-1)  # stable for faiss's already sorted candidates
        return ids.gather(1, top.indices), top.values


def build_index(matrix: torch.Tensor, kind: str, params: IndexParams, seed: int = 0) -> Any:
    """A faiss index of `kind` over the item rows 1..N of `matrix` [N + 1, d]."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(matrix[1:].detach().float().cpu().numpy())  # [N, d]
    items, dim = vectors.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
    elif kind == "ivf":
        cells = params.cells(items)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = vectors[rng.choice(items, min(items, TRAINING_POINTS_PER_CELL * cells), replace=False)]
        index.train(sample)
    elif kind in SCALAR_TYPES:
        index = faiss.IndexScalarQuantizer(
            dim, getattr(faiss.ScalarQuantizer, SCALAR_TYPES[kind]), faiss.METRIC_INNER_PRODUCT
        )
        index.train(vectors)  # int8: each dimension's range over the items
    else:
        raise ValueError(f"retrieval {kind!r} has no index; choose from {', '.join(RETRIEVALS[1:])}")
    index.add(vectors)
    return index


def index_files(kind: str) -> tuple[str, str]:
    return f"index-{kind}.faiss", f"index-{kind}.json"


def index_meta(kind: str, params: IndexParams, matrix: torch.Tensor, model_version: str) -> dict[str, Any]:
    built: dict[str, Any] = {}
    if kind == "ivf":
        built = {"nlist": params.cells(matrix.shape[0] - 1)}
    elif kind == "hnsw":
        built = {"hnsw_m": params.hnsw_m, "ef_construction": params.ef_construction}
    return {
        "kind": kind,
        "model_version": model_version,
        "items": matrix.shape[0] - 1,
        "dim": matrix.shape[1],
        **built,
    }


def write_index(loc: storage.Location, kind: str, index: Any, meta: dict[str, Any]) -> None:
    """The index and its JSON into the model folder `loc` (local: through a rename, so a reader never
    sees half a file)."""
    data, name = _faiss().serialize_index(index).tobytes(), index_files(kind)
    if loc.is_s3:
        storage.write_bytes(loc.join(name[0]), data)
        storage.write_bytes(loc.join(name[1]), json.dumps(meta).encode())
        return
    for file, content in ((name[0], data), (name[1], json.dumps(meta).encode())):
        fd, tmp = tempfile.mkstemp(dir=loc.path, prefix=f".{file}.")
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, Path(loc.path) / file)


def load_index(folder: Path, kind: str, matrix: torch.Tensor, model_version: str) -> Any | None:
    """The index stored in the local model folder for exactly these items, or None."""
    name = index_files(kind)
    meta_path = folder / name[1]
    if not meta_path.is_file() or not (folder / name[0]).is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if (meta.get("model_version"), meta.get("items"), meta.get("dim")) != (
        model_version, matrix.shape[0] - 1, matrix.shape[1]
    ):  # fmt: skip
        logger.info("ignoring %s: built for model %s", name[0], meta.get("model_version"))
        return None
    return _faiss().read_index(str(folder / name[0]))


def make_retriever(
    kind: str,
    matrix: torch.Tensor,
    params: IndexParams | None = None,
    folder: Path | None = None,
    model_version: str = "",
    writable: bool = False,
) -> Retriever:
    """The retriever of `kind` over `matrix` [N + 1, d]: an index read from `folder`, else built (and
    written there when `writable`)."""
    if kind not in RETRIEVALS:
        raise ValueError(f"retrieval {kind!r} is not one of {', '.join(RETRIEVALS)}")
    if kind == "exact":
        return ExactRetriever(matrix)
    params = params or IndexParams()
    index = load_index(folder, kind, matrix, model_version) if folder is not None else None
    if index is None:
        started = time.perf_counter()
        index = build_index(matrix, kind, params)
        logger.info(
            "built a %s index of %d items in %.1f s", kind, matrix.shape[0] - 1, time.perf_counter() - started
        )
        if folder is not None and writable:
            try:
                write_index(
                    storage.resolve(str(folder)), kind, index, index_meta(kind, params, matrix, model_version)
                )
            except OSError as exc:  # a read-only folder: every replica builds its own
                logger.warning("could not store the %s index in %s: %s", kind, folder, exc)
    return FaissRetriever(index, kind, params)


def summary(retriever: Retriever) -> dict[str, Any]:
    """What GET /v1/model says of the retrieval."""
    if not isinstance(retriever, FaissRetriever):
        return {"kind": retriever.kind}
    if retriever.kind == "ivf":
        return {"kind": "ivf", "nprobe": retriever.params.nprobe, "nlist": retriever.index.nlist}
    if retriever.kind == "hnsw":
        return {"kind": "hnsw", "ef_search": retriever.params.ef_search}
    return {"kind": retriever.kind, "bytes_per_item": retriever.index.code_size}
