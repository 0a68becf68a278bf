"""`build_app(args) -> Application`: the serving app from typed arguments.

Three ways to run it, all through this function:

    rec-serve deploy --model ./model --replicas 2                      # blocks; Ctrl-C stops
    serve run configs/serve/local.yaml                                   # Serve's config format
    serve run rec_serve.app:build_app model=./model replicas=2           # app builder arguments

or from Python: `serve.run(build_app({"model": "s3://bucket/model"}), route_prefix="/")`.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from rec_serve.deployment import Recommender
from rec_serve.predictor import check_model_folder
from rec_serve.schemas import ServeArgs
from rec_train.config import validate

APP_NAME = "rayrec"
logger = logging.getLogger("rayrec.serve")


def deployment_options(args: ServeArgs) -> dict[str, Any]:
    """Replicas (fixed or autoscaled), queue bound, CPUs and the live-updatable batching settings."""
    options: dict[str, Any] = {
        "max_ongoing_requests": args.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": args.num_cpus},
        "user_config": args.batch().model_dump(),
    }
    if args.autoscaling is not None:
        options["autoscaling_config"] = args.autoscaling.model_dump()
    else:
        options["num_replicas"] = args.replicas
    return options


def build_app(args: dict[str, Any] | ServeArgs) -> Application:
    """The rayrec app; `args` is a `ServeArgs` or a dict of its fields (strings are converted)."""
    if not isinstance(args, ServeArgs):
        args = validate(ServeArgs, dict(args), source="rayrec serve args")
    check_model_folder(args.model)
    if args.events == "memory" and (args.replicas > 1 or args.autoscaling is not None):
        logger.warning(
            "events=memory keeps POST /v1/events in each replica; with several replicas a user's events reach only "
            "the replica that took them: give events a redis:// URL"
        )
    # The replica gets only what it reads itself, so changing replicas or batching never restarts it.
    replica_args = args.model_dump(
        include={
            "model",
            "api_key_env",
            "max_body_bytes",
            "explain_items",
            "user_tower",
            "retrieval",
            "nprobe",
            "ef_search",
            "events",
            "max_user_events",
            "state_cache_mb",
        }
    )
    return Recommender.options(**deployment_options(args)).bind(replica_args)
