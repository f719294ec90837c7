"""WebDataset shards as a training source: BLIP3o-60k's layout (`<key>.jpg` + `<key>.txt`), split over processes
and workers, exact resume with samples waiting in bucket batches, bad samples named by shard and key, and a
training run that streams them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.training.config import TrainConfig
from metacanvas_core.training.data import ManifestError
from metacanvas_core.training.shards import Decoder, ShardSource, expand_shards
from metacanvas_core.training.synthetic import write_synthetic

BUCKETS = [(64, 64), (48, 80)]


def write_shards(folder: Path, shards: int = 4, per_shard: int = 5, bad: str | None = None) -> str:
    """BLIP3o-60k-style shards of the synthetic shapes: `<key>.jpg` and `<key>.txt`; `bad`: a key with a broken jpg."""
    manifest = write_synthetic(folder / "src", "t2i", shards * per_shard, sizes=[[64, 64], [64, 64], [48, 80]])
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for s in range(shards):
        with wds.TarWriter(str(folder / f"part-{s:05d}.tar")) as sink:
            for i, r in enumerate(records[s * per_shard : (s + 1) * per_shard]):
                key = f"{s:05d}{i:04d}"
                buffer = io.BytesIO()
                Image.open(manifest.parent / r["image"]).save(buffer, format="JPEG", quality=95)
                jpg = b"not a jpeg" if key == bad else buffer.getvalue()
                sink.write({"__key__": key, "jpg": jpg, "txt": r["prompt"]})
    return f"{folder}/part-{{00000..{shards - 1:05d}}}.tar"


def source(pattern: str, rank: int = 0, world: int = 1, workers: int = 2, batch_size: int = 3, **kw) -> ShardSource:
    decode = Decoder("t2i", {"image_key": "jpg;png", "caption_key": "txt"}, BUCKETS, frames=1)
    return ShardSource("s", expand_shards(pattern), decode, 1.0, batch_size, 0, rank, world, workers, **kw)


def keys(batches) -> list[list[str]]:
    return [[s.key for s in b] for b in batches]


def test_shards_are_dealt_to_processes_and_workers_and_every_sample_comes_once(tmp_path):
    pattern = write_shards(tmp_path)
    assert len(expand_shards(pattern)) == 4 and expand_shards(str(tmp_path / "*.tar")) == expand_shards(pattern)
    # batch_size 1: ten batches are one epoch of a process's two shards (of 5 samples each)
    epoch = {r: [s.key for b in range(10) for s in src.next_batch()] for r, src in enumerate(
        source(pattern, rank=r, world=2, batch_size=1) for r in range(2))}  # fmt: skip
    assert sorted(epoch[0] + epoch[1]) == sorted(f"{s:05d}{i:04d}" for s in range(4) for i in range(5))
    assert not {k[:5] for k in epoch[0]} & {k[:5] for k in epoch[1]}  # each process reads its own shards
    assert len({k[:5] for k in epoch[0][:2]}) == 2  # its two workers read one shard each, taken in turn
    batch = source(pattern).next_batch()
    assert len({s.bucket for s in batch}) == 1 and tuple(batch[0].target.shape[:2]) in BUCKETS
    assert batch[0].text.startswith("a ") and batch[0].shard.endswith(".tar")
    # Two workers read at their own pace; the stream is the same every time.
    assert keys(source(pattern).next_batch() for _ in range(8)) == keys(source(pattern).next_batch() for _ in range(8))


def test_resume_continues_exactly_with_batches_waiting(tmp_path):
    pattern = write_shards(tmp_path, shards=3, per_shard=7)
    full = source(pattern)
    expected = keys(full.next_batch() for _ in range(12))  # crosses into the second and third epoch
    part = source(pattern)
    keys(part.next_batch() for _ in range(4))
    state = part.state()
    assert any(state["pending"])  # a bucket batch is half full: it is part of the state
    resumed = source(pattern)
    resumed.resume([state], 0)
    assert keys(resumed.next_batch() for _ in range(8)) == expected[4:]
    other = source(pattern, world=1)
    other.resume([state, state], 0)  # saved by two processes: this source starts its next epoch
    assert other.epoch == state["epoch"] + 1


def test_bad_sample_names_shard_and_key(tmp_path):
    pattern = write_shards(tmp_path, shards=2, per_shard=4, bad="000010002")
    with pytest.raises(ManifestError, match=r"shard '.*part-00001.tar', key '000010002', field image_key: cannot dec"):
        stopping = source(pattern, workers=1, batch_size=1)
        [stopping.next_batch() for _ in range(8)]
    skipping = source(pattern, workers=1, batch_size=1, skip_bad=True)
    assert "000010002" not in [k for b in keys(skipping.next_batch() for _ in range(7)) for k in b]
    with pytest.raises(MetaCanvasInputError, match="does not exist"):
        expand_shards(str(tmp_path / "nothing-{0..3}.tar"))


def test_training_streams_webdataset_shards(tiny, tmp_path):
    from metacanvas_core.training.trainer import Trainer

    pattern = write_shards(tmp_path / "shards", shards=2, per_shard=4)
    base = dict(
        name="shards",
        mllm=str(tiny["mllm"]),
        backbone=str(tiny["sana"]),
        trainable=["canvas_connector", "dit"],
        lr=1e-3,
        batch_size=2,
        buckets=[list(b) for b in BUCKETS],
        data=[{"webdataset": {"shards": pattern, "kind": "t2i", "workers": 2}}],
        eval_samples=2,
        save_every=2,
        max_steps=4,
    )
    full = Trainer(TrainConfig(**base), tmp_path / "full", progress=False)
    trace = full.train()
    Trainer(TrainConfig(**base), tmp_path / "part", max_steps=2, progress=False).train()
    resumed = Trainer(TrainConfig(**base), tmp_path / "part", resume=tmp_path / "part", progress=False)
    assert trace[2:] == resumed.train()  # exact: the shard cursor and waiting samples came back
    assert (tmp_path / "full" / "shards.safetensors").is_file()


def _mp4(frames: int, size: tuple[int, int], seed: int) -> bytes:
    """A short H.264 clip (PyAV through imageio), frames of distinct flat colours."""
    import imageio.v3 as iio
    import numpy as np

    rng = np.random.default_rng(seed)
    clip = np.stack([np.full((*size, 3), rng.integers(0, 255, 3), dtype=np.uint8) for _ in range(frames)])
    return iio.imwrite("<bytes>", clip, extension=".mp4", codec="libx264", fps=8, plugin="pyav")


def test_video_shards_decode_clips_and_name_bad_ones(tmp_path):
    """Video kinds read `<key>.mp4` (+ the edit source `<key>.src.mp4`) from the shard: the first `frames` frames,
    cover-cropped to the bucket; a clip too short or not a video is refused naming the field (the source adds the
    shard and key, as for images above)."""
    with wds.TarWriter(str(tmp_path / "video-00000.tar")) as sink:
        sink.write({"__key__": "clip0", "mp4": _mp4(9, (64, 64), 0), "src.mp4": _mp4(9, (48, 80), 1), "txt": "a car"})
        sink.write({"__key__": "short", "mp4": _mp4(3, (64, 64), 2), "src.mp4": _mp4(9, (64, 64), 3), "txt": "a"})
        sink.write({"__key__": "broken", "mp4": b"not a video", "src.mp4": _mp4(9, (64, 64), 4), "txt": "a"})
    samples = {}
    for kind, keys in (("t2v", {}), ("video_edit", {"input_key": "src.mp4"})):
        decode = Decoder(kind, {"video_key": "mp4", "caption_key": "txt", **keys}, BUCKETS, frames=5)
        tar = list(wds.WebDataset(str(tmp_path / "video-00000.tar"), shardshuffle=False))
        samples[kind] = decode(tar[0])
        for bad in tar[1:]:
            with pytest.raises(ValueError, match="video_key: cannot decode the .mp4 file"):
                decode(bad)
    clip = samples["t2v"]
    assert clip.kind == "t2v" and clip.text == "a car" and tuple(clip.target.shape) == (5, 64, 64, 3)
    assert not torch.equal(clip.target[0], clip.target[1])  # five different frames, in order
    (source_clip,) = samples["video_edit"].inputs
    assert tuple(source_clip.shape) == (5, 64, 64, 3)  # the 48×80 source cover-cropped to the target's bucket
