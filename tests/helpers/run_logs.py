"""Read back what a training run logged: tensorboard event files, and the transaction log (`run-<id>.wandb`) of
an offline W&B run.

wandb 0.30 ships no Python reader for its run files (its core service, in Go, reads them for `wandb sync`), so
the reader is here: the file is a LevelDB-style log (a 7-byte header ':W&B', magic 0xBEE1, version 0; then 32 KiB
blocks of chunks, each with a CRC-32 of its type byte and data, a length and a type, FULL / FIRST / MIDDLE /
LAST), whose assembled payloads are `wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zlib
from typing import Dict, List

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def tensorboard_scalars(tensorboard_dir: str) -> Dict[str, Dict[int, float]]:
    """{tag: {step: value}} of every scalar below `tensorboard_dir`."""
    events = EventAccumulator(tensorboard_dir)
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def wandb_run_files(save_dir: str) -> List[str]:
    """The offline runs' transaction logs below a --wandb-save-dir."""
    return sorted(glob.glob(os.path.join(save_dir, "wandb", "offline-run-*", "run-*.wandb")))


def wandb_records(path: str) -> list:
    """Every record of a W&B run file, in order; a damaged chunk fails its checksum."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B run file ({ident!r}, {magic:#x})"
    records, payload, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at byte {pos}"
        payload = chunk if kind in (_FULL, _FIRST) else payload + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
    return records


def wandb_history(records: list) -> List[dict]:
    """The history rows ({key: value}, with W&B's `_step`), one per committed step."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                         for item in record.history.item})
    return rows
