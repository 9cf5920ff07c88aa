"""shared.tfrecord: framing read without TensorFlow, checked against TF's own writer."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import FailedPrecondition
from shared.tfrecord import split_records


def written_by_tf(path: Path, records: list[bytes]) -> bytes:
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return path.read_bytes()


@settings(max_examples=25, deadline=None)
@given(records=st.lists(st.binary(max_size=300), max_size=12))
def test_reads_back_what_tensorflow_wrote(tmp_path_factory: pytest.TempPathFactory, records: list[bytes]) -> None:
    data = written_by_tf(tmp_path_factory.mktemp("tfr") / "f", records)
    assert split_records(data, "f", limit=100) == records


def test_truncated_and_oversized_files_are_refused(tmp_path: Path) -> None:
    data = written_by_tf(tmp_path / "f", [b"one", b"two", b"three"])
    assert split_records(data, "f", limit=3) == [b"one", b"two", b"three"]
    with pytest.raises(FailedPrecondition, match="more than 2 records"):
        split_records(data, "f", limit=2)
    with pytest.raises(FailedPrecondition, match="record 2 is truncated"):
        split_records(data[:-1], "f", limit=3)
    with pytest.raises(FailedPrecondition, match="truncated record header"):
        split_records(data + b"\x01\x02", "f", limit=5)
    assert split_records(b"", "f", limit=1) == []
