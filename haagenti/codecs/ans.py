"""Table-driven rANS under integer models (the coder of codec `rans2`, haagenti.codecs.rans).

constriction's range coder searches its CDF for every decoded symbol (20-40 ns each) and
builds its models from floats; here a model's integer weights are quantized to frequencies
summing to 2^PROB_BITS by integer arithmetic alone (the same on every machine), a decoded
symbol is one lookup in a table of 2^PROB_BITS slots, and an encoded one a multiplication by a
reciprocal instead of a division (ryg_rans). Four states are interleaved (symbol i of a stream
uses state i mod 4) so that their dependency chains overlap, and share one stream of 16-bit
words: the encoder runs over the symbols backwards and writes the words back to front, the
decoder reads them front to back; neither branches on renormalization. A stream is the four
final states (32 bits each) and the words; decoding must use every word and end on the four
initial states, or the stream is damaged. Measured in docs/decisions/0380-table-rans.md.
"""
from __future__ import annotations

import numpy as np
from numba import njit

PROB_BITS = 15  # frequencies sum to 2^15: a decoding table of 32 K slots
LOW = 1 << 16  # a state lies in [LOW, 2^32) and is renormalized by 16-bit words
LANES = 4  # interleaved states


class DamagedStream(ValueError):
    """The words do not decode: too few, left over, or not ending on the initial states."""


