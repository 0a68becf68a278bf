"""Typed arguments of the serving app and the JSON bodies of its HTTP API (OpenAPI at /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rec_serve.retrieval import Retrieval
from rec_train.config import StrictModel

MAX_K = 1000
MAX_HISTORY = 1000
MAX_ID_LENGTH = 256
MAX_POPULARITY_PENALTY = 10.0
MAX_EVENTS = 1000  # per POST /v1/events

# --------------------------------------------------------------------- app arguments


class AutoscalingArgs(StrictModel):
    """Replicas follow load: Serve adds one when each has more than `target_ongoing_requests`."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0, description="load above target this long adds replicas")
    downscale_delay_s: float = Field(600.0, ge=0, description="load below target this long removes replicas")

    @model_validator(mode="after")
    def _order(self) -> AutoscalingArgs:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self


class BatchArgs(StrictModel):
    """`user_config` of the deployment: changed live through `reconfigure`, no restart."""

    max_batch_size: int = Field(32, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10)


UserTower = Literal["fp32", "bf16", "compiled"]
USER_TOWERS: tuple[str, ...] = get_args(UserTower)  # how histories can be encoded


class ServeArgs(StrictModel):
    """Arguments of `build_app`: `serve run rec_serve.app:build_app model=URI replicas=2`."""

    model: str = Field(description="exported model folder: a local path, file:// or s3:// URI")
    replicas: int = Field(1, ge=1, description="fixed replica count (ignored when autoscaling is set)")
    autoscaling: AutoscalingArgs | None = None
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica accepts before callers queue")
    max_batch_size: int = Field(32, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10)
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica")
    api_key_env: str | None = Field(
        None, description="environment variable holding the API key clients send as X-API-Key"
    )
    max_body_bytes: int = Field(65536, ge=1024, description="larger request bodies get 413")
    explain_items: int = Field(3, ge=1, le=20, description="history items named in 'because'")
    user_tower: UserTower = Field(
        "fp32",
        description="how histories are encoded: fp32 as trained, bf16 autocast (faster on CPUs with AVX512-BF16 "
        "or AMX), or fp32 through torch.compile (compiled at load; needs a C++ compiler); the item matrix stays "
        "fp32",
    )
    retrieval: Retrieval = Field(
        "exact",
        description="top-k over every item (exact), or over a faiss index: ivf (inverted file), hnsw (graph), or "
        "every item with the item vectors stored in fp16 or int8; the index is read from the model folder "
        "(`rec-serve index`) or built at load; popularity_penalty and diversity need exact",
    )
    events: str = Field(
        "memory",
        description="where POST /v1/events keeps each user's new events: memory (per replica, lost on restart), "
        "a redis:// or rediss:// URL (shared by every replica, kept across restarts and rollouts), or none",
    )
    max_user_events: int = Field(200, ge=1, le=100_000, description="newest events kept per user")
    state_cache_mb: float = Field(
        0.0,
        ge=0,
        description="memory per replica for recent users' encoder states (keys and values; a causal encoder "
        "other than HSTU, fp32 user tower): a user's request after new events encodes only those; 0: off",
    )
    nprobe: int = Field(32, ge=1, description="ivf: cells searched per query (more: higher recall, slower)")
    ef_search: int = Field(
        128, ge=1, description="hnsw: candidates kept while searching (more: higher recall)"
    )

    @field_validator("events")
    @classmethod
    def _check_events(cls, events: str) -> str:
        from rec_serve.user_state import check_store

        return check_store(events)

    def batch(self) -> BatchArgs:
        return BatchArgs(max_batch_size=self.max_batch_size, batch_wait_timeout_s=self.batch_wait_timeout_s)


# --------------------------------------------------------------------- HTTP bodies


