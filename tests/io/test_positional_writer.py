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


def _pieces(rng, tensors):
    """(name, byte offset, bytes) of every tensor cut into uneven pieces, shuffled."""
    pieces = []
    for name, t in tensors.items():
        raw = t.tobytes()
        cuts = sorted(set(rng.integers(0, len(raw) + 1, size=6).tolist()) | {0, len(raw)})
        pieces += [(name, s, raw[s:e]) for s, e in zip(cuts, cuts[1:])]
    rng.shuffle(pieces)
    return pieces


def test_direct_writes_round_trip_pieces_from_threads_placed_or_not(tmp_path):
    """O_DIRECT for the whole pages of each piece, the page cache for the pages pieces share:
    pieces of many pages, of less than a page, placed at their file phase in memory or not
    (bytes objects: an aligned copy), written from threads in any order, read back bit for bit."""
    rng = np.random.default_rng(1)
    tensors = {"a": rng.integers(0, 2**16, size=(300, 111), dtype=np.uint16),
               "tiny": rng.integers(0, 255, size=(7,), dtype=np.uint8),
               "b": rng.integers(0, 2**31, size=(20_000,), dtype=np.int32), "empty": np.zeros((0,), np.int32)}
    codes = {np.dtype(np.uint16): "U16", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}
    layout = [(n, codes[t.dtype], t.shape) for n, t in tensors.items()]
    pieces = _pieces(rng, tensors)
    path = tmp_path / "x.safetensors"
    with StreamingSafetensorsWriter(path, layout, direct=True) as w:
        assert w._dfd is not None  # /tmp here takes O_DIRECT: the direct path is what runs

        def put(piece):
            name, start, data = piece
            if start % 2:  # half the pieces placed at their file offset's phase, as apply does
                return w.write_at(name, start, data)
            phase = w.data_offset(name, start) % 4096
            raw = np.empty(len(data) + 2 * 4096, np.uint8)
            at = (-raw.ctypes.data) % 4096 + phase
            raw[at:at + len(data)] = np.frombuffer(data, np.uint8)
            w.write_at(name, start, raw[at:at + len(data)])

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(put, pieces))
        whole_pages = sum(max(0, (w.data_offset(n, s) + len(d)) // 4096 - -(-w.data_offset(n, s) // 4096)) * 4096
                          for n, s, d in pieces)
    assert w.direct_bytes == whole_pages > 0
    back = load_file(str(path))
    assert sorted(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert back[name].tobytes() == t.tobytes()


def test_direct_writer_falls_back_to_the_page_cache_where_o_direct_is_refused(tmp_path, monkeypatch):
    import os

    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")  # what tmpfs said before Linux 6.6
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    data = np.arange(10_000, dtype=np.uint16)
    path = tmp_path / "x.safetensors"
    with StreamingSafetensorsWriter(path, [("a", "U16", (10_000,))], direct=True) as w:
        w.write_at("a", 0, data[:6000].tobytes())
        w.write_at("a", 12_000, data[6000:].tobytes())
    assert w.direct_bytes == 0
    assert load_file(str(path))["a"].tobytes() == data.tobytes()


def test_direct_writes_refused_at_write_time_go_through_the_page_cache(tmp_path, monkeypatch):
    """A device that takes the O_DIRECT open but refuses the writes (EINVAL: an alignment it
    wants larger): that piece and every later one are written cached; the file is still right."""
    import os

    from rlsparse.io import safetensors_format

    real_pwrite = os.pwrite
    refused = []

    def pwrite(fd, data, pos):
        if fd == w._dfd:
            refused.append(pos)
            raise OSError(22, "Invalid argument")
        return real_pwrite(fd, data, pos)

    data = np.arange(40_000, dtype=np.uint16)
    path = tmp_path / "x.safetensors"
    with StreamingSafetensorsWriter(path, [("a", "U16", (40_000,))], direct=True) as w:
        monkeypatch.setattr(safetensors_format.os, "pwrite", pwrite)
        w.write_at("a", 0, data[:30_000].tobytes())
        w.write_at("a", 60_000, data[30_000:].tobytes())
    assert len(refused) == 1 and w.direct_bytes == 0  # tried once, then cached
    assert load_file(str(path))["a"].tobytes() == data.tobytes()
