"""The cluster configurations: `cluster/aws.yaml` through Ray's own cluster-config validation
(offline), and the KubeRay manifests: their commands, config files and embedded Serve config."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from pydantic import BaseModel
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from rec_train import docs_reference
from rec_train.cli import COMMANDS, build_parser
from rec_train.config import load_config, validate

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
IMAGE_REPO_ROOT = "/home/ray/rayrec/"  # where cluster/kuberay/Dockerfile puts the checkout
RAY_IMAGE = re.compile(r"^rayproject/ray(-ml)?:(?P<version>\d+\.\d+\.\d+)-py3\d+-cu\d+$")
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}


def aws_config() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def kuberay_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(KUBERAY.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(name, RayCluster spec) of the RayCluster and of the clusters inside RayJob / RayService."""
    specs = []
    for path, doc in kuberay_docs():
        if doc["kind"] not in RAY_KINDS:
            continue
        spec = doc["spec"]
        cluster = {
            "RayCluster": spec,
            "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig"),
        }
        if cluster.get(doc["kind"]) is not None:
            specs.append((f"{path.name}:{doc['kind']}", cluster[doc["kind"]]))
    return specs


def pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [group["template"]["spec"] for group in groups]


def repo_path(path: str) -> Path:
    """A path in an entrypoint -> the same file in this checkout."""
    return REPO / (path[len(IMAGE_REPO_ROOT) :] if path.startswith(IMAGE_REPO_ROOT) else path)


# ----------------------------------------------------------------------------- AWS


def test_aws_config_passes_rays_cluster_config_validation() -> None:
    # What `ray up` does before it talks to AWS: fill defaults, then the schema and sanity checks.
    prepared = prepare_config(aws_config())
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_validation_is_real_a_misspelt_key_fails() -> None:
    config = aws_config()
    worker = next(t for t in config["available_node_types"].values() if t.get("max_workers"))
    worker["min_worker"] = worker.pop("min_workers")
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


def test_aws_config_has_a_cpu_head_and_an_autoscaling_gpu_worker_type() -> None:
    config = aws_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    gpu = [
        t
        for name, t in types.items()
        if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1
    ]
    assert gpu, "a worker node type with GPUs"
    assert all(t.get("min_workers", 0) < t["max_workers"] <= config["max_workers"] for t in gpu)


def test_aws_config_pins_the_ray_image_of_this_project() -> None:
    match = RAY_IMAGE.match(aws_config()["docker"]["image"])
    assert match, "a rayproject/ray image with a Python and CUDA tag"
    assert match["version"] == ray.__version__


def test_aws_config_installs_rayrec_and_keeps_token_auth_on() -> None:
    config = aws_config()
    assert any(re.search(r"pip install .*rayrec", cmd) for cmd in config["setup_commands"])
    assert (CLUSTER / "aws.yaml").read_text().startswith("# ray up cluster/aws.yaml\n")
    assert "~/.ray/auth_token" in config["file_mounts"]
    for cmd in (
        c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c
    ):
        assert "RAY_AUTH_MODE=token" in cmd


def test_aws_nodes_reach_s3_through_an_instance_profile() -> None:
    for name, node_type in aws_config()["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert re.fullmatch(
            r"arn:aws:iam::ACCOUNT_ID:instance-profile/[\w+=,.@-]+", profile.get("Arn", "")
        ), name


CREDENTIAL_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"aws_(access_key_id|secret_access_key|session_token)\s*[:=]", re.IGNORECASE),
    re.compile(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)"),
    re.compile(r"aws_credentials"),
    re.compile(
        r"RAY_AUTH_TOKEN\s*[:=]\s*[\"']?[\w+/-]{16,}"
    ),  # a literal token (a command that reads one is fine)
    re.compile(r"BEGIN [A-Z ]*PRIVATE KEY"),
]


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(REPO).as_posix() for p in CLUSTER.rglob("*") if p.is_file())
)
def test_no_credentials_in_cluster_files(path: str) -> None:
    text = (REPO / path).read_text()
    for pattern in CREDENTIAL_PATTERNS:
        assert not pattern.search(text), f"{path} matches {pattern.pattern}"


