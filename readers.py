"""Raw text files -> documents: the one reader of corpora, for data_process.py, train_tokenizer.py and eval.py.

    files, skipped = expand_inputs("corpus/,more.jsonl.gz,web/*.csv")
    for text in iter_texts("corpus/", text_field="text", txt_split="blank", lenient=True): ...
    for where, obj in read_jsonl("eval.jsonl"): ...         # where = "path:line"

Inputs (`spec`: comma-separated files, folders and globs; `.gz` is read transparently, everything streams):
  .txt (and files without extension): `txt_split` = "line" (a document per line), "blank" (blank-line separated),
      "file" (one document per file), or any other string: a line equal to it ends a document ("%", "<|endoftext|>").
  .jsonl / .json (a JSON list, one object, or JSON Lines) / .csv (a header row) / .parquet (needs pyarrow):
      `text_field` names the field or column; a comma-separated list tries each in turn, a list value has its items
      joined by newlines and a nested object is searched for the same names (chinese-poetry: paragraphs,content,para);
      "#N" is column N of a headerless CSV. Folders skip `exclude` names and unknown extensions (both reported).
  Chat records (data_process.py --format=sft/dpo) in a .csv: each row is read as the JSON object of its header's
      names, which must hold one of CSV_LAYOUTS (after `rename`); a header with none stops, naming the columns.
  Binary files (a PDF, an image, an archive: a known signature or NUL bytes in the first 8 KB, _is_binary) are never
      read as text: they are skipped and reported, named or found in a folder alike.
Bad input (bytes that are not `encoding`, malformed JSON, a missing field, a broken .gz) stops with
`path:line: what`; with `lenient=True` such places are skipped and counted instead.
"""
import codecs
import csv
import fnmatch
import glob
import gzip
import io
import json
import os
import re
import sys
import zlib

EXCLUDE = "SOURCE.json,README*,LICENSE*"  # file-name globs skipped inside folders and globs

_KINDS = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
csv.field_size_limit(2**31 - 1)
# The columns a CSV of chat records needs, per format: its rows are then the JSON records of that layout (chat_data.py);
# other columns (input, system, split, prompt for chosen/rejected) come along. dpo's chosen/rejected alone: hh-rlhf.
CSV_LAYOUTS = {"sft": (("instruction", "output"), ("prompt", "completion")), "dpo": (("chosen", "rejected"),)}
# Signatures of binary formats that may hold no NUL byte early on (a PDF's first lines are text) or are zip archives
# (docx, xlsx, epub); most other binary files have many NUL bytes in their first 8 KB, which no text we read has.
_MAGIC = (b"%PDF", b"PK\x03\x04", b"\xd0\xcf\x11\xe0", b"\x1f\x8b", b"\xff\xd8\xff")


_GAP, _LIST_GAP = re.compile(r"\s*"), re.compile(r"[\s,]*")
_LINE = re.compile(r"[^\n]*\n|[^\n]+")  # a line and its newline (only \n ends a line, as in binary readline)


class _Bad(tuple):
    """A reader's complaint about one place in a file: (line, message)."""


class _Binary(str):
    """The path of a file expand_inputs skipped as binary."""


def _kind(path):
    base = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(os.path.basename(base))[1].lower()
    return _KINDS.get(ext, "txt" if ext == "" else None)


def _is_binary(path, size=8192):
    """Whether a file's first bytes (gunzipped for .gz) are no text: a _MAGIC signature, or NUL bytes (more than one
    in 1,024: a stray one in a scraped text is cleaned away later; compressed data has one in 256). UTF-16/32 text
    with its byte order mark is left to the reader, which says how to convert it. A pipe (--data=<(printf ...)) is
    not looked at: what is read from it is gone."""
    if not os.path.isfile(path):
        return False
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            head = f.read(size)
    except (OSError, EOFError, zlib.error):  # unreadable, or a broken .gz: the reader names what is wrong
        return False
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return False
    return head.startswith(_MAGIC) or head.count(b"\0") > len(head) // 1024


