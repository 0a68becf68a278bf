"""The synthetic generator: seeded, sized as asked, a shifted domain over the same items, and a signal
that a sequence-aware predictor picks up while popularity cannot."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rec_train.config import ConfigError, validate
from rec_train.data.synth import SynthConfig, synth, transition_order


def generate(tmp_path: Path, name: str, **kwargs) -> tuple:
    cfg = validate(SynthConfig, {"output": str(tmp_path / name), **kwargs})
    summary = synth(cfg)
    events = pq.read_table(tmp_path / name / "events.parquet")
    items = pq.read_table(tmp_path / name / "items.parquet")
    return summary, events, items


def sequences(events) -> list[list[str]]:
    df = events.to_pandas().sort_values(["user_id", "timestamp"], kind="stable")
    return [g["item_id"].tolist() for _, g in df.groupby("user_id", sort=False)]


def hit_rates(seqs: list[list[str]]) -> tuple[float, float]:
    """HR@10 on each user's last item: popularity vs. first-order transitions (+ popularity)."""
    train = [s[:-1] for s in seqs]
    popularity = collections.Counter(i for s in train for i in s)
    follows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for s in train:
        for a, b in zip(s, s[1:], strict=False):
            follows[a][b] += 1
    pop_hits = seq_hits = 0
    for s in seqs:
        seen, target = set(s[:-1]), s[-1]
        pop_top = [i for i, _ in popularity.most_common(len(seen) + 10) if i not in seen][:10]
        scores = collections.Counter({i: c * 1e-3 for i, c in popularity.items()})
        scores.update(follows[s[-2]])
        seq_top = [i for i, _ in scores.most_common(len(seen) + 10) if i not in seen][:10]
        pop_hits += target in pop_top
        seq_hits += target in seq_top
    return pop_hits / len(seqs), seq_hits / len(seqs)


def test_sizes_columns_and_titles(tmp_path: Path) -> None:
    summary, events, items = generate(tmp_path, "a", users=300, items=200, events=6000, seed=1)
    assert events.column_names == ["user_id", "item_id", "timestamp", "rating"]
    assert items.column_names[:3] == ["item_id", "title", "genres"]
    assert summary["events"] == events.num_rows and 0.97 * 6000 <= events.num_rows <= 6000
    assert len(set(events["user_id"].to_pylist())) == 300 and items.num_rows == 200
    df = events.to_pandas()
    assert not df.duplicated(["user_id", "item_id"]).any()  # no repeated item within a user
    assert df.groupby("user_id").size().min() >= 5
    # a title is made of its cluster's theme words: items of one genre share words, others do not
    by_genre = (
        items.to_pandas().groupby("genres")["title"].apply(lambda t: {w for x in t for w in x.split()[:2]})
    )
    genres = list(by_genre.index)
    assert not by_genre[genres[0]] & by_genre[genres[1]]


def test_seeded_and_domain_shift(tmp_path: Path) -> None:
    _, e1, i1 = generate(tmp_path, "a", users=100, items=100, events=2000, seed=3)
    _, e2, i2 = generate(tmp_path, "b", users=100, items=100, events=2000, seed=3)
    _, e3, i3 = generate(tmp_path, "c", users=100, items=100, events=2000, seed=3, domain=1)
    assert e1.equals(e2) and i1.equals(i2)
    assert i3.equals(i1)  # the shifted domain uses the very same items
    assert not np.array_equal(e3["item_id"].to_numpy(), e1["item_id"].to_numpy())
    assert e3["user_id"][0].as_py().startswith("d1u")
    base = validate(SynthConfig, {"output": "x", "seed": 3, "users": 100, "items": 100, "events": 2000})
    shifted = base.model_copy(update={"domain": 1})
    assert not np.array_equal(transition_order(base), transition_order(shifted))


def test_sequence_signal_beats_popularity(tmp_path: Path) -> None:
    _, events, _ = generate(tmp_path, "a", users=1500, items=400, events=45_000, seed=0)
    popularity, sequential = hit_rates(sequences(events))
    assert sequential > 1.3 * popularity, (popularity, sequential)


def test_too_few_events_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"events \(10\) must be at least 5 per user"):
        validate(SynthConfig, {"output": "x", "users": 10, "events": 10})


def test_ratings_follow_how_much_of_the_users_log_is_in_the_genre(tmp_path: Path) -> None:
    """Visible in the items alone: a genre that fills more of a user's log gets higher ratings."""
    _, events, items = generate(tmp_path, "a", users=400, items=200, events=12_000, seed=2)
    genre = dict(zip(items["item_id"].to_pylist(), items["genres"].to_pylist(), strict=True))
    df = events.to_pandas()
    assert set(df["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0} and df["rating"].std() > 0.8
    df["genre"] = df["item_id"].map(genre)
    counts = df.groupby(["user_id", "genre"])["item_id"].transform("size")
    share = counts / df.assign(n=counts).groupby("user_id")["n"].transform("max")
    assert np.corrcoef(share, df["rating"])[0, 1] > 0.6