# ----------------------------------------------------------------------------- KubeRay


def test_kuberay_manifests_are_ray_io_v1_and_start_with_their_command() -> None:
    kinds = set()
    for path, doc in kuberay_docs():
        if doc["kind"] in RAY_KINDS:
            assert doc["apiVersion"] == "ray.io/v1", path.name
        kinds.add(doc["kind"])
        first = path.read_text().splitlines()[0]
        assert first.startswith("# kubectl apply") and f"cluster/kuberay/{path.name}" in first, path.name
    assert kinds >= RAY_KINDS


def test_kuberay_clusters_pin_ray_and_rayrec_and_use_token_auth() -> None:
    accounts = {doc["metadata"]["name"] for _, doc in kuberay_docs() if doc["kind"] == "ServiceAccount"}
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert base and (m := RAY_IMAGE.match(base[1])) and m["version"] == ray.__version__
    image_tag = importlib.metadata.version("rayrec")
    assert {name.rsplit(":", 1)[1] for name, _ in ray_cluster_specs()} == RAY_KINDS
    for name, spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["authOptions"]["mode"] == "token", name
        templates = pod_templates(spec)
        if "RayService" not in name:  # training clusters have GPU workers; Serve replicas here use CPUs
            limits = [c["resources"]["limits"] for t in templates for c in t["containers"]]
            assert any("nvidia.com/gpu" in limit for limit in limits), name
        for template in templates:
            assert template["serviceAccountName"] in accounts, name
            for container in template["containers"]:
                assert container["image"].endswith(f"/rayrec:{image_tag}"), (name, container["image"])


SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """The commands of an entrypoint: one command, or `bash -c "a && b"` (a chain kept in one
    string: KubeRay pastes the entrypoint into its submitter's shell line, where a bare `&&`
    would run the rest of the chain in the submitter pod)."""
    argv = shlex.split(entrypoint)
    assert not SHELL_OPERATORS & set(argv), f"chain commands inside bash -c '...': {entrypoint}"
    if argv[:2] == ["bash", "-c"] and len(argv) == 3:
        return [shlex.split(part) for part in argv[2].split("&&")]
    return [argv]


def test_entrypoint_parser_reads_chains_inside_bash_c_only() -> None:
    assert entrypoint_commands(
        "bash -c \"rec-train prepare --x a && rec-train pretrain --config 'b c.yaml'\""
    ) == [
        ["rec-train", "prepare", "--x", "a"],
        ["rec-train", "pretrain", "--config", "b c.yaml"],
    ]
    assert entrypoint_commands("rec-train export --checkpoint c --output m") == [
        ["rec-train", "export", "--checkpoint", "c", "--output", "m"]
    ]
    with pytest.raises(AssertionError, match="bash -c"):
        entrypoint_commands("rec-train prepare --x a && rec-train pretrain")


def rayjob_entrypoints() -> list[tuple[str, list[str]]]:
    return [
        (path.name, argv)
        for path, doc in kuberay_docs()
        if doc["kind"] == "RayJob"
        for argv in entrypoint_commands(doc["spec"]["entrypoint"])
    ]


def test_rayjob_runs_prepare_then_pretrain_on_s3() -> None:
    for name, _ in [(p.name, d) for p, d in kuberay_docs() if d["kind"] == "RayJob"]:
        commands = [argv[1] for file, argv in rayjob_entrypoints() if file == name]
        assert commands[-1] == "pretrain" and "prepare" in commands, name
    uris = [a for _, argv in rayjob_entrypoints() for a in argv if "s3://" in a]
    assert uris and all(re.search(r"(^|=)s3://[a-z0-9.-]+/\S+$", u) for u in uris), uris


