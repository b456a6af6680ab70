"""Compiled counts and estimates that choose the models of the rans codecs
(haagenti/codecs/rans.py): numpy's calls on a fragment's few thousand blocks cost more than
the coding itself (docs/decisions/0380-table-rans.md)."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def best_shift(u, v, base, relative, max_shift, model_bits):  # pragma: no cover - compiled
    """(shift, estimated bits) of a scale field split into coarse symbols (u >> s less
    base >> s when relative, else v >> s) and fine ones (v's low s bits): every other shift
    from the least whose coarse symbols spread under 512 (more cost more in models than they
    save on 4,096 blocks), then the best one's neighbours; the first of equal estimates."""
    lows = np.zeros(max_shift + 1, np.int64)
    spreads = np.zeros(max_shift + 1, np.int64)
    if len(u) and not relative:  # v >> s is monotone in v: its extremes are v's, shifted
        v_lo, v_hi = v.min(), v.max()
        for s in range(max_shift + 1):
            lows[s], spreads[s] = v_lo >> s, (v_hi >> s) - (v_lo >> s)
    elif len(u):
        for s in range(max_shift + 1):
            lo, hi = 1 << 62, -(1 << 62)
            for i in range(len(u)):
                c = (u[i] >> s) - (base[i] >> s)
                lo, hi = min(lo, c), max(hi, c)
            lows[s], spreads[s] = lo, hi - lo
    least = max_shift  # u < 2^16: its coarse symbols spread under 16 at the most shift
    for s in range(max_shift, -1, -1):
        if spreads[s] < 512:
            least = s
    fine = np.zeros(1 << max_shift, np.int64)
    best, best_bits = least, np.inf
    for s in range(least, max_shift + 1, 2):
        bits = _shift_bits(u, v, base, relative, lows[s], spreads[s], s, fine, model_bits)
        if bits < best_bits:
            best, best_bits = s, bits
    first = best
    for s in (first - 1, first + 1):
        if least <= s <= max_shift:
            bits = _shift_bits(u, v, base, relative, lows[s], spreads[s], s, fine, model_bits)
            if bits < best_bits:
                best, best_bits = s, bits
    return best, best_bits


@njit(cache=True, nogil=True)
def _shift_bits(u, v, base, relative, lo, spread, s, fine, model_bits):  # pragma: no cover - compiled
    """The estimated bits of best_shift's coarse symbols (least lo) and fine ones at shift s
    under their own histograms, plus their models."""
    coarse = np.zeros(spread + 1, np.int64)
    fine[: 1 << s] = 0
    for i in range(len(u)):
        coarse[((u[i] >> s) - (base[i] >> s) if relative else v[i] >> s) - lo] += 1
        fine[v[i] & ((1 << s) - 1)] += 1
    return entropy(coarse) + entropy(fine[: 1 << s]) + model_bits * (len(coarse) + (1 << s))


@njit(cache=True, nogil=True)
def entropy(counts):  # pragma: no cover - compiled
    """The bits of symbols of these counts under their own histogram (order-0 entropy)."""
    n, acc = 0, 0.0
    for c in counts:
        if c:
            n += c
            acc += c * np.log2(c)
    return n * np.log2(n) - acc if n else 0.0


@njit(cache=True, nogil=True)
def counts_by_class(symbols, of, kind, hist_len, classes):  # pragma: no cover - compiled
    """Histogram symbols per class of their row (`classes` rows): the bytes themselves (kind 0),
    their two 4-bit codes (1), or |int8| of each byte (2)."""
    out = np.zeros((classes, hist_len), np.int64)
    for r in range(symbols.shape[0]):
        row = out[of[r]]
        for j in range(symbols.shape[1]):
            b = symbols[r, j]
            if kind == 1:
                row[b & 15] += 1
                row[b >> 4] += 1
            elif kind == 2:
                row[b if b < 128 else 256 - b] += 1
            else:
                row[b] += 1
    return out


@njit(cache=True, nogil=True)
def best_models(by_class, kind, weights, per_octave, model_bits):  # pragma: no cover - compiled
    """(k, levels of its k histograms): for k = 1, 2, 4, ... up to the classes counted (rows of
    by_class, merged k to a group), each group's histogram as levels of `weights` (its most
    frequent symbol at the top level, per_octave levels to a factor 2, a present symbol never
    at 0), and the bits its counts cost under it plus model_bits per entry; the smallest
    estimate, the fewer groups on a tie. Kind 2 (|int8|) weighs every entry but 0 and 128
    twice in its total."""
    n_classes, width = by_class.shape
    top_level = len(weights) - 1
    best_cost, best_k = np.inf, 1
    best = np.zeros((1, width), np.int64)
    k = 1
    while k <= n_classes:
        levels = np.zeros((k, width), np.int64)
        cost = model_bits * k * width
        per = n_classes // k
        for g in range(k):
            counts = by_class[g * per : (g + 1) * per].sum(axis=0)
            most = max(counts.max(), 1)
            n, total, coded = 0, 0, 0.0
            for s in range(width):
                if counts[s] > 0:
                    level = np.rint(per_octave * np.log2(counts[s] / most)) + top_level
                    levels[g, s] = min(max(level, 1), top_level)
                    coded += counts[s] * np.log2(weights[levels[g, s]])
                    n += counts[s]
                total += weights[levels[g, s]] * (2 if kind == 2 and 0 < s < 128 else 1)
            cost += n * np.log2(max(total, 1)) - coded
        if cost < best_cost:
            best_cost, best_k, best = cost, k, levels
        k *= 2
    return best_k, best


@njit(cache=True, nogil=True)
def classify(first, edges, classes):  # pragma: no cover - compiled
    """(each block's class: the edges at or below its first value; the blocks in class order,
    stable; blocks per class), by one counting sort."""
    of = np.zeros(len(first), np.int64)
    counts = np.zeros(classes, np.int64)
    for i in range(len(first)):
        c = 0
        for e in edges:
            c += e <= first[i]
        of[i] = c
        counts[c] += 1
    at = np.zeros(classes, np.int64)
    for c in range(1, classes):
        at[c] = at[c - 1] + counts[c - 1]
    order = np.empty(len(first), np.int64)
    for i in range(len(first)):
        order[at[of[i]]] = i
        at[of[i]] += 1
    return of, order, counts
