/* rlsparse.delta._kernels: the sparse encodings' compiled kernels, built at install.
 *
 * sparse_delta_apply   decodes a SPARSE_DELTA chunk over its base bits in one pass;
 * raw_layout           says where a stream's raw bits lie (the decoder's layout checks);
 * sparse_delta_symbols makes a sparse chunk's symbols, raw bits and histograms in one pass;
 * pack_raw_bits        packs a stream's raw bits, pack_nibbles its symbols below 16;
 * changed_positions    finds where two arrays differ;
 * scan_symbols16       the last two in one pass for 2-byte elements, a block at a time.
 *
 * They compute exactly what the numpy paths of codec.py compute (the tests compare them on
 * random chunks); codec.py documents the format. Arrays arrive through the buffer protocol
 * (numpy arrays, C-contiguous); every index is checked, so damaged data gives False or a
 * ValueError, never a read or write outside a buffer. The GIL is released while they run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define DIRECT 16 /* values below this are symbols of their own */
#define ALPHABET 256
#define MAX_RAW 61 /* raw bits of one value: bit length (<= 64) minus 3 */

/* ------------------------------------------------------------------ buffers */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

#define WIDTH_1_TO_4 0 /* take(): elements of 1, 2 or 4 bytes */
#define WIDTH_1_TO_8 -1 /* take(): elements of 1, 2, 4 or 8 bytes */

/* An integer array argument: C-contiguous, elements of ``itemsize`` bytes (or WIDTH_1_TO_4,
 * WIDTH_1_TO_8), at least ``min_len`` of them, writable if asked. Sets a ValueError naming it
 * otherwise. */
static int take(PyObject *obj, Buf *b, const char *fn, const char *name, Py_ssize_t itemsize,
                Py_ssize_t min_len, int writable)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &b->view, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: %s must be a C-contiguous%s integer array", fn, name,
                     writable ? ", writable" : "");
        return -1;
    }
    b->held = 1;
    const char *f = b->view.format ? b->view.format : "B";
    char code = f[strlen(f) - 1];
    Py_ssize_t size = b->view.itemsize;
    int width_ok = itemsize > 0 ? size == itemsize
                                : size == 1 || size == 2 || size == 4 || (itemsize == WIDTH_1_TO_8 && size == 8);
    if (!strchr("bBhHiIlLqQ", code) || !width_ok || b->view.len / size < min_len) {
        PyErr_Format(PyExc_ValueError, "%s: %s has elements of %zd bytes (format %s) and %zd of them; expected "
                     "integers of %s bytes, at least %zd", fn, name, size, f, b->view.len / size,
                     itemsize == 8 ? "8" : itemsize == 4 ? "4" : itemsize == 1 ? "1"
                     : itemsize == WIDTH_1_TO_8 ? "1, 2, 4 or 8" : "1, 2 or 4", min_len);
        return -1;
    }
    return 0;
}

static void release(Buf *bufs, int n)
{
    for (int i = 0; i < n; i++)
        if (bufs[i].held)
            PyBuffer_Release(&bufs[i].view);
}

static inline uint64_t load(const void *p, Py_ssize_t i, int size)
{
    switch (size) {
    case 1: return ((const uint8_t *)p)[i];
    case 2: return ((const uint16_t *)p)[i];
    default: return ((const uint32_t *)p)[i];
    }
}

static inline void store(void *p, Py_ssize_t i, int size, uint64_t x)
{
    switch (size) {
    case 1: ((uint8_t *)p)[i] = (uint8_t)x; break;
    case 2: ((uint16_t *)p)[i] = (uint16_t)x; break;
    default: ((uint32_t *)p)[i] = (uint32_t)x; break;
    }
}

/* ------------------------------------------------------------------ decode */

/* k (<= 61) bits, little bit order, of ``raw`` (``len`` bytes) from bit ``pos``; the caller
 * has checked that pos + k <= 8 * len. */
static inline uint64_t raw_bits(const uint8_t *raw, Py_ssize_t len, uint64_t pos, int k)
{
    uint64_t byte = pos >> 3;
    int off = (int)(pos & 7);
    uint64_t bits;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (byte + 8 <= (uint64_t)len) { /* one unaligned 64-bit load; the 9th byte only for wide fields */
        uint64_t word;
        memcpy(&word, raw + byte, 8);
        bits = word >> off;
        if (off + k > 64)
            bits |= (uint64_t)raw[byte + 8] << (64 - off);
        return bits & ((UINT64_C(1) << k) - 1);
    }
#endif
    bits = 0;
    for (int got = 0; got < k;) {
        int take_bits = 8 - off < k - got ? 8 - off : k - got;
        bits |= ((uint64_t)(raw[byte] >> off) & ((UINT64_C(1) << take_bits) - 1)) << got;
        got += take_bits;
        off = 0;
        byte++;
    }
    return bits;
}

/* The next value of a stream: its symbol below 16, else the symbol's base and its raw bits,
 * read at the cursor of its raw-bit count. 0 where the raw bits run past the stream's bytes. */
static inline int next_value(uint8_t s, const uint8_t *raw, Py_ssize_t raw_len, uint64_t *cur,
                             const uint64_t *sym_base, const uint8_t *sym_nbits, uint64_t *out)
{
    if (s < DIRECT) {
        *out = s;
        return 1;
    }
    int k = sym_nbits[s];
    if (k > MAX_RAW || (uint64_t)k > 8 * (uint64_t)raw_len || cur[k] > 8 * (uint64_t)raw_len - k)
        return 0;
    *out = sym_base[s] | raw_bits(raw, raw_len, cur[k], k);
    cur[k] += k;
    return 1;
}

