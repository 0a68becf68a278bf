"""`rec-train synth`: a seeded synthetic interaction log with item titles, for demos and scale tests.

    rec-train synth --output runs/synth --users 2000 --items 1000 --events 100000 --seed 0
    rec-train prepare --format parquet --events runs/synth/events.parquet \
        --items runs/synth/items.parquet --output runs/data/synth

Items belong to clusters (themes); titles and genres are built from the theme's words, so a text
encoder sees which items are alike. Popularity is Zipf-distributed. Each user has a latent taste
over clusters; each next event either follows the domain's cluster-to-cluster transition (with
probability `follow`) or is drawn from the user's taste, and the item within the cluster is drawn
by popularity. A sequence model can learn the transitions; popularity cannot, so it loses clearly.
Each event has a `rating` (1 to 5): high for items of the clusters that fill much of the user's log,
low for the others, plus noise, so a model that reads the history can predict it (pointwise fine-tuning).

`domain` changes the transition order and the users (different tastes) over the very same items
(items depend only on `seed`, `items` and `clusters`), giving a shifted domain to fine-tune on.
Events are generated in chunks of users and written as row groups, so tens of millions fit.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from rec_train import storage
from rec_train.config import StrictModel, validate

THEMES: dict[str, tuple[str, ...]] = {
    "Space Opera": ("galaxy", "star", "orbit", "nebula", "comet", "planet", "rocket", "cosmos"),
    "Detective": ("murder", "clue", "detective", "alibi", "suspect", "case", "witness", "verdict"),
    "Romance": ("love", "heart", "kiss", "wedding", "letter", "summer", "promise", "bride"),
    "Western": ("outlaw", "sheriff", "canyon", "saddle", "frontier", "rifle", "ranch", "gold"),
    "Horror": ("ghost", "haunted", "curse", "blood", "crypt", "shadow", "scream", "witch"),
    "Cooking": ("kitchen", "recipe", "bread", "spice", "feast", "bakery", "chef", "harvest"),
    "Sports": ("champion", "stadium", "goal", "coach", "league", "sprint", "final", "trophy"),
    "War": ("battle", "soldier", "front", "siege", "general", "trench", "army", "victory"),
    "Fantasy": ("dragon", "wizard", "sword", "kingdom", "quest", "elf", "spell", "throne"),
    "Music": ("song", "band", "melody", "guitar", "concert", "rhythm", "piano", "chorus"),
    "Ocean": ("ocean", "ship", "pirate", "island", "storm", "harbor", "whale", "reef"),
    "Robots": ("robot", "android", "circuit", "machine", "cyborg", "code", "neural", "steel"),
    "Family": ("family", "puppy", "holiday", "grandma", "school", "friends", "birthday", "home"),
    "Heist": ("heist", "vault", "diamond", "casino", "getaway", "safe", "thief", "score"),
    "History": ("empire", "emperor", "pharaoh", "dynasty", "revolution", "castle", "crown", "legacy"),
    "Nature": ("forest", "river", "mountain", "wolf", "eagle", "wild", "glacier", "jungle"),
    "Spy": ("agent", "secret", "cipher", "mission", "embassy", "double", "border", "signal"),
    "Comedy": ("laugh", "prank", "party", "roommate", "blunder", "wacky", "hiccup", "mixup"),
    "Medical": ("doctor", "hospital", "surgeon", "virus", "nurse", "cure", "clinic", "pulse"),
    "Courtroom": ("trial", "lawyer", "judge", "jury", "appeal", "testimony", "justice", "court"),
    "Travel": ("journey", "road", "passport", "train", "desert", "voyage", "map", "compass"),
    "Zombies": ("zombie", "outbreak", "survivor", "bunker", "horde", "infection", "plague", "undead"),
    "Art": ("painter", "canvas", "gallery", "sculpture", "museum", "portrait", "color", "muse"),
    "Dance": ("dance", "ballet", "tango", "stage", "rehearsal", "spotlight", "waltz", "step"),
}
TITLE_NOUNS = (
    "Story",
    "Chronicles",
    "Returns",
    "Rising",
    "Legacy",
    "Night",
    "Secret",
    "Days",
    "Road",
    "Tale",
)
MIN_EVENTS_PER_USER = 5
EVENTS_PER_CHUNK = 2_000_000
OVERSAMPLE = 2.5  # draw more than needed, then drop repeated items of a user
SECONDS_PER_YEAR = 365 * 24 * 3600
RATING_NOISE = 0.5  # standard deviation of the rating noise, in stars


class SynthConfig(StrictModel):
    """Size, seed and dynamics of a synthetic dataset."""

    output: str
    users: int = Field(2000, ge=1)
    items: int = Field(1000, ge=10)
    events: int = Field(100_000, ge=1)
    clusters: int = Field(16, ge=2, le=len(THEMES))
    seed: int = 0
    domain: int = Field(0, ge=0, description="0: the base domain; other values: shifted dynamics and users")
    follow: float = Field(0.7, ge=0, le=1, description="chance that the next cluster follows the transition")
    taste_concentration: float = Field(
        0.3, gt=0, description="Dirichlet alpha of user tastes (small = focused)"
    )
    zipf: float = Field(1.1, ge=0, description="popularity exponent")
    start_time: int = Field(978_307_200, description="Unix seconds of the earliest event (2001-01-01)")

    @model_validator(mode="after")
    def _check_sizes(self) -> SynthConfig:
        if self.events < MIN_EVENTS_PER_USER * self.users:
            raise ValueError(
                f"events ({self.events}) must be at least {MIN_EVENTS_PER_USER} per user"
                f" ({MIN_EVENTS_PER_USER * self.users} for {self.users} users)"
            )
        if self.items < self.clusters:
            raise ValueError(f"items ({self.items}) must be at least clusters ({self.clusters})")
        return self


def item_clusters(cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of each item, popularity weight of each item); depends on seed/items/clusters only."""
    rng = np.random.default_rng([cfg.seed, 0])
    cluster = rng.permutation(np.arange(cfg.items) % cfg.clusters)
    rank = rng.permutation(cfg.items)
    weight = 1.0 / (rank + 1.0) ** cfg.zipf
    return cluster, weight


