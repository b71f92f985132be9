"""The model card of each checkpoint (`coordinator/publishing/card.py`): huggingface_hub reads its
metadata back (license, datasets, model-index with the held-out loss), it credits the names
volunteers chose and counts the rest, strangers' names cannot inject markdown, HTML or links, and
`--data-url`/`--data-license` are refused, before anything is written, when malformed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from crowdtrain.coordinator.publishing.card import (
    MAX_NAME_CHARS,
    CardFacts,
    DataTerms,
    card_license,
    card_name,
    contributor_line,
    dataset_id,
    model_card,
)
from crowdtrain.coordinator.run.runs import RunSettings, RunSettingsError, check_data_url, open_run
from huggingface_hub import ModelCard

from tests.helpers import make_run

CREATED = "2026-12-07 12:00 UTC"


def _row(name: str, samples: int = 10, dht_peer_id: str = "QmZ8abcdefgh") -> dict:
    return {"name": name, "dht_peer_id": dht_peer_id, "samples": samples}


@pytest.fixture
def manifest(tmp_path: Path, small_corpus: Path):
    return make_run(tmp_path, small_corpus)[0]


def test_the_card_round_trips_through_huggingface_hub(tmp_path: Path, manifest):
    facts = CardFacts(
        step=12, eval_loss=4.5, contributing_peers=3, created=CREATED, contributors=(_row("alice"),)
    )
    terms = DataTerms(url="https://example.org/corpus?v=2", license="CC-BY-4.0")
    (tmp_path / "README.md").write_text(model_card(manifest, facts, terms), encoding="utf-8")
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == (
        "cc-by-4.0",
        "transformers",
        "text-generation",
    )
    assert data.datasets == [manifest.data.source] and "crowdtrain" in data.tags
    loss, perplexity = data.eval_results
    assert (loss.metric_type, loss.metric_value, loss.dataset_split) == ("loss", 4.5, "held-out")
    assert (perplexity.metric_type, perplexity.metric_value) == ("perplexity", round(math.exp(4.5), 2))
    assert data.model_name == f"{manifest.run_id} step 12"
    assert "<https://example.org/corpus?v=2>" in card.text and "CC-BY-4.0" in card.text
    assert "Trained by alice." in card.text


def test_the_card_states_what_a_downloader_needs(manifest):
    from crowdtrain.coordinator.peers.shardbook import Cursor, coverage_of

    read = coverage_of([Cursor(1, 10, 100), Cursor(0, 40, 80), Cursor()]).text()
    assert read == "150 training sequences; 2 of 3 shards sized (a share once every shard is)"
    card = model_card(manifest, CardFacts(12, 4.5, 3, CREATED, data_read=read))
    for needle in (
        manifest.run_id,
        "step 12",
        "llama",
        f"{12 * manifest.swarm.target_batch_size:,} sequences",
        "4.5000 nats/token",
        f"perplexity {math.exp(4.5):.2f}",
        "| 3 |",
        manifest.data.source,
        "Intended use and limitations",
        manifest.sha256(),
        f"Read so far by the swarm: {read}.",
        "stated no license",
        "No volunteer's samples have been credited yet.",
    ):
        assert needle in card, needle
    assert "license:" not in card.split("\n---", 1)[0]  # no license the operator did not state


def test_the_project_is_linked_only_at_a_real_address(manifest):
    bare = model_card(manifest, CardFacts(1, 4.0, 1, CREATED))
    assert "](" not in bare and "github.com/)" not in bare and "with\ncrowdtrain (preset" in bare
    linked = model_card(manifest, CardFacts(1, 4.0, 1, CREATED), project_url="https://example.org/crowdtrain")
    assert "[crowdtrain](<https://example.org/crowdtrain>)" in linked


def test_a_non_finite_loss_gives_no_model_index(manifest):
    card = model_card(manifest, CardFacts(1, float("nan"), 1, CREATED))
    assert "model-index" not in card


def test_chosen_names_are_listed_and_generated_handles_counted():
    rows = [
        _row("alice", 90),
        _row("volunteer-3f9a", 80),  # the default handle: not chosen
        _row("peer 12345678", 70, dht_peer_id="Qmxyz12345678"),  # no proven session named it
        _row("bob_smith", 60),
        _row("Alice", 50),  # another machine of alice (or a namesake): listed once
        _row("carol", 0),  # nothing accepted: not a contributor
        _row("volunteer-00ff", 5),
    ]
    assert contributor_line(rows) == "Trained by alice, bob\\_smith and 3 anonymous volunteers."
    assert contributor_line([_row("volunteer-abcd")]) == "Trained by 1 anonymous volunteer."
    assert contributor_line([_row("dave")]) == "Trained by dave."
    assert contributor_line([]) == "No volunteer's samples have been credited yet."


@pytest.mark.parametrize(
    ("hostile", "shown"),
    [
        ("\x1b]0;PWNED\x07eve\n", "0PWNEDeve"),
        ("<img src=x onerror=alert(1)>", "img srcx onerroralert1"),
        ("[click me](https://evil.example/x)", "click mehttpsevilexamplex"),
        ("**bold** `code` # head | www.evil.example", "bold code head wwwevilexample"),
        ("\u202eevil\u202c ok", "evil ok"),
        ("<>[]()*!", ""),  # nothing left: counted, not listed
    ],
)
def test_hostile_names_are_shown_as_plain_bounded_text(hostile, shown):
    assert card_name(hostile) == shown
    line = contributor_line([_row(hostile)])
    for forbidden in ("<", ">", "[", "](", "*", "`", "#", "|", "://", "www.", "\x1b", "\n", "\u202e"):
        assert forbidden not in line, forbidden


def test_a_very_long_name_is_cut():
    assert card_name("x" * 100_000) == "x" * MAX_NAME_CHARS
    assert len(contributor_line([_row("a b " * 5000)])) < 100


def test_license_and_dataset_metadata():
    assert card_license("") == {}
    assert card_license("Apache-2.0") == {"license": "apache-2.0"}
    assert card_license("Free for research, no redistribution") == {
        "license": "other",
        "license_name": "free-for-research-no-redistribution",
    }
    assert dataset_id("hf:org/name@train (field body)") == "org/name"
    assert dataset_id("hf:org/a, notes.txt") == "hf:org/a, notes.txt"
    assert dataset_id("/home/alice/texts (field text)") == "texts (field text)"


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        (RunSettings(data_url="ftp://example.org/data"), "http:// or https://"),
        (RunSettings(data_url="/home/alice/corpus"), "http:// or https://"),
        (RunSettings(data_url="https://"), "http:// or https://"),
        (RunSettings(data_url="https://exa mple.org"), "percent-encode"),
        (RunSettings(data_url="https://example.org/\x1b[2J"), "percent-encode"),
        (RunSettings(data_url="https://example.org/<script>"), "percent-encode"),
        (RunSettings(data_url="https://alice:s3cret@example.org/data"), "password"),
        (RunSettings(data_url="https://example.org:http/"), "not a valid address"),
        (RunSettings(data_url="https://example.org/" + "a" * 600), "over 500"),
        (RunSettings(data_license="MIT\x07"), "--data-license holds the control"),
        (RunSettings(data_license="x" * 500), "--data-license is 500 characters"),
        (RunSettings(data_name="notes\u202e2024"), "--data-name holds"),
    ],
)
def test_malformed_card_settings_are_refused_before_the_data_dir_is_written(tmp_path: Path, settings, flag):
    with pytest.raises(RunSettingsError, match=flag.replace("?", r"\?")) as refused:
        open_run(settings, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert "--data-" in str(refused.value)


def test_a_good_url_is_kept_as_given():
    assert check_data_url("  https://example.org/corpus#v2  ") == "https://example.org/corpus#v2"
    assert check_data_url("") == ""


def test_a_published_checkpoint_carries_the_card_and_still_loads_in_transformers(
    tmp_path: Path, small_corpus
):
    """The publisher's own write: README.md is the card (its contributors from the leaderboard),
    listed and signed with the other files, and transformers loads the directory."""
    from types import SimpleNamespace

    from crowdtrain.coordinator.publishing.publisher import Publisher, PublisherSettings
    from crowdtrain.coordinator.signing import new_key
    from crowdtrain.peer.checkpoints.format import step_dirname
    from crowdtrain.peer.run.model import build_model
    from transformers import AutoModelForCausalLM

    manifest, tokenizer_json = make_run(tmp_path, small_corpus)
    publisher = Publisher(
        PublisherSettings(),
        manifest,
        tokenizer_json,
        tmp_path / "d" / "eval.jsonl",
        tmp_path / "checkpoints",
        [],
        voters=lambda: (frozenset(), ""),
        signing_key=new_key(),
        data_terms=DataTerms(license="CC0-1.0"),
        contributors=lambda: [_row("alice", 30), _row("volunteer-1a2b", 20)],
    )
    publisher.model = build_model(manifest)  # what start() builds; no swarm here
    publisher._tracker = SimpleNamespace(global_progress=SimpleNamespace(num_peers=2))  # hivemind's tracker
    meta = publisher._write_checkpoint(7, 4.25, 0)
    out = tmp_path / "checkpoints" / step_dirname(7)
    assert "README.md" in [f.name for f in meta.files]
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "cc0-1.0" and card.data.eval_results[0].metric_value == 4.25
    assert "Trained by alice and 1 anonymous volunteer." in card.text
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() == manifest.model.num_parameters
