"""WriteBehind: writes run in order on its thread, buffers are page-placed and reused (memory
stays at ``depth`` buffers), and a failed write is raised to the caller, never lost."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from rlsparse.io.memory import PAGE
from rlsparse.io.write_behind import WriteBehind


def test_writes_run_in_order_from_placed_buffers_that_are_reused(tmp_path):
    wb = WriteBehind(depth=2)
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    expected = bytearray(64 * 1000)
    bases = set()
    try:
        for k in range(64):
            phase = (k * 37) % PAGE
            buf = wb.buffer(1000, phase)
            assert buf.ctypes.data % PAGE == phase and buf.size == 1000
            bases.add(buf.base.ctypes.data)
            buf[:] = k
            expected[k * 1000:(k + 1) * 1000] = bytes([k]) * 1000
            wb.submit(os.pwrite, fd, buf, k * 1000, buffer=buf)
        wb.flush()
        assert os.pread(fd, len(expected), 0) == bytes(expected)
    finally:
        wb.close()
        os.close(fd)
    assert len(bases) <= 2  # two buffers, grown once, reused for all 64 writes
    assert wb._thread.is_alive() is False


def test_a_failed_write_is_raised_by_the_next_call_and_later_writes_are_dropped():
    wb = WriteBehind(depth=2)
    ran = []
    gate = threading.Event()

    def fail(_):
        gate.wait()
        raise OSError(28, "No space left on device")

    buf = wb.buffer(10)
    wb.submit(fail, 0, buffer=buf)
    buf2 = wb.buffer(10)
    wb.submit(ran.append, 1, buffer=buf2)
    gate.set()
    with pytest.raises(OSError, match="No space left"):
        wb.flush()
    assert ran == []  # the write after the failure never ran
    with pytest.raises(OSError, match="No space left"):
        wb.buffer(10)
    with pytest.raises(OSError):
        wb.close()
    assert not wb._thread.is_alive()
