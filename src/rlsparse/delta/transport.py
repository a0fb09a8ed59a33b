"""Byte transports for weight sync: the sender's ``send(payload)``, the receiver's ``receive()``.

Anything with these two methods works (a queue, an RPC, NCCL); three ship here:
``FileTransport`` (a shared folder, one file per sync, written atomically), ``SocketTransport``
(length-prefixed frames over a stream socket, e.g. a local TCP or Unix socket) and
``GlooTransport`` (``torch.distributed`` point-to-point, e.g. the gloo backend on CPU).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

from rlsparse.errors import OutputError, PatchError

_LEN = struct.Struct("<Q")


class FileTransport:
    """Payloads as ``sync-000001.rlpatch``, ``sync-000002.rlpatch``... in a shared folder.

    Example:
        >>> FileTransport("/shared/sync").send(payload)
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._sent = len(list(self.folder.glob("sync-*.rlpatch")))
        self._received = 0

    def _path(self, k: int) -> Path:
        return self.folder / f"sync-{k:06d}.rlpatch"

    def send(self, payload: bytes) -> Path:
        from rlsparse.io.atomic import atomic_path

        self._sent += 1
        path = self._path(self._sent)
        with atomic_path(path) as tmp:
            tmp.write_bytes(payload)
        return path

    def receive(self, timeout: float | None = None) -> bytes:
        path = self._path(self._received + 1)
        t0 = time.monotonic()
        while not path.exists():
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{path}: no payload after {timeout} s")
            time.sleep(0.01)
        self._received += 1
        return path.read_bytes()


class SocketTransport:
    """Length-prefixed payloads over a connected stream socket.

    Example:
        >>> a, b = SocketTransport.pair()   # two ends in one process (tests)
        >>> a.send(b"..."); b.receive()
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple["SocketTransport", "SocketTransport"]:
        a, b = socket.socketpair()
        return cls(a), cls(b)

    @classmethod
    def connect(cls, host: str, port: int) -> "SocketTransport":
        try:
            return cls(socket.create_connection((host, port)))
        except OSError as exc:
            raise OutputError(f"{host}:{port}: cannot connect ({exc.strerror or exc}); start the receiver first") from None

    def send(self, payload: bytes) -> None:
        self.sock.sendall(_LEN.pack(len(payload)))
        self.sock.sendall(payload)

    def _exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise PatchError(f"socket closed after {got} of {n} bytes; the sender stopped mid-payload")
            got += k
        return bytes(buf)

    def receive(self) -> bytes:
        (n,) = _LEN.unpack(self._exactly(_LEN.size))
        return self._exactly(n)

    def close(self) -> None:
        self.sock.close()


class GlooTransport:
    """Point-to-point over an initialised ``torch.distributed`` process group (gloo on CPU).

    Example:
        >>> GlooTransport(peer=1).send(payload)     # on rank 0
        >>> GlooTransport(peer=0).receive()         # on rank 1
    """

    def __init__(self, peer: int):
        self.peer = peer

    def send(self, payload: bytes) -> None:
        import torch
        import torch.distributed as dist

        dist.send(torch.tensor([len(payload)], dtype=torch.int64), self.peer)
        if payload:
            dist.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), self.peer)

    def receive(self) -> bytes:
        import torch
        import torch.distributed as dist

        n = torch.zeros(1, dtype=torch.int64)
        dist.recv(n, self.peer)
        buf = torch.empty(int(n.item()), dtype=torch.uint8)
        if buf.numel():
            dist.recv(buf, self.peer)
        return buf.numpy().tobytes()