@njit(cache=True, nogil=True)
def frequencies(weights):  # pragma: no cover - compiled
    """Integer weights (a symbol of weight 0 never occurs; at most 2^PROB_BITS symbols, one of
    them weighted) as frequencies summing to 2^PROB_BITS, a weighted symbol at least 1: each
    weight x 2^PROB_BITS / total rounded, the difference given to (or taken from, never below
    1) the most frequent symbols. Integers only, so encoder and decoder build the same model."""
    total = 0
    for w in weights:
        total += w
    f = np.zeros(len(weights), np.int64)
    excess = -(1 << PROB_BITS)
    for i in range(len(weights)):
        if weights[i] > 0:
            f[i] = max(((weights[i] << PROB_BITS) + total // 2) // total, 1)
            excess += f[i]
    while excess != 0:
        top = np.argmax(f)
        take = min(excess, f[top] - 1) if excess > 0 else excess
        f[top] -= take
        excess -= take
    return f


class Encoder:
    """Collects (symbols, weights) parts in decoding order; `finish` codes them all at once."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.models: list[np.ndarray] = []

    def encode(self, symbols: np.ndarray, weights: np.ndarray) -> None:
        self.parts.append(symbols.ravel())
        self.models.append(np.asarray(weights, np.int64))

    def finish(self) -> bytes:
        states = np.full(LANES, LOW, np.uint64)
        if not self.parts:
            return states.astype("<u4").tobytes()
        width = max(len(w) for w in self.models)
        freq = np.zeros((len(self.models), width), np.int64)
        for m, w in enumerate(self.models):
            freq[m, : len(w)] = frequencies(w)
        rcp, shift, bias = _reciprocals(freq)
        symbols = np.concatenate(self.parts).astype(np.int64, copy=False)
        starts = np.cumsum([0] + [len(p) for p in self.parts])
        out = np.empty(len(symbols) + 1, np.uint16)
        first = _encode(symbols, starts, freq, rcp, shift, bias, out, states)
        return states.astype("<u4").tobytes() + out[first:].astype("<u2").tobytes()


@njit(cache=True, nogil=True)
def _reciprocals(freq):  # pragma: no cover - compiled
    """Per symbol (rcp, shift, bias) with x // f == (x * rcp) >> 32 >> shift for every state x
    (ryg_rans' RansEncSymbolInit; f == 1 folds the division into the bias)."""
    rcp = np.zeros(freq.shape, np.uint64)
    shift = np.zeros(freq.shape, np.uint64)
    bias = np.zeros(freq.shape, np.uint64)
    for m in range(freq.shape[0]):
        cum = 0
        for sym in range(freq.shape[1]):
            f = freq[m, sym]
            if f == 1:
                rcp[m, sym], bias[m, sym] = 0xFFFFFFFF, cum + (1 << PROB_BITS) - 1
            elif f > 1:
                bits = 0
                while (1 << bits) < f:  # ceil(log2 f)
                    bits += 1
                rcp[m, sym], shift[m, sym], bias[m, sym] = ((1 << (bits + 31)) + f - 1) // f, bits - 1, cum
            cum += f
    return rcp, shift, bias


@njit(cache=True, nogil=True)
def _encode(symbols, starts, freq, rcp, shift, bias, out, states):  # pragma: no cover - compiled
    """Codes the parts backwards into out (back to front); returns where the words begin."""
    pos = len(out)  # renormalizations: at most one a symbol, and out has one slot more
    for part in range(len(starts) - 2, -1, -1):
        f, r, s, b = freq[part], rcp[part], shift[part], bias[part]
        for i in range(starts[part + 1] - 1, starts[part] - 1, -1):
            sym = symbols[i]
            lane = i & (LANES - 1)
            x = states[lane]
            fs = np.uint64(f[sym])
            big = np.uint64(x >= (fs << np.uint64(32 - PROB_BITS)))
            out[pos - 1] = x & np.uint64(0xFFFF)  # kept only when the state is renormalized
            pos -= np.int64(big)
            x >>= big << np.uint64(4)
            q = ((x * r[sym]) >> np.uint64(32)) >> s[sym]
            states[lane] = x + b[sym] + q * (np.uint64(1 << PROB_BITS) - fs)
    return pos


class Decoder:
    """Decodes the parts in the order they were encoded, each under the weights it was coded
    with; `finish` checks that the stream ended where the encoder began."""

    def __init__(self, data: bytes | memoryview):
        if len(data) < 4 * LANES or len(data) % 2:
            raise DamagedStream("its coded words are not whole")
        body = np.frombuffer(data, np.uint8)
        self.states = body[: 4 * LANES].view("<u4").astype(np.uint64)
        self.words = np.zeros((len(body) - 4 * LANES) // 2 + 1, np.uint16)  # one word past the end, read but never used
        self.words[:-1] = body[4 * LANES :].view("<u2")
        self.pos, self.done = 0, 0
        if int(self.states.min()) < LOW:
            raise DamagedStream("a state is below its bound")

    def decode_rows(self, weights: np.ndarray, sizes: np.ndarray, order: np.ndarray, out: np.ndarray) -> None:
        """Fills out[order[i]] (rows of `width` symbols) in turn: sizes[m] rows under the
        weights weights[m] (rows of one array), then the next part's."""
        table = np.empty(1 << PROB_BITS, np.uint8 if weights.shape[1] <= 256 else np.uint16)  # bytes: half the cache
        self.pos = _decode(self.words, self.pos, self.states, self.done, np.asarray(weights, np.int64), np.asarray(sizes, np.int64), order, out, table)
        if self.pos > len(self.words) - 1:
            raise DamagedStream("its words end early")
        self.done += out.size

    def decode(self, weights: np.ndarray, n: int) -> np.ndarray:
        """n symbols under these weights."""
        out = np.empty((n, 1), np.uint16)
        self.decode_rows(np.asarray(weights)[None, :], np.array([n]), np.arange(n), out)
        return out[:, 0]

    def finish(self) -> None:
        if self.pos != len(self.words) - 1 or (self.states != LOW).any():
            raise DamagedStream("its words do not end where they began")


@njit(cache=True, nogil=True)
def _decode(words, pos, states, done, weights, sizes, order, out, table):  # pragma: no cover - compiled
    """Decodes parts under their weights into rows of out, each symbol looked up in `table`
    (2^PROB_BITS slots); returns the position after the last word read (past the end when the
    words ran short)."""
    last = len(words) - 1
    width = out.shape[1]
    i = done
    row = 0
    for part in range(len(sizes)):
        if sizes[part] == 0:
            continue
        f = frequencies(weights[part])
        cum = np.empty(len(f), np.uint64)
        c = 0
        for sym in range(len(f)):
            cum[sym] = c
            table[c : c + f[sym]] = sym
            c += f[sym]
        fu = f.astype(np.uint64)
        for r in order[row : row + sizes[part]]:
            for j in range(width):
                lane = i & (LANES - 1)
                x = states[lane]
                slot = x & np.uint64((1 << PROB_BITS) - 1)
                sym = table[slot]
                x = fu[sym] * (x >> np.uint64(PROB_BITS)) + slot - cum[sym]
                need = np.uint64(x < np.uint64(LOW))
                x = (x << (need << np.uint64(4))) | (np.uint64(words[min(pos, last)]) & (np.uint64(0) - need))
                pos += np.int64(need)
                states[lane] = x
                out[r, j] = sym
                i += 1
        row += sizes[part]
    return pos