def expand_inputs(spec, exclude=EXCLUDE):
    """Comma-separated files/folders/globs -> (sorted file list, skipped files: see skipped_summary). Missing paths
    stop with an error."""
    patterns = [p for p in exclude.split(",") if p]
    files, skipped = [], []

    def add(path, explicit):
        name = os.path.basename(path)
        if not explicit and any(fnmatch.fnmatch(name, p) for p in patterns):
            skipped.append(path)
        elif not (_kind(path) or explicit):  # an explicitly named file of unknown extension is read as text
            skipped.append(path)
        elif _kind(path) != "parquet" and _is_binary(path):
            skipped.append(_Binary(path))
        else:
            files.append(path)

    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        is_glob = any(c in part for c in "*?[")
        matches = sorted(glob.glob(part, recursive=True)) if is_glob else [part]
        if not matches or not (is_glob or os.path.exists(part)):
            raise SystemExit(f"{part}: no such file or folder")
        for m in matches:
            if os.path.isdir(m):
                for root, dirs, names in os.walk(m):
                    dirs.sort()
                    for name in sorted(names):
                        add(os.path.join(root, name), False)
            else:
                add(m, not is_glob)
    if not files:
        raise SystemExit(f"{spec}: no readable files ({skipped_summary(skipped) or 'none found'})")
    return files, skipped


def skipped_summary(skipped):
    """One line naming expand_inputs' skipped files, the binary ones apart ("" when there are none)."""
    def names(paths):
        return ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")

    binary = [p for p in skipped if isinstance(p, _Binary)]
    other = [p for p in skipped if not isinstance(p, _Binary)]
    parts = ([f"{len(binary)} binary (not text: never read): {names(binary)}"] if binary else []) + (
        [f"{len(other)} by name or extension: {names(other)}"] if other else [])
    return f"skipped {len(skipped)} file(s): {'; '.join(parts)}" if skipped else ""


def _blocks(path, encoding, size=1 << 20):
    """(number of its first line, text) for runs of whole lines of about `size` bytes, gunzipping .gz: decoding and
    splitting a block at once is several times faster than line by line. A line that does not decode comes back as
    _Bad((line, message)) between the good runs around it; a file that cannot be read on (a broken .gz) as
    _Bad((None, message)), after which nothing more is read from it."""
    gz, n, parts = path.endswith(".gz"), 1, []
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            for chunk in iter(lambda: f.read(size), b""):
                cut = chunk.rfind(b"\n") + 1
                parts.append(chunk[:cut] if cut else chunk)
                if cut:  # a block of whole lines is ready (a line longer than `size` waits for its end)
                    block, parts = b"".join(parts), [chunk[cut:]]
                    items, lines = _decoded(block, n, encoding), block.count(b"\n")
                    del block
                    yield from _hand_over(items)
                    n += lines
            if any(parts):
                yield from _hand_over(_decoded(b"".join(parts), n, encoding))
    except (OSError, EOFError, zlib.error) as e:  # EOFError: a truncated .gz; zlib.error: corrupt deflate data
        what = ("not a gzip file" if n == 1 and isinstance(e, gzip.BadGzipFile) else
                f"broken gzip data after line {n - 1}" if gz else "cannot read it")
        yield None, _Bad((None, f"{what} ({e})"))


def _decoded(block, n, encoding):
    """[(n, text)] for a block that decodes, else its runs of good lines and _Bad for each line that does not."""
    try:
        return [(n, _without_bom(block.decode(encoding), n))]
    except UnicodeDecodeError:  # again line by line, to name the bad lines and keep the others
        items, good, start = [], [], n
        for k, raw in enumerate(io.BytesIO(block), n):
            try:
                good.append(raw.decode(encoding))
            except UnicodeDecodeError as e:
                items += [(start, _without_bom("".join(good), start))] if good else []
                hint = ("a UTF-16 file? convert it to UTF-8" if k == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff")
                        else "see --encoding")  # Windows "Unicode" text starts with a UTF-16 byte order mark
                items.append((k, _Bad((k, f"not valid {encoding} (byte {e.start} of the line: "
                                          f"{raw[e.start:e.start + 4]!r}; {hint})"))))
                good, start = [], k + 1
        return items + ([(start, _without_bom("".join(good), start))] if good else [])


