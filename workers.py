"""Tokenizer worker processes for data_process.py and chat_data.py: map a function over batches, in order.

    for out in parallel_map(encode_fn, batches(docs), count(num_workers), (tok_or_folder, cfg)): ...

Each worker holds the tokenizer and the config in `state` (a forked worker inherits a loaded Tokenizer; otherwise it
loads the folder again), so the mapped functions take only their batch and pickle nothing big.
"""
import collections
import os

state = {}  # in a worker: "tok" and "cfg"


def _init(tok_source, cfg):
    if isinstance(tok_source, str):
        from tokenizer import Tokenizer
        tok_source = Tokenizer.from_pretrained(tok_source)
    state.update(tok=tok_source, cfg=cfg)


def count(num_workers):
    """The number of worker processes for a num_workers setting: 0 means one per CPU core."""
    return num_workers or os.cpu_count() or 1


def parallel_map(fn, items, num_workers, initargs):
    """map(fn, items) in order over worker processes, with at most 2 batches per worker in flight, so memory stays
    flat however long `items` is (Pool.imap would read the whole input ahead). One worker: in this process."""
    if num_workers <= 1:
        _init(*initargs)
        yield from map(fn, items)
        return
    import multiprocessing as mp
    with mp.get_context().Pool(num_workers, _init, initargs) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def batches(items, max_chars=1 << 20, max_items=512):
    """Lists of items holding about max_chars characters (strings) or max_items items, whichever comes first."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item) if isinstance(item, str) else 1
        if size >= max_chars or len(batch) >= max_items:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
