"""The operator's corpus formats (text, directories, globs, JSONL, Parquet, hf:), the chosen record
field, and corrupted records skipped and counted on the coordinator and on the peer."""

from __future__ import annotations

import gzip
import io
import json
import logging
import sys
from pathlib import Path

import pytest
from crowdtrain.coordinator.run import dataset, sources
from crowdtrain.peer.data import shards as data

BUILD = dict(num_shards=2, eval_fraction=0.2, max_bytes=0, seq_len=16, eval_max_sequences=4, vocab_size=300)


def _texts(n: int, tag: str) -> list[str]:
    return [f"{tag} document {i}: " + " ".join(f"w{i * j % 97}" for j in range(3 + i % 7)) for i in range(n)]


def _write_jsonl(path: Path, records: list[object]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _write_parquet(path: Path, columns: dict[str, list]) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=7)  # several row groups and batches


def _build(entries: list, out: Path, **kw):
    """Build a run's data; returns (its data spec, every shard's texts, the train shards' bytes)."""
    spec, _, _ = dataset.build_dataset(entries, out, source_label="corpus", **{**BUILD, **kw})
    names = [spec.eval.name, *(s.name for s in spec.shards)]
    texts = [t for name in names for t in data.read_shard(out / name)]
    return spec, texts, [(out / name).read_bytes() for name in names]


def test_jsonl_records_become_shards_holding_exactly_their_text_from_the_chosen_field(tmp_path: Path):
    texts = _texts(60, "jsonl")
    _write_jsonl(
        tmp_path / "my.jsonl", [{"id": i, "body": t, "text": "not this"} for i, t in enumerate(texts)]
    )
    spec, shard_texts, _ = _build([tmp_path / "my.jsonl"], tmp_path / "out", field="body")
    assert sorted(shard_texts) == sorted(texts)
    assert spec.source == "corpus (field body)"
    docs = dataset.iter_documents([str(tmp_path / "my.jsonl")], field="body")
    assert {d.path for d in docs} == {f"my.jsonl#{line}" for line in range(1, 61)}


def test_a_run_built_from_jsonl_is_byte_identical_every_time(tmp_path: Path):
    records = [{"text": t} for t in _texts(50, "det")] + ["junk", {"text": 5}]
    _write_jsonl(tmp_path / "c.jsonl", records)
    first = _build([tmp_path / "c.jsonl"], tmp_path / "a")
    again = _build([tmp_path / "c.jsonl"], tmp_path / "b")
    assert first[0] == again[0] and first[2] == again[2]
    assert first[0].source == "corpus (field text; 2 corrupted records skipped)"


def test_every_corrupted_jsonl_record_is_skipped_and_counted(tmp_path: Path, caplog):
    good = _texts(40, "good")
    lines = [json.dumps({"text": t}) for t in good] + [
        "{not json",
        '{"text": "cut off',
        "[1, 2, 3]",
        '"a string"',
        '{"other": "no text field"}',
        '{"text": 42}',
        '{"text": null}',
        '{"text": ["a", "list"]}',
        '{"text": ""}',
        '{"text": "   \\n "}',
        '{"text": "lone \\ud800 surrogate"}',
        "[" * 100_000,  # nesting deep enough to exhaust the parser's recursion
        json.dumps({"text": "x" * (sources.MAX_DOCUMENT_BYTES + 1)}),
        "",  # blank lines are no records
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9 latin-1"}\n'
    (tmp_path / "bad.jsonl").write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="crowdtrain.coordinator.run.dataset"):
        spec, shard_texts, _ = _build([tmp_path / "bad.jsonl"], tmp_path / "out")
    corpus = dataset.read_corpus([tmp_path / "bad.jsonl"])
    assert corpus.skipped == {
        "not JSON": 3,
        "not a JSON object": 2,
        "missing field 'text'": 1,
        "field 'text' not a string": 3,
        "empty field 'text'": 2,
        "not UTF-8": 2,
        "over 4 MiB": 1,
    }
    assert sorted(shard_texts) == sorted(good)
    assert spec.source == "corpus (field text; 14 corrupted records skipped)"
    [summary] = [r.getMessage() for r in caplog.records if "corrupted" in r.getMessage()]
    assert summary.startswith("skipped 14 corrupted records: 3 field 'text' not a string, 3 not JSON, 2 ")
    assert "bad.jsonl#41 (not JSON)" in summary  # where to look: the first line of each reason


