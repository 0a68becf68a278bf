"""Top-k recommendations from an exported model folder, with no Ray in sight.

`Predictor.load(uri)` reads the folder that `rec-train export` writes (docs/formats.md): the
weights (safetensors only), the item table with titles, every known user's history, the model
version and its metrics. The item embedding matrix is computed once; a request is then a forward
pass over the user's history and a top-k over `user vector . item matrix`.

    predictor = Predictor.load("s3://bucket/models/ml-1m")
    [response] = predictor.recommend_batch([RecommendRequest(user_id="42", k=10, explain=True)])

`recommend_batch` pads the histories of many requests together (grouped into length buckets) so a
serving replica answers a whole batch of concurrent requests with one forward pass per bucket.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from rec_serve.retrieval import IndexParams, make_retriever, summary
from rec_serve.schemas import MAX_POPULARITY_PENALTY, USER_TOWERS
from rec_serve.user_state import StateCache
from rec_train import exported, storage
from rec_train.data.collate import pad_left
from rec_train.errors import RayrecError
from rec_train.model import RecModel
from rec_train.ranking import candidate_scores, penalise_popularity, top_k, unit_rows

logger = logging.getLogger("rayrec.predictor")

NO_TEXT_VECTORS = (
    "diversity needs item text vectors; this model reads no item text (export a model trained with"
    " model.overrides.item_representation=id+text or text), or send diversity 0"
)


class ModelFolderError(RayrecError):
    """An exported model folder that cannot be served; the message names the file and the fix."""


class RequestError(RayrecError):
    """A request that cannot be answered as given (HTTP 422); the message says what to change."""


class NotFoundError(RayrecError):
    """A user or item id the model does not know (HTTP 404)."""


@dataclass
class RecommendRequest:
    """A user (`user_id`) and/or a `history` of item ids, oldest first. A user's history is the trained one,
    then their `events` (POST /v1/events), then `history`; a user the model was not trained on needs events.

    `popularity_penalty` (0 to 10) ranks by `rec_train.ranking.penalise_popularity`; `diversity` (0 to 1)
    picks the k by maximal marginal relevance over item text vectors (`rec_train.ranking.top_k`). Both
    leave each returned item's score the model's own, and the popularity fallback ignores both.
    """

    user_id: str | None = None
    history: list[str] | None = None
    k: int = 10
    exclude_history: bool = True
    exclude: list[str] = field(default_factory=list)
    explain: bool = False
    popularity_penalty: float = 0.0
    diversity: float = 0.0
    events: list[str] = field(default_factory=list)


@dataclass
class Recommendation:
    item_id: str
    score: float
    title: str | None
    because: list[str] | None = None


@dataclass
class RecommendResponse:
    items: list[Recommendation]
    model_version: str
    unknown_items: list[str]
    fallback: bool
    message: str | None = None


@dataclass
class PreparedRequest:
    """A request with ids resolved to item indices; ready for a batched forward pass."""

    history: list[int]  # item indices, oldest first, unknown ids dropped
    excluded: list[int]  # item indices never to return
    k: int
    explain: bool
    unknown_items: list[str]
    from_user: bool
    popularity_penalty: float = 0.0
    diversity: float = 0.0
    user_id: str | None = None  # the key of the user's encoder state, when the request names a user


def _read_table(path: Path, columns: list[str]) -> Any:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ModelFolderError(
            f"{path}: not a readable parquet file ({exc}); re-run rec-train export"
        ) from exc
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ModelFolderError(
            f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(table.column_names)});"
            " see docs/formats.md 'Exported model'"
        )
    return table


def check_model_folder(uri: str) -> storage.Location:
    """Fail early, naming the file, unless `uri` holds an exported model with safetensors weights."""
    loc = storage.resolve(uri)
    if not storage.is_dir(loc):
        raise ModelFolderError(f"{loc.uri}: no such model folder; give the --output of rec-train export")
    missing = [name for name in exported.REQUIRED_FILES if not storage.is_file(loc.join(name))]
    if not exported.has_weights(loc):
        missing.insert(1, exported.WEIGHTS_FILE)
    if missing:
        pickled = [name for name in exported.PICKLE_WEIGHTS if storage.is_file(loc.join(name))]
        hint = (
            f" (found pickle weights {', '.join(pickled)}, which are never loaded: re-save with"
            " save_pretrained(safe_serialization=True))"
            if pickled
            else "; re-run rec-train export"
        )
        raise ModelFolderError(f"{loc.uri}: missing {', '.join(missing)}{hint}")
    return loc


def _bucket(length: int) -> int:
    """Length bucket of a history: the next power of two, so similar lengths share a forward pass."""
    return 1 << max(0, math.ceil(math.log2(max(1, length))))


def compile_user_tower(model: RecModel, source: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`model.encode_users` through `torch.compile`, compiled now, so no request pays for it: a graph for a
    single history and one for any batch, each for histories shorter than `max_seq_len` and for full ones
    (the four warm-up shapes); lengths of at least 2 (`Predictor.encode` pads shorter ones, as size-1
    dimensions would get graphs of their own)."""
    compiled = torch.compile(model.encode_users, dynamic=True)
    started, full = time.perf_counter(), model.config.max_seq_len
    try:
        with torch.no_grad():
            for batch, length in ((1, 2), (3, 3), (1, full), (3, full)):
                ids = torch.ones(batch, length, dtype=torch.long)  # [B, L], item 1 everywhere
                compiled(ids, torch.ones_like(ids))
    except Exception as exc:  # inductor needs a C++ compiler; say so instead of failing on a request
        raise ModelFolderError(
            f"{source}: could not compile the user tower ({str(exc).strip().splitlines()[0][:300]}); torch.compile "
            "needs a C++ compiler (gcc or clang) on the replica - install one or use --user-tower fp32"
        ) from exc
    logger.info("compiled the user tower of %s in %.1f s", source, time.perf_counter() - started)
    return compiled


