"""Read an offline W&B run (``run-<id>.wandb``) back with wandb's own protobuf ``Record``.

The file is wandb's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then
32 KiB blocks of chunks, each ``<crc32 u32, length u16, type u8>`` + payload (type 1 full, 2 first,
3 middle, 4 last); a block tail shorter than a chunk header is zero padding. Payloads are
serialized ``wandb.proto.wandb_internal_pb2.Record`` messages.
"""

import json
import struct
import time
from pathlib import Path

BLOCK, HEADER = 32768, 7


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
    pos, buf, out = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        if kind == 0 and n == 0:
            break
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def finished_records(path: Path, wait_s: float = 60.0) -> list:
    """The records of a finished run: wandb's service may still be writing the file when
    ``run.finish()`` returns, so poll until the ``exit`` record is there (or ``wait_s`` passes)."""
    deadline = time.monotonic() + wait_s
    while True:
        recs = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def history_and_config(path: Path) -> tuple[list[dict], dict, object]:
    """(history rows as {key: value}, the run config {key: value}, the run record) of one .wandb file."""
    history, config, run = [], {}, None
    for rec in finished_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            run = rec.run
            config |= {u.key: json.loads(u.value_json) for u in rec.run.config.update}
        elif kind == "config":
            config |= {u.key: json.loads(u.value_json) for u in rec.config.update}
    return history, config, run
