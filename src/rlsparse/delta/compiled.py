"""The compiled kernels of the sparse encodings: C (``_kernels.c``), built at install, or None.

``codec.decode_chunk`` rebuilds a ``SPARSE_DELTA`` chunk in ~15 numpy passes over its changed
elements (symbols to values, raw bits, positions, the ordered view and back): ~45 numpy calls
per stream, ~110 ns per changed element on the sparse real pairs. :data:`sparse_delta_apply`
does the same work in one compiled pass per chunk, writes the very same bits and refuses
positions outside the chunk. :data:`sparse_delta_symbols` is the encoder's counterpart: the
symbols, raw bits and histograms of both sparse streams (gaps, ULP differences) and the
byte-plane histograms of the new bits, in one pass instead of ~20 numpy passes;
``codec.encode_chunk`` codes the very same bytes from them. :data:`changed_positions` is
``np.flatnonzero(old != new)`` in one pass (SSE2 compares, 64 elements per test), for
``pack.changes_and_digests``. All three release the GIL.

They are a C extension module (``setup.py`` builds it at ``pip install``; in a source tree,
``python setup.py build_ext --inplace``), so loading them costs nothing measurable: ``pack`` and
``apply`` use them for every chunk they fit (dtypes up to 32 bits). Where the module was not
built (no C compiler at install), both names are None and numpy codes the same bytes.
"""

from __future__ import annotations

try:
    from rlsparse.delta._kernels import changed_positions, sparse_delta_apply, sparse_delta_symbols
except ImportError:  # not built: the numpy paths of ``codec`` and ``pack`` give the same bytes
    changed_positions = sparse_delta_apply = sparse_delta_symbols = None


def kernels() -> str:
    """Which code decodes and codes sparse chunks in this process: "C" or "numpy"."""
    return "C" if None not in (changed_positions, sparse_delta_apply, sparse_delta_symbols) else "numpy"
