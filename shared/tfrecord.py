"""TFRecord framing, read and written without TensorFlow.

A TFRecord file is a sequence of records, each ``uint64 length``,
``uint32 masked_crc32c(length)``, ``length`` bytes of data and
``uint32 masked_crc32c(data)``, little-endian.  This reader checks the
framing (a short or garbled tail is an error: TF's own reader would take it
for the end of the file) but not the CRCs: a worker verifies those with
TensorFlow's reader when it loads the version, before the router replays the
same file (``router.control.warmup``).  The writer (request logs:
``router/reqlog.py``) computes both CRCs, so TensorFlow's ``TFRecordDataset``
reads its files.
"""

from __future__ import annotations

import struct
from pathlib import Path

from shared.errors import FailedPrecondition

_HEADER = 12  # length (8) + its CRC (4)
_FOOTER = 4  # the data's CRC


def split_records(data: bytes, path: Path | str, limit: int) -> list[bytes]:
    """The records of a whole TFRecord file; FAILED_PRECONDITION if it is cut short
    or holds more than ``limit`` records."""
    offset = 0
    records: list[bytes] = []
    while offset < len(data):
        if len(data) - offset < _HEADER:
            raise FailedPrecondition(f"warm-up file {path} ends in a truncated record header")
        length = struct.unpack_from("<Q", data, offset)[0]
        end = offset + _HEADER + length + _FOOTER
        if end > len(data):
            raise FailedPrecondition(f"warm-up file {path}: record {len(records)} is truncated")
        if len(records) == limit:
            raise FailedPrecondition(f"warm-up file {path} has more than {limit} records")
        records.append(data[offset + _HEADER:offset + _HEADER + length])
        offset = end
    return records


def _masked_crc(data: bytes) -> int:
    import google_crc32c  # the C implementation: a record's CRC costs microseconds

    crc = int(google_crc32c.value(data))
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord record around ``data``, CRCs included (TensorFlow's reader checks them)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))