def test_an_over_long_line_is_skipped_without_stopping_the_file(tmp_path: Path):
    texts = _texts(30, "around")
    huge = json.dumps({"text": "y" * (sources.MAX_RECORD_LINE_BYTES + 10)})
    lines = (
        [json.dumps({"text": t}) for t in texts[:15]] + [huge] + [json.dumps({"text": t}) for t in texts[15:]]
    )
    (tmp_path / "long.jsonl").write_text("\n".join(lines) + "\n")
    corpus = dataset.read_corpus([tmp_path / "long.jsonl"])
    assert sorted(d.text for d in corpus.documents) == sorted(texts)
    assert corpus.skipped == {"over 4 MiB": 1}


def test_gzipped_jsonl_is_read_and_a_truncated_one_keeps_what_came_before(tmp_path: Path):
    texts = _texts(200, "gz")
    payload = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "ok.jsonl.gz").write_bytes(gzip.compress(payload))
    assert sorted(d.text for d in dataset.iter_documents([tmp_path / "ok.jsonl.gz"])) == sorted(texts)
    whole = gzip.compress(payload)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    corpus = dataset.read_corpus([tmp_path / "cut.jsonl.gz"])
    assert corpus.skipped == {"unreadable or truncated file": 1}
    assert 0 < len(corpus.documents) < len(texts)
    assert {d.text for d in corpus.documents} <= set(texts)


def test_parquet_reads_only_the_chosen_column_and_counts_null_and_non_string_values(tmp_path: Path):
    texts = _texts(50, "parquet")
    column = texts[:20] + [None, ""] + texts[20:]
    _write_parquet(tmp_path / "t.parquet", {"content": column, "id": list(range(len(column)))})
    _write_parquet(tmp_path / "ints.parquet", {"content": [1, 2, 3]})
    _write_parquet(tmp_path / "bytes.parquet", {"content": [b"raw", b"bytes"]})
    _write_parquet(tmp_path / "other.parquet", {"text": ["a", "b", "c", "d"]})
    entries = [tmp_path / n for n in ("t.parquet", "ints.parquet", "bytes.parquet", "other.parquet")]
    spec, shard_texts, _ = _build(entries, tmp_path / "out", field="content")
    assert sorted(shard_texts) == sorted(texts)
    corpus = dataset.read_corpus(entries, field="content")
    assert corpus.skipped == {
        "field 'content' not a string": 1 + 3 + 2,
        "empty field 'content'": 1,
        "missing field 'content'": 4,
    }
    assert "t.parquet#21" not in {d.path for d in corpus.documents}  # the empty row
    assert {"t.parquet#0", "t.parquet#22"} <= {d.path for d in corpus.documents}
    assert spec.source == "corpus (field content; 11 corrupted records skipped)"


def test_a_damaged_parquet_file_is_counted_not_a_crash(tmp_path: Path):
    _write_parquet(tmp_path / "good.parquet", {"text": _texts(30, "pq")})
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    corpus = dataset.read_corpus([tmp_path / "good.parquet", tmp_path / "junk.parquet"])
    assert corpus.skipped == {"unreadable or truncated file": 1}
    assert len(corpus.documents) == 30


@pytest.mark.parametrize("repeated", [False, True], ids=["distinct values", "one value repeated"])
def test_a_parquet_decompression_bomb_is_skipped_without_copying_its_rows_out(tmp_path: Path, repeated):
    """A decompression bomb: a few-KiB Parquet file of 8 rows x 5 MiB (40 MiB decoded)
    among ordinary rows. The oversized rows are counted as too large from Arrow's offsets, and never
    become Python strings: the traced peak stays far below one of them (the old reader converted
    256-row batches first, all 40 MiB at once)."""
    import tracemalloc

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    big = [(("a" if repeated else chr(97 + i)) * (5 << 20)) for i in range(8)]
    texts = _texts(10, "pq")
    table = pa.table({"text": texts[:5] + big + texts[5:]})
    pq.write_table(
        table, tmp_path / "bomb.parquet", compression="zstd", compression_level=1, use_dictionary=repeated
    )
    del big, table
    assert (tmp_path / "bomb.parquet").stat().st_size < 64 << 10
    counts = sources.ReadCounts()
    tracemalloc.start()
    try:
        docs = list(sources.iter_entry(str(tmp_path / "bomb.parquet"), field="text", counts=counts))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [d.text for d in docs] == texts and docs[5].path == "bomb.parquet#13"
    assert counts.skipped == {sources.TOO_LARGE: 8} and counts.first[sources.TOO_LARGE] == "bomb.parquet#5"
    assert peak < 2 << 20, f"{peak} bytes traced: oversized rows were copied out of Arrow"


