"""Read the records of an offline W&B run file (`run-<id>.wandb`) back, for tests.

The file is a W&B header followed by a LevelDB-style log of protobuf `Record`s:
blocks of 32 KiB, each record chunk prefixed by crc32 (4 bytes), length (2, little
endian) and type (1: full, 2: first, 3: middle, 4: last).

W&B's service process writes the file on its own time: after `wandb.finish()` returns, the file can
still lack the run's last records (a CI run once read it with no history at all). Tests find run files
with `finished_runs`, which waits for each file's exit record, never with a bare glob.
"""
import glob
import json
import struct
import time
from pathlib import Path

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)


def records(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length:  # the service is still writing this record
            return
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(path):
    """Every logged row as a dict {key: value}."""
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            yield {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}


def run_info(path):
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run


def finished(path) -> bool:
    """Whether the run file holds the run's exit record (written by `wandb.finish()`), all readable."""
    if len(open(path, "rb").read(HEADER)) < HEADER:  # the service has not written the header yet
        return False
    try:
        return any(record.WhichOneof("record_type") == "exit" for record in records(path))
    except DecodeError:  # a record half written
        return False


def finished_runs(folder, timeout: float = 60) -> list[str]:
    """The offline run files under folder/wandb, once each is finished (waiting up to `timeout` s);
    fails the test naming the files that are not. Raises AssertionError for a file that is not a W&B
    run file."""
    pattern = str(Path(folder) / "wandb" / "offline-run-*" / "run-*.wandb")
    deadline = time.monotonic() + timeout
    while (waiting := [path for path in glob.glob(pattern) if not finished(path)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    paths = sorted(glob.glob(pattern))
    assert not waiting, f"W&B run files without their exit record after {timeout} s: {waiting}"
    return paths
