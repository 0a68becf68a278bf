"""Means and deviations over seeds of benchmarks/quality.py's JSON lines, as a markdown table.

    python benchmarks/quality_table.py runs/quality.jsonl [more.jsonl ...]

One row per dataset, config (with its key=value overrides), protocol and history length: the number of
seeds, then the mean ± sample standard deviation (ddof=1; n/a for one seed) of the test NDCG@K and HR@K
(the Ks every line has), MRR, catalogue coverage at the smallest K, the validation NDCG@10 of the chosen checkpoint (strict) and the seconds per
epoch; and per dataset a row of the most-popular-items baseline. The last line is one JSON object of the
same figures.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

from rec_train.errors import RayrecError

NDCG = re.compile(r"ndcg@(\d+)")
VALID = "valid ndcg@10"
SECONDS = "s/epoch"


def read_lines(paths: list[Path]) -> list[dict[str, Any]]:
    """Every line quality.py wrote in these files."""
    lines = []
    for path in paths:
        try:
            text = path.read_text()
        except OSError as exc:
            raise RayrecError(f"cannot read {path}: {exc}") from exc
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RayrecError(f"{path} line {n}: not JSON ({exc})") from exc
            if not isinstance(record, dict) or record.get("benchmark") != "quality":
                raise RayrecError(f"{path} line {n}: not a line of benchmarks/quality.py")
            lines.append(record)
    if not lines:
        raise RayrecError(f"{' '.join(map(str, paths))}: no lines of benchmarks/quality.py")
    return lines


def columns(lines: list[dict[str, Any]]) -> list[str]:
    """ndcg@K and hr@K for the Ks of every line, mrr, and coverage@K of the smallest K where every line
    (and its popularity baseline) has it."""
    ks = set.intersection(*({int(m[1]) for m in map(NDCG.fullmatch, line["test"]) if m} for line in lines))
    names = [f"{m}@{k}" for k in sorted(ks) for m in ("ndcg", "hr")] + ["mrr"]
    coverage = f"coverage@{min(ks)}" if ks else None
    if coverage and all(coverage in line["test"] and coverage in line["popularity"] for line in lines):
        names.append(coverage)
    return names


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for fewer than two values; both None for none)."""
    if not values:
        return {"mean": None, "std": None}
    std = round(statistics.stdev(values), 4) if len(values) > 1 else None
    return {"mean": round(statistics.fmean(values), 4), "std": std}


def summarise(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """{"columns", "rows": one per group with each figure's mean and std, "popularity": per dataset}."""
    names = columns(lines)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for line in lines:
        config = " ".join([line["config"], *line.get("overrides", [])])
        key = (line["dataset"], config, line["protocol"], line.get("max_seq_len"))
        groups.setdefault(key, []).append(line)
    rows = []
    for (dataset, config, protocol, max_seq_len), runs in groups.items():
        runs_figures = [
            {**{n: run["test"][n] for n in names}, VALID: run.get("valid", {}).get("ndcg@10"),
             SECONDS: run.get("seconds_per_epoch")}
            for run in runs
        ]  # fmt: skip
        figures = {
            n: mean_std([f[n] for f in runs_figures if f[n] is not None]) for n in [*names, VALID, SECONDS]
        }
        rows.append({
            "dataset": dataset, "config": config, "protocol": protocol, "max_seq_len": max_seq_len,
            "seeds": [run["seed"] for run in runs], "figures": figures,
        })  # fmt: skip
    popularity = {line["dataset"]: {n: line["popularity"][n] for n in names} for line in lines}
    return {"columns": names, "rows": rows, "popularity": popularity}


def cell(figure: dict[str, float | None], digits: int) -> str:
    if figure["mean"] is None:
        return "n/a"
    std = "n/a" if figure["std"] is None else f"{figure['std']:.{digits}f}"
    return f"{figure['mean']:.{digits}f} ± {std}"


def markdown(summary: dict[str, Any]) -> str:
    names = summary["columns"]
    head = ["dataset", "config", "protocol", "max_seq_len", "seeds", *names, VALID, SECONDS]
    out = [head, ["---"] * len(head)]
    for row in summary["rows"]:
        figures = row["figures"]
        out.append([
            row["dataset"], row["config"], row["protocol"], str(row["max_seq_len"]), str(len(row["seeds"])),
            *[cell(figures[n], 4) for n in [*names, VALID]], cell(figures[SECONDS], 1),
        ])  # fmt: skip
    for dataset, figures in summary["popularity"].items():
        out.append([dataset, "most popular", "", "", "", *[f"{figures[n]:.4f}" for n in names], "", ""])
    return "\n".join("| " + " | ".join(cells) + " |" for cells in out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="JSON lines of benchmarks/quality.py (--out)")
    summary = summarise(read_lines(parser.parse_args().files))
    print(markdown(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