def test_globs_expand_in_sorted_order_and_an_empty_match_names_the_pattern(tmp_path: Path, monkeypatch):
    root = tmp_path / "corpus"
    expected = []
    for i, text in enumerate(_texts(40, "glob")):
        path = root / f"part{i % 3}" / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        expected.append(text)
    (root / "part0" / "notes.md").write_text("markdown the pattern does not match")
    (root / "part1" / "latin1.txt").write_bytes(b"caf\xe9 au lait")
    monkeypatch.chdir(tmp_path)
    spec, shard_texts, _ = _build(["corpus/**/*.txt"], tmp_path / "out")
    assert sorted(shard_texts) == sorted(expected)
    assert spec.source == "corpus (1 corrupted record skipped)"  # text files: no record field named
    docs = dataset.iter_documents(["corpus/**/*.txt"])
    assert docs[0].path == "corpus/part0/doc00.txt" and len(docs) == 40
    everything = dataset.iter_documents(["corpus/**"])  # directories and their files: each file once
    assert len(everything) == 41 and len({d.path for d in everything}) == 41  # with notes.md
    with pytest.raises(data.DataError, match=r"'logs/\*\.jsonl' matches no files"):
        dataset.iter_documents(["logs/*.jsonl"])


def test_directories_read_jsonl_and_parquet_files_as_records(tmp_path: Path):
    root = tmp_path / "mixed[v2]"  # an existing path is literal, wildcard characters or not
    (root / "sub").mkdir(parents=True)
    texts = _texts(45, "mixed")
    for i, text in enumerate(texts[:15]):
        (root / f"t{i}.txt").write_text(text)
    _write_jsonl(root / "sub" / "a.jsonl", [{"text": t} for t in texts[15:30]] + [{"text": None}])
    _write_parquet(root / "sub" / "b.parquet", {"text": texts[30:]})
    corpus = dataset.read_corpus([root])
    assert sorted(d.text for d in corpus.documents) == sorted(texts)
    assert corpus.skipped == {"field 'text' not a string": 1}
    paths = {d.path for d in corpus.documents}
    assert {"mixed[v2]/t0.txt", "mixed[v2]/sub/a.jsonl#1", "mixed[v2]/sub/b.parquet#0"} <= paths


def test_a_record_free_corpus_says_what_was_skipped_and_how_to_fix_it(tmp_path: Path):
    _write_jsonl(tmp_path / "wrong.jsonl", [{"content": t} for t in _texts(5, "x")])
    with pytest.raises(
        data.DataError, match=r"skipped 5 corrupted records: 5 missing field 'text'.*--data-field"
    ):
        dataset.read_corpus([tmp_path / "wrong.jsonl"])
    with pytest.raises(data.DataError, match="--data-field"):
        dataset.read_corpus([tmp_path / "wrong.jsonl"], field=" ")


def test_a_byte_budget_keeps_while_reading_exactly_what_the_split_would_keep(tmp_path: Path):
    _write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in _texts(300, "budget")])
    everything = dataset.read_corpus([tmp_path / "big.jsonl"]).documents
    kept = dataset.read_corpus([tmp_path / "big.jsonl"], max_bytes=3_000).documents
    split_all = dataset.split_documents(everything, num_shards=2, eval_fraction=0.2, max_bytes=3_000)
    split_kept = dataset.split_documents(kept, num_shards=2, eval_fraction=0.2, max_bytes=3_000)
    assert split_all == split_kept and len(kept) < len(everything) / 3


