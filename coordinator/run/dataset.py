"""Run creation's data: the corpus, a deterministic eval/train split, shards, the tokenizer.

    data, tokenizer, tokenizer_json = build_dataset(
        ["corpus/", "extra/*.jsonl", "hf:org/name@train"], out_dir, source_label="my corpus",
        field="text", num_shards=4, eval_fraction=0.05, max_bytes=6_000_000, seq_len=256,
        eval_max_sequences=64, vocab_size=4096,
    )
    corpus = read_corpus(["logs/*.jsonl"], field="text")   # documents + skipped records by reason

The coordinator turns a corpus (by default the Python standard library source of the running
interpreter; the forms an operator may give are read by `coordinator.sources`) into JSONL shards
once per run and trains a byte-level BPE tokenizer on the training part. Nothing here imports
torch, so the coordinator can build a run without it. Peers only read what this writes
(`crowdtrain.peer.data.shards`). Corrupted records are skipped, counted, logged in one summary line and
noted in the run's source label ("my.jsonl (field text; 3 corrupted records skipped)").

Determinism: documents are ordered by their path (relative to the corpus root, `file#record` for
records) and assigned to eval or a shard by a hash of that path, so the same corpus always gives
byte-identical shards and the same tokenizer. With a byte budget, only the documents the budget
keeps are held in memory while reading (the same ones `split_documents` would keep).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.coordinator.run.sources import (
    HF_PREFIX,
    TEXT_SUFFIXES,
    Document,
    ReadCounts,
    is_glob,
    iter_entry,
    plural,
)
from crowdtrain.peer.checks import sha256_file
from crowdtrain.peer.data.shards import EVAL_SHARD_NAME, DataError
from crowdtrain.peer.run.manifest import (
    EOS_TOKEN,
    MAX_SHARD_BYTES,
    PAD_TOKEN,
    DataSpec,
    ShardSpec,
    TokenizerSpec,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

__all__ = ["Corpus", "Document", "build_dataset", "iter_documents", "read_corpus", "split_documents"]

HF_READ_FACTOR = 4  # a Hugging Face stream is read up to this many times the byte budget
HF_MAX_READ_BYTES = 1 << 30  # ... or this much text when the preset keeps the whole corpus


@dataclass(frozen=True)
class Corpus:
    documents: list[Document]  # sorted by path; with a byte budget, only those it keeps
    counts: ReadCounts  # corrupted records skipped, by reason; documents taken from record fields

    @property
    def skipped(self) -> dict[str, int]:
        """Corrupted records skipped, by reason ("not JSON", "missing field 'text'", ...)."""
        return dict(self.counts.skipped)


def default_corpus() -> list[Path]:
    """The Python standard library source of the running interpreter."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def default_corpus_label() -> str:
    """The public name of `default_corpus()`, without its path on this machine."""
    return f"the Python {sys.version_info.major}.{sys.version_info.minor} standard library source"


def public_data_label(entries: Sequence[str]) -> str:
    """Pure: the public name of the `--data` entries, without the operator's local paths.

    `hf:NAME` is kept; a file or directory is named by its base name (`/home/alice/texts` ->
    `texts`); a glob by its pattern and the directory it starts from (`corpus/**/*.md` -> `*.md in
    corpus`). No entries: `default_corpus_label()`.
    """
    if not entries:
        return default_corpus_label()
    return ", ".join(_public_entry(str(entry)) for entry in entries)


def _public_entry(entry: str) -> str:
    if entry.startswith(HF_PREFIX):
        return entry
    path = Path(entry).expanduser()
    if not is_glob(entry) or path.exists():  # an existing path is read literally (sources.expand_entry)
        return _base_name(path)
    parts = path.parts
    first_glob = next(i for i, part in enumerate(parts) if is_glob(part))
    base = _base_name(Path(*parts[:first_glob])) if first_glob else ""
    return f"{parts[-1]} in {base}" if base else parts[-1]


