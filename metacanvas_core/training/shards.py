"""WebDataset shards as a training source: tar files streamed without unpacking (webdataset's tar reader).

A recipe's data entry:

    {"webdataset": {"shards": "blip3o-60k/*.tar", "kind": "t2i"}, "weight": 1}

`shards` is a glob, a brace pattern (`data/{00000..00099}.tar`) or a list of them. A sample is the files of one
key; which file is which field (webdataset extensions, `;` separates alternatives):

    image_key    the target image of image kinds        default "jpg;jpeg;png;webp"  (BLIP3o-60k: `<key>.jpg`)
    video_key    the target clip of video kinds         default "mp4;webm;mov;mkv"
    caption_key  the prompt / instruction               default "txt"                (BLIP3o-60k: `<key>.txt`)
    input_key    the input of edit / i2v / video_edit   no default

Kinds: t2i, recon (the caption is optional), edit, t2v, i2v, video_edit (not ref2v). Options: `workers`
(DataLoader processes that read and decode, default 2).

How it is split and resumed: every epoch the shards are shuffled (seed, epoch) and dealt to the processes
(rank r takes every world-th), then to the DataLoader workers of each process the same way. A worker reads its
shards in order and decodes each sample at its aspect bucket; the process takes samples from its workers in
turn and batches them per bucket, so the stream is the same however fast each worker is. The state of a
process (epoch, each worker's next shard and sample, whose turn it is, the samples waiting in bucket batches)
is saved with each checkpoint: a run resumed on as many processes continues exactly; on another number of
processes the source starts its next epoch. A bad sample (unreadable image, missing field) stops the run with
an error naming shard and key; with `skip_bad_records` it is reported and left out.
"""

from __future__ import annotations

import glob
import io
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import MetaCanvasInputError
from .data import RECON_PROMPT, RECORD_KINDS, ManifestError, _seed, cover_crop, nearest_bucket, read_video

log = logging.getLogger(__name__)