#define BLOCK 64 /* positions decoded ahead of their elements, whose cache lines are fetched meanwhile */

/* (A copy of this loop per width and kind, called through a switch, measured 5-10% slower.) */
static int apply_loop(uint8_t *old, Py_ssize_t n, int size, const uint8_t *gsym, const uint8_t *graw,
                      Py_ssize_t graw_len, const int64_t *gstart, const uint8_t *dsym, const uint8_t *draw,
                      Py_ssize_t draw_len, const int64_t *dstart, Py_ssize_t m, const uint64_t *sym_base,
                      const uint8_t *sym_nbits, int is_float)
{
    uint64_t gcur[65], dcur[65];
    for (int k = 0; k < 65; k++) { /* a negative start reads as huge: refused by the bound check */
        gcur[k] = (uint64_t)gstart[k];
        dcur[k] = (uint64_t)dstart[k];
    }
    int width = 8 * size;
    uint64_t mask = (UINT64_C(1) << width) - 1, top = UINT64_C(1) << (width - 1), low = top - 1;
    uint64_t next = 0; /* the first position the next gap counts from */
    Py_ssize_t at[BLOCK];
    for (Py_ssize_t i0 = 0; i0 < m; i0 += BLOCK) {
        Py_ssize_t count = m - i0 < BLOCK ? m - i0 : BLOCK;
        for (Py_ssize_t j = 0; j < count; j++) {
            uint64_t gap;
            if (!next_value(gsym[i0 + j], graw, graw_len, gcur, sym_base, sym_nbits, &gap) || gap >= (uint64_t)n
                || next + gap >= (uint64_t)n)
                return 0;
            at[j] = (Py_ssize_t)(next + gap);
            next = at[j] + 1;
            __builtin_prefetch(old + at[j] * size, 1);
        }
        for (Py_ssize_t j = 0; j < count; j++) {
            uint64_t z;
            if (!next_value(dsym[i0 + j], draw, draw_len, dcur, sym_base, sym_nbits, &z))
                return 0;
            uint64_t step = ((z >> 1) ^ (UINT64_C(0) - (z & 1))) & mask; /* unzigzag, wrapped to the width */
            uint64_t x = load(old, at[j], size);
            if (is_float) { /* onto the ordered line (negative: every bit flipped; else the sign set), step, back */
                if (x & top)
                    x ^= low;
                x ^= top;
                x = (x + step) & mask;
                x ^= top;
                if (x & top)
                    x ^= low;
            } else {
                x = (x + step) & mask;
            }
            store(old, at[j], size, x);
        }
    }
    return 1;
}

static const char layout_doc[] =
    "raw_layout(sym, sym_nbits, width_bits, start)\n"
    "--\n\n"
    "Where a stream's raw low bits lie (codec._take_raw's layout): the values with k raw bits\n"
    "(``sym_nbits[s]`` of each symbol ``s``; uint8 symbols) are packed together, groups by ascending k,\n"
    "each starting on a byte. Writes the first bit of each k's group into ``start`` (65 int64) and\n"
    "returns the bytes of all groups; -1 where a symbol's raw bits do not fit a ``width_bits``-bit\n"
    "value (k + 3 > width_bits: damaged data). Releases the GIL.";

static PyObject *raw_layout(PyObject *self, PyObject *args)
{
    static const char *fn = "raw_layout";
    PyObject *o[3];
    int width_bits;
    if (!PyArg_ParseTuple(args, "OOiO:raw_layout", &o[0], &o[1], &width_bits, &o[2]))
        return NULL;
    Buf b[3] = {{{0}}};
    static const char *names[3] = {"sym", "sym_nbits", "start"};
    static const Py_ssize_t sizes[3] = {1, 1, 8}, mins[3] = {0, ALPHABET, 65};
    for (int i = 0; i < 3; i++) {
        if (take(o[i], &b[i], fn, names[i], sizes[i], mins[i], i == 2) < 0) {
            release(b, 3);
            return NULL;
        }
    }
    const uint8_t *sym = b[0].view.buf, *sym_nbits = b[1].view.buf;
    int64_t *start = b[2].view.buf;
    Py_ssize_t m = b[0].view.len, count[ALPHABET] = {0};
    int64_t nbytes = 0;
    Py_BEGIN_ALLOW_THREADS
    /* four histograms, summed after: a run of one symbol (most of a stream) does not make every
     * increment wait for the one before it */
    Py_ssize_t part[3][ALPHABET] = {{0}}, i = 0;
    for (; i + 4 <= m; i += 4) {
        count[sym[i]]++;
        part[0][sym[i + 1]]++;
        part[1][sym[i + 2]]++;
        part[2][sym[i + 3]]++;
    }
    for (; i < m; i++)
        count[sym[i]]++;
    for (int s = 0; s < ALPHABET; s++)
        count[s] += part[0][s] + part[1][s] + part[2][s];
    int64_t per_k[65] = {0};
    for (int s = 0; s < ALPHABET; s++) {
        int k = sym_nbits[s];
        if (!count[s])
            continue;
        if (k > 64 || (k && k + 3 > width_bits)) {
            nbytes = -1;
            break;
        }
        per_k[k] += count[s];
    }
    if (nbytes == 0) {
        for (int k = 0; k < 65; k++) {
            start[k] = 8 * nbytes;
            nbytes += (per_k[k] * k + 7) / 8;
        }
    }
    Py_END_ALLOW_THREADS
    release(b, 3);
    return PyLong_FromLongLong(nbytes);
}

