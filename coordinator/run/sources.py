"""The operator's corpus, read one document at a time from every form `--data` accepts.

    counts = ReadCounts()
    for doc in iter_entry("logs/*.jsonl", field="text", counts=counts):
        ...
    print(counts.summary())       # "3 corrupted records: 2 not JSON, 1 missing field 'text'"

An entry is a text file; a directory (walked in sorted order); a glob (`corpus/**/*.txt`, expanded
in sorted order); a JSONL file (`.jsonl`, `.jsonl.gz`) or a Parquet file (`.parquet`) whose records'
text is in the field `field`; or `hf:NAME[:CONFIG][@SPLIT]`, a Hugging Face dataset streamed with
the optional `datasets` package. Inside directories and globs, JSONL and Parquet files are read as
records too. Every document gets a deterministic `path` (`corpus/a/b.txt`, `my.jsonl#17` for line 17,
`t.parquet#0` for row 0) from which `coordinator.dataset` derives the eval/shard split.

Nothing read here is trusted: a record that is not JSON, not an object, lacks the field, holds no
string or an empty one, is not UTF-8 or is over `MAX_DOCUMENT_BYTES` is skipped and counted in
`ReadCounts` by reason, never a crash; over-long lines are read past without being held whole.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer.data.shards import DataError, iter_bounded_lines

logger = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 4 << 20  # of UTF-8 text per document; larger ones are skipped and counted
MAX_RECORD_LINE_BYTES = 4 * MAX_DOCUMENT_BYTES  # a JSONL line, escapes and other fields included
PARQUET_BATCH_ROWS = 16  # rows Arrow decodes at once, before their sizes are checked (each may be huge)
TEXT_SUFFIXES = frozenset(
    {".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".toml", ".cfg", ".html", ".js"}
)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SKIPPED_DIRS = frozenset({"site-packages", "__pycache__", ".git"})
HF_PREFIX = "hf:"
_HF_PART = re.compile(r"[A-Za-z0-9_.\-]+")

NOT_UTF8 = "not UTF-8"
NOT_JSON = "not JSON"
NOT_OBJECT = "not a JSON object"
TOO_LARGE = f"over {MAX_DOCUMENT_BYTES >> 20} MiB"
UNREADABLE = "unreadable or truncated file"


@dataclass(frozen=True)
class Document:
    path: str  # deterministic and unique within its corpus, with "/" separators
    text: str


class ReadCounts:
    """What reading a corpus found: records skipped by reason (and where the first of each reason
    was), and how many documents came from a record field (JSONL, Parquet, hf:)."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.first: dict[str, str] = {}
        self.records = 0

    def skip(self, reason: str, where: str, n: int = 1) -> None:
        self.skipped[reason] += n
        self.first.setdefault(reason, where)
        logger.debug("skipping %s: %s", where, reason)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def by_reason(self) -> list[tuple[str, int]]:
        """Most frequent first, then by name: a stable order for messages."""
        return sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))

    def summary(self) -> str:
        """E.g. "3 corrupted records: 2 not JSON, 1 missing field 'text'"."""
        parts = ", ".join(f"{n} {reason}" for reason, n in self.by_reason())
        return f"{plural(self.skipped_total, 'corrupted record')}: {parts}"

    def examples(self) -> str:
        """Where the first record of each reason was, for the operator to look at."""
        return ", ".join(f"{self.first[reason]} ({reason})" for reason, _ in self.by_reason())


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def record_text(record: object, field: str) -> tuple[str | None, str | None]:
    """Pure: (the record's text, None), or (None, why the record is unusable)."""
    if not isinstance(record, dict):
        return None, NOT_OBJECT
    if field not in record:
        return None, f"missing field {field!r}"
    text = record[field]
    if not isinstance(text, str):
        return None, f"field {field!r} not a string"
    if not text.strip():
        return None, f"empty field {field!r}"
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate (\ud800 in JSON): no shard could hold it
        return None, NOT_UTF8
    return (None, TOO_LARGE) if size > MAX_DOCUMENT_BYTES else (text, None)


# ---------------------------------------------------------------- entries


@dataclass(frozen=True)
class HfSource:
    name: str
    config: str | None
    split: str

    @property
    def label(self) -> str:
        return f"hf:{self.name}{':' + self.config if self.config else ''}@{self.split}"


