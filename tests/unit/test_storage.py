"""URIs -> filesystems: local paths, file:// and s3:// (moto's HTTP server), with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from rec_train import storage


def test_local_paths_and_file_uris(tmp_path: Path) -> None:
    loc = storage.resolve(f"file://{tmp_path}/a")
    assert loc.path == str(tmp_path / "a") and not loc.is_s3
    storage.write_json(loc.join("x", "m.json"), {"k": 1})
    assert storage.read_json(storage.resolve(tmp_path / "a" / "x" / "m.json")) == {"k": 1}
    assert storage.list_files(loc) == [str(tmp_path / "a" / "x" / "m.json")]
    assert storage.is_dir(loc) and storage.is_file(loc.join("x", "m.json"))
    assert not list((tmp_path / "a" / "x").glob("*.tmp"))  # written through a temp name, then moved


def test_bad_uris() -> None:
    with pytest.raises(storage.StorageError, match="unsupported scheme 'gs'"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(storage.StorageError, match="has no bucket"):
        storage.resolve("s3://")


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.read_bytes(storage.resolve(tmp_path / "nope"))


def test_s3_round_trip_and_copy(s3_bucket: str, tmp_path: Path) -> None:
    loc = storage.resolve(f"s3://{s3_bucket}/run/")
    assert loc.is_s3 and loc.path == f"{s3_bucket}/run"
    storage.write_text(loc.join("a.txt"), "hello")
    storage.write_bytes(loc.join("sub", "b.bin"), b"\x00\x01")
    assert storage.read_text(loc.join("a.txt")) == "hello"
    assert storage.list_files(loc) == [f"{s3_bucket}/run/a.txt", f"{s3_bucket}/run/sub/b.bin"]
    local = storage.local_copy(loc, tmp_path / "copy")
    assert (local / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    storage.delete_dir(loc)
    assert not storage.exists(loc.join("a.txt"))


def test_s3_missing_bucket_names_the_fix(s3_env: dict[str, str]) -> None:
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-rayrec/x.*AWS_ENDPOINT_URL_S3"):
        storage.write_text(storage.resolve("s3://no-such-bucket-rayrec/x"), "x")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoint_folders_ray_train_does_not_keep_are_removed(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from rec_train.train.launch import remove_unregistered_checkpoints

    root = f"s3://{request.getfixturevalue('s3_bucket')}/run" if where == "s3" else str(tmp_path / "run")
    run = storage.resolve(root)
    names = [
        "checkpoint_2026-01-01_00-00-01.0",
        "checkpoint_2026-01-01_00-00-02.0",
        "checkpoint_2026-01-01_00-00-03.0",
    ]
    for name in [*names, "tensorboard"]:
        storage.write_text(run.join(name, "state.json"), "{}")
    storage.write_text(run.join("metrics.jsonl"), "")
    remove_unregistered_checkpoints(run, [run.join(names[0]).path, run.join(names[2]).path + "/"])
    assert storage.list_dirs(run) == [names[0], names[2], "tensorboard"]
    assert storage.exists(run.join("metrics.jsonl"))