static const char apply_doc[] =
    "sparse_delta_apply(old, gsym, graw, gstart, dsym, draw, dstart, sym_base, sym_nbits, width, is_float)\n"
    "--\n\n"
    "Write a SPARSE_DELTA chunk's new bits over ``old`` (its base bits: unsigned, ``width`` = 8, 16\n"
    "or 32 bits, writable). ``gsym`` / ``dsym``: the symbols (uint8) of the gaps between changed\n"
    "positions and of the zigzagged ULP differences; ``graw`` / ``draw``: their raw low bits (bytes);\n"
    "``gstart`` / ``dstart``: the first bit of each raw-bit count's group (65 int64); ``sym_base`` /\n"
    "``sym_nbits``: each symbol's base value (uint64) and raw-bit count (uint8). Returns False where\n"
    "the data is damaged (a position outside the chunk, raw bits past their bytes); ``old`` is then\n"
    "partly written. Releases the GIL.";

static PyObject *sparse_delta_apply(PyObject *self, PyObject *args)
{
    static const char *fn = "sparse_delta_apply";
    PyObject *o[9];
    int width, is_float;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOip:sparse_delta_apply", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                          &o[6], &o[7], &o[8], &width, &is_float))
        return NULL;
    Buf b[9] = {{{0}}};
    static const char *names[9] = {"old", "gsym", "graw", "gstart", "dsym", "draw", "dstart", "sym_base", "sym_nbits"};
    static const Py_ssize_t sizes[9] = {0, 1, 1, 8, 1, 1, 8, 8, 1};
    static const Py_ssize_t mins[9] = {0, 0, 0, 65, 0, 0, 65, ALPHABET, ALPHABET};
    for (int i = 0; i < 9; i++) {
        if (take(o[i], &b[i], fn, names[i], sizes[i], mins[i], i == 0) < 0) {
            release(b, 9);
            return NULL;
        }
    }
    int size = (int)b[0].view.itemsize;
    Py_ssize_t m = b[1].view.len;
    if (width != 8 * size || b[4].view.len != m) {
        PyErr_Format(PyExc_ValueError, "%s: old has %d-bit elements and width is %d; the two symbol streams have "
                     "%zd and %zd values; expected the same on each side", fn, 8 * size, width, m, b[4].view.len);
        release(b, 9);
        return NULL;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = apply_loop(b[0].view.buf, b[0].view.len / size, size, b[1].view.buf, b[2].view.buf, b[2].view.len,
                    b[3].view.buf, b[4].view.buf, b[5].view.buf, b[5].view.len, b[6].view.buf, m,
                    b[7].view.buf, b[8].view.buf, is_float);
    Py_END_ALLOW_THREADS
    release(b, 9);
    return PyBool_FromLong(ok);
}

/* ------------------------------------------------------------------ encode */

typedef struct {
    uint8_t *sym;
    int64_t *where;
    uint8_t *nbits;
    uint32_t *extra;
    int64_t *counts;
    Py_ssize_t big; /* values with raw bits so far */
} Stream;

/* Value ``v`` (< 2**32), the ``i``-th of its stream, as codec._symbolize codes it: below 16 its
 * own symbol; else (bit length, next two bits) with the rest raw. */
static inline void put_symbol(Stream *s, uint64_t v, Py_ssize_t i, const int64_t *bitlen16)
{
    if (v < DIRECT) {
        s->sym[i] = (uint8_t)v;
        s->counts[v]++;
        return;
    }
    int length = v < 65536 ? (int)bitlen16[v] : 16 + (int)bitlen16[v >> 16];
    int k = length - 3;
    int sym = DIRECT + (length - 5) * 4 + (int)((v >> k) & 3);
    s->sym[i] = (uint8_t)sym;
    s->counts[sym]++;
    s->where[s->big] = i;
    s->nbits[s->big] = (uint8_t)k;
    s->extra[s->big] = (uint32_t)(v & ((UINT64_C(1) << k) - 1));
    s->big++;
}

/* 0 where ``idx`` is not ascending inside the chunk. */
#define AHEAD 16 /* the encoder fetches the elements this many changes ahead */

static int symbols_loop(const uint8_t *old, const uint8_t *new, Py_ssize_t n, int size, const int64_t *idx,
                        Py_ssize_t m, const int64_t *bitlen16, int is_float, Stream *g, Stream *d, void *values,
                        int64_t *planes)
{
    int width = 8 * size;
    uint64_t mask = (UINT64_C(1) << width) - 1, top = UINT64_C(1) << (width - 1);
    int64_t prev = -1;
    for (Py_ssize_t i = 0; i < m; i++) {
        if (i + AHEAD < m && idx[i + AHEAD] >= 0 && idx[i + AHEAD] < n) { /* a hint: checked, never faults */
            __builtin_prefetch(old + idx[i + AHEAD] * size);
            __builtin_prefetch(new + idx[i + AHEAD] * size);
        }
        int64_t p = idx[i];
        if (p <= prev || p >= n || p - prev - 1 > (int64_t)UINT32_MAX)
            return 0;
        put_symbol(g, (uint64_t)(p - prev - 1), i, bitlen16);
        prev = p;
        uint64_t a = load(old, p, size), b = load(new, p, size);
        store(values, i, size, b);
        for (int j = 0; j < size; j++)
            planes[256 * j + ((b >> (8 * j)) & 255)]++;
        if (is_float) { /* onto the ordered line: negative flips every bit, else the sign bit is set */
            a ^= (a & top) ? mask : top;
            b ^= (b & top) ? mask : top;
        }
        uint64_t diff = (b - a) & mask;
        /* zigzag of the difference as a signed width-bit integer */
        put_symbol(d, (diff & top) ? ((diff << 1) ^ mask) & mask : diff << 1, i, bitlen16);
    }
    return 1;
}

/* The loop above for 2-byte elements (bf16, fp16, 16-bit ints: the common case), 1.4x faster
 * on the dense synthetic pair's chunks: the bit length by a count of leading zeros instead of a
 * table, the streams' arrays and the histograms in locals the compiler can keep in registers or
 * on the stack (through the Stream structs, every byte store could alias them: each would be
 * reloaded). Measured and not kept: four interleaved copies of each histogram (against the wait
 * on a counter incremented again and again: 10% slower), appending the values with raw bits
 * without a branch (30% slower where few have any). */
#define FLUSH (1 << 30) /* changes counted before the 32-bit counters are added up (no overflow) */

typedef struct {
    uint32_t g[ALPHABET], d[ALPHABET], lo[256], hi[256];
} Hist16;

typedef struct {
    uint8_t *restrict sym;
    int64_t *restrict where;
    uint8_t *restrict nbits;
    uint32_t *restrict extra;
    Py_ssize_t big;
} Out16;

/* Value ``v`` (< 2**32), the ``i``-th of its stream, as put_symbol codes it; returns its symbol
 * (the caller counts it). */
static inline __attribute__((always_inline)) unsigned put_symbol16(Out16 *s, uint64_t v, Py_ssize_t i)
{
    int big = v >= DIRECT;
    int k = big ? 64 - __builtin_clzll(v) - 3 : 0;
    unsigned sym = big ? DIRECT + (k - 2) * 4 + (unsigned)((v >> k) & 3) : (unsigned)v;
    s->sym[i] = (uint8_t)sym;
    if (!big)
        return sym;
    s->where[s->big] = i;
    s->nbits[s->big] = (uint8_t)k;
    s->extra[s->big] = (uint32_t)(v & ((UINT64_C(1) << k) - 1));
    s->big++;
    return sym;
}

static void flush16(Hist16 *h, Stream *g, Stream *d, int64_t *planes)
{
    for (int x = 0; x < 256; x++) {
        g->counts[x] += h->g[x];
        d->counts[x] += h->d[x];
        planes[x] += h->lo[x];
        planes[256 + x] += h->hi[x];
    }
    memset(h, 0, sizeof *h);
}

/* The ``i``-th change of a 2-byte chunk: ``gap`` unchanged elements after the previous one, from
 * ``a`` to ``b`` (``flip_neg`` / ``flip_pos``: onto the ordered line, for floats; else 0). */
static inline __attribute__((always_inline)) void change16(Hist16 *h, Out16 *go, Out16 *dout,
                                                           uint16_t *restrict values, Py_ssize_t i, uint64_t gap,
                                                           uint16_t a, uint16_t b, uint16_t flip_neg, uint16_t flip_pos)
{
    h->g[put_symbol16(go, gap, i)]++;
    values[i] = b;
    h->lo[b & 255]++;
    h->hi[b >> 8]++;
    a ^= (a & 0x8000) ? flip_neg : flip_pos;
    uint16_t diff = (uint16_t)((b ^ ((b & 0x8000) ? flip_neg : flip_pos)) - a);
    uint16_t z = (uint16_t)((diff << 1) ^ ((diff & 0x8000) ? 0xFFFF : 0)); /* zigzag */
    h->d[put_symbol16(dout, z, i)]++;
}

static int symbols_loop16(const uint16_t *restrict old, const uint16_t *restrict new, Py_ssize_t n,
                          const int64_t *restrict idx, Py_ssize_t m, int is_float, Stream *g, Stream *d,
                          uint16_t *restrict values, int64_t *planes)
{
    Hist16 h;
    memset(&h, 0, sizeof h);
    Out16 go = {g->sym, g->where, g->nbits, g->extra, 0}, dout = {d->sym, d->where, d->nbits, d->extra, 0};
    /* onto the ordered line: negative flips every bit, else the sign bit is set */
    const uint16_t flip_neg = is_float ? 0xFFFF : 0, flip_pos = is_float ? 0x8000 : 0;
    int64_t prev = -1;
    int ok = 1;
    for (Py_ssize_t i0 = 0; i0 < m && ok; i0 += FLUSH) {
        Py_ssize_t end = m - i0 < FLUSH ? m : i0 + FLUSH;
        for (Py_ssize_t i = i0; i < end; i++) {
            if (i + AHEAD < m && idx[i + AHEAD] >= 0 && idx[i + AHEAD] < n) { /* a hint: checked, never faults */
                __builtin_prefetch(old + idx[i + AHEAD]);
                __builtin_prefetch(new + idx[i + AHEAD]);
            }
            int64_t p = idx[i];
            if (p <= prev || p >= n || p - prev - 1 > (int64_t)UINT32_MAX) {
                ok = 0;
                break;
            }
            change16(&h, &go, &dout, values, i, (uint64_t)(p - prev - 1), old[p], new[p], flip_neg, flip_pos);
            prev = p;
        }
        flush16(&h, g, d, planes);
    }
    g->big = go.big;
    d->big = dout.big;
    return ok;
}

static const char symbols_doc[] =
    "sparse_delta_symbols(old, new, idx, bitlen16, width, is_float, gsym, gwhere, gnbits, gextra, gcounts,\n"
    "                     dsym, dwhere, dnbits, dextra, dcounts, values, planes)\n"
    "--\n\n"
    "The symbols of a sparse chunk's two streams, as codec._symbolize makes them, in one pass over its\n"
    "changed positions ``idx`` (int64, ascending, inside the chunk): the gaps between them and the\n"
    "zigzagged ULP differences of ``new`` against ``old`` (unsigned bits, ``width`` = 8, 16 or 32).\n"
    "``bitlen16``: the bit length of every 16-bit value (int64).\n\n"
    "Per stream (``len(idx)`` entries each): the symbol of every value (``*sym``, uint8), and for the\n"
    "values with raw bits (symbols >= 16) their positions (int64), raw-bit counts (uint8) and raw bits\n"
    "(uint32), packed at the front of ``*where``, ``*nbits``, ``*extra``; adds to the stream's\n"
    "histogram (``*counts``, 256 int64, zeroed by the caller). Copies the new bits into ``values``\n"
    "and counts their byte planes' histograms into ``planes`` (``width // 8`` rows of 256 int64,\n"
    "zeroed). Returns how many values of each stream have raw bits. Releases the GIL.";

static PyObject *sparse_delta_symbols(PyObject *self, PyObject *args)
{
    static const char *fn = "sparse_delta_symbols";
    PyObject *o[16];
    int width, is_float;
    if (!PyArg_ParseTuple(args, "OOOOipOOOOOOOOOOOO:sparse_delta_symbols", &o[0], &o[1], &o[2], &o[3], &width,
                          &is_float, &o[4], &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &o[12], &o[13],
                          &o[14], &o[15]))
        return NULL;
    static const char *names[16] = {"old", "new", "idx", "bitlen16", "gsym", "gwhere", "gnbits", "gextra", "gcounts",
                                    "dsym", "dwhere", "dnbits", "dextra", "dcounts", "values", "planes"};
    Buf b[16] = {{{0}}};
    /* idx first: every stream array must hold len(idx) values */
    int order[16] = {2, 0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    Py_ssize_t m = 0;
    for (int j = 0; j < 16; j++) {
        int i = order[j];
        static const Py_ssize_t sizes[16] = {0, 0, 8, 8, 1, 8, 1, 4, 8, 1, 8, 1, 4, 8, 0, 8};
        Py_ssize_t min_len = i == 3 ? 65536 : (i == 8 || i == 13) ? ALPHABET : (i >= 4 && i <= 14) ? m : 0;
        int writable = i >= 4;
        if (take(o[i], &b[i], fn, names[i], sizes[i], min_len, writable) < 0) {
            release(b, 16);
            return NULL;
        }
        if (i == 2)
            m = b[2].view.len / 8;
    }
    int size = (int)b[1].view.itemsize;
    Py_ssize_t n = b[1].view.len / size;
    if (width != 8 * size || b[0].view.itemsize != size || b[0].view.len != b[1].view.len
        || b[14].view.itemsize != size || b[15].view.len / 8 < 256 * size) {
        PyErr_Format(PyExc_ValueError, "%s: old, new and values must have elements of width %d bits, old and new "
                     "the same length, planes %d rows of 256; found %zd-, %zd- and %zd-byte elements", fn, width,
                     width / 8, b[0].view.itemsize, b[1].view.itemsize, b[14].view.itemsize);
        release(b, 16);
        return NULL;
    }
    Stream g = {b[4].view.buf, b[5].view.buf, b[6].view.buf, b[7].view.buf, b[8].view.buf, 0};
    Stream d = {b[9].view.buf, b[10].view.buf, b[11].view.buf, b[12].view.buf, b[13].view.buf, 0};
    int ok;
    Py_BEGIN_ALLOW_THREADS
    if (size == 2)
        ok = symbols_loop16(b[0].view.buf, b[1].view.buf, n, b[2].view.buf, m, is_float, &g, &d, b[14].view.buf,
                            b[15].view.buf);
    else
        ok = symbols_loop(b[0].view.buf, b[1].view.buf, n, size, b[2].view.buf, m, b[3].view.buf, is_float, &g, &d,
                          b[14].view.buf, b[15].view.buf);
    Py_END_ALLOW_THREADS
    release(b, 16);
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s: idx must be ascending positions inside the chunk (%zd elements), "
                     "each gap below 2**32", fn, n);
        return NULL;
    }
    return Py_BuildValue("nn", g.big, d.big);
}