class Body(BaseModel):
    """Request bodies: unknown fields and loose types are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)


ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]


class RecommendBody(Body):
    user_id: str | None = Field(
        None, min_length=1, max_length=MAX_ID_LENGTH, description="a user the model was trained on"
    )
    history: list[ItemId] | None = Field(
        None,
        max_length=MAX_HISTORY,
        description="item ids the user interacted with, oldest first (added after a known user's history)",
    )
    k: int = Field(10, ge=1, le=MAX_K, description="number of items to return")
    exclude_history: bool = Field(True, description="never return items already in the history")
    exclude: list[ItemId] = Field(
        default_factory=list, max_length=MAX_K, description="item ids never to return"
    )
    explain: bool = Field(False, description="name the history items behind each recommendation")
    popularity_penalty: float = Field(
        0.0,
        ge=0,
        le=MAX_POPULARITY_PENALTY,
        description="rank by the standardised model score minus this times each item's standardised"
        " log(1 + events), so one value means the same for any model: higher values move less popular"
        " items up; 0 ranks by the model alone. Each item keeps the model's score, so scores need not"
        " descend. The popularity fallback (no usable history) ignores it",
    )
    diversity: float = Field(
        0.0,
        ge=0,
        le=1,
        description="pick the k by maximal marginal relevance over item text vectors from a pool of the"
        " model's best candidates (several times k): 0 is the model's own top k; 1 follows the best item"
        " with the items least like those above. Needs a model that reads item text (GET /v1/model:"
        " rerank.diversity). Each item keeps the model's score, so scores need not descend. The"
        " popularity fallback (no usable history) ignores it",
    )

    @model_validator(mode="after")
    def _who(self) -> RecommendBody:
        if self.user_id is None and self.history is None:
            raise ValueError("give 'user_id' (a known user) or 'history' (a list of item ids), or both")
        return self


class EventBody(Body):
    user_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, description="known to the model or not")
    item_id: ItemId = Field(description="an item the model knows")
    timestamp: float | None = Field(
        None, ge=0, description="seconds since the epoch; orders the request's events"
    )
    event_type: str | None = Field(
        None, min_length=1, max_length=64, description="view, click, purchase, ..."
    )


class EventsBody(Body):
    events: list[EventBody] = Field(
        min_length=1,
        max_length=MAX_EVENTS,
        description="new interactions, appended to each user's history in the order sent (by timestamp when "
        "every event has one); all are stored or, when one is invalid, none",
    )


class EventsResponseBody(BaseModel):
    accepted: int
    users: int
    store: str = Field(description="where the events are kept: memory (this replica) or redis")


class SimilarBody(Body):
    item_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    k: int = Field(10, ge=1, le=MAX_K)


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(
        description="the model's score (user . item), kept when popularity_penalty or diversity re-order"
        " the list; in a popularity fallback, the item's share of all events"
    )
    title: str | None = None
    because: list[str] | None = Field(None, description="history items behind this one (with explain)")


class RecommendResponseBody(BaseModel):
    items: list[RecommendedItem]
    model_version: str
    unknown_items: list[str] = Field(description="history ids the model does not know; they were ignored")
    fallback: bool = Field(description="true when no history was usable and popular items were returned")
    message: str | None = None


class SimilarResponseBody(BaseModel):
    item_id: str
    items: list[RecommendedItem]
    model_version: str


class ItemBody(BaseModel):
    item_id: str
    title: str | None
    count: int = Field(description="events with this item in the training data")


class ServingStats(BaseModel):
    replica: str
    requests: int
    batches: int
    mean_batch_size: float
    max_batch_size_seen: int
    max_batch_size: int
    batch_wait_timeout_s: float


class RerankSupport(BaseModel):
    """The re-ranking knobs `POST /v1/recommend` accepts for this model."""

    popularity_penalty: bool = Field(description="popularity_penalty is accepted (always)")
    diversity: bool = Field(description="diversity is accepted: the model has item text vectors")


class ModelBody(BaseModel):
    model_version: str
    source: str
    num_items: int
    num_users: int
    max_seq_len: int
    user_tower: str = Field(description="how histories are encoded (fp32, bf16 or compiled)")
    events: str = Field(description="where POST /v1/events keeps events: memory, redis or none")
    state_cache: dict[str, int] | None = Field(
        description="the encoder-state cache of this replica (users, bytes, hits, extended, encoded, evicted); "
        "null when off"
    )
    retrieval: dict[str, Any] = Field(
        description="the top-k search: kind (exact, ivf, hnsw) and, for an index, its search settings"
    )
    metrics: dict[str, Any]
    rerank: RerankSupport
    serving: ServingStats


class HealthBody(BaseModel):
    status: str
    model_version: str


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong and how to fix it")
    details: list[str] = Field(default_factory=list)
    request_id: str | None = None
