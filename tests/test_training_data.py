"""Training data without models: every record kind, errors that name record and field, buckets, order, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from metacanvas_core.training.config import load_config
from metacanvas_core.training.data import (
    RECORD_KINDS,
    ManifestError,
    Source,
    nearest_bucket,
    read_manifest,
)

RECIPES = Path(__file__).resolve().parents[1] / "metacanvas_core" / "recipes"


def _files(root: Path) -> None:
    for name, size in (("a.png", (64, 48)), ("b.png", (64, 48)), ("c.png", (32, 32))):
        Image.new("RGB", size, (200, 10, 10)).save(root / name)
    (root / "v.mp4").write_bytes(b"\x00" * 16)
    (root / "w.mp4").write_bytes(b"\x00" * 16)
    (root / "frames").mkdir()
    Image.new("RGB", (80, 48)).save(root / "frames" / "0000.png")


def _write(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_every_record_kind_validates(tmp_path):
    _files(tmp_path)
    records = [
        {"kind": "t2i", "image": "a.png", "prompt": "a red cube"},
        {"kind": "recon", "image": "a.png"},
        {"kind": "edit", "source": "a.png", "instruction": "make it blue", "target": "b.png"},
        {"kind": "t2v", "video": "v.mp4", "prompt": "a dog runs", "width": 1280, "height": 704},
        {"kind": "i2v", "image": "c.png", "video": "frames", "prompt": "the dog runs"},
        {
            "kind": "video_edit",
            "source": "v.mp4",
            "instruction": "night",
            "target": "w.mp4",
            "width": 832,
            "height": 480,
        },
        {"kind": "ref2v", "references": ["a.png", "c.png"], "video": "v.mp4", "prompt": "p", "width": 64, "height": 64},
    ]
    got = read_manifest(_write(tmp_path / "all.jsonl", records))
    assert [r.kind for r in got] == list(RECORD_KINDS)
    assert got[0].size == (64, 48) and got[0].inputs == ()
    assert got[1].inputs == (tmp_path / "a.png",) and got[1].text  # recon: the image is its own input
    assert got[2].target == tmp_path / "b.png" and got[2].inputs == (tmp_path / "a.png",)
    assert got[4].size == (80, 48)  # from the first frame of a frames folder
    assert got[6].inputs == (tmp_path / "a.png", tmp_path / "c.png")


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"kind": "t2i", "image": "missing.png", "prompt": "x"},
            r"record 2 \(line 2\), field 'image': file .*missing.png' does not exist",
        ),
        ({"kind": "t2i", "image": "a.png"}, r"record 2 \(line 2\), field 'prompt': a t2i record needs"),
        ({"kind": "paint", "image": "a.png"}, r"record 2 \(line 2\), field 'kind': unknown kind 'paint'"),
        ('{"kind": "t2i", ', r"record 2 \(line 2\): not valid JSON"),
        ({"kind": "t2i", "image": "junk.png", "prompt": "x"}, r"field 'image': .*junk.png' is not a readable image"),
        ({"kind": "t2v", "video": "v.mp4", "prompt": "x"}, r"field 'video': a video record needs 'width' and 'height'"),
        ({"kind": "ref2v", "references": [], "video": "v.mp4", "prompt": "x"}, r"field 'references': a non-empty list"),
    ],
)
def test_bad_record_names_record_and_field(tmp_path, bad, message):
    _files(tmp_path)
    (tmp_path / "junk.png").write_text("not an image")
    good = {"kind": "t2i", "image": "a.png", "prompt": "fine"}
    manifest = _write(tmp_path / "m.jsonl", [good, bad, good])
    with pytest.raises(ManifestError, match=message) as err:
        read_manifest(manifest)
    assert "skip_bad_records" in str(err.value)
    assert [r.number for r in read_manifest(manifest, skip_bad_records=True)] == [1, 3]


def test_kinds_the_backbone_does_not_train(tmp_path):
    _files(tmp_path)
    manifest = _write(
        tmp_path / "m.jsonl", [{"kind": "edit", "source": "a.png", "instruction": "x", "target": "b.png"}]
    )
    with pytest.raises(ManifestError, match="record 1 .*field 'kind': this backbone trains on t2i, recon, not edit"):
        read_manifest(manifest, kinds=("t2i", "recon"))
    with pytest.raises(ManifestError, match="no usable records"):
        read_manifest(manifest, skip_bad_records=True, kinds=("t2i",))


def test_buckets_and_resumable_order(tmp_path):
    buckets = [(64, 64), (48, 80), (80, 48)]
    assert nearest_bucket((100, 100), buckets) == 0
    assert nearest_bucket((160, 90), buckets) == 1
    assert nearest_bucket((90, 160), buckets) == 2
    _files(tmp_path)
    rows = [{"kind": "t2i", "image": "a.png" if i % 2 else "c.png", "prompt": f"p{i}"} for i in range(10)]
    records = read_manifest(_write(tmp_path / "m.jsonl", rows))
    source = Source("s", records, 1.0, buckets, batch_size=3, seed=5)
    for batch in source.epoch_batches(0):
        assert len({source.bucket_of[i] for i in batch}) == 1  # one size per batch
    assert sorted(i for b in source.epoch_batches(0) for i in b) == list(range(10))
    assert source.epoch_batches(0) != source.epoch_batches(1)
    source.take(3)
    state = source.state()
    ahead = source.take(5)  # crosses into epoch 1
    source.load_state(state)
    assert source.take(5) == ahead and source.epoch == 1


def test_every_recipe_parses():
    recipes = sorted(RECIPES.glob("*.json"))
    assert recipes
    for path in recipes:
        config = load_config(path)
        assert config.name and config.trainable