/* ``k`` (<= 61) bits of ``v`` (higher bits clear) ORed into ``out`` (``len`` bytes, zeroed) at bit
 * ``pos``; the caller has checked that pos + k <= 8 * len. */
static inline void put_bits(uint8_t *out, Py_ssize_t len, uint64_t pos, int k, uint64_t v)
{
    uint64_t byte = pos >> 3;
    int off = (int)(pos & 7);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (byte + 9 <= (uint64_t)len) {
        uint64_t word;
        memcpy(&word, out + byte, 8);
        word |= v << off;
        memcpy(out + byte, &word, 8);
        if (off + k > 64)
            out[byte + 8] |= (uint8_t)(v >> (64 - off));
        return;
    }
#endif
    for (int done = 0; done < k; byte++) {
        out[byte] |= (uint8_t)((v >> done) << off);
        done += 8 - off;
        off = 0;
    }
}

static const char pack_doc[] =
    "pack_raw_bits(nbits, extra)\n"
    "--\n\n"
    "The raw low bits of a stream's values as codec._encode_uints lays them out: value j has\n"
    "``nbits[j]`` (uint8, 0 to 61: 0 = none) raw bits, the low bits of ``extra[j]`` (unsigned, 1 to\n"
    "8 bytes); the values with k bits are packed together in their order, little bit order,\n"
    "groups by ascending k, each group starting on a byte. Returns the bytes. Releases the GIL.";

