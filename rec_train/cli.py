"""`rec-train COMMAND ...`: each command lives in its own module with `add_arguments` and `run`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rec_train.config import ConfigError
from rec_train.errors import RayrecError
from rec_train.storage import StorageError

# command -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("rec_train.data.prepare", "raw events (+ items) -> validated sequence dataset"),
    "synth": ("rec_train.data.synth", "write a synthetic interaction log with item titles"),
    "embed-items": ("rec_train.model.text", "item text -> embeddings with a Hugging Face encoder"),
    "params": ("rec_train.model.sizes", "print the parameter count of a model config"),
    "pretrain": ("rec_train.train.launch", "pre-train (or continue pre-training) on Ray Train + DeepSpeed"),
    "finetune": ("rec_train.train.launch", "fine-tune a pre-trained model on Ray Train + DeepSpeed"),
    "evaluate": ("rec_train.train.evaluate", "full-ranking HR/NDCG/MRR of a checkpoint or exported model"),
    "export": ("rec_train.train.export", "consolidate a checkpoint into a servable model folder"),
    "add-items": ("rec_train.add_items", "new items -> a new model version that serves them from their text"),
    "plot": ("rec_train.train.plot", "draw a run's loss and NDCG curves to a PNG"),
    "demo": ("rec_train.demo", "the whole path on a local Ray: data, training, export, serving"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rec-train", description="Train transformer recommenders on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        print(f"rec-train: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (RayrecError, ConfigError, StorageError) as exc:
        print(f"rec-train {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