def parse_hf(entry: str) -> HfSource:
    """Pure: `hf:NAME`, `hf:NAME:CONFIG`, either with `@SPLIT` (default train)."""
    rest = entry[len(HF_PREFIX) :]
    split = "train"
    if "@" in rest:
        rest, split = rest.rsplit("@", 1)
    name, _, config = rest.partition(":")
    if not name.strip() or any(c.isspace() for c in name) or len(entry) > 1000:
        raise DataError(f"--data {entry!r} names no dataset; write hf:NAME, hf:NAME:CONFIG or hf:NAME@SPLIT")
    for what, value in (("config", config), ("split", split)):
        if value and not _HF_PART.fullmatch(value):
            raise DataError(
                f"--data {entry!r}: {what} {value!r} is not a plain name (letters, digits, _ . -); "
                "write hf:NAME:CONFIG@SPLIT"
            )
    return HfSource(name, config or None, split)


def is_glob(entry: str) -> bool:
    return any(c in entry for c in "*?[")


def _glob_base(pattern: str) -> Path:
    """The leading directories of `pattern` that hold no wildcard."""
    parts = Path(pattern).parts
    fixed = parts[: next((i for i, part in enumerate(parts) if is_glob(part)), len(parts))]
    return Path(*fixed) if fixed else Path(".")


def _doc_prefix(base: Path, path: Path) -> str:
    rel = path.relative_to(base).as_posix()
    return f"{base.name}/{rel}" if base.name else rel


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # site-packages is whatever the user installed, not the corpus; __pycache__ is bytecode
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if (_kind(path) != "text" or path.suffix in TEXT_SUFFIXES) and path.is_file():
                yield path


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "parquet" if name.endswith(PARQUET_SUFFIXES) else "text"


def expand_entry(entry: str) -> list[tuple[Path, str, bool]]:
    """The files of one non-hf entry: (path, document path prefix, whether a read error is fatal).

    An existing path is taken literally (even with wildcard characters in its name); otherwise a
    pattern with `*`, `?` or `[` is a glob. Raises DataError when nothing is there.
    """
    path = Path(entry).expanduser()
    if not path.exists() and is_glob(entry):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise DataError(
                f"--data pattern {entry!r} matches no files; check the pattern and the working directory"
            )
        base = _glob_base(str(path))
        found: dict[Path, tuple[Path, str, bool]] = {}  # `dir/**` matches a directory and its files
        for match in map(Path, matches):
            files = _walk(match) if match.is_dir() else [match] if match.is_file() else []
            found.update((f.resolve(), (f, _doc_prefix(base, f), False)) for f in files)
        return list(found.values())
    if not path.exists():
        raise DataError(
            f"data path {entry!r} does not exist; pass an existing file or directory, a glob or hf:NAME"
        )
    if not os.access(path, os.R_OK):
        raise DataError(f"data path {entry!r} is not readable; check its permissions")
    if path.is_dir():
        return [(f, _doc_prefix(path, f), False) for f in _walk(path)]
    return [(path, path.name, True)]


# ---------------------------------------------------------------- readers


def iter_entry(
    entry: str, *, field: str, counts: ReadCounts, hf_max_read_bytes: int = 0
) -> Iterator[Document]:
    """Every usable document of one `--data` entry, in a deterministic order; skips are counted."""
    if entry.startswith(HF_PREFIX):
        yield from _read_hf(parse_hf(entry), field, counts, hf_max_read_bytes)
        return
    for path, prefix, strict in expand_entry(entry):
        kind = _kind(path)
        if kind == "jsonl":
            yield from _read_jsonl(path, prefix, field, counts)
        elif kind == "parquet":
            yield from _read_parquet(path, prefix, field, counts)
        else:
            doc = _read_text(path, prefix, counts, strict)
            if doc is not None:
                yield doc


def _read_text(path: Path, prefix: str, counts: ReadCounts, strict: bool) -> Document | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as e:
        if strict:
            raise DataError(f"cannot read data file {str(path)!r}: {e.strerror or e}") from e
        counts.skip(UNREADABLE, prefix)
        return None
    if len(raw) > MAX_DOCUMENT_BYTES:
        counts.skip(TOO_LARGE, prefix)
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        counts.skip(NOT_UTF8, prefix)
        return None
    return Document(prefix, text) if text.strip() else None  # an empty file is no corruption