def _base_name(path: Path) -> str:
    """The last component of `path`; for `.`, `..` or `~`, of the directory it stands for."""
    return path.name if path.name not in ("", ".", "..") else (path.resolve().name or "/")


class _Budget:
    """Keeps, of the documents offered, exactly those `split_documents(max_bytes=...)` would keep:
    the shortest prefix in budget-hash order that reaches `max_bytes` (all of them when 0)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._heap: list[tuple[float, int, int, Document]] = []  # (-hash, -arrival, size, doc)
        self._arrivals = itertools.count()
        self._used = 0

    def offer(self, doc: Document) -> None:
        """Equal hashes (a repeated path) keep the earliest, as split_documents' stable sort does."""
        size = len(doc.text.encode())
        heapq.heappush(self._heap, (-_unit_hash(doc.path, "budget"), -next(self._arrivals), size, doc))
        self._used += size
        while self.max_bytes and len(self._heap) > 1 and self._used - self._heap[0][2] >= self.max_bytes:
            self._used -= heapq.heappop(self._heap)[2]

    def documents(self) -> list[Document]:
        return sorted((entry[3] for entry in self._heap), key=lambda d: d.path)


def read_corpus(sources: Sequence[str | os.PathLike], *, field: str = "text", max_bytes: int = 0) -> Corpus:
    """Every usable document of the `--data` entries (see `coordinator.sources` for the forms).

    Corrupted records are skipped and counted. Raises DataError naming the entry when one is
    missing, unreadable, an empty glob or an unavailable dataset, or when no text is left at all.
    """
    if not isinstance(field, str) or not field.strip():
        raise DataError("--data-field must name the record field holding the text (e.g. text)")
    counts = ReadCounts()
    budget = _Budget(max_bytes)
    hf_limit = HF_READ_FACTOR * max_bytes if max_bytes else HF_MAX_READ_BYTES
    entries = [os.fspath(s) for s in sources]
    for entry in entries:
        for doc in iter_entry(entry, field=field, counts=counts, hf_max_read_bytes=hf_limit):
            budget.offer(doc)
    docs = budget.documents()
    if not docs:
        skipped = f" (skipped {counts.summary()})" if counts.skipped_total else ""
        raise DataError(
            f"no UTF-8 text found under {entries}{skipped}; give files or directories holding text "
            f"({', '.join(sorted(TEXT_SUFFIXES))}), JSONL or Parquet records with a {field!r} field, "
            "or pick the field with --data-field"
        )
    return Corpus(docs, counts)


def iter_documents(
    sources: Sequence[str | os.PathLike], *, field: str = "text", max_bytes: int = 0
) -> list[Document]:
    """All usable documents of `sources`, sorted by path (`read_corpus` without the skip counts)."""
    return read_corpus(sources, field=field, max_bytes=max_bytes).documents


def describe_source(label: str, corpus: Corpus, field: str) -> str:
    """Pure: the run's provenance line, e.g. "my.jsonl (field text; 3 corrupted records skipped)"."""
    notes = [f"field {field}"] if corpus.counts.records else []
    if corpus.counts.skipped_total:
        notes.append(f"{plural(corpus.counts.skipped_total, 'corrupted record')} skipped")
    return f"{label} ({'; '.join(notes)})" if notes else label


