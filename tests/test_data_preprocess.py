"""JSONL preprocessing, tokenizers, the data CLI and the shipped corpus."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from click.testing import CliRunner

from xmoe.data import preprocess as pp
from xmoe.data.cli import data as data_cli
from xmoe.data.errors import DataError
from xmoe.data.indexed import IndexedDataset
from xmoe.data.storygen import CORPUS_FILE, corpus_lines
from xmoe.data.tokenizer import ByteTokenizer, load_tokenizer

TEXTS = ["hello world", "ünïcödé ✓", "a\nb", "x" * 3000, "the end"]


def _jsonl(path, texts=TEXTS, extra=()):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    path.write_text("\n".join([*lines, *extra]) + "\n", encoding="utf-8")
    return path


def _docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_byte_documents_with_eod_and_counts(tmp_path):
    bad = ["", "   ", "{not json", '{"other": 1}', '{"text": 5}', "[1, 2]", '{"text": ""}', "\xff"]
    src = _jsonl(tmp_path / "in.jsonl", extra=bad)
    stats = pp.preprocess([str(src)], str(tmp_path / "out"))
    assert (stats.documents, stats.empty, stats.malformed) == (5, 3, 5)
    assert stats.bytes_read == src.stat().st_size
    expected = [list(t.encode()) + [256] for t in TEXTS]
    assert _docs(tmp_path / "out") == expected
    assert stats.tokens == sum(map(len, expected))
    assert IndexedDataset(tmp_path / "out").dtype == np.uint16


def test_two_workers_write_identical_files(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "CHUNK_BYTES", 64)  # many chunks, so ordering is exercised
    texts = [f"document {i} " + "abc" * (i % 17) for i in range(400)]
    src = _jsonl(tmp_path / "in.jsonl", texts)
    s1 = pp.preprocess([str(src)], str(tmp_path / "one"), workers=1)
    s2 = pp.preprocess([str(src)], str(tmp_path / "two"), workers=2)
    assert s1.documents == s2.documents == 400
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()


def test_gz_and_zst_inputs(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    src = _jsonl(tmp_path / "in.jsonl")
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(src.read_bytes()))
    (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(src.read_bytes()))
    pp.preprocess([str(src)], str(tmp_path / "plain"))
    for ext in ("gz", "zst"):
        pp.preprocess([str(tmp_path / f"in.jsonl.{ext}")], str(tmp_path / ext))
        assert _docs(tmp_path / ext) == _docs(tmp_path / "plain")


def test_corrupt_gz_is_one_line_error_and_writes_nothing(tmp_path):
    good = gzip.compress(_jsonl(tmp_path / "in.jsonl", ["x" * 50000]).read_bytes())
    (tmp_path / "bad.jsonl.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz: cannot read"):
        pp.preprocess([str(tmp_path / "bad.jsonl.gz")], str(tmp_path / "out"))
    assert not list(tmp_path.glob("out*"))


def test_refuses_to_overwrite_without_force(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl")
    pp.preprocess([str(src)], str(tmp_path / "out"))
    before = (tmp_path / "out.bin").read_bytes()
    other = _jsonl(tmp_path / "other.jsonl", ["different"])
    with pytest.raises(DataError, match=r"out\.bin exists: pass --force"):
        pp.preprocess([str(other)], str(tmp_path / "out"))
    assert (tmp_path / "out.bin").read_bytes() == before
    pp.preprocess([str(other)], str(tmp_path / "out"), force=True)
    assert _docs(tmp_path / "out") == [list(b"different") + [256]]


def test_no_documents_is_an_error_and_leaves_no_files(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": ""}\nnot json\n')
    with pytest.raises(DataError, match="no documents.*1 empty, 1 malformed"):
        pp.preprocess([str(src)], str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_missing_input_and_unknown_tokenizer(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: input file not found"):
        pp.preprocess([str(tmp_path / "nope.jsonl")], str(tmp_path / "out"))
    src = _jsonl(tmp_path / "in.jsonl")
    with pytest.raises(DataError, match="tokenizer 'sentencepiece' is unknown"):
        pp.preprocess([str(src)], str(tmp_path / "out"), tokenizer="sentencepiece")
    with pytest.raises(DataError, match=r"tok\.json: tokenizer file not found"):
        load_tokenizer(f"hf:{tmp_path / 'tok.json'}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table, from its definition."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@pytest.fixture
def gpt2_files(tmp_path):
    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("e", "ll")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    body = "".join(f"{a} {b}\n" for a, b in merges)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + body, encoding="utf-8")
    return tmp_path, vocab


def test_gpt2_bpe_from_local_files(gpt2_files):
    folder, vocab = gpt2_files
    tok = load_tokenizer(f"gpt2:{folder}")
    assert tok.eod == vocab["<|endoftext|>"] == 261 and tok.vocab_size == 262
    # " the" merges to one token through Ġt + he; "the" at the start has no leading space.
    assert tok.encode(" the") == [vocab["Ġthe"]]
    assert tok.encode("the") == [ord("t"), vocab["he"]]
    # merges apply by rank: "h e" wins over "l l" in "hell", "e ll" completes "bell"
    assert tok.encode("hell") == [vocab["he"], vocab["ll"]]
    assert tok.encode("bell") == [ord("b"), vocab["ell"]]
    assert tok.encode(" 7é") == [vocab["Ġ"], ord("7"), vocab["Ã"], vocab["©"]]
    # the GPT-2 pre-tokenizer keeps contractions and digits apart
    assert tok.encode("it's") == [ord("i"), ord("t"), ord("'"), ord("s")]
    text = "He said: the bell, the shell!  ünï ✓"
    assert tok.decode(tok.encode(text)) == text
    same = load_tokenizer(f"gpt2:{folder / 'vocab.json'},{folder / 'merges.txt'}")
    assert same.encode(text) == tok.encode(text)


def test_preprocess_with_gpt2_and_hf_tokenizers(tmp_path, gpt2_files):
    tokenizers = pytest.importorskip("tokenizers")
    folder, vocab = gpt2_files
    src = _jsonl(tmp_path / "in.jsonl")
    pp.preprocess([str(src)], str(tmp_path / "g"), tokenizer=f"gpt2:{folder}", workers=2)
    tok = load_tokenizer(f"gpt2:{folder}")
    docs = _docs(tmp_path / "g")
    assert [tok.decode(d[:-1]) for d in docs] == TEXTS and {d[-1] for d in docs} == {261}

    trained = tokenizers.Tokenizer(tokenizers.models.BPE())
    trained.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    trained.train_from_iterator(TEXTS * 5, trainer)
    trained.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}")
    assert hf.eod == trained.token_to_id("</s>")
    pp.preprocess([str(src)], str(tmp_path / "h"), tokenizer=f"hf:{tmp_path / 'tokenizer.json'}")
    assert [hf.decode(d[:-1]) for d in _docs(tmp_path / "h")] == TEXTS
    with pytest.raises(DataError, match="no end-of-document token"):
        load_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}@<|eot|>")


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("ünï ✓")
    assert max(ids) < 256 and tok.decode([*ids, tok.eod]) == "ünï ✓"


def test_cli_preprocess_inspect_and_one_line_errors(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl")
    runner = CliRunner()
    out = str(tmp_path / "out")
    res = runner.invoke(
        data_cli, ["preprocess", "--input", str(src), "--output-prefix", out, "--workers", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "5 documents" in res.output and "MB/s" in res.output
    res = runner.invoke(data_cli, ["preprocess", "--input", str(src), "--output-prefix", out])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0
    assert "out.bin exists: pass --force" in res.output
    res = runner.invoke(data_cli, ["inspect", out])
    assert res.exit_code == 0 and "5 documents" in res.output
    (tmp_path / "out.idx").write_bytes(b"garbage")
    res = runner.invoke(data_cli, ["inspect", out])
    assert res.exit_code == 2 and "out.idx: wrong magic" in res.output
    assert "Traceback" not in res.output


def test_cli_sample_writes_a_ready_dataset(tmp_path):
    res = CliRunner().invoke(data_cli, ["sample", "--output-prefix", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    ds = IndexedDataset(tmp_path / "s")
    assert ds.num_documents == 1000 and ds.num_tokens > 400_000


def test_shipped_corpus_matches_its_generator_and_is_small():
    assert CORPUS_FILE.read_text(encoding="utf-8") == corpus_lines()
    assert CORPUS_FILE.stat().st_size < 1_000_000


def test_last_line_without_newline_and_crlf_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "CHUNK_BYTES", 16)
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b'{"text": "first"}\r\n\r\n{"text": "a much longer second line"}\n{"text": "last"}'
    )
    stats = pp.preprocess([str(src)], str(tmp_path / "out"))
    assert (stats.documents, stats.empty, stats.malformed) == (3, 1, 0)
    texts = [bytes(d[:-1]).decode() for d in _docs(tmp_path / "out")]
    assert texts == ["first", "a much longer second line", "last"]


def test_reading_stays_at_most_two_blocks_per_worker_ahead():
    """Constant memory: the reader is never more than 2 x workers blocks ahead of the writer."""
    pulled = 0

    def blocks():
        nonlocal pulled
        for i in range(40):
            pulled += 1
            yield json.dumps({"text": f"doc {i}"}).encode() + b"\n"

    yielded = 0
    for ids, *_ in pp._ordered_results(blocks(), 2, ("byte", "text", True, "<u2")):
        yielded += 1
        assert pulled - yielded <= 2 * 2
        assert bytes(ids[:-1].tolist()).decode() == f"doc {yielded - 1}"  # in input order
    assert yielded == 40


def test_invalid_utf8_line_is_malformed_and_its_block_still_parses(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff\xfe"}\n{"text": "fine"}\n')
    stats = pp.preprocess([str(src)], str(tmp_path / "out"))
    assert (stats.documents, stats.empty, stats.malformed) == (2, 0, 1)
    assert [bytes(d[:-1]).decode() for d in _docs(tmp_path / "out")] == ["ok", "fine"]
