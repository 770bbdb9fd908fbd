"""readers.py: the public entry points (iter_texts, read_jsonl) and broken files; the formats themselves are
covered by test_data_process.py's reader tests."""
import os
import gzip
import json

import pytest

import readers


def test_iter_texts_reads_files_folders_and_fields(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    (tmp_path / "c" / "b.jsonl").write_text('{"body": "three"}\n', encoding="utf-8")
    (tmp_path / "c" / "SOURCE.json").write_text('{"not": "read"}', encoding="utf-8")
    assert list(readers.iter_texts(str(tmp_path / "c"), text_field="body,text")) == ["one", "two", "three"]
    (tmp_path / "d.txt").write_text("p1\np1b\n\np2\n", encoding="utf-8")
    assert list(readers.iter_texts(str(tmp_path / "d.txt"), txt_split="blank")) == ["p1\np1b", "p2"]


def test_iter_texts_lenient_summary_and_bad_options(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n{"other": 1}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"m\.jsonl:2: malformed JSON"):
        list(readers.iter_texts(str(path)))
    assert list(readers.iter_texts(str(path), lenient=True)) == ["ok"]
    assert "skipped 2 bad record(s), e.g. " in capsys.readouterr().err
    with pytest.raises(SystemExit, match="encoding 'utf-9' is unknown"):
        list(readers.iter_texts(str(path), encoding="utf-9"))
    with pytest.raises(SystemExit, match="txt_split must be line, blank, file"):
        list(readers.iter_texts(str(path), txt_split="lines"))


def test_read_jsonl_names_the_line(tmp_path):
    path = tmp_path / "e.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"q": "1"}) + "\n\n" + json.dumps(["x"]) + "\n{bad\n")
    rows = readers.read_jsonl(str(path))
    assert next(rows) == (f"{path}:1", {"q": "1"}) and next(rows) == (f"{path}:3", ["x"])
    with pytest.raises(SystemExit, match=r"e\.jsonl\.gz:4: malformed JSON"):
        next(rows)


@pytest.mark.parametrize("name", ["a.txt.gz", "a.jsonl.gz", "a.json.gz", "a.csv.gz"])
def test_broken_gz_names_the_file_or_is_skipped_when_lenient(tmp_path, name, capsys):
    rows = [json.dumps({"text": f"document number {i}"}) for i in range(2000)]
    body = ("text\n" + "\n".join(f"document number {i}" for i in range(2000)) if name.startswith("a.csv")
            else "[" + ",".join(rows) + "]" if name.startswith("a.json.") else "\n".join(rows))
    whole = gzip.compress(body.encode())
    (tmp_path / "ok.txt").write_text("a good line\n", encoding="utf-8")
    for broken, what in ((whole[:len(whole) // 2], "broken gzip data after line"), (body.encode(), "not a gzip file")):
        (tmp_path / name).write_bytes(broken)
        spec = f"{tmp_path / 'ok.txt'},{tmp_path / name}"
        with pytest.raises(SystemExit, match=f"{name}: {what}"):
            list(readers.iter_texts(spec))
        texts = list(readers.iter_texts(spec, lenient=True))
        assert texts[0] == "a good line" and len(texts) < 2000
        assert f"skipped 1 bad record(s), e.g. {tmp_path / name}: {what}" in capsys.readouterr().err


def test_broken_parquet_names_the_file(tmp_path):
    pytest.importorskip("pyarrow.parquet")
    (tmp_path / "t.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SystemExit, match=r"t\.parquet: not a readable parquet file"):
        list(readers.iter_texts(str(tmp_path / "t.parquet")))


def test_utf16_files_get_a_hint_and_utf16_is_refused(tmp_path):
    path = tmp_path / "win.txt"
    path.write_bytes("第一行\n第二行\n".encode("utf-16"))
    with pytest.raises(SystemExit, match=r"win\.txt:1: not valid utf-8 .*a UTF-16 file\? convert it to UTF-8"):
        list(readers.iter_texts(str(path)))
    with pytest.raises(SystemExit, match="encoding utf-16 is not supported: convert the files to UTF-8"):
        list(readers.iter_texts(str(path), encoding="utf-16"))


# a PDF's start: text lines, then compressed streams (no NUL byte in these first ones)
FAKE_PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\nstream\nx\x9c\xf3H\xcd\xc9\xc9\x07"


def test_binary_files_are_skipped_and_named_never_read(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("a line of text\n", encoding="utf-8")
    (tmp_path / "c" / "paper.txt").write_bytes(FAKE_PDF)  # a PDF saved under a text name
    (tmp_path / "c" / "scan.jsonl.gz").write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"))
    (tmp_path / "c" / "win.txt").write_bytes("第一行\n".encode("utf-16"))  # text with NUL bytes: left to the reader
    (tmp_path / "c" / "web.txt").write_bytes(b"scraped\x00 text\n" + b"more text\n" * 200)  # one stray NUL: text
    (tmp_path / "report.pdf").write_bytes(FAKE_PDF)
    files, skipped = readers.expand_inputs(f"{tmp_path / 'c'},{tmp_path / 'report.pdf'}")
    assert [f.rsplit("/", 1)[1] for f in files] == ["notes.txt", "web.txt", "win.txt"]
    summary = readers.skipped_summary(skipped)
    assert summary.startswith("skipped 3 file(s): 3 binary (not text: never read): ")
    assert all(name in summary for name in ("paper.txt", "scan.jsonl.gz", "report.pdf"))
    texts = list(readers.iter_texts(f"{tmp_path / 'c' / 'notes.txt'},{tmp_path / 'report.pdf'}"))
    assert texts == ["a line of text"] and "1 binary (not text: never read): " in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"report\.pdf: no readable files \(skipped 1 file\(s\): 1 binary"):
        readers.expand_inputs(str(tmp_path / "report.pdf"))


def test_csv_chat_records_are_read_like_json_records(tmp_path):
    opts = {"text_field": "text", "txt_split": "line", "encoding": "utf-8", "format": "sft"}
    path = tmp_path / "alpaca.csv"
    rows = 'instruction,input,output\n把这句话翻译成英文,"你好，世界",Hello world\n写一首诗,,"床前明月光，\n疑是地上霜。"\n'
    path.write_text(rows, encoding="utf-8-sig")  # as Excel saves it: with a byte order mark
    assert list(readers.read_file(str(path), opts)) == [
        ({"instruction": "把这句话翻译成英文", "input": "你好，世界", "output": "Hello world"}, 2),
        ({"instruction": "写一首诗", "input": "", "output": "床前明月光，\n疑是地上霜。"}, 4)]
    (tmp_path / "pref.csv").write_text("prompt,chosen,rejected\n问题,好,坏\n", encoding="utf-8")
    assert list(readers.read_file(str(tmp_path / "pref.csv"), {**opts, "format": "dpo"})) == \
        [({"prompt": "问题", "chosen": "好", "rejected": "坏"}, 2)]
    (tmp_path / "qa.csv").write_text("question,answer\n问,答\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"qa\.csv:1: the columns question, answer hold no sft record layout: .*"
                                         r"instruction,output or prompt,completion"):
        list(readers.read_file(str(tmp_path / "qa.csv"), opts))
    renamed = {**opts, "rename": "question:prompt,answer:completion"}  # renamed later, by chat_data
    assert list(readers.read_file(str(tmp_path / "qa.csv"), renamed)) == [({"question": "问", "answer": "答"}, 2)]
    (tmp_path / "short.csv").write_text("instruction,output\n1,2\n3\n", encoding="utf-8")
    assert list(readers.read_file(str(tmp_path / "short.csv"), opts))[1] == (3, "row has 1 columns, the header 2")
    assert list(readers.read_file(str(path), {**opts, "format": "pretrain", "text_field": "output"})) == \
        [("Hello world", 2), ("床前明月光，\n疑是地上霜。", 4)]  # pretraining text: one column, as before


def test_a_pipe_is_read_once_not_sniffed_first():
    """--data=<(printf ...) is a pipe: the binary check must not eat what the reader then reads."""
    read_end, write_end = os.pipe()
    os.write(write_end, "The for statement\n一个类是\n".encode())
    os.close(write_end)
    try:
        assert list(readers.iter_texts(f"/dev/fd/{read_end}", text_field="prompt")) == ["The for statement", "一个类是"]
    finally:
        os.close(read_end)
