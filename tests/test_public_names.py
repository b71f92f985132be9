"""What the run publishes names nobody's machine: the data label in the signed manifest (served by
/api/v1/run), the model card and the whole checkpoint directory carry no local path of the
operator's nor this machine's host name, `--data-name` replaces the derived label, `--data-url` and
`--data-license` reach the cards and last across restarts, and a peer without `--name` shows a
random handle, never its host name."""

from __future__ import annotations

import dataclasses
import re
import socket
from pathlib import Path

import pytest
from crowdtrain.coordinator.publishing.card import CardFacts, markdown_text, model_card
from crowdtrain.coordinator.run.dataset import default_corpus_label, public_data_label
from crowdtrain.coordinator.run.runs import RunSettings, create_run, open_run
from crowdtrain.peer.settings.commands import PeerConfig
from crowdtrain.peer.volunteer.trainer import Volunteer, display_handle

HANDLE = re.compile(r"volunteer-[0-9a-f]{4}")


def _leaked_components(text: str, *paths: Path) -> list[str]:
    """The `/component` pieces of `paths` (their directories included) that appear in `text`."""
    parts = {part for path in paths for part in path.resolve().parts[1:]}
    return sorted(part for part in parts if f"/{part}" in text or f"\\{part}" in text)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """/.../private/corpus: enough varied words for the tiny preset's tokenizer, in a few directories."""
    import random

    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(3000)
    ]
    root = tmp_path / "private" / "corpus"
    for i in range(300):
        sub = root / f"part{i % 5}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc_{i:03d}.py").write_text(" ".join(rng.choice(words) for _ in range(80)))
    return root


def _card(manifest) -> str:
    return model_card(
        manifest, CardFacts(step=3, eval_loss=4.0, contributing_peers=1, created="2026-12-07 12:00 UTC")
    )


@pytest.mark.parametrize(
    ("entries", "label"),
    [
        (("corpus/**/*.md",), "*.md in corpus"),
        (("/home/alice/texts",), "texts"),
        (("/home/alice/texts/",), "texts"),
        (("~/notes.jsonl", "hf:org/name@train"), "notes.jsonl, hf:org/name@train"),
        (("/srv/data/*/part-*.parquet",), "part-*.parquet in data"),
        (("*.txt",), "*.txt"),
    ],
)
def test_data_entries_are_named_by_base_name(entries, label):
    assert public_data_label(entries) == label


def test_the_stdlib_is_named_by_its_version_only():
    import sys
    import sysconfig

    label = default_corpus_label()
    assert label == f"the Python {sys.version_info.major}.{sys.version_info.minor} standard library source"
    assert public_data_label(()) == label
    assert sysconfig.get_paths()["stdlib"] not in label and "/" not in label


def test_a_run_from_absolute_paths_publishes_none_of_them(tmp_path: Path, corpus: Path):
    notes = tmp_path / "private" / "notes.txt"
    notes.write_text("def notes():\n    return 'kept in a private place'\n" * 40)
    entries = (str(corpus.resolve()), str(notes.resolve()), f"{corpus.resolve()}/**/*.py")
    manifest, _ = create_run(RunSettings(data=entries), tmp_path / "run", signing_public_key="")
    assert manifest.data.source == "corpus, notes.txt, *.py in corpus"
    assert _leaked_components(manifest.to_json(), corpus, notes) == []  # what /api/v1/run serves
    card = _card(manifest)
    assert markdown_text("corpus, notes.txt, *.py in corpus") in card
    assert _leaked_components(card, corpus, notes) == []

    named = RunSettings(data=entries, data_name="  Module sources\n2026 ")
    manifest, _ = create_run(named, tmp_path / "named", signing_public_key="")
    assert manifest.data.source == "Module sources 2026"  # --data-name wins
    assert "Module sources 2026; " in _card(manifest)