def test_hf_entries_are_parsed_and_checked():
    assert sources.parse_hf("hf:org/name") == sources.HfSource("org/name", None, "train")
    assert sources.parse_hf("hf:org/name:en@validation") == sources.HfSource("org/name", "en", "validation")
    for bad, message in (("hf:", "names no dataset"), ("hf:a:b c", "config"), ("hf:a@x/y", "split")):
        with pytest.raises(data.DataError, match=message):
            sources.parse_hf(bad)


def test_hf_without_the_datasets_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails as if absent
    with pytest.raises(data.DataError, match=r"pip install 'crowdtrain\[hf\]'"):
        dataset.read_corpus(["hf:someone/unknown-dataset"])


def _offline_datasets(monkeypatch, tmp_path: Path):
    for name, value in (
        ("HF_DATASETS_OFFLINE", "1"),
        ("HF_HUB_OFFLINE", "1"),
        ("HF_HOME", str(tmp_path / "hf")),
    ):
        monkeypatch.setenv(name, value)
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")


def test_hf_streams_a_local_dataset_and_counts_its_bad_records(tmp_path: Path, monkeypatch):
    _offline_datasets(monkeypatch, tmp_path)
    local = tmp_path / "local_ds"
    local.mkdir()
    texts = _texts(40, "hf")
    _write_jsonl(local / "train-0.jsonl", [{"text": t, "n": 1} for t in texts[:20]])
    _write_jsonl(
        local / "train-1.jsonl", [{"text": t, "n": 2} for t in texts[20:]] + [{"text": None, "n": 3}]
    )
    spec, shard_texts, _ = _build([f"hf:{local}"], tmp_path / "out")
    assert sorted(shard_texts) == sorted(texts)
    assert spec.source == "corpus (field text; 1 corrupted record skipped)"
    with pytest.raises(data.DataError, match="cannot read Hugging Face dataset hf:no-such/dataset@train"):
        dataset.read_corpus(["hf:no-such/dataset"])


def test_the_peer_skips_and_counts_malformed_shard_lines(tmp_path: Path, caplog):
    good = ["first text", "second text", ""]
    hostile = [
        b"not json",
        b"[1, 2]",
        b'{"path": "x"}',
        b'{"text": 7}',
        b'{"text": "\xff\xfe"}',
        b'{"text": "lone \\ud800 surrogate"}',
        b"[" * 50_000,
    ]
    body = b"\n".join([json.dumps({"text": t}).encode() for t in good] + hostile + [b"", b"   "]) + b"\n"
    (tmp_path / "shard.jsonl").write_bytes(body)
    with caplog.at_level(logging.WARNING, logger="crowdtrain.peer.data.shards"):
        texts, skipped = data.read_shard_counted(tmp_path / "shard.jsonl")
    assert (texts, skipped) == (good, len(hostile))
    assert data.read_shard(tmp_path / "shard.jsonl") == good
    assert any("skipped 7 malformed" in r.getMessage() for r in caplog.records)


def test_bounded_lines_read_past_an_over_long_line():
    stream = io.BytesIO(b"short\n" + b"z" * 5000 + b"\nafter\nlast-without-newline")
    lines = list(data.iter_bounded_lines(stream, 100))
    assert lines == [b"short\n", None, b"after\n", b"last-without-newline"]
    assert data.shard_texts(lines) == ([], 4)  # none of them is a shard record


def test_a_run_created_from_the_operators_jsonl_names_the_field_and_the_skips(tmp_path: Path):
    import random

    from crowdtrain.coordinator.run.runs import RunSettings, create_run

    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(3000)
    ]
    records = [{"body": " ".join(rng.choice(words) for _ in range(40))} for _ in range(600)]
    _write_jsonl(tmp_path / "corpus.jsonl", [*records, {"body": 1}, {"text": "wrong field"}])
    settings = RunSettings(data=(str(tmp_path / "corpus.jsonl"),), data_field="body")
    manifest, _ = create_run(settings, tmp_path / "run", signing_public_key="")
    assert manifest.data.source == "corpus.jsonl (field body; 2 corrupted records skipped)"  # no local path
    names = [manifest.data.eval.name, *(s.name for s in manifest.data.shards)]
    texts = [t for name in names for t in data.read_shard(tmp_path / "run" / "data" / name)]
    assert sorted(texts) == sorted(r["body"] for r in records)