def _unit_hash(path: str, salt: str) -> float:
    """A uniform number in [0, 1) that depends only on the document path."""
    digest = hashlib.sha256(f"{salt}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    docs: Sequence[Document], *, num_shards: int, eval_fraction: float, max_bytes: int = 0
) -> tuple[list[Document], list[list[Document]]]:
    """Pure and deterministic: (eval documents, training shards).

    With `max_bytes`, documents are kept in hash order until the budget is spent, so a smaller
    budget is a subset of a larger one and samples the whole corpus rather than its first folder.
    """
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    chosen = list(docs)
    if max_bytes:
        chosen.sort(key=lambda d: _unit_hash(d.path, "budget"))
        kept, used = [], 0
        for doc in chosen:
            if used >= max_bytes:
                break
            kept.append(doc)
            used += len(doc.text.encode())
        chosen = sorted(kept, key=lambda d: d.path)
    eval_docs: list[Document] = []
    shards: list[list[Document]] = [[] for _ in range(num_shards)]
    for doc in chosen:
        if _unit_hash(doc.path, "eval") < eval_fraction:
            eval_docs.append(doc)
        else:
            shards[int(_unit_hash(doc.path, "shard") * num_shards)].append(doc)
    if not eval_docs or any(not s for s in shards):
        raise DataError(
            f"corpus of {len(chosen)} documents is too small for {num_shards} shards and a "
            f"{eval_fraction:.0%} held-out split; give more text or use fewer shards"
        )
    return eval_docs, shards


def write_shard(docs: Sequence[Document], path: Path) -> ShardSpec:
    """The documents as a JSONL shard at `path`; DataError (nothing written) past MAX_SHARD_BYTES,
    the most a volunteer accepts (peer/run/manifest.py)."""
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                line = json.dumps({"path": doc.path, "text": doc.text}, ensure_ascii=False) + "\n"
                written += len(line.encode("utf-8"))
                if written > MAX_SHARD_BYTES:
                    raise DataError(
                        f"data shard {path.name} would hold more than {MAX_SHARD_BYTES >> 20} MiB, the most "
                        "a volunteer downloads; use a smaller corpus or a preset with more shards"
                    )
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return ShardSpec(
        name=path.name, sha256=sha256_file(path), size_bytes=path.stat().st_size, num_documents=len(docs)
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style); deterministic for the same texts in the same order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_dataset(
    sources: Sequence[str | os.PathLike],
    out_dir: Path,
    *,
    source_label: str,
    num_shards: int,
    eval_fraction: float,
    max_bytes: int,
    seq_len: int,
    eval_max_sequences: int,
    vocab_size: int,
    field: str = "text",
) -> tuple[DataSpec, TokenizerSpec, str]:
    """Read the corpus, write eval and training shards into `out_dir`, train the tokenizer.

    Returns the data spec (its source: `source_label` with the record field and the number of
    corrupted records skipped), tokenizer spec and the tokenizer's JSON text.
    """
    corpus = read_corpus(sources, field=field, max_bytes=max_bytes)
    if corpus.counts.skipped_total:
        logger.warning("skipped %s (first: %s)", corpus.counts.summary(), corpus.counts.examples())
    eval_docs, shards = split_documents(
        corpus.documents, num_shards=num_shards, eval_fraction=eval_fraction, max_bytes=max_bytes
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_spec = write_shard(eval_docs, out_dir / EVAL_SHARD_NAME)
    shard_specs = tuple(write_shard(s, out_dir / f"train-{i:05d}.jsonl") for i, s in enumerate(shards))
    train_texts = [doc.text for shard in shards for doc in shard]
    logger.info(
        "dataset: %d eval and %d training documents (%.1f MB) in %d shards; training tokenizer (vocab %d)",
        len(eval_docs),
        len(train_texts),
        sum(s.size_bytes for s in shard_specs) / 1e6,
        num_shards,
        vocab_size,
    )
    tokenizer = train_tokenizer(train_texts, vocab_size)
    tokenizer_json = tokenizer.to_str()
    data = DataSpec(
        source=describe_source(source_label, corpus, field),
        seq_len=seq_len,
        eval_fraction=eval_fraction,
        eval=eval_spec,
        shards=shard_specs,
        eval_max_sequences=eval_max_sequences,
    )
    tok = TokenizerSpec(
        kind="byte-level-bpe",
        vocab_size=tokenizer.get_vocab_size(),
        sha256=hashlib.sha256(tokenizer_json.encode()).hexdigest(),
    )
    return data, tok, tokenizer_json
