"""`POST /v1/events` over real HTTP on 2 Serve replicas sharing a real Redis: every event is stored (counted
in Redis), bad events get a 4xx and store nothing, the next `/v1/recommend` on either replica reads the new
history (for a known user and for one the model never saw; the replicas continue users' encoder states from
their cache), and the events outlive a rollout to a new model version (whose replicas are new processes)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis
from local_cluster import free_port
from ray import serve

from rec_serve.app import APP_NAME, build_app
from rec_serve.predictor import Predictor, RecommendRequest
from rec_serve.synthetic import item_id, write_tiny_model
from rec_serve.user_state import KEY_PREFIX


def top(predictor: Predictor, **request: object) -> list[str]:
    return [r.item_id for r in predictor.recommend(RecommendRequest(k=10, **request)).items]


def test_events_reach_every_replica_and_outlive_a_rollout(
    ray_shared: None, redis_url: str, tmp_path: Path
) -> None:
    v1 = write_tiny_model(tmp_path / "v1", model_version="v1", seed=1)
    v2 = write_tiny_model(tmp_path / "v2", model_version="v2", seed=2)
    store = redis.from_url(redis_url, decode_responses=True)
    args = {"replicas": 2, "events": redis_url, "max_user_events": 50, "state_cache_mb": 16}
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": str(v1), **args}), name=APP_NAME, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            known = [item_id(i) for i in (3, 9, 27, 14, 30)]
            fresh = [item_id(i) for i in (5, 6, 7)]
            posts = [
                [{"user_id": "u1", "item_id": i} for i in known[:2]],
                [{"user_id": "u1", "item_id": known[2], "event_type": "click"}, {"user_id": "nobody", "item_id": fresh[0]}],
                [{"user_id": "nobody", "item_id": fresh[2], "timestamp": 20.0},
                 {"user_id": "nobody", "item_id": fresh[1], "timestamp": 10}],
            ]  # fmt: skip
            for body in posts:
                response = client.post("/v1/events", json={"events": body})
                assert response.status_code == 200, response.text
            # many small posts at once, spread over both replicas: every one is stored
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(
                    lambda n: client.post("/v1/events", json={"events": [{"user_id": "busy", "item_id": item_id(1 + n % 40)}]}).status_code,
                    range(40),
                ))  # fmt: skip
            assert statuses == [200] * 40 and store.llen(KEY_PREFIX + "busy") == 40
            more = [{"user_id": "u1", "item_id": i} for i in known[3:]]
            assert client.post("/v1/events", json={"events": more}).json() == {
                "accepted": 2,
                "users": 1,
                "store": "redis",
            }
            assert store.lrange(KEY_PREFIX + "u1", 0, -1) == known
            assert store.lrange(KEY_PREFIX + "nobody", 0, -1) == [
                fresh[0],
                fresh[1],
                fresh[2],
            ]  # by timestamp

            bad = [
                {
                    "events": [
                        {"user_id": "u1", "item_id": "no-such-item"},
                        {"user_id": "u1", "item_id": known[0]},
                    ]
                },
                {"events": []},
                {"events": [{"item_id": known[0]}]},
                {"events": [{"user_id": "u1", "item_id": known[0], "timestamp": -1}]},
                {"events": [{"user_id": "u1", "item_id": known[0]}] * 1001},
            ]
            for body in bad:
                response = client.post("/v1/events", json=body)
                assert 400 <= response.status_code < 500 and response.json()["error"], response.text
            assert store.llen(KEY_PREFIX + "u1") == len(known)  # nothing of a refused request was stored
            assert "no-such-item" in client.post("/v1/events", json=bad[0]).json()["error"]

            for version, folder in (("v1", v1), ("v2", v2)):
                if version == "v2":  # a rollout: new replicas (new processes) of a new model version
                    serve.run(build_app({"model": str(folder), **args}), name=APP_NAME, route_prefix="/")
                    assert client.get("/v1/model").json()["model_version"] == "v2"
                predictor = Predictor.load(str(folder), state_cache_mb=16)  # as the replicas
                expected_u1 = top(predictor, user_id="u1", history=known)
                expected_new = top(predictor, history=fresh)
                assert expected_u1 != top(predictor, user_id="u1")  # the events change the answer
                for _ in range(6):  # both replicas
                    got = client.post("/v1/recommend", json={"user_id": "u1", "k": 10}).json()
                    assert (
                        got["model_version"] == version
                        and [i["item_id"] for i in got["items"]] == expected_u1
                    )
                    got = client.post("/v1/recommend", json={"user_id": "nobody", "k": 10}).json()
                    assert [i["item_id"] for i in got["items"]] == expected_new
            described = client.get("/v1/model").json()
            assert described["events"] == "redis" and described["state_cache"]["users"] >= 1

            serve.run(build_app({"model": str(v1), "events": "none"}), name=APP_NAME, route_prefix="/")
            response = client.post("/v1/events", json={"events": [{"user_id": "u1", "item_id": known[0]}]})
            assert response.status_code == 404 and "events=none" in response.json()["error"]
    finally:
        serve.shutdown()
        store.flushdb()
