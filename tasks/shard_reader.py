"""shard_reader: stream documents' token ids from the shard stage's parquet shards, for training.

Imports only numpy and pyarrow (torch lazily, for DataLoader workers), so it runs on a GPU
box without prefect, mlflow or polars.

    reader = ShardReader.from_artifact("<artifacts>/shard/<key>", "train", seed=1,
                                       rank=rank, world_size=world)
    for ids in reader:        # 1-D uint16 arrays: one document, <|endoftext|> last; loops over epochs
        ...
    state = reader.state_dict()          # the cursor, for a checkpoint
    reader.load_state_dict(state)        # continue at the exact next document

Units   the split's parquet row groups (about `row_group_tokens` tokens each), in file order.
        When there are fewer units than streams, each row group is cut into equal row ranges.
Order   epoch e: the units are permuted with rng(seed, e) (file order when shuffle=False);
        stream s = rank * num_workers + worker of S = world_size * num_workers takes the units
        s, s+S, s+2S, ... of that order; inside a unit the rows are permuted with
        rng(seed, e, unit). So what a stream yields is a function of (files, seed, S, s,
        epoch, cursor) only, the streams of one epoch partition the split (every document
        exactly once), and each epoch has another order.
Cursor  {"epoch", "unit", "row"}: the next document is row `row` (in the permuted order) of
        the stream's `unit`-th unit of `epoch`. Resuming reads that unit again and skips
        `row` rows. The state also names seed, streams and unit count, and loading a state
        saved for other data or another layout fails with a message.
Memory  one row group of one file (~0.5 MB of ids at the default 262144 tokens).
Fails   naming the file when the column is missing or not list<uint16>-like integers, and
        when a stream would get no unit at all (fewer rows than streams).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

COLUMN = "input_ids"
MANIFEST = "_MANIFEST.json"


@dataclass(frozen=True)
class Unit:
    file: int  # index into ShardReader.files
    row_group: int
    start: int  # rows [start, stop) of that row group
    stop: int


def _unit_table(files: list[str], streams: int) -> tuple[list[Unit], int, int]:
    """All units of the files (subdivided when fewer than streams), documents, tokens."""
    groups, docs, tokens = [], 0, 0
    for index, path in enumerate(files):
        handle = pq.ParquetFile(path)
        if COLUMN not in handle.schema_arrow.names:
            raise ValueError(f"{path}: no `{COLUMN}` column (columns: {handle.schema_arrow.names}); is it a token shard?")
        meta = handle.metadata
        column = next(i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == COLUMN)
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if rows:
                groups.append((index, g, rows))
                docs += rows
                # leaf values of a list column = tokens (no document is empty: each ends with EOS)
                tokens += meta.row_group(g).column(column).num_values
    pieces = max(1, math.ceil(streams / max(len(groups), 1)))
    units = []
    for index, g, rows in groups:
        bounds = np.linspace(0, rows, min(pieces, rows) + 1).astype(int)
        units += [Unit(index, g, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    return units, docs, tokens


class ShardReader:
    """A deterministic, resumable, shardable stream of documents (see the module docstring).

    files        shard paths of one split, in the manifest's order
    seed         unit and row order; shuffle=False keeps file order (the shard stage's shuffle)
    loop         True: the next epoch starts after the last unit (training); False: one pass
    rank, world_size, worker, num_workers   which stream of S = world_size * num_workers this is
    """

    def __init__(self, files: list[str | Path], *, seed: int = 0, shuffle: bool = True, loop: bool = True,
                 rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1):
        if not files:
            raise ValueError("ShardReader needs at least one shard file")
        if not (0 <= rank < world_size and 0 <= worker < num_workers):
            raise ValueError(f"rank {rank} of {world_size}, worker {worker} of {num_workers}: out of range")
        self.files = [str(f) for f in files]
        self.seed, self.shuffle, self.loop = seed, shuffle, loop
        self.rank, self.world_size, self.worker, self.num_workers = rank, world_size, worker, num_workers
        self.streams = world_size * num_workers
        self.stream = rank * num_workers + worker
        self.all_units, self.num_docs, self.num_tokens = _unit_table(self.files, self.streams)
        if len(self.all_units) < self.streams:
            raise ValueError(
                f"{len(self.all_units)} row ranges in {len(self.files)} shard files cannot feed "
                f"{self.streams} streams (ranks x workers): use fewer workers, or smaller row groups "
                f"(stages.shard.row_group_tokens)")
        self.epoch, self.unit, self.row = 0, 0, 0
        self._units_epoch: int | None = None
        self._units: list[int] = []
        self._loaded: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_artifact(cls, directory: str | Path, split: str = "train", **options) -> "ShardReader":
        """The reader of one split of a committed shard artifact (a local directory)."""
        directory = Path(directory)
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        files = [directory / s["path"] for s in manifest["extra"]["shards"] if s["split"] == split]
        if not files:
            raise ValueError(f"{directory}: the shard artifact has no {split!r} shard")
        return cls(files, **options)

    def for_worker(self, worker: int, num_workers: int) -> "ShardReader":
        """The same stream split again, for one of `num_workers` DataLoader workers."""
        return ShardReader(self.files, seed=self.seed, shuffle=self.shuffle, loop=self.loop, rank=self.rank,
                           world_size=self.world_size, worker=worker, num_workers=num_workers)

    def for_dataloader_worker(self) -> "ShardReader":
        """Inside a torch IterableDataset's __iter__: this worker's reader (self in the main process)."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        return self if info is None else self.for_worker(info.id, info.num_workers)

    # -- order ------------------------------------------------------------------------------
    def units(self, epoch: int) -> list[Unit]:
        """This stream's units of an epoch, in reading order."""
        return [self.all_units[i] for i in self._unit_order(epoch)]

    def stream_docs(self, epoch: int = 0) -> int:
        """How many documents this stream serves in an epoch."""
        return sum(u.stop - u.start for u in self.units(epoch))

    def _unit_order(self, epoch: int) -> list[int]:
        count = len(self.all_units)
        order = np.random.default_rng([self.seed, epoch]).permutation(count) if self.shuffle else np.arange(count)
        return [int(i) for i in order[self.stream::self.streams]]

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        unit = self.all_units[index]
        path = self.files[unit.file]
        column = pq.ParquetFile(path).read_row_group(unit.row_group, columns=[COLUMN]).column(0).combine_chunks()
        if len(column) and column.values is not None:
            values = column.values.to_numpy(zero_copy_only=False)
        else:
            values = np.zeros(0, np.uint16)
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{path}: `{COLUMN}` holds {values.dtype}, expected a list of integer token ids")
        offsets = column.offsets.to_numpy()[unit.start:unit.stop + 1]
        rows = unit.stop - unit.start
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, index]).permutation(rows)
        else:
            order = np.arange(rows)
        return values, offsets, order

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> "ShardReader":
        return self

    def __next__(self) -> np.ndarray:
        while True:
            if self._units_epoch != self.epoch:
                self._units, self._units_epoch, self._loaded = self._unit_order(self.epoch), self.epoch, None
            if self.unit >= len(self._units):
                if not self.loop:
                    raise StopIteration
                self.epoch, self.unit, self.row = self.epoch + 1, 0, 0
                continue
            if self._loaded is None:
                self._loaded = self._read(self._units[self.unit])
            values, offsets, order = self._loaded
            if self.row >= len(order):
                self.unit, self.row, self._loaded = self.unit + 1, 0, None
                continue
            r = order[self.row]
            self.row += 1
            return values[offsets[r]:offsets[r + 1]]

    def state_dict(self) -> dict:
        """The cursor: where the next document comes from, plus what it is valid for."""
        return {"epoch": self.epoch, "unit": self.unit, "row": self.row, "seed": self.seed,
                "shuffle": self.shuffle, "streams": self.streams, "stream": self.stream,
                "units": len(self.all_units), "docs": self.num_docs}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("streams", self.streams),
                          ("stream", self.stream), ("units", len(self.all_units)), ("docs", self.num_docs)):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"the data cursor was saved with {key}={state[key]}, this reader has {key}={mine}: "
                    f"it belongs to other shards or another rank/worker layout")
        self.epoch, self.unit, self.row = int(state["epoch"]), int(state["unit"]), int(state["row"])
        self._units_epoch, self._loaded = None, None