static PyObject *pack_raw_bits(PyObject *self, PyObject *args)
{
    static const char *fn = "pack_raw_bits";
    PyObject *o[2];
    if (!PyArg_ParseTuple(args, "OO:pack_raw_bits", &o[0], &o[1]))
        return NULL;
    Buf b[2] = {{{0}}};
    if (take(o[0], &b[0], fn, "nbits", 1, 0, 0) < 0 || take(o[1], &b[1], fn, "extra", WIDTH_1_TO_8, 0, 0) < 0) {
        release(b, 2);
        return NULL;
    }
    const uint8_t *nbits = b[0].view.buf;
    const uint8_t *extra = b[1].view.buf;
    Py_ssize_t m = b[0].view.len, size = b[1].view.itemsize;
    if (b[1].view.len / size != m) {
        PyErr_Format(PyExc_ValueError, "%s: nbits has %zd values and extra %zd; expected as many", fn, m,
                     b[1].view.len / size);
        release(b, 2);
        return NULL;
    }
    Py_ssize_t count[MAX_RAW + 1] = {0};
    for (Py_ssize_t j = 0; j < m; j++) {
        if (nbits[j] > MAX_RAW) {
            PyErr_Format(PyExc_ValueError, "%s: nbits[%zd] is %d; expected at most %d", fn, j, nbits[j], MAX_RAW);
            release(b, 2);
            return NULL;
        }
        count[nbits[j]]++;
    }
    uint64_t cur[MAX_RAW + 1], total = 0; /* each group's next bit */
    for (int k = 1; k <= MAX_RAW; k++) {
        cur[k] = 8 * total;
        total += ((uint64_t)count[k] * k + 7) / 8;
    }
    PyObject *res = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (res == NULL) {
        release(b, 2);
        return NULL;
    }
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(res);
    Py_BEGIN_ALLOW_THREADS
    memset(out, 0, total);
    for (Py_ssize_t j = 0; j < m; j++) {
        int k = nbits[j];
        if (!k)
            continue;
        uint64_t v = size == 8 ? ((const uint64_t *)extra)[j] : load(extra, j, (int)size);
        put_bits(out, (Py_ssize_t)total, cur[k], k, v & ((UINT64_C(1) << k) - 1));
        cur[k] += k;
    }
    Py_END_ALLOW_THREADS
    release(b, 2);
    return res;
}