def _without_bom(text, first_line):
    return text[1:] if first_line == 1 and text.startswith("\ufeff") else text


def _hand_over(items):
    """Yield the items of a list, dropping each from it: a reader further on that holds a very long line then holds
    its only copy (the generators before it keep none)."""
    items.reverse()
    while items:
        yield items.pop()


def _lines(path, encoding="utf-8"):
    """(line number, text with its newline) per line, or (line, _Bad) as _blocks says."""
    for n, text in _blocks(path, encoding):
        if isinstance(text, _Bad):
            yield n, text
            continue
        lines = [text] if text.find("\n") in (-1, len(text) - 1) else _LINE.findall(text)  # one line: no copy
        del text
        yield from enumerate(_hand_over(lines), n)


def _read_txt(path, split, encoding):
    doc, start = [], 0
    for n, line in _lines(path, encoding):
        if isinstance(line, _Bad):
            yield line
            continue
        line = line.rstrip("\r\n")
        blank = not line or line.isspace()  # (line.strip() would copy a very long line)
        if split == "line":
            if not blank:
                yield line, n
            continue
        end = blank if split == "blank" else (split != "file" and line.strip() == split)
        if end:
            if doc:
                yield "\n".join(doc), start
            doc = []
        elif not blank or doc:
            start = start if doc else n
            doc.append(line)
    if doc:
        yield "\n".join(doc), start


def _read_jsonl(path, encoding):
    for n, line in _lines(path, encoding):
        if isinstance(line, _Bad):
            yield line
        elif line.strip():
            try:
                yield json.loads(line), n
            except json.JSONDecodeError as e:
                yield _Bad((n, f"malformed JSON: {e.msg} (column {e.colno})"))


def _read_json(path, encoding):
    """Stream the items of a JSON list (or a sequence of JSON values: one object, JSON Lines) without loading the
    whole file: raw_decode over a buffer of whole lines, topped up a block at a time (more while an item is
    incomplete). A malformed item stops the file: past it there is no telling where the next item starts."""
    decoder, src, bad = json.JSONDecoder(), _blocks(path, encoding), []
    buf, pos, line, eof, in_list = "", 0, 1, False, None

    def more(want):  # keep buf[pos:], append whole lines worth at least `want` characters (or all that is left)
        nonlocal buf, pos, eof
        parts, size = [buf[pos:]], 0
        while size < want and not eof:
            n, text = next(src, (None, None))
            if text is None or isinstance(text, _Bad):
                eof = True
                bad.extend([_Bad((text[0], text[1] + " (rest of the file skipped)"))] if text else [])
            else:
                parts.append(text)
                size += len(text)
        buf, pos = "".join(parts), 0

    while True:
        m = (_LIST_GAP if in_list else _GAP).match(buf, pos)
        line, pos = line + buf.count("\n", pos, m.end()), m.end()
        if pos == len(buf):
            if eof:
                break
            more(1 << 16)
            continue
        if in_list is None:
            in_list = buf[pos] == "["
            pos += in_list
            continue
        if in_list and buf[pos] == "]":
            break
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as e:
            if not eof and e.pos >= buf.rfind("\n", 0, len(buf) - 1) + 1:  # maybe just incomplete: read more
                more(max(len(buf) - pos, 1 << 16))
                continue
            if not bad:
                yield _Bad((line + buf.count("\n", pos, e.pos), f"malformed JSON: {e.msg} (rest of the file skipped)"))
            break
        yield obj, line
        line, pos = line + buf.count("\n", pos, end), end
    yield from bad