@pytest.mark.parametrize("case", rayjob_entrypoints(), ids=lambda c: f"{c[0]}:{c[1][1]}")
def test_rayjob_entrypoint_is_a_real_command_with_a_real_config(case: tuple[str, list[str]]) -> None:
    name, argv = case
    program, command, *rest = argv
    assert program == "rec-train", f"{name}: {program}"
    assert command in COMMANDS, f"{name}: {command} is not one of {sorted(COMMANDS)}"
    # The command's own parser: an unknown flag or a missing argument fails here.
    args = build_parser(command).parse_args([command, *rest])
    config = getattr(args, "config", None)
    if config is None:
        return
    args.config = str(repo_path(config))
    assert Path(args.config).is_file(), f"{name}: {config} is not a config file of the repository"
    # The whole config as the command builds it (file + flags + overrides) must validate.
    module = importlib.import_module(COMMANDS[command][0])
    if hasattr(module, "config_from_args"):
        module.config_from_args(args)
        return
    models = [m for m, users in docs_reference.config_models().items() if f"rec-train {command}" in users]
    assert len(models) == 1, f"{name}: the config model of rec-train {command}: {models}"
    load_config(models[0], args.config, list(getattr(args, "overrides", None) or []))


def serve_config_of(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def unknown_keys(schema: type[BaseModel], data: Any, where: str = "") -> list[str]:
    """Keys of `data` that `schema` (Serve's pydantic models, which ignore extras) does not define."""
    if not isinstance(data, dict):
        return []
    fields = schema.model_fields
    aliases = {f.alias: n for n, f in fields.items() if f.alias}
    found = []
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in fields:
            found.append(f"{where}{key}")
            continue
        for sub in pydantic_models_in(fields[name].annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                found += unknown_keys(
                    sub, item, f"{where}{key}[{i}]." if isinstance(value, list) else f"{where}{key}."
                )
    return found


def pydantic_models_in(annotation: Any) -> list[type[BaseModel]]:
    """pydantic models mentioned in an annotation (`X`, `X | None`, `list[X]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in pydantic_models_in(arg)]


def rayservices() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in kuberay_docs() if d["kind"] == "RayService"]


def test_rayservice_serve_config_passes_serves_schema() -> None:
    assert rayservices()
    for path, doc in rayservices():
        config = serve_config_of(doc)
        ServeDeploySchema.model_validate(config)
        assert unknown_keys(ServeDeploySchema, config) == [], path.name


def test_serve_schema_check_catches_a_misspelt_deployment_key() -> None:
    config = serve_config_of(rayservices()[0][1])
    config["applications"][0].setdefault("deployments", [{"name": "x"}])[0]["num_replica"] = 2
    assert unknown_keys(ServeDeploySchema, config) == ["applications[0].deployments[0].num_replica"]


def test_rayservice_embeds_a_serve_config_of_the_repository() -> None:
    for path, doc in rayservices():
        named = re.findall(r"configs/serve/[\w.-]+\.yaml", path.read_text().split("apiVersion", 1)[0])
        assert named, f"{path.name}: the header names the configs/serve file it embeds"
        assert serve_config_of(doc) == yaml.safe_load((REPO / named[0]).read_text()), path.name


def serve_deployment_names() -> set[str]:
    """Names of the classes decorated with `@serve.deployment` in rec_serve (read from the source)."""
    names = set()
    for path in (REPO / "rec_serve").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for deco in node.decorator_list:
                call = deco if isinstance(deco, ast.Call) else None
                func = call.func if call else deco
                if isinstance(func, ast.Attribute) and func.attr == "deployment":
                    named = [k.value.value for k in (call.keywords if call else []) if k.arg == "name"]
                    names.add(named[0] if named else node.name)
    return names


def test_rayservice_app_args_and_deployments_are_those_of_rec_serve() -> None:
    # Checked from the sources: importing the app would load Ray Serve and torch into a unit test.
    serve_models = [
        m for m, users in docs_reference.config_models().items() if any("rec_serve.app" in u for u in users)
    ]
    assert len(serve_models) == 1, serve_models
    for path, doc in rayservices():
        for app in serve_config_of(doc)["applications"]:
            module, _, attr = app["import_path"].partition(":")
            source = docs_reference.module_tree(module)
            assert source is not None, f"{path.name}: no module {module}"
            assert attr in {n.name for n in source.body if isinstance(n, ast.FunctionDef)}, path.name
            validate(serve_models[0], app.get("args", {}), source=path.name)
            assert {d["name"] for d in app.get("deployments", [])} <= serve_deployment_names(), path.name
