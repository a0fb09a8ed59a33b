"""Atomic outputs: umask respected, odd destinations never replaced, stale temporaries removed,
disk full as one line, temporaries cleaned on SIGTERM/SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from rlsparse.errors import OutputError
from rlsparse.io.atomic import write_json
from rlsparse.masks import Mask, MaskMeta, MaskWriter, pack


def _small_mask(path):
    bits = np.zeros(40, dtype=bool)
    bits[3] = True
    with MaskWriter(path, {"w": (5, 8)}) as w:
        w.write("w", pack(bits))
        w.set_meta(MaskMeta(shapes={"w": [5, 8]}, counts={"w": 1}))


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_mask_and_json_respect_the_umask(tmp_path, umask_022):
    _small_mask(tmp_path / "m.safetensors")
    write_json(tmp_path / "r.json", {"a": 1})
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o644


def test_symlink_destination_keeps_the_link(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json(link, {"a": 1})
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text()) == {"a": 1}


def test_fifo_destination_is_written_into_not_replaced(tmp_path):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    write_json(fifo, {"a": 1})
    reader.join(10)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert json.loads(got[0]) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_character_device_is_not_replaced(tmp_path):
    dev = tmp_path / "null"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    _small_mask(dev)
    write_json(dev, {"a": 1})
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    from rlsparse.io.atomic import _HOST, temp_name

    dest = tmp_path / "m.safetensors"
    mine = temp_name(dest)
    dead = mine.replace(f"-{os.getpid()}@", f"-{_dead_pid()}@")
    other_host = dead.replace(f"@{_HOST}-", "@elsewhere-")
    for name in (mine, dead, other_host):
        (tmp_path / name).write_bytes(b"x" * 100)
    _small_mask(dest)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([mine, other_host, "m.safetensors"])


class _FullDisk:
    """A file object whose writes fail with ENOSPC once ``room`` bytes were written."""

    def __init__(self, fh, room: int):
        self._fh, self._room = fh, room

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self._room:
            raise OSError(28, "No space left on device")
        self._room -= n
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def test_disk_full_at_the_write_call_is_one_line_error(tmp_path, monkeypatch):
    import rlsparse.io.safetensors_format as fmt

    real_fdopen = os.fdopen
    monkeypatch.setattr(fmt.os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode), room=100))
    with pytest.raises(OutputError, match=r"m.safetensors: cannot write \(No space left on device\); free some"):
        _small_mask(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (needs root and mount rights)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_file_system_mid_mask_leaves_nothing(tiny_fs):
    shapes = {f"w{i}": (512, 1024) for i in range(2)}  # 2 x 64 KiB packed: does not fit in 64 KiB
    with pytest.raises(OutputError, match="No space left on device"):
        with MaskWriter(tiny_fs / "m.safetensors", shapes) as w:
            for name, shape in shapes.items():
                w.write(name, np.zeros(shape[0] * shape[1] // 8, dtype=np.uint8))
            w.set_meta(MaskMeta(shapes={k: list(v) for k, v in shapes.items()}, counts=dict.fromkeys(shapes, 0)))
    assert list(tiny_fs.iterdir()) == []
    with pytest.raises(OutputError, match="r.json: cannot write .No space left on device."):
        write_json(tiny_fs / "r.json", {"x": "y" * 100_000})
    assert list(tiny_fs.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_mid_write_removes_the_temporary(tmp_path, sig):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        import numpy as np
        from rlsparse.cli.main import main
        from rlsparse.masks import MaskWriter
        import rlsparse.cli.main as m

        # A shell starts background jobs with SIGINT ignored (and Python then installs no Ctrl-C
        # handler); model a foreground command, which is where Ctrl-C reaches rlsparse.
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def fake(args):
            with MaskWriter({str(tmp_path / 'm.safetensors')!r}, {{"w": (8, 8)}}) as w:
                w.write("w", np.zeros(8, dtype=np.uint8)[:4])
                os.kill(os.getpid(), {int(sig)})
                time.sleep(30)
            return 0

        parser = m.make_parser
        def make():
            p = parser()
            p._subparsers._group_actions[0].choices["diff"].set_defaults(func=fake)
            return p
        m.make_parser = make
        sys.exit(main(["diff", "a", "b"]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 128 + int(sig), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "interrupted" in proc.stderr and "no output was written" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_too_long_output_name_is_one_line(tiny_pair, tmp_path, capsys):
    from rlsparse.cli.main import main

    base, ft = tiny_pair
    code = main(["diff", str(base), str(ft), "--quiet", "--json", str(tmp_path / ("x" * 300 + ".json"))])
    err = capsys.readouterr().err
    assert code == 2 and "too long" in err and err.count("\n") == 1, err


def test_json_to_dev_stdout_through_a_pipe(tiny_pair):
    base, ft = tiny_pair
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "rlsparse", "diff", str(base), str(ft), "--quiet", "--json",
                           "/dev/stdout"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["schema_version"] == 1
    assert os.path.islink("/dev/stdout") or stat.S_ISCHR(os.stat("/dev/stdout").st_mode)
