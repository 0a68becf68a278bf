"""`rec-train add-items`: new items get vectors from their text and a new model version serves them, for a
model with an LM item tower and one with fixed text vectors (tiny BERTs saved on the fly; S3 through moto)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rec_serve.predictor import Predictor, RecommendRequest
from rec_serve.synthetic import write_exported_model
from rec_train import exported, storage
from rec_train.cli import main
from rec_train.model import RecModel, build_config
from rec_train.model.item_tower import load_item_tower, load_tokenizer, save_tokenizer, tokenize_items
from rec_train.model.text import TextEncoder
from rec_train.train.config import model_config
from tests.conftest import WORDS

NUM_ITEMS = 40
CONTENT = WORDS[5:18]  # the vocabulary's words


def item_texts(n: int) -> list[str]:
    """n distinct texts the tiny BERT's vocabulary covers."""
    return [f"{a} {b}" for a, b in itertools.islice(itertools.permutations(CONTENT, 2), n)]


def tower_folder(tiny_bert: Path, out: Path) -> Path:
    """An exported model with an item tower over `item_texts`, and its tokenizer."""
    torch.manual_seed(0)
    overrides = {"loss": "sampled_softmax", "negatives_per": "batch", "l2_normalize": True}
    model = RecModel(model_config("tiny", None, None, overrides, str(tiny_bert), num_items=NUM_ITEMS))
    load_item_tower(model.items.tower, str(tiny_bert))
    texts = item_texts(NUM_ITEMS)
    model.set_item_tokens(
        *tokenize_items(load_tokenizer(str(tiny_bert)), texts, model.config.item_text_max_length)
    )
    folder = write_exported_model(out, model.eval())
    items = pq.read_table(folder / exported.ITEMS_FILE)
    pq.write_table(items.set_column(4, "text", [texts]), folder / exported.ITEMS_FILE)
    save_tokenizer(str(tiny_bert), str(folder / exported.TOKENIZER_DIR))
    return folder


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("item_id,title\n" + "".join(f"{i},{t}\n" for i, t in rows))
    return path


