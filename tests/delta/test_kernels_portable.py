"""The C kernels' portable paths: built here with ``-U__SSE2__ -U__BYTE_ORDER__`` (the compare's
plain loop instead of SSE2, the raw bits read a byte at a time instead of one unaligned 64-bit
load: what a non-x86 or big-endian build compiles), they code and decode the very bytes numpy
does. The ordinary build never runs these lines on this machine."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import rlsparse.delta as delta
from rlsparse.delta import compiled
from rlsparse.delta.format import PatchReader

from deltahelpers import assert_bit_identical, bits_tensor, change, load, random_bits, write
from test_golden import GOLDEN, _write_pair

SOURCE = Path(delta.__file__).parent / "_kernels.c"


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The kernels compiled without SSE2 and without the byte-order test, loaded as a module of
    their own (the installed one is untouched)."""
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    out = tmp_path_factory.mktemp("portable")
    ext = Extension("_kernels", [str(SOURCE)], extra_compile_args=["-U__SSE2__", "-U__BYTE_ORDER__"])
    cmd = build_ext(Distribution({"ext_modules": [ext]}))
    cmd.build_lib, cmd.build_temp = str(out), str(out / "tmp")
    cmd.ensure_finalized()
    try:
        cmd.run()
    except Exception as exc:  # no compiler or no Python headers: what the optional build tolerates
        pytest.skip(f"cannot compile the kernels here ({exc})")
    path = out / f"_kernels{sysconfig.get_config_var('EXT_SUFFIX')}"
    loader = importlib.machinery.ExtensionFileLoader("_kernels", str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_kernels", path, loader=loader))
    loader.exec_module(module)
    return module


def test_portable_changed_positions_match_numpy(portable):
    rng = np.random.default_rng(0)
    for width in (np.uint8, np.uint16, np.uint32, np.uint64):
        for n, density in ((1000, 0.3), (777, 0.01), (64 * 50 + 13, 0.7)):
            a = rng.integers(0, 200, size=n).astype(width)
            b = a.copy()
            idx = np.flatnonzero(rng.random(n) < density)
            b[idx] += width(1)
            out = np.empty(n, dtype=np.int64)
            k = portable.changed_positions(a, b, out, 5)
            assert out[:k].tolist() == (np.flatnonzero(a != b) + 5).tolist()


def _mixed_pair(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    shapes = {"a.weight": ("BF16", (300, 64), 0.05), "b.weight": ("F32", (97, 130), 0.3),
              "c.weight": ("F16", (512, 40), 0.001), "d.weight": ("BF16", (64, 64), 0.45)}
    base, ft = {}, {}
    for name, (code, shape, density) in shapes.items():
        bits = random_bits(rng, code, int(np.prod(shape)), small=False)
        base[name] = bits_tensor(bits, code, shape)
        ft[name] = bits_tensor(change(rng, bits, density, ulps=name != "d.weight"), code, shape)
    return write(root / "base", base), write(root / "ft", ft)


def test_portable_kernels_pack_and_apply_the_bytes_numpy_does(tmp_path, portable, monkeypatch):
    base, ft = _mixed_pair(tmp_path)
    gbase, gft = _write_pair(tmp_path / "golden")
    monkeypatch.setattr(compiled, "KERNELS", None)
    delta.pack(base, ft, tmp_path / "numpy.rlpatch", chunk_elements=3000)
    monkeypatch.setattr(compiled, "KERNELS", portable)
    delta.pack(base, ft, tmp_path / "portable.rlpatch", chunk_elements=3000)
    assert (tmp_path / "portable.rlpatch").read_bytes() == (tmp_path / "numpy.rlpatch").read_bytes()
    delta.apply(base, tmp_path / "portable.rlpatch", tmp_path / "out", parallel="threads")
    assert_bit_identical(load(tmp_path / "out"), load(ft))
    # and today's golden patch, byte for byte
    delta.pack(gbase, gft, tmp_path / "g.rlpatch", chunk_elements=1024)
    with PatchReader.open(GOLDEN) as g, PatchReader.open(tmp_path / "g.rlpatch") as p:
        assert p.read(0, p.size) == g.read(0, g.size)
    delta.apply(gbase, GOLDEN, tmp_path / "gout", parallel="threads")
    assert_bit_identical(load(tmp_path / "gout"), load(gft))