static const char nibbles_doc[] =
    "pack_nibbles(sym)\n"
    "--\n\n"
    "A symbol stream two per byte, as codec._encode_symbols_zstd packs it: byte j is\n"
    "``sym[2j] | sym[2j + 1] << 4`` (uint8 arithmetic; a last odd symbol alone). Returns the bytes\n"
    "(``(len(sym) + 1) // 2`` of them). Releases the GIL.";

static PyObject *pack_nibbles(PyObject *self, PyObject *arg)
{
    Buf b = {{0}};
    if (take(arg, &b, "pack_nibbles", "sym", 1, 0, 0) < 0) {
        release(&b, 1);
        return NULL;
    }
    const uint8_t *sym = b.view.buf;
    Py_ssize_t m = b.view.len, half = m / 2;
    PyObject *res = PyBytes_FromStringAndSize(NULL, half + (m & 1));
    if (res == NULL) {
        release(&b, 1);
        return NULL;
    }
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(res);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < half; j++) /* the compiler vectorises it */
        out[j] = (uint8_t)(sym[2 * j] | (uint8_t)(sym[2 * j + 1] << 4));
    if (m & 1)
        out[half] = sym[m - 1];
    Py_END_ALLOW_THREADS
    release(&b, 1);
    return res;
}

/* ------------------------------------------------------------------ compare */

/* A bit per element of the 64 elements of ``size`` (1, 2 or 4) bytes at ``a`` and ``b``: set
 * where they differ. SSE2 (every x86-64) compares 16 bytes at a time; elsewhere a plain loop. */