def _read_csv(path, fields, encoding, fmt=None, rename=""):
    """The `fields` column of each row, or for fmt sft/dpo each row as {header name: value} (CSV_LAYOUTS)."""
    bad, where = [], [0]

    def text_lines():
        for n, line in _lines(path, encoding):
            where[0] = n
            if isinstance(line, _Bad):
                bad.append(line)
            else:
                yield line

    reader = csv.reader(text_lines())
    if fmt in CSV_LAYOUTS:
        yield from _csv_records(path, reader, bad, where, fmt, rename)
        return
    if fields[0].startswith("#"):
        col = int(fields[0][1:])
    else:
        header = next(reader, [])
        col = next((header.index(f) for f in fields if f in header), None)
        if col is None:  # or the header line itself was bad
            yield from bad or [_Bad((1, f"no column {'/'.join(fields)} (columns: {', '.join(header)})"))]
            return
    for row in reader:
        yield from bad
        bad.clear()
        if len(row) <= col:
            yield _Bad((where[0], f"row has {len(row)} columns, needs column {col + 1}"))
        else:
            yield row[col], where[0]
    yield from bad


def parse_rename(spec):
    """data_process's `rename`: "old:new,..." -> {old: new}."""
    renames = {}
    for pair in filter(str.strip, spec.split(",")):
        old, sep, new = (x.strip() for x in pair.partition(":"))
        if not (sep and old and new):
            raise SystemExit(f"rename: expected old:new pairs separated by commas, got {pair!r}")
        renames[old] = new
    return renames


def _csv_records(path, reader, bad, where, fmt, rename):
    header = next(reader, [])
    if bad:  # the header line itself does not decode
        yield _Bad((bad[0][0], bad[0][1] + " (in the header: the file is skipped)"))
        return
    renames = parse_rename(rename)
    names = {renames.get(h, h) for h in header}
    if not any(names.issuperset(layout) for layout in CSV_LAYOUTS[fmt]):
        raise SystemExit(f"{path}:1: the columns {', '.join(header) or '(none)'} hold no {fmt} record layout: a CSV of "
                         f"{fmt} records needs the columns {' or '.join(','.join(x) for x in CSV_LAYOUTS[fmt])}, "
                         f"as in JSON records (--rename=old:new maps other names)")
    for row in reader:
        yield from bad
        bad.clear()
        if len(row) != len(header):
            yield _Bad((where[0], f"row has {len(row)} columns, the header {len(header)}"))
        else:
            yield dict(zip(header, row)), where[0]
    yield from bad