KINDS = ("t2i", "recon", "edit", "t2v", "i2v", "video_edit")
DEFAULT_KEYS = {"image_key": "jpg;jpeg;png;webp", "video_key": "mp4;webm;mov;mkv", "caption_key": "txt"}
OPTIONS = (*DEFAULT_KEYS, "shards", "kind", "input_key", "workers")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard files of brace patterns and globs, sorted, each existing."""
    import webdataset as wds

    out = []
    for pattern in [spec] if isinstance(spec, str) else spec:
        for item in wds.shardlists.expand_urls(str(pattern)):
            found = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
            missing = [f for f in found if not Path(f).is_file()]
            if not found or missing:
                raise MetaCanvasInputError(f"webdataset shards: '{(missing or [item])[0]}' does not exist.")
            out += found
    return out


@dataclass
class ShardSample:
    """One decoded sample, its target already cropped to its bucket (uint8, so a waiting batch is small to save)."""

    shard: str
    key: str
    kind: str
    text: str
    bucket: int
    target: torch.Tensor  # (H, W, 3) image or (F, H, W, 3) clip, uint8
    inputs: list[torch.Tensor] = field(default_factory=list)  # images (H, W, 3) or one clip (F, H, W, 3), uint8

    def where(self, field_name: str) -> str:
        return f"shard '{self.shard}', key '{self.key}', field '{field_name}'"


def _pick(sample: dict, keys: str) -> tuple[str, bytes] | None:
    for ext in keys.split(";"):
        if ext in sample:
            return ext, sample[ext]
    return None


def _array(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())


@dataclass(frozen=True)
class Decoder:
    """Turns the files of one key into a `ShardSample` (in the DataLoader workers): fields, bucket, crop."""

    kind: str
    keys: dict[str, str]
    buckets: list[tuple[int, int]]
    frames: int

    def media(self, sample: dict, field_name: str, keys: str, video: bool) -> list[Image.Image]:
        found = _pick(sample, keys)
        if found is None:
            raise ValueError(f"{field_name}: no file with extension {keys!r} (the sample has {_exts(sample)})")
        ext, data = found
        try:
            if video:
                return read_video(data, self.frames, extension="." + ext.rsplit(".", 1)[-1])
            with Image.open(io.BytesIO(data)) as im:
                return [im.convert("RGB")]
        except Exception as e:  # PIL and imageio raise many kinds for a broken file
            raise ValueError(f"{field_name}: cannot decode the .{ext} file ({e})") from None

    def __call__(self, sample: dict) -> ShardSample:
        spec = RECORD_KINDS[self.kind]
        video = spec.media == "video"
        target_key = "video_key" if video else "image_key"
        target = self.media(sample, target_key, self.keys[target_key], video)
        text = ""
        found = _pick(sample, self.keys["caption_key"])
        if found is not None:
            text = found[1].decode("utf-8", errors="replace").strip()
        if not text and spec.text_required:
            raise ValueError(f"caption_key: no non-empty .{self.keys['caption_key']} caption")
        text = text or RECON_PROMPT
        bucket = nearest_bucket(target[0].size, self.buckets)
        h, w = self.buckets[bucket]
        inputs = []
        if self.kind == "recon":
            inputs = [_array(target[0])]
        elif spec.inputs:
            input_video = spec.input_media == "video"
            if "input_key" not in self.keys:
                raise ValueError(f"input_key: {self.kind} samples need an input_key (the file of the input)")
            images = self.media(sample, "input_key", self.keys["input_key"], input_video)
            inputs = (
                [torch.stack([_array(cover_crop(f, h, w)) for f in images])] if input_video else [_array(images[0])]
            )
        crops = torch.stack([_array(cover_crop(f, h, w)) for f in target])
        return ShardSample("", sample["__key__"], self.kind, text, bucket, crops if video else crops[0], inputs)


def _exts(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


class _Stream(torch.utils.data.IterableDataset):
    """One process's shards of one epoch, dealt to the DataLoader workers; each worker starts at its position."""

    def __init__(self, shards: list[str], starts: list[tuple[int, int]], decode: Decoder) -> None:
        self.shards, self.starts, self.decode = shards, starts, decode

    def __iter__(self):
        from webdataset.tariterators import tarfile_samples

        info = torch.utils.data.get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shards[w::workers]
        first, skip = self.starts[w]
        for j in range(first, len(mine)):
            k = -1
            try:
                for k, raw in enumerate(tarfile_samples([{"url": mine[j]}])):
                    if j == first and k < skip:
                        continue  # taken before the resume (read, not decoded)
                    try:
                        sample = self.decode(raw)
                        sample.shard = mine[j]
                    except ValueError as e:
                        sample = f"shard '{mine[j]}', key '{raw['__key__']}', field {e}"
                    yield w, j, k, sample
            except Exception as e:  # a truncated or corrupt tar file: report it and go on with the next shard
                yield w, j, k + 1, f"shard '{mine[j]}', after sample {k + 1}: cannot read the tar file ({e})"
        yield w, len(mine), 0, None  # this worker is done


