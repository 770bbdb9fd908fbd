"""readers.py: the public entry points (iter_texts, read_jsonl) and broken files; the formats themselves are
covered by test_data_process.py's reader tests."""
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