def _read_parquet(path, fields, encoding=None):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        yield _Bad((None, f"not a readable parquet file ({e})"))
        return
    col = next((f for f in fields if f in pf.schema_arrow.names), None)
    if col is None:
        yield _Bad((1, f"no column {'/'.join(fields)} (columns: {', '.join(pf.schema_arrow.names)})"))
        return
    row = 0
    for batch in pf.iter_batches(columns=[col], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield value, row


def check_options(txt_split, encoding):
    """Stop on a txt_split or encoding that cannot be meant, before any reading."""
    if txt_split not in ("line", "blank", "file") and txt_split.strip().isalpha():  # a typo, surely
        raise SystemExit(f"txt_split must be line, blank, file or a separator line such as % or <|endoftext|>, "
                         f"not {txt_split!r}")
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise SystemExit(f"encoding {encoding!r} is unknown (e.g. utf-8, gb18030, latin-1)") from None
    if name.startswith(("utf-16", "utf-32")):  # files are cut into lines at the byte \n, which these split
        raise SystemExit(f"encoding {encoding} is not supported: convert the files to UTF-8 first "
                         f"(iconv -f {encoding} -t utf-8)")


def check_csv_layouts(files, opts):
    """For format sft/dpo: stop on the first CSV of `files` whose header holds no CSV_LAYOUTS layout, before any
    file is read through (or anything written)."""
    for path in files:
        if _kind(path) == "csv" and opts.get("format") in CSV_LAYOUTS:
            next(read_file(path, opts), None)


def read_file(path, opts):
    """Yield (value, line) per document/record of one file (a str, or a decoded JSON value), or _Bad((line, msg)).
    `opts`: a mapping with text_field, txt_split and encoding, and optionally format and rename (data_process.py's
    config has them all): format sft/dpo reads a CSV's rows as records (CSV_LAYOUTS)."""
    kind, fields, enc = _kind(path) or "txt", opts["text_field"].split(","), opts["encoding"]
    if kind == "txt":
        return _read_txt(path, opts["txt_split"], enc)
    if kind in ("json", "jsonl"):
        return (_read_json if kind == "json" else _read_jsonl)(path, enc)
    if kind == "csv":
        return _read_csv(path, fields, enc, opts.get("format"), opts.get("rename", ""))
    return _read_parquet(path, fields, enc)


def _where(path, line, msg):
    return f"{path}:{line}: {msg}" if line is not None else f"{path}: {msg}"


class Issues:
    """Bad records: stop with `path:line: message`, or (lenient) count them and keep a few examples."""

    def __init__(self, lenient):
        self.lenient, self.count, self.examples = lenient, 0, []

    def __call__(self, path, line, msg):
        where = _where(path, line, msg)
        if not self.lenient:
            raise SystemExit(f"{where}\n(pass --lenient=True to skip such records and count them)")
        self.count += 1
        if len(self.examples) < 20:
            self.examples.append(where)

    def summary(self):
        return f"skipped {self.count} bad record(s), e.g. {self.examples[0]}" if self.count else ""


def _flatten(value, fields):
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(type(v) is str for v in value):  # the common case (a poem's lines), without a call per item
            return "\n".join(filter(None, value))
        return "\n".join(t for t in (_flatten(v, fields) for v in value) if t)
    if isinstance(value, dict):
        return next((_flatten(value[f], fields) for f in fields if f in value), "")
    return "" if value is None else str(value)


def record_text(rec, fields):
    """The document text of a JSON record (see text_field); raises ValueError naming what is missing."""
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object with field {'/'.join(fields)}, got {type(rec).__name__}")
    for f in fields:
        if f in rec:
            return _flatten(rec[f], fields)
    raise ValueError(f"missing field {'/'.join(fields)} (record has: {', '.join(list(rec)[:12])})")


def iter_records(files, opts, issues, sources):
    """(value, path, line) over all files; bad places go to `issues`; per-file counts go into `sources`."""
    for path in files:
        sources[path] = 0
        for item in read_file(path, opts):
            if isinstance(item, _Bad):
                issues(path, *item)
            else:
                sources[path] += 1
                yield item[0], path, item[1]


def iter_documents(files, opts, issues, sources):
    """The document text of every record (record_text), like iter_records."""
    fields = opts["text_field"].split(",")
    for value, path, line in iter_records(files, opts, issues, sources):
        try:
            yield record_text(value, fields)
        except ValueError as e:
            sources[path] -= 1
            issues(path, line, str(e))


def iter_texts(spec, text_field="text", txt_split="line", encoding="utf-8", lenient=False, exclude=EXCLUDE):
    """The documents of comma-separated files/folders/globs. Bad places stop with `path:line: what`; lenient: they
    are skipped and counted, with a one-line summary on stderr at the end."""
    check_options(txt_split, encoding)
    files, skipped = expand_inputs(spec, exclude)
    if skipped:
        print(f"{spec}: {skipped_summary(skipped)}", file=sys.stderr)
    issues = Issues(lenient)
    yield from iter_documents(files, {"text_field": text_field, "txt_split": txt_split, "encoding": encoding},
                              issues, {})
    if issues.count:
        print(f"{spec}: {issues.summary()}", file=sys.stderr)


def read_jsonl(path, encoding="utf-8"):
    """(where, value) for each non-empty line of a JSON Lines file (.gz allowed), where = "path:line"; a malformed
    line or a broken file stops with `path:line: what`."""
    for item in _read_jsonl(path, encoding):
        if isinstance(item, _Bad):
            raise SystemExit(_where(path, *item))
        yield f"{path}:{item[1]}", item[0]
