"""Near-duplicate detection for data_process.py: MinHash signatures of character n-grams and LSH banding.

    sigs = minhash(texts, n=5, num_perm=128)     # (len(texts), 128) uint32, a batch at a time
    near = NearDedup(threshold=0.8, num_perm=128)
    keys = near.band_keys(sigs)                  # the LSH bucket keys of each row
    near.is_duplicate(sigs[i], keys[i])          # True if a kept document is this similar; else it is kept

The exact duplicates are data_process.py's (a hash of the cleaned text); this file finds the documents that differ
by a few words, a header or whitespace.
"""
import numpy as np


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
            h = h * np.uint64(1000003) + cp[j:j + len(h)]
        h ^= h >> np.uint64(31)  # mix, so that every bit depends on the whole shingle
        h *= np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
        sizes = np.array([len(p) for p in pieces])
        h = h[np.concatenate([np.arange(a, a + m - n + 1) for a, m in zip(np.cumsum(sizes) - sizes, sizes)])]
        cell = np.repeat(np.array(owners) * num_perm, sizes - n + 1)
        cell += (h >> np.uint64(64 - bits)).astype(np.int64) if bits else 0
        np.minimum.at(sig.reshape(-1), cell, ((h << np.uint64(bits)) >> np.uint64(32)).astype(np.uint32))
        pieces.clear()
        owners.clear()
        return 0

    for d, text in enumerate(texts):
        text = " ".join(text.lower().split()).ljust(n)
        for a in range(0, len(text) - n + 1, chunk):
            pieces.append(text[a:a + chunk + n - 1])
            owners.append(d)
            size += len(pieces[-1])
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
        for c in {self.buckets[k] for k in keys if k in self.buckets}:
            if np.count_nonzero(self.sigs[c] == sig) >= self.threshold * len(sig):
                return True
        index = len(self.sigs)
        for k in keys:
            self.buckets.setdefault(k, index)
        self.sigs.append(sig.copy())  # a copy: a view would keep its whole batch alive
        return False