static inline uint64_t differ64(const uint8_t *a, const uint8_t *b, int size)
{
    uint64_t same = 0;
#if defined(__SSE2__)
    for (int v = 0; v < 4; v++) { /* 16 elements per step, whatever their width */
        const __m128i *x = (const __m128i *)(a + 16 * size * v), *y = (const __m128i *)(b + 16 * size * v);
        __m128i eq;
        if (size == 1) {
            eq = _mm_cmpeq_epi8(_mm_loadu_si128(x), _mm_loadu_si128(y));
        } else if (size == 2) {
            eq = _mm_packs_epi16(_mm_cmpeq_epi16(_mm_loadu_si128(x), _mm_loadu_si128(y)),
                                 _mm_cmpeq_epi16(_mm_loadu_si128(x + 1), _mm_loadu_si128(y + 1)));
        } else {
            __m128i lo = _mm_packs_epi32(_mm_cmpeq_epi32(_mm_loadu_si128(x), _mm_loadu_si128(y)),
                                         _mm_cmpeq_epi32(_mm_loadu_si128(x + 1), _mm_loadu_si128(y + 1)));
            __m128i hi = _mm_packs_epi32(_mm_cmpeq_epi32(_mm_loadu_si128(x + 2), _mm_loadu_si128(y + 2)),
                                         _mm_cmpeq_epi32(_mm_loadu_si128(x + 3), _mm_loadu_si128(y + 3)));
            eq = _mm_packs_epi16(lo, hi);
        }
        same |= (uint64_t)(uint16_t)_mm_movemask_epi8(eq) << (16 * v);
    }
#else
    for (int j = 0; j < 64; j++)
        same |= (uint64_t)(memcmp(a + j * size, b + j * size, size) == 0) << j;
#endif
    return ~same;
}

/* Where ``a`` and ``b`` (``n`` elements of ``size`` bytes) differ, plus ``offset``, into ``out``;
 * returns how many. 64 elements at a time: a mask of those that differ (none, in most blocks
 * of a sparse update), then one write per set bit. */
static Py_ssize_t changed_loop(const uint8_t *a, const uint8_t *b, Py_ssize_t n, int size, int64_t offset,
                               int64_t *out)
{
    Py_ssize_t k = 0, i = 0;
    if (size <= 4) {
        for (; i + 64 <= n; i += 64) {
            uint64_t d;
            switch (size) { /* a constant per case: the compiler keeps one branch of differ64 */
            case 1: d = differ64(a + i, b + i, 1); break;
            case 2: d = differ64(a + 2 * i, b + 2 * i, 2); break;
            default: d = differ64(a + 4 * i, b + 4 * i, 4); break;
            }
            while (d) {
                out[k++] = offset + i + __builtin_ctzll(d);
                d &= d - 1;
            }
        }
    }
    for (; i < n; i++) { /* the tail, and 8-byte elements */
        out[k] = offset + i;
        k += memcmp(a + i * size, b + i * size, size) != 0;
    }
    return k;
}

/* ------------------------------------------------------------------ compare and encode */

/* symbols_loop16 over the elements where ``old`` and ``new`` (one block of a chunk, ``n``
 * elements from chunk position ``offset``) differ, found as changed_loop finds them: the chunk's
 * changed positions are never written down and read back, and each block is coded while the
 * compare has it in the CPU cache. ``st``: the chunk's state so far (changes, values with raw
 * bits in each stream, the last changed position); changes from the ``limit``-th on are counted
 * only. Returns 0 where ``st`` is inconsistent. */
static int scan_loop16(const uint16_t *restrict old, const uint16_t *restrict new, Py_ssize_t n, int64_t offset,
                       Py_ssize_t limit, int is_float, int64_t *st, Stream *g, Stream *d, uint16_t *restrict values,
                       int64_t *planes)
{
    int64_t count = st[0], prev = st[3];
    if (count < 0 || st[1] < 0 || st[2] < 0 || st[1] > count || st[2] > count || prev < -1 || prev >= offset
        || offset < 0 || (count > 0 && prev < 0) || count > prev + 1)
        return 0;
    Hist16 h;
    memset(&h, 0, sizeof h);
    Out16 go = {g->sym, g->where, g->nbits, g->extra, st[1]}, dout = {d->sym, d->where, d->nbits, d->extra, st[2]};
    const uint16_t flip_neg = is_float ? 0xFFFF : 0, flip_pos = is_float ? 0x8000 : 0;
    Py_ssize_t i = 0;
    for (; i < n; i += 64) {
        uint64_t diff;
        if (i + 64 <= n) {
            diff = differ64((const uint8_t *)(old + i), (const uint8_t *)(new + i), 2);
        } else { /* the tail */
            diff = 0;
            for (Py_ssize_t j = i; j < n; j++)
                diff |= (uint64_t)(old[j] != new[j]) << (j - i);
        }
        while (diff) {
            Py_ssize_t at = i + __builtin_ctzll(diff);
            diff &= diff - 1;
            int64_t p = offset + at;
            if (count < limit) {
                if (p - prev - 1 > (int64_t)UINT32_MAX)
                    return 0;
                change16(&h, &go, &dout, values, (Py_ssize_t)count, (uint64_t)(p - prev - 1), old[at], new[at],
                         flip_neg, flip_pos);
            }
            count++;
            prev = p;
        }
    }
    flush16(&h, g, d, planes);
    st[0] = count;
    st[1] = go.big;
    st[2] = dout.big;
    st[3] = prev;
    return 1;
}

static const char scan_doc[] =
    "scan_symbols16(old, new, offset, limit, is_float, state, gsym, gwhere, gnbits, gextra, gcounts,\n"
    "               dsym, dwhere, dnbits, dextra, dcounts, values, planes)\n"
    "--\n\n"
    "sparse_delta_symbols for 2-byte elements without the changed positions: finds where ``old`` and\n"
    "``new`` (uint16, one block of a chunk, starting at the chunk's position ``offset``) differ, as\n"
    "changed_positions does, and codes those changes as sparse_delta_symbols would, appending to the\n"
    "chunk's streams: call it on a chunk's blocks in order. ``state`` (int64: changes so far, values\n"
    "with raw bits in each stream so far, the last changed position; [0, 0, 0, -1] for a new chunk)\n"
    "is updated. Changes from the ``limit``-th on are counted, not coded: the stream arrays (and\n"
    "``values``) need ``limit`` entries. Releases the GIL.";

