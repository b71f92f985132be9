"""Run creation's data: corpus discovery, a deterministic eval/train split, shards, the tokenizer.

The coordinator turns a corpus (by default the Python standard library source of the running
interpreter) into JSONL shards once per run and trains a byte-level BPE tokenizer on the training
part. Nothing here imports torch, so the coordinator can build a run without it. Peers only read
what this writes (`crowdtrain.peer.data`).

Determinism: documents are ordered by their path relative to the corpus root and assigned to eval
or a shard by a hash of that path, so the same corpus always gives byte-identical shards and the
same tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer.data import EVAL_SHARD_NAME, DataError, sha256_file
from crowdtrain.peer.manifest import EOS_TOKEN, PAD_TOKEN, DataSpec, ShardSpec, TokenizerSpec
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)


TEXT_SUFFIXES = frozenset(
    {".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".toml", ".cfg", ".html", ".js"}
)


@dataclass(frozen=True)
class Document:
    path: str  # relative to its corpus root, with "/" separators
    text: str


def default_corpus() -> list[Path]:
    """The Python standard library source of the running interpreter."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def default_corpus_label() -> str:
    import platform

    return f"python-stdlib {platform.python_version()} ({sysconfig.get_paths()['stdlib']})"


def _walk_text_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # site-packages is whatever the user installed, not the corpus; __pycache__ is bytecode
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", ".git"))
        for name in sorted(filenames):
            if Path(name).suffix in TEXT_SUFFIXES:
                yield Path(dirpath) / name


def iter_documents(sources: Sequence[Path]) -> list[Document]:
    """All text documents under `sources` (files or directories), sorted by relative path.

    Raises DataError naming the path when a source is missing or unreadable, or holds no text.
    """
    docs: list[Document] = []
    for source in sources:
        source = Path(source)
        if not source.exists():
            raise DataError(f"data path {str(source)!r} does not exist; pass an existing file or directory")
        if not os.access(source, os.R_OK):
            raise DataError(f"data path {str(source)!r} is not readable; check its permissions")
        if source.is_file():
            files, root = [source], source.parent
        else:
            files, root = list(_walk_text_files(source)), source
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                logger.debug("skipping %s: not UTF-8 text", path)
                continue
            except OSError as e:
                if source.is_file():
                    raise DataError(f"cannot read data file {str(path)!r}: {e.strerror}") from e
                logger.debug("skipping %s: %s", path, e)
                continue
            if text.strip():
                docs.append(Document(f"{source.name}/{path.relative_to(root).as_posix()}", text))
    if not docs:
        raise DataError(
            f"no UTF-8 text found under {[str(s) for s in sources]}; "
            f"give files or directories holding text ({', '.join(sorted(TEXT_SUFFIXES))})"
        )
    docs.sort(key=lambda d: d.path)
    return docs


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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"path": doc.path, "text": doc.text}, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
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
    sources: Sequence[Path],
    out_dir: Path,
    *,
    source_label: str,
    num_shards: int,
    eval_fraction: float,
    max_bytes: int,
    seq_len: int,
    eval_max_sequences: int,
    vocab_size: int,
) -> tuple[DataSpec, TokenizerSpec, str]:
    """Read the corpus, write eval and training shards into `out_dir`, train the tokenizer.

    Returns the data spec, tokenizer spec and the tokenizer's JSON text.
    """
    docs = iter_documents(sources)
    eval_docs, shards = split_documents(
        docs, num_shards=num_shards, eval_fraction=eval_fraction, max_bytes=max_bytes
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
        source=source_label,
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
