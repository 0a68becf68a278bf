"""The HTTP API over real HTTP against `serve.run` on a local Ray: answers, batching, every 4xx, fuzzing.

One Serve instance for the module: the `rayrec` app (2 replicas) at `/` and a key-protected copy
(1 replica, its user tower in bf16) at `/secured`, both serving a tiny model that reads item text (so
every knob is served).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from local_cluster import TEST_API_KEY as KEY
from local_cluster import TEST_API_KEY_ENV as KEY_ENV
from local_cluster import free_port
from ray import serve

from rec_serve.app import APP_NAME, build_app
from rec_serve.predictor import Predictor, RecommendRequest
from rec_serve.synthetic import item_id, write_exported_model
from rec_train.model import RecModel, build_config


@dataclass
class Server:
    url: str
    folder: Path
    predictor: Predictor
    client: httpx.Client


def write_text_model(out: Path) -> Path:
    """A tiny id+text model with random item text vectors, exported as version v1."""
    torch.manual_seed(0)
    model = RecModel(build_config("tiny", num_items=40, item_representation="id+text", text_dim=8))
    text = torch.randn(41, 8)  # [num_items + 1, text_dim]
    text[0] = 0.0  # padding
    model.set_item_text_embeddings(text)
    return write_exported_model(out, model, model_version="v1")


@pytest.fixture(scope="module")
def server(ray_shared: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = write_text_model(tmp_path_factory.mktemp("serve") / "model")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"model": str(folder), "replicas": 2, "batch_wait_timeout_s": 0.05, "max_body_bytes": 65536}
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        serve.run(
            build_app({"model": str(folder), "api_key_env": KEY_ENV, "user_tower": "bf16"}),
            name="secured",
            route_prefix="/secured",
        )
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as client:
            yield Server(url, folder, Predictor.load(str(folder)), client)
    finally:
        serve.shutdown()


def recommend(server: Server, **body: Any) -> dict[str, Any]:
    response = server.client.post("/v1/recommend", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def item_ids(body: dict[str, Any]) -> list[str]:
    return [item["item_id"] for item in body["items"]]


# ------------------------------------------------------------------ answers


@pytest.mark.parametrize("user", ["u1", "u4", "u17", "u33"])
def test_top_k_by_user_equals_the_predictor_called_directly(server: Server, user: str) -> None:
    body = recommend(server, user_id=user, k=7)
    [want] = server.predictor.recommend_batch([RecommendRequest(user_id=user, k=7)])
    assert item_ids(body) == [r.item_id for r in want.items]
    assert [i["score"] for i in body["items"]] == pytest.approx([r.score for r in want.items], abs=1e-4)
    assert [i["title"] for i in body["items"]] == [r.title for r in want.items]
    assert body["model_version"] == "v1" and body["fallback"] is False and body["unknown_items"] == []


def test_history_request_with_unknown_items_and_exclusions(server: Server) -> None:
    history = [item_id(3), "not-an-item", item_id(8), item_id(5)]
    body = recommend(server, history=history, k=10, exclude=[item_id(11)])
    [want] = server.predictor.recommend_batch(
        [RecommendRequest(history=history, k=10, exclude=[item_id(11)])]
    )
    assert item_ids(body) == [r.item_id for r in want.items]
    assert body["unknown_items"] == ["not-an-item"]
    assert not {item_id(3), item_id(8), item_id(5), item_id(11)} & set(item_ids(body))
    kept = recommend(server, history=history, k=40, exclude_history=False)
    assert {item_id(3), item_id(8), item_id(5)} <= set(item_ids(kept))


def test_explanations_name_history_items(server: Server) -> None:
    history = [item_id(i) for i in (2, 9, 14, 21)]
    body = recommend(server, history=history, k=5, explain=True)
    for item in body["items"]:
        assert item["because"] and set(item["because"]) <= set(history)
    assert all(i["because"] is None for i in recommend(server, history=history, k=5)["items"])


def test_popularity_fallback_is_flagged(server: Server) -> None:
    body = recommend(server, history=["unknown-1", "unknown-2"], k=3)
    assert body["fallback"] is True and "most popular" in body["message"]
    assert body["unknown_items"] == ["unknown-1", "unknown-2"]
    assert item_ids(body) == [server.predictor.item_ids[i] for i in server.predictor.popular[:3]]


def test_reranking_knobs(server: Server) -> None:
    knobs = {"popularity_penalty": 2.5, "diversity": 0.7}
    body = recommend(server, user_id="u6", k=8, **knobs)
    [want] = server.predictor.recommend_batch([RecommendRequest(user_id="u6", k=8, **knobs)])
    assert item_ids(body) == [r.item_id for r in want.items] and len(body["items"]) == 8
    assert [i["score"] for i in body["items"]] == pytest.approx([r.score for r in want.items], abs=1e-4)
    assert item_ids(body) != item_ids(recommend(server, user_id="u6", k=8))
    fallback = recommend(server, history=[], k=3, **knobs)  # no history: popular items, knobs ignored
    assert fallback["fallback"] is True and item_ids(fallback) == item_ids(recommend(server, history=[], k=3))
    rerank = server.client.get("/v1/model").json()["rerank"]
    assert rerank == {"popularity_penalty": True, "diversity": True}


def test_similar_items_item_model_health_and_docs(server: Server) -> None:
    c = server.client
    similar = c.post("/v1/similar-items", json={"item_id": item_id(4), "k": 3}).json()
    assert [i["item_id"] for i in similar["items"]] == [
        r.item_id for r in server.predictor.similar_items(item_id(4), 3)
    ]
    assert c.get(f"/v1/items/{item_id(1)}").json() == {
        "item_id": "17",
        "title": "Item 1",
        "count": int(server.predictor.counts[1]),
    }
    model = c.get("/v1/model").json()
    assert model["model_version"] == "v1" and model["num_items"] == 40 and model["metrics"]["test"]
    assert c.get("/healthz").json() == {"status": "ok", "model_version": "v1"}
    assert c.get("/docs").status_code == 200
    assert "/v1/recommend" in c.get("/openapi.json").json()["paths"]


def test_request_ids_are_returned(server: Server) -> None:
    generated = server.client.get("/healthz").headers.get("x-request-id")
    assert generated
    mine = server.client.get("/healthz", headers={"X-Request-ID": "trace-123"})
    assert mine.headers["x-request-id"] == "trace-123"
    missing = server.client.post(
        "/v1/recommend", json={"user_id": "ghost"}, headers={"X-Request-ID": "trace-404"}
    )
    assert missing.json()["request_id"] == "trace-404"


# ------------------------------------------------------------------ every 4xx

BAD_REQUESTS = [
    # (method, path, body bytes or JSON, status, words in the message)
    ("POST", "/v1/recommend", b'{"user_id": "u1", "k": }', 422, "not valid JSON"),
    ("POST", "/v1/recommend", b"", 422, "Field required"),
    ("POST", "/v1/recommend", {"user_id": 5}, 422, "body.user_id: Input should be a valid string (got 5)"),
    ("POST", "/v1/recommend", {"user_id": "u1", "k": "5"}, 422, "body.k: Input should be a valid integer"),
    (
        "POST",
        "/v1/recommend",
        {"user_id": "u1", "k": 0},
        422,
        "body.k: Input should be greater than or equal to 1",
    ),
    ("POST", "/v1/recommend", {"user_id": "u1", "k": 1001}, 422, "less than or equal to 1000"),
    ("POST", "/v1/recommend", {"k": 5}, 422, "give 'user_id'"),
    (
        "POST",
        "/v1/recommend",
        {"user_id": "u1", "colour": "red"},
        422,
        "body.colour: Extra inputs are not permitted",
    ),
    (
        "POST",
        "/v1/recommend",
        {"history": ["17"] * 1001},
        422,
        "body.history: List should have at most 1000 items",
    ),
    ("POST", "/v1/recommend", {"history": "17"}, 422, "body.history: Input should be a valid list"),
    (
        "POST",
        "/v1/recommend",
        {"user_id": "u1", "popularity_penalty": -1},
        422,
        "body.popularity_penalty: Input should be greater than or equal to 0 (got -1)",
    ),
    (
        "POST",
        "/v1/recommend",
        {"user_id": "u1", "diversity": 2},
        422,
        "body.diversity: Input should be less than or equal to 1 (got 2)",
    ),
    ("POST", "/v1/recommend", b"x" * 70000, 413, "request body over 65536 bytes"),
    ("POST", "/v1/recommend", {"user_id": "ghost"}, 404, "unknown user_id 'ghost'"),
    ("POST", "/v1/similar-items", {"item_id": "ghost"}, 404, "unknown item_id 'ghost'"),
    (
        "POST",
        "/v1/similar-items",
        {"item_id": ""},
        422,
        "body.item_id: String should have at least 1 character",
    ),
    ("GET", "/v1/items/ghost", None, 404, "unknown item_id 'ghost'"),
    ("GET", "/v1/recommend", None, 405, "Method Not Allowed"),
    ("GET", "/v2/nothing", None, 404, "see /docs for the routes"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "words"), BAD_REQUESTS)
def test_malformed_requests_get_4xx_saying_what_to_fix(
    server: Server, method: str, path: str, body: Any, status: int, words: str
) -> None:
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    response = server.client.request(
        method, path, content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_chunked_body_over_the_limit_gets_413(server: Server) -> None:
    chunks = iter([b'{"history": [' + b'"17",' * 20000, b'"17"]}'])
    response = server.client.post(
        "/v1/recommend", content=chunks, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413


def test_api_key_is_required_where_configured(server: Server) -> None:
    c = server.client
    body = {"user_id": "u2", "k": 3}
    assert c.post("/secured/v1/recommend", json=body).status_code == 401
    wrong = c.post("/secured/v1/recommend", json=body, headers={"X-API-Key": "guess"})
    assert wrong.status_code == 401 and "X-API-Key" in wrong.json()["error"]
    right = c.post("/secured/v1/recommend", json=body, headers={"X-API-Key": KEY})
    assert right.status_code == 200 and len(right.json()["items"]) == 3
    model = c.get("/secured/v1/model", headers={"X-API-Key": KEY}).json()
    assert model["user_tower"] == "bf16" and c.get("/v1/model").json()["user_tower"] == "fp32"
    assert c.get("/secured/healthz").status_code == 200  # probes need no key
    assert c.post("/v1/recommend", json=body).status_code == 200  # the open app stays open
    for page in ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"):  # the API's description too
        assert c.get(f"/secured{page}").status_code == 401, page
        assert c.get(f"/secured{page}", headers={"X-API-Key": "guess"}).status_code == 401, page
        assert c.get(f"/secured{page}", headers={"X-API-Key": KEY}).status_code == 200, page
        assert c.get(page).status_code == 200, page
    assert "/v1/recommend" in c.get("/secured/openapi.json", headers={"X-API-Key": KEY}).json()["paths"]


# ------------------------------------------------------------------ batching


def replica_stats(server: Server, rounds: int = 30) -> dict[str, dict[str, Any]]:
    """`serving` stats of each replica of the open app, polled until both answered: 8 requests at a time,
    since Serve's router may send one request after another to the same idle replica."""

    def one(_: int) -> dict[str, Any]:
        return server.client.get("/v1/model").json()["serving"]

    seen: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(rounds):
            seen.update((stats["replica"], stats) for stats in pool.map(one, range(8)))
            if len(seen) == 2:
                break
    return seen


def burst(server: Server, n: int = 64) -> list[int]:
    def one(u: int) -> int:
        return server.client.post("/v1/recommend", json={"user_id": f"u{1 + u % 49}", "k": 5}).status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_requests_are_batched(server: Server) -> None:
    assert set(burst(server)) == {200}
    stats = replica_stats(server)
    assert len(stats) == 2
    assert max(s["max_batch_size_seen"] for s in stats.values()) > 1
    assert all(s["max_batch_size"] == 32 and s["batch_wait_timeout_s"] == 0.05 for s in stats.values())


# ------------------------------------------------------------------ fuzzing


def test_no_input_from_the_openapi_spec_causes_a_5xx(server: Server, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "25",
        "--seed",
        "7",
        "--workers",
        "2",
        "--request-timeout",
        "30",
        "--report-dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