static PyObject *scan_symbols16(PyObject *self, PyObject *args)
{
    static const char *fn = "scan_symbols16";
    PyObject *o[15];
    long long offset;
    Py_ssize_t limit;
    int is_float;
    if (!PyArg_ParseTuple(args, "OOLnpOOOOOOOOOOOOO:scan_symbols16", &o[0], &o[1], &offset, &limit, &is_float,
                          &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &o[12], &o[13],
                          &o[14]))
        return NULL;
    static const char *names[15] = {"old", "new", "state", "gsym", "gwhere", "gnbits", "gextra", "gcounts",
                                    "dsym", "dwhere", "dnbits", "dextra", "dcounts", "values", "planes"};
    static const Py_ssize_t sizes[15] = {2, 2, 8, 1, 8, 1, 4, 8, 1, 8, 1, 4, 8, 2, 8};
    if (limit < 0) {
        PyErr_Format(PyExc_ValueError, "%s: limit is %zd; expected >= 0", fn, limit);
        return NULL;
    }
    Buf b[15] = {{{0}}};
    for (int i = 0; i < 15; i++) {
        Py_ssize_t min_len = i == 2 ? 4 : (i == 7 || i == 12) ? ALPHABET : i == 14 ? 512 : i >= 3 ? limit : 0;
        if (take(o[i], &b[i], fn, names[i], sizes[i], min_len, i >= 2) < 0) {
            release(b, 15);
            return NULL;
        }
    }
    Py_ssize_t n = b[0].view.len / 2;
    if (b[1].view.len != b[0].view.len) {
        PyErr_Format(PyExc_ValueError, "%s: old has %zd elements and new %zd; expected as many", fn, n,
                     b[1].view.len / 2);
        release(b, 15);
        return NULL;
    }
    Stream g = {b[3].view.buf, b[4].view.buf, b[5].view.buf, b[6].view.buf, b[7].view.buf, 0};
    Stream d = {b[8].view.buf, b[9].view.buf, b[10].view.buf, b[11].view.buf, b[12].view.buf, 0};
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = scan_loop16(b[0].view.buf, b[1].view.buf, n, offset, limit, is_float, b[2].view.buf, &g, &d, b[13].view.buf,
                     b[14].view.buf);
    Py_END_ALLOW_THREADS
    release(b, 15);
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s: state must be a chunk's (changes, raw values, raw values, last "
                     "position) before this block at %lld, with gaps below 2**32", fn, offset);
        return NULL;
    }
    Py_RETURN_NONE;
}

static const char changed_doc[] =
    "changed_positions(old, new, out, offset)\n"
    "--\n\n"
    "Write ``offset`` + the positions where ``old`` and ``new`` (integer arrays of one width, 1 to 8\n"
    "bytes, the same length) differ, ascending, into ``out`` (int64, at least as long; writable);\n"
    "returns how many: ``np.flatnonzero(old != new) + offset`` in one pass. Releases the GIL.";

static PyObject *changed_positions(PyObject *self, PyObject *args)
{
    static const char *fn = "changed_positions";
    PyObject *o[3];
    long long offset;
    if (!PyArg_ParseTuple(args, "OOOL:changed_positions", &o[0], &o[1], &o[2], &offset))
        return NULL;
    Buf b[3] = {{{0}}};
    static const char *names[3] = {"old", "new", "out"};
    for (int i = 0; i < 3; i++) {
        if (take(o[i], &b[i], fn, names[i], i < 2 ? WIDTH_1_TO_8 : 8, 0, i == 2) < 0) {
            release(b, 3);
            return NULL;
        }
    }
    int size = (int)b[1].view.itemsize;
    Py_ssize_t n = b[1].view.len / size;
    if (b[0].view.itemsize != size || b[0].view.len != b[1].view.len || b[2].view.len / 8 < n) {
        PyErr_Format(PyExc_ValueError, "%s: old and new must be the same width and length and out at least as "
                     "long; found %zd and %zd bytes of %zd- and %d-byte elements, out %zd elements", fn,
                     b[0].view.len, b[1].view.len, b[0].view.itemsize, size, b[2].view.len / 8);
        release(b, 3);
        return NULL;
    }
    Py_ssize_t k;
    Py_BEGIN_ALLOW_THREADS
    k = changed_loop(b[0].view.buf, b[1].view.buf, n, size, offset, b[2].view.buf);
    Py_END_ALLOW_THREADS
    release(b, 3);
    return PyLong_FromSsize_t(k);
}

static PyMethodDef methods[] = {
    {"sparse_delta_apply", sparse_delta_apply, METH_VARARGS, apply_doc},
    {"raw_layout", raw_layout, METH_VARARGS, layout_doc},
    {"sparse_delta_symbols", sparse_delta_symbols, METH_VARARGS, symbols_doc},
    {"changed_positions", changed_positions, METH_VARARGS, changed_doc},
    {"pack_raw_bits", pack_raw_bits, METH_VARARGS, pack_doc},
    {"pack_nibbles", pack_nibbles, METH_O, nibbles_doc},
    {"scan_symbols16", scan_symbols16, METH_VARARGS, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "The sparse encodings' compiled kernels (C, built at install): see rlsparse.delta.compiled.", -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void)
{
    return PyModule_Create(&module);
}
