"""Near-duplicate detection for data_process.py: MinHash signatures of character n-grams and LSH banding.

    sigs = minhash(texts, n=5, num_perm=128)     # (len(texts), 128) uint32, a batch at a time
    near = NearDedup(threshold=0.8, num_perm=128)
    keys = near.band_keys(sigs)                  # the LSH bucket keys of each row
    near.is_duplicate(sigs[i], keys[i])          # True if a kept document is this similar; else it is kept

The exact duplicates are data_process.py's (a hash of the cleaned text); this file finds the documents that differ
by a few words, a header or whitespace.
"""
import re

import numpy as np

_SPACE = re.compile(r"\s")  # \s is exactly str.isspace(), which split() uses


def minhash(texts, n, num_perm, chunk=1 << 20):
    """MinHash signatures (len(texts) x num_perm, uint32) of the character n-grams of each text (lower-cased,
    whitespace collapsed), for a whole batch at once. One-permutation hashing: each shingle is hashed once, the
    hash's top bits pick one of num_perm bins and the bin keeps its smallest value; empty bins borrow from the next
    filled bin (rotation densification, Shrivastava & Li 2014). This equals num_perm-permutation MinHash in
    expectation at 1/num_perm of the cost; the tests check its estimates against exact Jaccard similarity.
    Texts are hashed in pieces of `chunk` characters, so a book-sized document does not need GBs of arrays."""
    bits = num_perm.bit_length() - 1
    sig = np.full((len(texts), num_perm), 2**32 - 1, dtype=np.uint32)
    pieces, owners, size = [], [], 0

    def add_pieces():  # bin minima of the windows of each piece (pieces overlap by n - 1: no window is lost)
        cp = np.frombuffer("".join(pieces).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        h = np.zeros(len(cp) - n + 1, dtype=np.uint64)
        for j in range(n):  # polynomial rolling hash over every window; uint64 wraps around
            h *= np.uint64(1000003)
            h += cp[j:j + len(h)]
        h ^= h >> np.uint64(31)  # mix, so that every bit depends on the whole shingle
        h *= np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
        sizes = np.array([len(p) for p in pieces])
        if len(pieces) > 1:  # drop the windows that span two pieces: those starting n - 1 or fewer before a boundary
            keep = np.ones(len(h), dtype=bool)
            keep[(np.cumsum(sizes)[:-1, None] - np.arange(1, n)).ravel()] = False
            h = h[keep]
        cell = np.repeat(np.array(owners) * num_perm, sizes - n + 1)
        cell += (h >> np.uint64(64 - bits)).astype(np.int64) if bits else 0
        np.minimum.at(sig.reshape(-1), cell, ((h << np.uint64(bits)) >> np.uint64(32)).astype(np.uint32))
        pieces.clear()
        owners.clear()
        return 0

    for d, text in enumerate(texts):
        for piece in _squeezed_pieces(text, n, chunk):
            pieces.append(piece)
            owners.append(d)
            size += len(piece)
            if size >= chunk:
                size = add_pieces()
    if pieces:
        add_pieces()
    j = np.arange(num_perm)
    filled = sig != 2**32 - 1
    nxt = np.minimum.accumulate(np.where(filled, j, 2 * num_perm)[:, ::-1], axis=1)[:, ::-1]
    nxt = np.where(nxt >= num_perm, filled.argmax(axis=1)[:, None] + num_perm, nxt)  # wrap around
    src = np.take_along_axis(sig, nxt % num_perm, axis=1)
    return src + ((nxt - j) % num_perm).astype(np.uint32) * np.uint32(0x9E3779B1)  # uint32 arithmetic wraps


def _squeezed_pieces(text, n, chunk):
    """The text lower-cased, whitespace runs made one space, stripped (and padded to n), in pieces that hold `chunk`
    n-grams each and overlap by n - 1 characters. A text over `chunk` characters is squeezed a slice at a time, each
    slice ending before a whitespace where it can: split() on a whole book would hold ~10x its size in words."""
    if len(text) <= chunk:
        yield " ".join(text.lower().split()).ljust(n)
        return
    buf, started, gap, done, a = "", False, False, False, 0
    while a < len(text):
        m = _SPACE.search(text, a + chunk, a + 2 * chunk)
        b = m.start() if m else min(a + chunk, len(text))
        part, a = text[a:b], b
        words = " ".join(part.lower().split())
        if words:
            buf += (" " if started and (gap or part[0].isspace()) else "") + words
            started = True
        gap = part[-1].isspace()  # whitespace between this slice's last word and the next slice
        while len(buf) >= chunk + n - 1:
            yield buf[:chunk + n - 1]
            buf, done = buf[chunk:], True
    if len(buf) >= n or not done:
        yield buf.ljust(n)


class NearDedup:
    """MinHash LSH: signatures sharing a band become candidates, a candidate is a duplicate when the estimated
    Jaccard similarity (the share of equal signature values) reaches the threshold."""

    def __init__(self, threshold, num_perm):
        # bands x rows whose S-curve midpoint (1/b)^(1/r) sits a little below the threshold, for recall
        self.rows = min(range(1, num_perm + 1), key=lambda r: abs((r / num_perm) ** (1 / r) - (threshold - 0.1)))
        self.bands, self.threshold = num_perm // self.rows, threshold
        self.buckets, self.sigs = {}, []

    def band_keys(self, sigs):
        """One 64-bit key per band for each row of `sigs` (a batch), as Python ints for the bucket dict."""
        blocks = sigs[:, :self.bands * self.rows].reshape(len(sigs), self.bands, self.rows).astype(np.uint64)
        mult = np.uint64(0x9E3779B97F4A7C15) ** np.arange(1, self.rows + 1, dtype=np.uint64)  # wraps, distinct odd
        return ((blocks * mult).sum(axis=2) ^ np.arange(self.bands, dtype=np.uint64)).tolist()

    def is_duplicate(self, sig, keys):
        """True when `sig` matches a kept document; otherwise remember it and return False."""
        shared = self.buckets.keys() & keys  # set operations in C: this runs once per document
        for c in {self.buckets[k] for k in shared}:
            if np.count_nonzero(self.sigs[c] == sig) >= self.threshold * len(sig):
                return True
        new = dict.fromkeys(keys, len(self.sigs))
        for k in shared:  # a bucket keeps the first document that landed in it
            del new[k]
        self.buckets.update(new)
        self.sigs.append(sig.copy())  # a copy: a view would keep its whole batch alive
        return False
