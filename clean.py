"""Cleaning rules for pretraining text (data_process.py); SFT/DPO text only gets step 1 (strip_control).

In this order:
  1. ANSI escape sequences and control characters (all of Unicode Cc except \\t and \\n; \\r\\n -> \\n; zero-width
     space, BOM, word joiner, soft hyphen) are removed.
  2. NFKC: full-width letters/digits/space become ASCII and compatibility ideographs are unified - and full-width
     punctuation such as '，！？：；（）' becomes ASCII too (also lossy bits: '²' -> '2', '①' -> '1'); '…' is kept.
  3. Runs of one repeated mark among 。，、！？；：,!?; collapse to one ("。。。。。" -> "。"); '...', '……', '——' stay.
  4. CJK punctuation rule (documents with CJK only), undoing step 2 in Chinese/Japanese: , ! ? : ; become ，！？：；when the
     character right before or after is CJK (Han, kana, CJK punctuation), and spaces after them before CJK go;
     '.' becomes '。' only between a Han character and whitespace/Han/end (so 3.14, v1.2, 文件.txt stay);
     a parenthesised span containing CJK becomes （...）. Elsewhere punctuation stays half-width.
  5. Optional final period (`final_period`): a document ending in a letter/digit gets '。' after Han, else '.'.
"""
import re
import unicodedata

_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0002ffff"
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff\u00ad]")
_REPEATED = re.compile(r"([。，、！？；：,!?;])\1+")
_FULLWIDTH = {",": "，", "!": "！", "?": "？", ":": "：", ";": "；"}
# The mark first, its context in lookarounds: a regex that starts with a character class scans fast, and a
# replacement without group references is applied in C (3.11 expands "\1" in Python for every match).
_TO_FULLWIDTH = re.compile(f"([,!?:;])(?:(?<=[{_CJK}][,!?:;])|(?=[{_CJK}]))")  # split() keeps the captured mark
_SPACE_AFTER_FULLWIDTH = re.compile(f"(?<=[，！？：；])[ \t]+(?=[{_CJK}])")
_PERIOD = re.compile(f"\\.(?<=[{_HAN}]\\.)(?=[\\s{_HAN}]|\\Z)")
_PARENS = re.compile(f"\\(([^()\\n]*[{_CJK}][^()\\n]*)\\)")
_IS_HAN, _HAS_CJK = re.compile(f"[{_HAN}]"), re.compile(f"[{_CJK}]")
_COMMON_WIDE = [(c, unicodedata.normalize("NFKC", c)) for c in "，！？：；（）　"]


def strip_control(text, counts=None):
    """Step 1 of the cleaning: ANSI escape codes, control characters (keeping \\t and \\n), \\r\\n -> \\n."""
    text = text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text
    text, n_ansi = _ANSI.subn("", text) if "\x1b" in text else (text, 0)
    text, n_ctrl = _CONTROL.subn("", text)
    if counts is not None:
        counts["ansi_codes_removed"] += n_ansi
        counts["control_chars_removed"] += n_ctrl
    return text


def _nfkc(text):
    """Step 2, keeping '…' (NFKC makes it '...'). The full-width marks Chinese text is full of are first replaced by
    their NFKC form: the result is the same (NFKC decomposes them to exactly that), but then the quick check of
    unicodedata.normalize passes on most documents, which makes the step ~8x faster on Chinese."""
    if text.isascii():
        return text
    for wide, narrow in _COMMON_WIDE:
        text = text.replace(wide, narrow)
    return "…".join(unicodedata.normalize("NFKC", t) for t in text.split("…"))


def clean_text(text, cfg, counts):
    """The pretraining cleaning rules (module docstring); `counts` collects what the steps changed."""
    raw, text = text, strip_control(text, counts)
    if cfg["nfkc"]:
        text = _nfkc(text)
    if cfg["collapse_punct"]:
        text, n = _REPEATED.subn(r"\1", text)
        counts["punct_runs_collapsed"] += n
    if cfg["cjk_punct"] and _HAS_CJK.search(text):
        parts = _TO_FULLWIDTH.split(text)  # [text, mark, text, mark, ..., text]
        parts[1::2], n1 = map(_FULLWIDTH.__getitem__, parts[1::2]), len(parts) // 2
        text = "".join(parts)
        text, n2 = _PERIOD.subn("。", text) if "." in text else (text, 0)  # (a scan for one character is cheap)
        text, n3 = _PARENS.subn(r"（\1）", text) if "(" in text else (text, 0)
        text = _SPACE_AFTER_FULLWIDTH.sub("", text) if " " in text or "\t" in text else text
        counts["punct_made_fullwidth"] += n1 + n2 + 2 * n3  # mostly marks that NFKC had made ASCII
    text = text.strip()
    if cfg["final_period"] and text and text[-1].isalnum():
        text += "。" if _IS_HAN.match(text[-1]) else "."
        counts["final_period_added"] += 1
    counts["docs_changed_by_cleaning"] += text != raw.strip()
    return text
