"""The configuration reference: Markdown generated from the project's typed configs.

    python -m rec_train.docs_reference > docs/configuration.md

Every `StrictModel` of the commands (`rec-train ...`, `rec-serve ...`) and of the Serve app is
documented as a table of keys (dotted, as in `a.b=c` overrides), types, defaults and descriptions.
A description comes from `Field(description=...)`, else from the string or `#` comment next to
the field in the source.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import re
import sys
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from rec_train.config import StrictModel

PACKAGES = ("rec_train", "rec_serve")
COMMAND = "python -m rec_train.docs_reference > docs/configuration.md"


@dataclass(frozen=True)
class Source:
    """Where users meet a config: a CLI command or the Serve app builder."""

    label: str
    module: str


def module_file(name: str) -> Path | None:
    """The source file of a project module, found without importing it or its parent packages
    (`importlib.util.find_spec` would import `rec_train.model`, and with it torch)."""
    top, *rest = name.split(".")
    if top not in PACKAGES:
        return None
    base = Path(importlib.import_module(top).__file__).parent.joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_tree(name: str) -> ast.Module | None:
    """The parsed source of a project module (None when it does not exist)."""
    path = module_file(name)
    return ast.parse(path.read_text(), filename=str(path)) if path else None


def cli_commands(name: str) -> dict[str, str]:
    """command -> module of a CLI module: its `COMMANDS = {name: (module, help)}` dict, or else the
    `add_parser("name", ...)` subcommands it defines itself."""
    tree = module_tree(name)
    if tree is None:
        return {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and node.value is not None:
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in targets):
                commands = ast.literal_eval(node.value)
                return {cmd: spec[0] if isinstance(spec, tuple) else spec for cmd, spec in commands.items()}
    return {
        node.args[0].value: name
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_parser"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }


def sources() -> list[Source]:
    """The `rec-train` commands, the `rec-serve` commands and the Serve app builder."""
    found = [Source(f"rec-train {name}", module) for name, module in cli_commands("rec_train.cli").items()]
    found += [Source(f"rec-serve {name}", module) for name, module in cli_commands("rec_serve.cli").items()]
    found.append(Source("Serve app `rec_serve.app:build_app` (`applications[].args`)", "rec_serve.app"))
    return found


def imported_names(name: str) -> dict[str, str]:
    """`from M import N` in a module's source: N -> M (absolute module names)."""
    tree = module_tree(name)
    package = name.rsplit(".", 1)[0]
    found = {}
    for node in ast.walk(tree) if tree else ():
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], module]
                ).strip(".")
            found.update({alias.asname or alias.name: module for alias in node.names})
    return found