class ShardSource:
    """WebDataset shards as one source of the data mix; batches of one bucket, drawn by this process alone."""

    def __init__(
        self,
        name: str,
        shards: list[str],
        decode: Decoder,
        weight: float,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        workers: int = 2,
        skip_bad: bool = False,
    ) -> None:
        if len(shards) < world:
            raise MetaCanvasInputError(
                f"source '{name}': {len(shards)} shards cannot be dealt to {world} processes: use more shards."
            )
        self.name, self.shards, self.decode, self.weight = name, shards, decode, weight
        self.buckets = decode.buckets
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.workers, self.skip_bad = max(workers, 1), skip_bad
        self._fixed: list[list[ShardSample]] | None = None
        self._restart(0)

    @classmethod
    def from_spec(
        cls,
        name: str,
        spec: dict,
        weight: float,
        buckets,
        config,
        rank: int,
        world: int,
        kinds: tuple[str, ...],
        batch_size: int,
    ) -> ShardSource:
        unknown = sorted(set(spec) - set(OPTIONS))
        if unknown or "shards" not in spec:
            raise MetaCanvasInputError(
                f"source '{name}': webdataset takes 'shards' and {', '.join(o for o in OPTIONS if o != 'shards')}"
                + (f"; unknown: {unknown}" if unknown else "")
            )
        kind = spec.get("kind", "t2i")
        if kind not in KINDS or kind not in kinds:
            allowed = [k for k in KINDS if k in kinds]
            raise MetaCanvasInputError(f"source '{name}': webdataset kind {kind!r}; this backbone trains on {allowed}")
        keys = {**DEFAULT_KEYS, **{k: spec[k] for k in (*DEFAULT_KEYS, "input_key") if k in spec}}
        decode = Decoder(kind, keys, list(buckets), config.frames)
        shards = expand_shards(spec["shards"])
        workers = spec.get("workers", 2)
        return cls(name, shards, decode, weight, batch_size, config.seed, rank, world, workers,
                   config.skip_bad_records)  # fmt: skip

    # --- the stream -------------------------------------------------------------------------
    def epoch_shards(self, epoch: int) -> list[str]:
        """This process's shards of an epoch: all shards shuffled by (seed, epoch), every world-th from rank."""
        g = torch.Generator().manual_seed(_seed(self.seed, 5, epoch))
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=g).tolist()][self.rank :: self.world]

    def _restart(self, epoch: int, positions=None, turn: int = 0, pending=None) -> None:
        self.epoch, self.turn = epoch, turn
        self.positions = [tuple(p) for p in positions] if positions else [(0, 0)] * self.workers
        self.pending: list[list[ShardSample]] = pending or [[] for _ in self.buckets]
        self.ended: set[int] = set()
        self.queues: list[list] = [[] for _ in range(self.workers)]
        self._loader = None

    def _items(self):
        if self._loader is None:
            stream = _Stream(self.epoch_shards(self.epoch), self.positions, self.decode)
            workers = self.workers if self.workers > 1 else 0
            loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
            self._loader = iter(loader)
        return self._loader

    def _next_sample(self) -> ShardSample | None:
        """The next good sample, taking the workers in turn; None when the epoch's shards are done."""
        while len(self.ended) < self.workers:
            w = self.turn
            self.turn = (w + 1) % self.workers
            if w in self.ended:
                continue
            while not self.queues[w]:
                item = next(self._items())
                self.queues[item[0]].append(item)
            _, j, k, sample = self.queues[w].pop(0)
            self.positions[w] = (j, k + 1)
            if sample is None:
                self.ended.add(w)
            elif isinstance(sample, str):
                if not self.skip_bad:
                    raise ManifestError(f"{sample} (set skip_bad_records to leave bad samples out)")
                log.warning("skipping bad sample: %s", sample)
            else:
                return sample
        return None

    def next_batch(self) -> list[ShardSample]:
        """Samples are batched per bucket; a batch is given out as soon as it is full (waiting ones carry on)."""
        seen = True  # whether the epoch being read gave a sample (the one before the call is assumed to)
        while True:
            sample = self._next_sample()
            if sample is None:
                if not seen:
                    raise ManifestError(f"source '{self.name}': process {self.rank}'s shards hold no usable sample.")
                self._restart(self.epoch + 1, pending=self.pending)
                seen = False
                continue
            seen = True
            waiting = self.pending[sample.bucket]
            waiting.append(sample)
            if len(waiting) == self.batch_size:
                self.pending[sample.bucket] = []
                return waiting

    def draw(self, world: int, rank: int, accum: int) -> list[tuple[int, list[ShardSample]]]:
        return [(d, self.next_batch()) for d in range(rank * accum, (rank + 1) * accum)]

    def fixed(self, n: int) -> list[list[ShardSample]]:
        """The first `n` good samples of the first shards (sorted), grouped by bucket and batched: the evaluation
        set, the same on every process."""
        if self._fixed is None:
            stream = iter(_Stream(self.shards, [(0, 0)], self.decode))
            groups: dict[int, list[ShardSample]] = {}
            taken = 0
            while taken < n:
                _, _, _, sample = next(stream)
                if sample is None:
                    break
                if isinstance(sample, ShardSample):
                    groups.setdefault(sample.bucket, []).append(sample)
                    taken += 1
            bs = self.batch_size
            self._fixed = [g[i : i + bs] for g in groups.values() for i in range(0, len(g), bs)]
        return self._fixed

    # --- state ------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "world": self.world,
            "epoch": self.epoch,
            "positions": [list(p) for p in self.positions],
            "turn": self.turn,
            "ended": sorted(self.ended),
            "pending": [[asdict(s) for s in waiting] for waiting in self.pending],
        }

    def resume(self, states: list[dict], rank: int) -> None:
        if len(states) != self.world or len(states[rank]["positions"]) != self.workers:
            epoch = max(s["epoch"] for s in states) + 1
            log.warning(
                "source '%s': saved by %d processes, resumed on %d (or with other workers): starting epoch %d",
                self.name, len(states), self.world, epoch,
            )  # fmt: skip
            self._restart(epoch)
            return
        state = states[rank]
        pending = [[ShardSample(**s) for s in waiting] for waiting in state["pending"]]
        self._restart(state["epoch"], state["positions"], state["turn"], pending)
        self.ended = set(state["ended"])
