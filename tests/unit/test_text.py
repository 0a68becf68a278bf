"""Item text encoder and `rec-train embed-items`, with a tiny random BERT saved on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rec_train import storage
from rec_train.cli import main
from rec_train.model import RecModel, build_config
from rec_train.model.text import (
    EMBEDDINGS_FILE,
    TextEncoder,
    read_item_text_embeddings,
)
from tests.conftest import TEXTS


def write_dataset(root: Path, texts: list[str | None], titles: list[str | None]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    n = len(texts)
    table = pa.table(
        {
            "item_index": pa.array(range(1, n + 1), pa.int32()),
            "item_id": [f"m{i}" for i in range(1, n + 1)],
            "count": pa.array([1] * n, pa.int64()),
            "title": pa.array(titles, pa.string()),
            "text": pa.array(texts, pa.string()),
        }
    )
    pq.write_table(table, root / "items.parquet")
    (root / "manifest.json").write_text(
        json.dumps({"schema_version": 1, "kind": "rayrec.dataset", "counts": {"items": n}})
    )
    return root


def test_encoder_pooling_and_normalisation(tiny_bert: Path) -> None:
    mean = TextEncoder(str(tiny_bert), pooling="mean")
    vectors = mean.encode(TEXTS, batch_size=2, progress=False)
    assert vectors.shape == (3, 16) and mean.dim == 16
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    # padding inside a batch does not change a text's vector
    torch.testing.assert_close(
        mean.encode(TEXTS[:1], batch_size=1, progress=False), vectors[:1], atol=1e-5, rtol=0
    )
    cls = TextEncoder(str(tiny_bert), pooling="cls").encode(TEXTS, progress=False)
    assert not torch.allclose(cls, vectors)
    raw = TextEncoder(str(tiny_bert), normalize=False).encode(TEXTS, progress=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), vectors, atol=1e-5, rtol=0)


def test_embed_items_command(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_dataset(
        tmp_path / "data", [TEXTS[0], None, TEXTS[2], None], [None, "The Matrix (1999)", None, None]
    )
    assert main(["embed-items", "--data", str(data), "--model", str(tiny_bert), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["items"] == 4 and summary["dim"] == 16 and summary["missing_text"] == 1
    assert (data / EMBEDDINGS_FILE).is_file()
    table, metadata = read_item_text_embeddings(str(data))
    assert table.shape == (5, 16) and table.dtype == torch.float32
    assert metadata == {"model": str(tiny_bert), "pooling": "mean", "dim": "16", "normalize": "true"}
    assert torch.count_nonzero(table[0]) == 0 and torch.count_nonzero(table[4]) == 0  # padding, no text
    expected = TextEncoder(str(tiny_bert)).encode([TEXTS[0], "The Matrix (1999)", TEXTS[2]], progress=False)
    torch.testing.assert_close(table[1:4], expected, atol=1e-5, rtol=0)
    # the table drops into a text model as its frozen buffer
    model = RecModel(build_config("tiny", num_items=4, item_representation="text", text_dim=16))
    model.set_item_text_embeddings(table)
    assert torch.equal(model.items.text_embeddings, table)
    with pytest.raises(ValueError, match=r"\(num_items \+ 1, text_dim\)"):
        RecModel(
            build_config("tiny", num_items=7, item_representation="text", text_dim=16)
        ).set_item_text_embeddings(table)
    assert model.item_embeddings().shape == (5, 16)
    assert "items.text_embeddings" in model.state_dict()
    assert not any(name.endswith("text_embeddings") for name, _ in model.named_parameters())


def test_embed_items_errors(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["embed-items", "--data", str(empty), "--model", str(tiny_bert)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    data = write_dataset(tmp_path / "data", ["a"], [None])
    pq.write_table(
        pa.table({"item_index": pa.array([1], pa.int32()), "title": ["x"]}), data / "items.parquet"
    )
    assert main(["embed-items", "--data", str(data), "--model", str(tiny_bert)]) == 2
    assert "missing column(s) text" in capsys.readouterr().err
    data = write_dataset(tmp_path / "ok", ["toy story"], [None])
    assert main(["embed-items", "--data", str(data), "--model", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_embed_items_from_s3(
    tiny_bert: Path, tmp_path: Path, s3_bucket: str, capsys: pytest.CaptureFixture
) -> None:
    data = write_dataset(tmp_path / "data", TEXTS, [None] * 3)
    storage.copy_dir(storage.resolve(str(data)), storage.resolve(f"s3://{s3_bucket}/data"))
    storage.copy_dir(storage.resolve(str(tiny_bert)), storage.resolve(f"s3://{s3_bucket}/models/tiny-bert"))
    args = [
        "embed-items",
        "--data",
        f"s3://{s3_bucket}/data",
        "--model",
        f"s3://{s3_bucket}/models/tiny-bert",
    ]
    assert main([*args, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["output"] == f"s3://{s3_bucket}/data/{EMBEDDINGS_FILE}"
    table, _ = read_item_text_embeddings(f"s3://{s3_bucket}/data")
    expected = TextEncoder(str(tiny_bert)).encode(TEXTS, progress=False)
    torch.testing.assert_close(table[1:], expected, atol=1e-5, rtol=0)