class Predictor:
    """An exported model in memory, answering recommendation, similar-item and item look-ups. The item
    matrix is computed in fp32; `user_tower="bf16"` encodes histories under bfloat16 autocast (matrix
    products in bf16, norms and softmax in fp32), `"compiled"` in fp32 through `torch.compile` (inductor,
    dynamic shapes; compiled at load)."""

    def __init__(
        self,
        model: RecModel,
        items: Any,
        histories: dict[str, list[int]],
        info: dict[str, Any],
        metrics: dict[str, Any],
        source: str,
        explain_items: int = 3,
        user_tower: str = "fp32",
        retrieval: str = "exact",
        index_params: IndexParams | None = None,
        folder: Path | None = None,
        writable: bool = False,
        state_cache_mb: float = 0.0,
    ) -> None:
        """`retrieval` ("exact", "ivf", "hnsw") picks the top-k search; an index is read from the local model
        `folder` or built (and written there when `writable`). `state_cache_mb` > 0 keeps the encoder states
        of recent users (a causal encoder other than HSTU, fp32 user tower), so a user's request after new
        events encodes only those."""
        if user_tower not in USER_TOWERS:
            raise ValueError(f"user_tower={user_tower!r} is not one of {', '.join(USER_TOWERS)}")
        self.user_tower = user_tower
        self.model = model.eval()
        self._encode_users = model.encode_users
        if user_tower == "compiled":
            self._encode_users = compile_user_tower(model, source)
        self.source = source
        self.info = info
        self.metrics = metrics
        self.model_version = str(info.get("model_version", "unknown"))
        self.explain_items = explain_items
        self.max_seq_len = int(
            getattr(model.config, "max_seq_len", 0) or model.config.max_position_embeddings
        )

        index = items.column("item_index").to_numpy().astype(np.int64)
        self.num_items = int(index.max()) if len(index) else 0
        self.item_ids: list[str | None] = [None] * (self.num_items + 1)
        self.titles: list[str | None] = [None] * (self.num_items + 1)
        self.counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for i, item_id, title, count in zip(
            index.tolist(),
            items.column("item_id").to_pylist(),
            items.column("title").to_pylist(),
            items.column("count").to_pylist(),
            strict=True,
        ):
            self.item_ids[i], self.titles[i], self.counts[i] = str(item_id), title, int(count or 0)
        self.item_index = {item_id: i for i, item_id in enumerate(self.item_ids) if item_id is not None}
        self.histories = histories
        # Most popular first; padding row 0 never appears.
        self.popular = [int(i) for i in np.argsort(-self.counts[1:], kind="stable") + 1]

        with torch.no_grad():
            matrix = model.item_embeddings().float()  # [num_items + 1, d]
        if matrix.shape[0] != self.num_items + 1:
            raise ModelFolderError(
                f"{source}: the model has {matrix.shape[0] - 1} items but items.parquet has {self.num_items};"
                " the folder mixes two exports - re-run rec-train export"
            )
        self.item_matrix = matrix
        self.retriever = make_retriever(retrieval, matrix, index_params, folder, self.model_version, writable)
        usable = state_cache_mb > 0 and model.keeps_user_state and user_tower == "fp32"
        self.states = StateCache(model, int(state_cache_mb * 2**20)) if usable else None
        # cosines of similar_items from the norms, not a unit copy of the (possibly multi-GB) item matrix
        self.item_norms = matrix.norm(dim=-1).clamp_min(1e-12)  # [num_items + 1]
        # Unit item text vectors for `diversity`, [num_items + 1, text_dim]; None for a model without text.
        self.text_unit = unit_rows(model.items.text_table()) if model.config.uses_text else None

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        uri: str,
        cache_dir: str | None = None,
        explain_items: int = 3,
        user_tower: str = "fp32",
        retrieval: str = "exact",
        index_params: IndexParams | None = None,
        state_cache_mb: float = 0.0,
    ) -> Predictor:
        """Load an exported model from a local path, `file://` or `s3://` URI (downloaded first); an index
        built at load is stored in a local folder, not written back to S3."""
        loc = check_model_folder(uri)
        if loc.is_s3 and cache_dir is None:
            cache_dir = tempfile.mkdtemp(prefix="rayrec-model-")  # the replica's own copy
        local = storage.local_copy(loc, cache_dir or loc.path)
        model = RecModel.from_pretrained(str(local), use_safetensors=True)
        items = _read_table(local / exported.ITEMS_FILE, ["item_index", "item_id", "title", "count"])
        hist_table = _read_table(local / exported.HISTORIES_FILE, ["user_id", "items"])
        histories = {
            str(user): [int(i) for i in seq or []]
            for user, seq in zip(
                hist_table.column("user_id").to_pylist(), hist_table.column("items").to_pylist(), strict=True
            )
        }
        info = storage.read_json(storage.resolve(str(local / exported.INFO_FILE)))
        metrics_path = local / exported.METRICS_FILE
        metrics = storage.read_json(storage.resolve(str(metrics_path))) if metrics_path.is_file() else {}
        return cls(
            model,
            items,
            histories,
            info,
            metrics,
            source=loc.uri,
            explain_items=explain_items,
            user_tower=user_tower,
            retrieval=retrieval,
            index_params=index_params,
            folder=local,
            writable=not loc.is_s3,
            state_cache_mb=state_cache_mb,
        )

    # ---------------------------------------------------------------- requests

    def prepare(self, request: RecommendRequest) -> PreparedRequest:
        """Resolve ids to indices; raises `NotFoundError` for an unknown user, `RequestError` if invalid."""
        if request.k < 1:
            raise RequestError(f"k must be at least 1, got {request.k}")
        if not 0.0 <= request.popularity_penalty <= MAX_POPULARITY_PENALTY:
            raise RequestError(
                f"popularity_penalty must be between 0 and {MAX_POPULARITY_PENALTY:g},"
                f" got {request.popularity_penalty}"
            )
        if not 0.0 <= request.diversity <= 1.0:
            raise RequestError(f"diversity must be between 0 and 1, got {request.diversity}")
        if request.diversity and self.text_unit is None:
            raise RequestError(NO_TEXT_VECTORS)
        if (request.popularity_penalty or request.diversity) and self.retriever.kind != "exact":
            raise RequestError(
                f"popularity_penalty and diversity re-rank every item's score, which retrieval="
                f"{self.retriever.kind} does not compute; drop them, or query an endpoint with retrieval exact"
            )
        history: list[int] = []
        if request.user_id is not None:
            if request.user_id not in self.histories and not request.events:
                raise NotFoundError(
                    f"unknown user_id {request.user_id!r}; send the user's recent items as 'history' instead"
                )
            history = list(self.histories.get(request.user_id, []))
        unknown: list[str] = []
        for item_id in [*request.events, *(request.history or [])]:
            index = self.item_index.get(item_id)
            if index is None:
                unknown.append(item_id)
            else:
                history.append(index)
        excluded = {self.item_index[i] for i in request.exclude if i in self.item_index}
        if request.exclude_history:
            excluded.update(history)
        return PreparedRequest(
            history=history,
            excluded=sorted(excluded),
            k=request.k,
            explain=request.explain,
            unknown_items=unknown,
            from_user=request.user_id is not None,
            popularity_penalty=request.popularity_penalty,
            diversity=request.diversity,
            user_id=request.user_id,
        )

    def recommend_batch(self, requests: list[RecommendRequest]) -> list[RecommendResponse]:
        """Answer many requests together; raises on the first request that cannot be answered."""
        return self.recommend_prepared([self.prepare(r) for r in requests])

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        return self.recommend_batch([request])[0]

    def recommend_prepared(self, prepared: list[PreparedRequest]) -> list[RecommendResponse]:
        """Popularity for empty histories; one forward pass per history-length bucket for the rest."""
        responses: dict[int, RecommendResponse] = {}  # request position -> its answer
        buckets: dict[int, list[int]] = defaultdict(list)
        for n, p in enumerate(prepared):
            if p.history:
                buckets[_bucket(min(len(p.history), self.max_seq_len))].append(n)
            else:
                responses[n] = self._popular(p)
        for members in buckets.values():
            for n, response in zip(members, self._rank([prepared[n] for n in members]), strict=True):
                responses[n] = response
        return [responses[n] for n in range(len(prepared))]

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Left-padded histories [B, L] -> fp32 user vectors [B, d], in the user tower's precision."""
        if self.user_tower == "compiled" and input_ids.shape[1] < 2:  # [B, 1] -> [B, 2], left-padded
            input_ids, attention_mask = (
                torch.nn.functional.pad(t, (1, 0)) for t in (input_ids, attention_mask)
            )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.user_tower == "bf16"):
            return self._encode_users(input_ids, attention_mask).float()

    @torch.no_grad()
    def _rank(self, batch: list[PreparedRequest]) -> list[RecommendResponse]:
        """One forward pass for the batch, then `rec_train.ranking`'s top-k with each request's knobs."""
        input_ids, attention_mask = pad_left([p.history for p in batch], self.max_seq_len)  # [B, L]
        users = self._users(batch, input_ids, attention_mask)  # [B, d]
        width = max(len(p.excluded) for p in batch)
        exclude = torch.tensor(
            [p.excluded + [0] * (width - len(p.excluded)) for p in batch], dtype=torch.long
        )  # [B, E], 0-padded
        k_max = min(max(p.k for p in batch), self.num_items)
        if self.retriever.kind == "exact":
            top_ids, top_scores = self._rerank(batch, users, exclude, k_max)
        else:  # no re-ranking knobs here (prepare refuses them)
            top_ids, top_scores = self.retriever.search(users, k_max, exclude)  # [B, k_max] each

        because = None
        if any(p.explain for p in batch):
            n = min(self.explain_items, input_ids.shape[1])
            because = self.model.explain(input_ids, attention_mask, top_ids, n)  # [B, k_max, n]

        responses = []
        for row, p in enumerate(batch):
            items = []
            for col in range(min(p.k, k_max)):
                score = float(top_scores[row, col])
                if score == -math.inf:  # fewer candidates than k
                    break
                index = int(top_ids[row, col])
                reasons = None
                if p.explain and because is not None:
                    reasons = list(
                        dict.fromkeys(self.item_ids[int(h)] for h in because[row, col].tolist() if int(h) > 0)
                    )
                items.append(Recommendation(self.item_ids[index] or "", score, self.titles[index], reasons))
            responses.append(RecommendResponse(items, self.model_version, p.unknown_items, fallback=False))
        return responses

    def _users(
        self, batch: list[PreparedRequest], input_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """User vectors [B, d]: from the state cache for requests that name a user (histories up to
        max_seq_len), one batched forward pass for the rest."""
        cached = [
            i for i, p in enumerate(batch) if self.states and p.user_id and len(p.history) <= self.max_seq_len
        ]
        if not cached:
            return self.encode(input_ids, mask)
        users = torch.empty(len(batch), self.item_matrix.shape[1])
        rest = sorted(set(range(len(batch))) - set(cached))
        if rest:
            users[rest] = self.encode(input_ids[rest], mask[rest])
        for i in cached:
            users[i] = self.states.vector(batch[i].user_id, batch[i].history)
        return users

    def _rerank(
        self, batch: list[PreparedRequest], users: torch.Tensor, exclude: torch.Tensor, k_max: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k with each request's re-ranking knobs: (ids [B, k_max], the model's scores [B, k_max])."""
        scores = candidate_scores(users @ self.item_matrix.T, exclude)  # [B, num_items + 1]
        top_ids = torch.zeros(len(batch), k_max, dtype=torch.long)  # [B, k_max]; 0 past a row's own k
        groups: dict[tuple[float, float, int], list[int]] = defaultdict(list)
        for row, p in enumerate(batch):
            # MMR's picks depend on k (its candidate pool grows with k); plain top-k lists share prefixes.
            groups[(p.popularity_penalty, p.diversity, p.k if p.diversity else k_max)].append(row)
        for (penalty, diversity, k), rows in groups.items():
            members = torch.tensor(rows)
            ranked = scores[members]  # [G, num_items + 1]
            if penalty:
                ranked = penalise_popularity(ranked, torch.from_numpy(self.counts), penalty)
            ids, _ = top_k(ranked, k, self.text_unit, diversity)  # [G, min(k, num_items)]
            top_ids[members, : ids.shape[1]] = ids
        return top_ids, scores.gather(1, top_ids)  # the model's scores, in the listed order

    def _popular(self, p: PreparedRequest) -> RecommendResponse:
        """Most popular items (score = share of all events) for a request without a usable history."""
        excluded = set(p.excluded)
        total = max(1, int(self.counts.sum()))
        items = []
        for index in self.popular:
            if len(items) == p.k:
                break
            if index not in excluded:
                items.append(
                    Recommendation(
                        self.item_ids[index] or "",
                        float(self.counts[index]) / total,
                        self.titles[index],
                        [] if p.explain else None,
                    )
                )
        if p.unknown_items:
            reason = "none of the history items are known to this model"
        elif p.from_user:
            reason = "this user has no history"
        else:
            reason = "the request has no history"
        message = f"{reason}; returning the most popular items"
        return RecommendResponse(items, self.model_version, p.unknown_items, fallback=True, message=message)

    # ---------------------------------------------------------------- items

    def similar_items(self, item_id: str, k: int = 10) -> list[Recommendation]:
        """The `k` items whose embeddings have the highest cosine similarity with `item_id`'s."""
        index = self.item_index.get(item_id)
        if index is None:
            raise NotFoundError(f"unknown item_id {item_id!r}; GET /v1/items/{{item_id}} lists what is known")
        sims = (self.item_matrix @ self.item_matrix[index]) / (self.item_norms * self.item_norms[index])
        sims[0] = -math.inf
        sims[index] = -math.inf
        top_sims, top_ids = (
            sims.topk(min(k, self.num_items - 1)) if self.num_items > 1 else (sims[:0], sims[:0])
        )
        return [
            Recommendation(self.item_ids[int(i)] or "", float(s), self.titles[int(i)])
            for s, i in zip(top_sims.tolist(), top_ids.tolist(), strict=True)
        ]

    def item(self, item_id: str) -> dict[str, Any]:
        index = self.item_index.get(item_id)
        if index is None:
            raise NotFoundError(f"unknown item_id {item_id!r}")
        return {"item_id": item_id, "title": self.titles[index], "count": int(self.counts[index])}

    def describe(self) -> dict[str, Any]:
        """Model version, source, sizes and training metrics (for GET /v1/model)."""
        return {
            "model_version": self.model_version,
            "source": self.source,
            "num_items": self.num_items,
            "num_users": len(self.histories),
            "max_seq_len": self.max_seq_len,
            "user_tower": self.user_tower,
            "metrics": self.metrics,
            "retrieval": summary(self.retriever),
            "state_cache": self.states.describe() if self.states is not None else None,
            "rerank": {
                "popularity_penalty": self.retriever.kind == "exact",
                "diversity": self.retriever.kind == "exact" and self.text_unit is not None,
            },
        }