def make_items(cfg: SynthConfig) -> pa.Table:
    """`item_id`, `title`, `genres`, `cluster`: titles from the cluster's theme words."""
    rng = np.random.default_rng([cfg.seed, 1])
    cluster, _ = item_clusters(cfg)
    themes = list(THEMES)[: cfg.clusters]
    titles = []
    for i, c in enumerate(cluster):
        words = THEMES[themes[c]]
        a, b = rng.choice(len(words), size=2, replace=False)
        noun = TITLE_NOUNS[rng.integers(len(TITLE_NOUNS))]
        titles.append(f"{words[a].capitalize()} {words[b].capitalize()} {noun} {i % 97 + 1}")
    return pa.table(
        {
            "item_id": [f"i{i}" for i in range(cfg.items)],
            "title": titles,
            "genres": [themes[c] for c in cluster],
            "cluster": pa.array(cluster, pa.int32()),
        }
    )


def transition_order(cfg: SynthConfig) -> np.ndarray:
    """The domain's cyclic order of clusters: the transition goes from order[k] to order[k + 1]."""
    return np.random.default_rng([cfg.seed, 2, cfg.domain]).permutation(cfg.clusters)


def user_lengths(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Events per user: log-normal, at least 5, at most half the items, summing to `events`."""
    cap = max(MIN_EVENTS_PER_USER, cfg.items // 2)
    raw = rng.lognormal(0.0, 0.7, cfg.users)
    n = np.clip(np.floor(raw / raw.sum() * cfg.events), MIN_EVENTS_PER_USER, cap).astype(np.int64)
    for _ in range(100):  # move the rounding remainder onto users that have room
        missing = cfg.events - int(n.sum())
        if missing == 0:
            break
        room = np.flatnonzero(n < cap) if missing > 0 else np.flatnonzero(n > MIN_EVENTS_PER_USER)
        if len(room) == 0:
            break
        pick = rng.choice(room, size=min(abs(missing), len(room)), replace=False)
        n[pick] += np.sign(missing)
    return n


def _sample_rows(cum: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each entry of `rows`, a column drawn from that row's cumulative distribution `cum` [R, K]."""
    r, k = cum.shape
    flat = (cum + np.arange(r)[:, None]).ravel()  # row i's CDF shifted into (i, i + 1]
    pos = np.searchsorted(flat, rows + rng.random(len(rows)) * (1 - 1e-12), side="right")
    return np.minimum(pos - rows * k, k - 1)


def generate_chunk(
    cfg: SynthConfig, lengths: np.ndarray, first_user: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user numbers, item numbers, timestamps, ratings) for users first_user.. with `lengths` events each."""
    cluster, weight = item_clusters(cfg)
    order = transition_order(cfg)
    place = np.argsort(order)  # place[c]: position of cluster c in the cyclic order
    n_users = len(lengths)

    # draw more events than needed (repeated items are removed below)
    drawn = np.ceil(lengths * OVERSAMPLE).astype(np.int64) + 5
    user = np.repeat(np.arange(n_users), drawn)  # [T]
    starts = np.concatenate([[0], np.cumsum(drawn)[:-1]])
    pos = np.arange(len(user)) - starts[user]  # position within the user

    # clusters: restart from the taste, then follow the cyclic transition k steps
    taste = rng.dirichlet(np.full(cfg.clusters, cfg.taste_concentration), size=n_users)  # [U, C]
    from_taste = _sample_rows(np.cumsum(taste, axis=1), user, rng)  # [T]
    restart = (rng.random(len(user)) >= cfg.follow) | (pos == 0)
    last_restart = np.maximum.accumulate(np.where(restart, np.arange(len(user)), 0))
    steps = np.arange(len(user)) - last_restart
    clusters = order[(place[from_taste[last_restart]] + steps) % cfg.clusters]

    # items within the cluster by popularity
    by_cluster = np.lexsort((np.arange(cfg.items), cluster))  # items grouped by cluster
    counts = np.bincount(cluster, minlength=cfg.clusters)
    grouped_w = weight[by_cluster]
    cum = np.zeros((cfg.clusters, counts.max()))  # [C, max items per cluster], padded with 1
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for c in range(cfg.clusters):
        w = grouped_w[offsets[c] : offsets[c] + counts[c]]
        cum[c, : counts[c]] = np.cumsum(w) / w.sum()
        cum[c, counts[c] :] = 1.0 + 1e-9
    within = np.minimum(_sample_rows(cum, clusters, rng), counts[clusters] - 1)
    items = by_cluster[offsets[clusters] + within]

    # keep each user's first occurrence of an item, then the first `lengths[u]` events
    _, first = np.unique(user * cfg.items + items, return_index=True)
    keep = np.zeros(len(user), dtype=bool)
    keep[first] = True
    user, items = user[keep], items[keep]
    rank = np.arange(len(user)) - np.searchsorted(user, user)
    keep = rank < lengths[user]
    user, items = user[keep], items[keep]

    # time: each user starts somewhere in the first year, then gaps of minutes to days
    begin = cfg.start_time + rng.integers(0, SECONDS_PER_YEAR, n_users)
    gaps = rng.exponential(6 * 3600, len(user)).astype(np.int64) + 1
    user_start = np.searchsorted(user, user)
    cum_gaps = np.cumsum(gaps)
    times = begin[user] + cum_gaps - cum_gaps[user_start]

    # ratings: 1 star + up to 4 more by how much of the user's log is in the item's cluster, plus noise
    shares = np.bincount(user * cfg.clusters + cluster[items], minlength=n_users * cfg.clusters)
    shares = shares.reshape(n_users, cfg.clusters).astype(np.float64)  # [U, C] events per cluster
    liking = shares[user, cluster[items]] / shares[user].max(axis=1)  # [T] in (0, 1]
    ratings = np.clip(np.rint(1 + 4 * liking + rng.normal(0, RATING_NOISE, len(user))), 1, 5)
    return user + first_user, items, times, ratings.astype(np.float32)


def synth(cfg: SynthConfig) -> dict[str, Any]:
    """Write `events.parquet` and `items.parquet` under `cfg.output`; returns a summary."""
    started = time.perf_counter()
    out = storage.resolve(cfg.output)
    if not out.is_s3:
        storage.makedirs(out)
    items = make_items(cfg)
    with out.fs.open_output_stream(out.join("items.parquet").path) as f:
        pq.write_table(items, f)

    rng = np.random.default_rng([cfg.seed, 3, cfg.domain])
    lengths = user_lengths(cfg, rng)
    prefix = "u" if cfg.domain == 0 else f"d{cfg.domain}u"
    user_ids = pa.array([f"{prefix}{u}" for u in range(cfg.users)], pa.string())
    item_ids = items["item_id"].combine_chunks()
    schema = pa.schema(
        [
            ("user_id", pa.string()),
            ("item_id", pa.string()),
            ("timestamp", pa.int64()),
            ("rating", pa.float32()),
        ]
    )
    written = 0
    with (
        out.fs.open_output_stream(out.join("events.parquet").path) as f,
        pq.ParquetWriter(f, schema) as writer,
    ):
        first = 0
        while first < cfg.users:
            last = int(np.searchsorted(np.cumsum(lengths[first:]), EVENTS_PER_CHUNK)) + first + 1
            last = min(max(last, first + 1), cfg.users)
            user, item, times, ratings = generate_chunk(cfg, lengths[first:last], first, rng)
            table = pa.Table.from_arrays(
                [user_ids.take(user), item_ids.take(item), pa.array(times), pa.array(ratings)], schema=schema
            )
            writer.write_table(table, row_group_size=EVENTS_PER_CHUNK)
            written += table.num_rows
            first = last
    return {
        "output": out.uri,
        "users": cfg.users,
        "items": cfg.items,
        "events": written,
        "domain": cfg.domain,
        "seconds": round(time.perf_counter() - started, 2),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="folder for events.parquet and items.parquet")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domain", type=int, default=0, help="another value gives a shifted domain")


def run(args: argparse.Namespace) -> int:
    keys = ("output", "users", "items", "events", "clusters", "seed", "domain")
    cfg = validate(SynthConfig, {k: getattr(args, k) for k in keys}, source="synth arguments")
    print(json.dumps(synth(cfg)), flush=True)
    return 0