def test_a_card_of_an_older_run_leaves_its_stored_paths_out(tmp_path: Path, corpus: Path):
    """A run created before labels were path-free keeps its signed manifest; its cards drop the paths."""
    manifest, _ = create_run(RunSettings(data=(str(corpus),)), tmp_path / "run", signing_public_key="")
    stdlib = "python-stdlib 3.11.7 (/usr/lib/python3.11)"
    old = f"{corpus.resolve()}, ~/texts/, hf:org/name, corpus/**/*.md (field body)"
    for source, shown in ((stdlib, "python-stdlib 3.11.7 (python3.11)"), (old, "corpus, texts, hf:org/name")):
        card = _card(dataclasses.replace(manifest, data=dataclasses.replace(manifest.data, source=source)))
        assert shown in card
        assert _leaked_components(card, corpus, Path("/usr/lib/python3.11")) == []


def test_a_peer_without_a_name_shows_a_random_handle_kept_across_restarts(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CROWDTRAIN_CONFIG_DIR", str(tmp_path / "config"))
    first = Volunteer(PeerConfig(coordinator="127.0.0.1:1")).name
    assert HANDLE.fullmatch(first) and first != socket.gethostname()
    assert (tmp_path / "config" / "display-name").read_text().strip() == first
    assert Volunteer(PeerConfig(coordinator="127.0.0.1:1")).name == first  # a restart: the same handle
    assert Volunteer(PeerConfig(coordinator="127.0.0.1:1", name="alice")).name == "alice"


def test_a_handle_that_cannot_be_kept_is_still_random_and_not_the_host_name(tmp_path: Path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    handles = {display_handle(blocked / "config") for _ in range(8)}
    assert all(HANDLE.fullmatch(h) and h != socket.gethostname() for h in handles)
    assert len(handles) > 1  # one per start
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "display-name").write_text(socket.gethostname())  # not a handle: replaced
    assert HANDLE.fullmatch(display_handle(tmp_path / "config"))


FAKE_HOST = "vetch-7qz4-host"  # what socket.gethostname and platform.node answer in the test below


def _host_name_in(text: str, real_host: str) -> bool:
    """FAKE_HOST, or this machine's real name where it is distinctive enough to look for."""
    hosts = [FAKE_HOST] + ([real_host] if len(real_host) >= 6 and real_host != "localhost" else [])
    return any(host.lower() in text.lower() for host in hosts)


def test_a_published_checkpoint_names_no_path_and_no_host(tmp_path: Path, corpus: Path, monkeypatch):
    """Every text file of a checkpoint directory (config, tokenizer, card) and the manifest
    /api/v1/run serves hold neither the data dir, the corpus path nor this machine's name."""
    import platform

    from crowdtrain.peer.run.model import build_model, save_hf

    real_host = socket.gethostname()
    monkeypatch.setattr(socket, "gethostname", lambda: FAKE_HOST)
    monkeypatch.setattr(platform, "node", lambda: FAKE_HOST)
    data_dir = tmp_path / "private" / "run"
    store, run = open_run(RunSettings(data=(str(corpus),), data_url="https://example.org/c"), data_dir)
    store.close()
    out = data_dir / "checkpoints" / "step-3"
    save_hf(build_model(run.manifest), run.tokenizer_json, run.manifest, out)
    (out / "README.md").write_text(model_card(run.manifest, CardFacts(3, 4.0, 1, "now"), run.data_terms))
    texts = {"manifest": run.manifest.to_json()}
    texts.update(
        {p.name: p.read_text(errors="replace") for p in out.iterdir() if p.suffix in (".json", ".md")}
    )
    assert {"README.md", "config.json", "tokenizer_config.json", "manifest"} <= texts.keys()
    for name, text in texts.items():
        assert _leaked_components(text, corpus, data_dir) == [], name
        assert not _host_name_in(text, real_host), name


def test_the_data_url_and_license_last_across_restarts_and_may_be_replaced(tmp_path: Path, corpus: Path):
    data_dir = tmp_path / "run"
    first = RunSettings(data=(str(corpus),), data_url=" https://example.org/c ", data_license="CC-BY-4.0")
    for settings, url, license_ in (
        (first, "https://example.org/c", "CC-BY-4.0"),
        (RunSettings(), "https://example.org/c", "CC-BY-4.0"),  # a restart without the flags keeps them
        (RunSettings(data_license="CC0-1.0"), "https://example.org/c", "CC0-1.0"),  # a new one replaces it
    ):
        store, run = open_run(settings, data_dir)
        store.close()
        assert (run.data_terms.url, run.data_terms.license) == (url, license_)
