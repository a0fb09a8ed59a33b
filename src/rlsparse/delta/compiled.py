"""The compiled kernels of ``pack`` and ``apply``: C (``_kernels.c``), built at install, or None.

``codec.decode_chunk`` rebuilds a ``SPARSE_DELTA`` chunk in ~15 numpy passes over its changed
elements (symbols to values, raw bits, positions, the ordered view and back): ~45 numpy calls
per stream, ~110 ns per changed element on the sparse real pairs. The kernels module
(:data:`KERNELS`) does the same work in one compiled pass per chunk and writes the very same
bits; ``codec`` passes it around as ``compiled``:

- ``sparse_delta_apply``: decode a ``SPARSE_DELTA`` chunk over its base bits (positions outside
  the chunk and raw bits past their bytes refused: False);
- ``sparse_delta_symbols``: the symbols, raw bits and histograms of a sparse chunk's two streams
  (gaps, ULP differences) and the byte-plane histograms of its new bits, in one pass instead of
  ~20 numpy passes;
- ``pack_raw_bits``: a stream's raw low bits in their groups (``codec._encode_uints``' layout);
- ``pack_nibbles``: a stream of symbols below 16, two per byte (``codec._encode_symbols_zstd``);
- ``changed_positions``: ``np.flatnonzero(old != new)`` in one pass (SSE2 compares, 64 elements
  per test), for ``pack.changes_and_digests``;
- ``scan_symbols16``: for 2-byte elements (bf16, fp16), ``changed_positions`` and
  ``sparse_delta_symbols`` in one pass a block at a time, the positions never written down
  (``codec.SparseScan``: what ``pack`` uses for such chunks).

They take numpy arrays (the buffer protocol), check every index and release the GIL. Being an
extension module (``setup.py`` builds it at ``pip install``; in a source tree, ``python setup.py
build_ext --inplace``), loading it costs nothing measurable, so ``pack`` and ``apply`` use it for
every chunk it fits (dtypes up to 32 bits). Where it was not built (no C compiler at install),
:data:`KERNELS` is None and numpy codes the same bytes.
"""

from __future__ import annotations

try:
    from rlsparse.delta import _kernels as KERNELS
except ImportError:  # not built: the numpy paths of ``codec`` and ``pack`` give the same bytes
    KERNELS = None


def name() -> str:
    """Which code codes and decodes in this process: "C" (:data:`KERNELS`) or "numpy"."""
    return "numpy" if KERNELS is None else "C"