def test_a_tower_model_serves_new_items_from_their_text(
    tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tower_folder(tiny_bert, tmp_path / "v1")
    twin_text = item_texts(NUM_ITEMS)[2]  # item 3's text
    new = write_csv(tmp_path / "new.csv", [("n1", twin_text), ("n2", "heat thriller")])
    args = ["add-items", "--model", str(folder), "--items", str(new), "--output", str(tmp_path / "v2")]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["items_added"] == 2 and summary["num_items"] == NUM_ITEMS + 2
    assert summary["parent_version"] == "v1" and summary["model_version"] != "v1"

    before, after = Predictor.load(str(folder)), Predictor.load(str(tmp_path / "v2"))
    assert after.model_version == summary["model_version"]
    torch.testing.assert_close(after.item_matrix[: NUM_ITEMS + 1], before.item_matrix)
    torch.testing.assert_close(after.item_matrix[NUM_ITEMS + 1], after.item_matrix[3])  # the same text
    assert after.similar_items("n1", k=1)[0].item_id == after.item_ids[3]
    # the new item is recommended wherever its twin is, with the same score
    twin = after.item_ids[3]
    for user in after.histories:
        response = after.recommend(RecommendRequest(user_id=user, k=12))
        ranked = response.items
        recs = {r.item_id: r.score for r in ranked}
        if not response.fallback and twin in [r.item_id for r in ranked[:-1]]:  # n1 is scored the same
            assert recs["n1"] == pytest.approx(recs[twin])
            break
    else:
        pytest.fail("item 3 is recommended to no user")
    info = json.loads((tmp_path / "v2" / exported.INFO_FILE).read_text())
    assert info["parent"]["model_version"] == "v1" and info["added_items"]["items"] == 2
    assert after.item(after.item_ids[NUM_ITEMS + 2]) == {
        "item_id": "n2",
        "title": "heat thriller",
        "count": 0,
    }
    # the new version can take more items in turn
    more = write_csv(tmp_path / "more.csv", [("n3", "toy story")])
    assert (
        main(
            [
                "add-items",
                "--model",
                str(tmp_path / "v2"),
                "--items",
                str(more),
                "--output",
                str(tmp_path / "v3"),
            ]
        )
        == 0
    )


def test_a_model_with_fixed_text_vectors(
    tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    model = RecModel(build_config("tiny", num_items=NUM_ITEMS, item_representation="text", text_dim=16))
    folder = write_exported_model(tmp_path / "v1", model)
    items = pq.read_table(folder / exported.ITEMS_FILE)
    known = [
        t or title or ""
        for t, title in zip(items["text"].to_pylist(), items["title"].to_pylist(), strict=True)
    ]
    encoder = TextEncoder(str(tiny_bert))
    table = torch.cat([torch.zeros(1, 16), encoder.encode(known, progress=False)])
    table[[i + 1 for i, text in enumerate(known) if not text]] = 0.0
    model.set_item_text_embeddings(table)
    write_exported_model(folder, model)

    new = write_csv(tmp_path / "new.csv", [("n1", "the matrix")])
    args = ["add-items", "--model", str(folder), "--items", str(new), "--output", str(tmp_path / "v2")]
    assert main([*args, "--text-model", str(tiny_bert)]) == 0
    after = RecModel.from_pretrained(tmp_path / "v2", use_safetensors=True)
    expected = encoder.encode(["the matrix"], progress=False)[0]
    torch.testing.assert_close(after.items.text_embeddings[NUM_ITEMS + 1], expected)
    capsys.readouterr()

    # another encoder does not reproduce the model's vectors: refused, nothing written
    from transformers import BertConfig, BertModel

    other = tmp_path / "other-bert"
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(other)  # fmt: skip
    load_tokenizer(str(tiny_bert)).save_pretrained(other)
    out = ["--output", str(tmp_path / "v3")]
    assert (
        main(["add-items", "--model", str(folder), "--items", str(new), *out, "--text-model", str(other)])
        == 2
    )
    assert "does not reproduce the model's item vectors" in capsys.readouterr().err
    assert not (tmp_path / "v3").exists()


def test_bad_input_is_refused_and_nothing_is_written(
    tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tower_folder(tiny_bert, tmp_path / "v1")
    id_only = write_exported_model(tmp_path / "ids", RecModel(build_config("tiny", num_items=NUM_ITEMS)))
    good = write_csv(tmp_path / "good.csv", [("n1", "toy story")])
    cases = [
        (
            folder,
            write_csv(tmp_path / "known.csv", [("17", "toy story")]),
            "1 item ids are already in the model",
        ),
        (folder, write_csv(tmp_path / "empty-text.csv", [("n1", "")]), "1 items have no text"),
        (folder, tmp_path / "missing.csv", "does not exist"),
        (id_only, good, "represents items by ID only"),
        (tmp_path / "nothing", good, "is not an exported model"),
        (folder, good, "already exists"),
    ]
    for model, items, message in cases:
        output = folder if message == "already exists" else tmp_path / "out"
        assert main(["add-items", "--model", str(model), "--items", str(items), "--output", str(output)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    (tmp_path / "no-title.csv").write_text("item_id,name\nn1,toy\n")
    args = ["add-items", "--model", str(folder), "--items", str(tmp_path / "no-title.csv")]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    assert "missing column 'title'" in capsys.readouterr().err
    assert (
        main([*args, "--output", str(tmp_path / "out"), "--title-column", "", "--text-columns", "name"]) == 0
    )


def test_add_items_in_s3(
    tiny_bert: Path, tmp_path: Path, s3_bucket: str, capsys: pytest.CaptureFixture
) -> None:
    folder = tower_folder(tiny_bert, tmp_path / "v1")
    storage.copy_dir(storage.resolve(str(folder)), storage.resolve(f"s3://{s3_bucket}/models/v1"))
    new = write_csv(tmp_path / "new.csv", [("n1", "heat action")])
    storage.write_bytes(storage.resolve(f"s3://{s3_bucket}/new.csv"), new.read_bytes())
    args = ["add-items", "--model", f"s3://{s3_bucket}/models/v1", "--items", f"s3://{s3_bucket}/new.csv"]
    assert main([*args, "--output", f"s3://{s3_bucket}/models/v2"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == f"s3://{s3_bucket}/models/v2"
    served = Predictor.load(f"s3://{s3_bucket}/models/v2")
    assert served.item_ids[NUM_ITEMS + 1] == "n1"
    assert storage.is_dir(storage.resolve(f"s3://{s3_bucket}/models/v2/{exported.TOKENIZER_DIR}"))
