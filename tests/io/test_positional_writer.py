"""StreamingSafetensorsWriter.write_at: pieces written from many threads in any order make the
same file the safetensors library reads back bit for bit; a file with bytes missing never appears."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from safetensors.numpy import load_file

from rlsparse.io.safetensors_format import StreamingSafetensorsWriter


def test_pieces_in_any_order_from_threads_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.integers(0, 2**16, size=(37, 11), dtype=np.uint16), "empty": np.zeros((0, 3), np.uint16),
               "b": rng.integers(0, 2**31, size=(1000,), dtype=np.int32), "c": rng.integers(0, 255, size=(5,), dtype=np.uint8)}
    codes = {np.dtype(np.uint16): "U16", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}
    layout = [(n, codes[t.dtype], t.shape) for n, t in tensors.items()]
    pieces = []  # (name, byte offset, bytes): every tensor cut into uneven pieces
    for name, t in tensors.items():
        raw = t.tobytes()
        cuts = sorted(set(rng.integers(0, len(raw) + 1, size=4).tolist()) | {0, len(raw)})
        pieces += [(name, s, raw[s:e]) for s, e in zip(cuts, cuts[1:])]
    rng.shuffle(pieces)
    path = tmp_path / "x.safetensors"
    with StreamingSafetensorsWriter(path, layout) as w:
        w.metadata = {"format": "pt"}
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: w.write_at(*p), pieces))
    back = load_file(str(path))
    assert sorted(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert back[name].tobytes() == t.tobytes()


def test_missing_bytes_and_out_of_range_pieces_are_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError, match="writer closed after 4 of 8 bytes"):
        with StreamingSafetensorsWriter(path, [("a", "U8", (8,))]) as w:
            w.write_at("a", 0, b"\x01\x02\x03\x04")
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with StreamingSafetensorsWriter(path, [("a", "U8", (8,))]) as w:
        with pytest.raises(RuntimeError, match="outside"):
            w.write_at("a", 6, b"\x00\x00\x00")
        w.write_at("a", 0, bytes(8))
    assert load_file(str(path))["a"].tolist() == [0] * 8
