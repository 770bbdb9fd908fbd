"""The embedded default data: text that ships with every Python, so `bash run.sh` needs no download.

    default_documents()    pretraining corpus: pydoc_data's language-reference topics + the docstrings of ~70
                           standard-library modules (~0.85 MB, deterministic for a Python version)
    default_sft_records()  instruction records derived from it: question -> first sentence of the matching doc
    default_dpo_records()  preference records: chosen = that sentence, rejected = another item's

The same ~10% of items (by a hash of their name) are held out as "val" in both instruction sets. data_process.py
reads these when it is given no --input; train_tokenizer.py when it is given no --input either.
"""
import inspect
import re
import zlib

_DEFAULT_MODULES = ("abc", "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "contextlib",
                    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fnmatch", "fractions",
                    "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "inspect",
                    "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "math",
                    "mimetypes", "numbers", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re",
                    "sched", "secrets", "shlex", "shutil", "statistics", "string", "struct", "tempfile", "textwrap",
                    "threading", "time", "timeit", "tokenize", "traceback", "types", "typing", "unittest", "uuid",
                    "warnings", "weakref", "zipfile", "zlib")


def _topics():
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; the docstrings remain
        return {}
    return topics


def _docstrings():
    """[(qualified name, docstring)] of the public classes, functions and methods of a fixed list of modules."""
    import importlib
    import warnings
    items = []
    with warnings.catch_warnings():  # some names warn on access (typing.io)
        warnings.simplefilter("ignore")
        for modname in _DEFAULT_MODULES:
            mod = importlib.import_module(modname)
            items += [(modname, inspect.cleandoc(mod.__doc__))] if mod.__doc__ else []
            for name, obj in sorted(vars(mod).items()):
                if name.startswith("_") or getattr(obj, "__module__", None) != modname or not (
                        inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                if isinstance(obj.__doc__, str):
                    items.append((f"{modname}.{name}", inspect.cleandoc(obj.__doc__)))
                for mname, meth in sorted(vars(obj).items()) if inspect.isclass(obj) else []:
                    if not mname.startswith("_") and inspect.isroutine(meth) and isinstance(meth.__doc__, str):
                        items.append((f"{modname}.{name}.{mname}", inspect.cleandoc(meth.__doc__)))
    return items


def default_documents():
    """The embedded corpus: the language-reference topics of pydoc_data and standard-library docstrings, as a
    deterministic list of documents (a few MB) that ships with every Python."""
    docs = [text.strip() for _, text in sorted(_topics().items())]
    return docs + [f"{name}\n\n{doc}" for name, doc in _docstrings() if len(doc) >= 40]


def _summary(doc):
    """The first sentence of a docstring's first prose paragraph (skipping signature lines), or None."""
    for para in re.split(r"\n\s*\n", doc):
        para = " ".join(para.split())
        if not para or re.match(r"^[\w.]+\(.*\)( -> .*)?$", para) or "::" in para or para.startswith((">>>", "*")):
            continue
        m = re.match(r"(.+?[.!?])(\s|$)", para)
        sentence = m.group(1) if m else para
        return sentence if 20 <= len(sentence) <= 300 else None
    return None


def _default_qa():
    """[(name, question, answer)] derived from the default corpus, in a fixed order."""
    topics, qa = _topics(), []
    import pydoc
    for kw, target in sorted(pydoc.Helper.keywords.items()):
        label = target[0].split()[0] if isinstance(target, tuple) else None
        if label in topics:
            body = topics[label].split("\n\n", 1)[-1]  # drop the title and its underline
            answer = _summary(body)
            if answer:
                qa.append((f"keyword.{kw}", f"What does the Python keyword `{kw}` do?", answer))
    questions = ("What does `{}` do?", "Summarize the docstring of `{}`.", "In one sentence, what is `{}` for?")
    for name, doc in _docstrings():
        answer = _summary(doc)
        if answer and "." in name:
            qa.append((name, questions[zlib.crc32(name.encode()) % 3].format(name), answer))
    return qa


def _heldout(name):
    return zlib.crc32(name.encode()) % 10 == 0  # the same ~10% of items are held out in SFT and DPO


def default_sft_records():
    """Instruction records from the default corpus: question -> first sentence of the matching doc."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "split": "val" if _heldout(name) else "train"} for name, q, a in _default_qa()]


def default_dpo_records():
    """Preference records: chosen = the right doc sentence, rejected = the sentence of another item (fixed pick)."""
    qa, records = _default_qa(), []
    for i, (name, q, a) in enumerate(qa):
        j = (i + 1 + zlib.crc32(name.encode()) % (len(qa) - 1)) % len(qa)
        while qa[j][2] == a:
            j = (j + 1) % len(qa)
        records.append({"prompt": q, "chosen": a, "rejected": qa[j][2], "split": "val" if _heldout(name) else "train"})
    return records