def _read_jsonl(path: Path, prefix: str, field: str, counts: ReadCounts) -> Iterator[Document]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, line in enumerate(iter_bounded_lines(f, MAX_RECORD_LINE_BYTES), start=1):
                where = f"{prefix}#{lineno}"
                if line is None:
                    counts.skip(TOO_LARGE, where)
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    counts.skip(NOT_UTF8, where)
                    continue
                except (ValueError, RecursionError):
                    counts.skip(NOT_JSON, where)
                    continue
                text, reason = record_text(record, field)
                if text is None:
                    counts.skip(reason, where)
                else:
                    counts.records += 1
                    yield Document(where, text)
    except (OSError, EOFError, zlib.error) as e:  # a damaged .gz, or an I/O error mid-file
        logger.warning("%s: stopped reading after line %d: %s", path, lineno, e)
        counts.skip(UNREADABLE, f"{prefix}#{lineno + 1}")


def _read_parquet(path: Path, prefix: str, field: str, counts: ReadCounts) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path} is a Parquet file; reading it needs pyarrow: pip install pyarrow") from e
    row = 0
    try:
        parquet = pq.ParquetFile(path)
        if field not in parquet.schema_arrow.names:
            logger.warning(
                "%s has no column %r (its columns: %s); pick the text column with --data-field",
                path,
                field,
                ", ".join(parquet.schema_arrow.names[:20]),
            )
            counts.skip(f"missing field {field!r}", prefix, max(parquet.metadata.num_rows, 1))
            return
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            for value, reason in parquet_values(batch.column(0)):
                text, reason = record_text({field: value}, field) if reason is None else (None, reason)
                if text is None:
                    counts.skip(reason, f"{prefix}#{row}")
                else:
                    counts.records += 1
                    yield Document(f"{prefix}#{row}", text)
                row += 1
    except (pa.ArrowException, OSError, ValueError) as e:  # not Parquet, truncated, or damaged
        logger.warning("%s: stopped reading at row %d: %s", path, row, e)
        counts.skip(UNREADABLE, f"{prefix}#{row}")


def parquet_values(column) -> Iterator[tuple[str | None, str | None]]:
    """(value, None) for each row of an Arrow column that may hold a document, (None, TOO_LARGE)
    for one over MAX_DOCUMENT_BYTES, known from the column's offsets without copying it out of
    Arrow; a column of another type than text yields None for every row (record_text says why)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string_view(column.type):
        column = column.cast(pa.large_string())  # binary_length has no string_view kernel
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        yield from ((None, None) for _ in range(len(column)))
        return
    sizes = pc.binary_length(column)  # UTF-8 bytes per value, from the offsets; null for null
    fits = pc.fill_null(pc.less_equal(sizes, MAX_DOCUMENT_BYTES), True)
    kept = iter(column.filter(fits).to_pylist())
    for ok in fits.to_pylist():
        yield (next(kept), None) if ok else (None, TOO_LARGE)


def _import_datasets(label: str):
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"--data {label} needs the optional Hugging Face datasets package: pip install 'crowdtrain[hf]'"
        ) from e
    return datasets


def _read_hf(source: HfSource, field: str, counts: ReadCounts, max_read_bytes: int) -> Iterator[Document]:
    """Stream the dataset in its own order; stop once `max_read_bytes` of text were read (0: all)."""
    datasets = _import_datasets(source.label)
    read, index = 0, -1
    try:
        stream = datasets.load_dataset(source.name, source.config, split=source.split, streaming=True)
        for index, record in enumerate(stream):
            where = f"{source.label}#{index}"
            text, reason = record_text(record, field)
            if text is None:
                counts.skip(reason, where)
                continue
            counts.records += 1
            yield Document(where, text)
            read += len(text.encode("utf-8", "replace"))
            if max_read_bytes and read >= max_read_bytes:
                logger.info(
                    "%s: read the first %d records (%.1f MB of text)", source.label, index + 1, read / 1e6
                )
                return
    except Exception as e:  # datasets raises many kinds: hub, network, config, schema, file errors
        where = f" after {index + 1} records" if index >= 0 else ""
        raise DataError(
            f"cannot read Hugging Face dataset {source.label}{where}: {type(e).__name__}: {str(e)[:500]}; "
            "check the name, config and split on huggingface.co, your network, and HF_HUB_OFFLINE"
        ) from e