def project_models() -> list[type[StrictModel]]:
    """Every `StrictModel` subclass of the project. Only modules whose source defines a class on
    `StrictModel` are imported (configs and schemas: light), never the commands themselves."""
    for package in PACKAGES:
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            text = path.read_text()
            if re.search(r"^class \w+\((\w+\.)*StrictModel\)", text, re.MULTILINE):
                parts = path.relative_to(root.parent).with_suffix("").parts
                importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    seen: list[type[StrictModel]] = []
    stack = list(StrictModel.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls not in seen and cls.__module__.split(".")[0] in PACKAGES:
            seen.append(cls)
        stack.extend(cls.__subclasses__())
    return sorted(seen, key=lambda c: (c.__module__, inspect.getsourcelines(c)[1]))


def models_in(annotation: Any) -> list[type[StrictModel]]:
    """The `StrictModel` classes an annotation mentions (`X`, `X | None`, `list[X]`, `dict[str, X]`)."""
    if isinstance(annotation, type) and issubclass(annotation, StrictModel):
        return [annotation]
    found: list[type[StrictModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(m for m in models_in(arg) if m not in found)
    return found


def root_models(models: list[type[StrictModel]]) -> list[type[StrictModel]]:
    """Models that are not a field of another model: the configs a user writes a file for."""
    nested = {m for model in models for f in model.model_fields.values() for m in models_in(f.annotation)}
    return [m for m in models if m not in nested]


# ----------------------------------------------------------------------------- field text


def type_name(annotation: Any) -> str:
    """`int`, `str | None`, `"a" | "b"`, `list[str]`, `dict[str, float]` ..."""
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


BOUNDS = {
    "ge": ">=",
    "gt": ">",
    "le": "<=",
    "lt": "<",
    "min_length": "min length",
    "max_length": "max length",
}


def field_type(field: FieldInfo) -> str:
    """The type plus the field's bounds: `int, >= 1`, `str, max length 1`."""
    bounds = [
        f"{BOUNDS[attr]} {getattr(meta, attr)}"
        for meta in field.metadata
        for attr in BOUNDS
        if getattr(meta, attr, None) is not None
    ]
    return ", ".join([type_name(field.annotation), *bounds])


def default_text(field: FieldInfo) -> str:
    """The default as YAML would write it; `required` when there is none."""
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True, validated_data={})
    dumped = TypeAdapter(Any).dump_python(value, mode="json")
    return json.dumps(dumped)


def source_comments(model: type[StrictModel]) -> dict[str, str]:
    """Field name -> the docstring under it or the `#` comment at the end of its line."""
    try:
        lines, _ = inspect.getsourcelines(model)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    text_lines = source.splitlines()
    found: dict[str, str] = {}
    statements = body.body
    for i, node in enumerate(statements):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        following = statements[i + 1] if i + 1 < len(statements) else None
        if (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            found[name] = " ".join(following.value.value.split())
            continue
        last_line = text_lines[(node.end_lineno or node.lineno) - 1]
        if "#" in last_line:
            found[name] = last_line.split("#", 1)[1].strip()
    return found


def describe(model: type[StrictModel], name: str, field: FieldInfo) -> str:
    text = field.description or source_comments(model).get(name, "")
    return " ".join(text.split())


# ----------------------------------------------------------------------------- tables


def rows(model: type[StrictModel], prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, description) for every field, nested models expanded with dotted keys."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        nested = models_in(annotation)
        inline = [a for a in typing.get_args(annotation) if a is not type(None)]
        if nested and (annotation in nested or (len(nested) == 1 and inline == nested)):
            sub = nested[0]
            if annotation is not sub:  # `Model | None`: the whole section is optional
                description = describe(model, name, field) or " ".join((inspect.getdoc(sub) or "").split())
                yield key, f"{sub.__name__} | null", default_text(field), description
            yield from rows(sub, f"{key}.")
            continue
        yield key, field_type(field), default_text(field), describe(model, name, field)
        for sub in nested:  # lists / dicts of sections
            marker = "[]" if typing.get_origin(annotation) is list else ".<name>"
            yield from rows(sub, f"{key}{marker}.")


def cell(text: str) -> str:
    """Table-cell text: pipes escaped so they do not split the cell."""
    return text.replace("|", "\\|")


def config_models() -> dict[type[StrictModel], list[str]]:
    """Each top-level config model -> the sources that import or define it (possibly none), in the
    order of the commands (`rec-train prepare` first); models no command uses come last."""
    roots = root_models(project_models())
    used_by: dict[type[StrictModel], list[str]] = {m: [] for m in roots}
    by_name = {(m.__module__, m.__name__): m for m in roots}
    labels = [source.label for source in sources()]
    for source in sources():
        defined = {m.__name__: m.__module__ for m in roots if m.__module__ == source.module}
        for name, module in (imported_names(source.module) | defined).items():
            model = by_name.get((module, name))
            if model is not None and source.label not in used_by[model]:
                used_by[model].append(source.label)

    def order(model: type[StrictModel]) -> tuple[int, int]:
        first = min((labels.index(label) for label in used_by[model]), default=len(labels))
        return first, roots.index(model)

    return {model: used_by[model] for model in sorted(roots, key=order)}


def render() -> str:
    """The whole reference page as Markdown."""
    used_by = config_models()

    out = [
        "# Configuration reference",
        "",
        f"Generated from the typed configs by `{COMMAND}`; do not edit by hand.",
        "",
        "Each key can be set in the YAML file a command reads (`--config FILE`) or on its command line",
        "as `key.sub=value` (the value is parsed as YAML). Unknown keys are errors that name the nearest",
        "valid key. The Serve app's arguments go under `applications[].args` of a Serve config",
        "(`configs/serve/*.yaml`, also embedded by `cluster/kuberay/rayservice.yaml`); `rec-serve deploy`",
        "takes the same settings as flags.",
        "",
    ]
    for model in used_by:
        out += [f"## `{model.__name__}`", ""]
        doc = inspect.getdoc(model)
        if doc and doc != inspect.getdoc(StrictModel):
            out += [" ".join(doc.split()), ""]
        users = ", ".join(f"`{u}`" if "`" not in u else u for u in used_by[model])
        out += [f"Used by: {users}." if users else f"Defined in `{model.__module__}`.", ""]
        out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for key, type_text, default, description in rows(model):
            out.append(f"| `{key}` | {cell(type_text)} | {cell(default)} | {cell(description)} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
