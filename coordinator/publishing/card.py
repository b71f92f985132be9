"""The model card published with each checkpoint: its README.md, built with huggingface_hub's
`ModelCard`, so the Hub and `ModelCard.load` read its metadata. Pure: no clock, no network.

    text = model_card(manifest, CardFacts(step=64, eval_loss=3.21, contributing_peers=3,
                      created="2026-12-07 12:00 UTC", contributors=leaderboard_rows),
                      DataTerms(url="https://example.org/corpus", license="CC-BY-4.0"))

Its YAML metadata: `license` (the operator's `--data-license`), `library_name: transformers`,
`pipeline_tag`, `tags`, `datasets` (the data's public name, or its `hf:` id) and `model-index`
with the checkpoint's held-out loss. What it publishes names nobody's machine: the data's name is
the manifest's path-free label (an older run's absolute paths are cut to base names here), the
project is linked only when the installed package's metadata names a public address, and
volunteers are listed by the names they chose (`--name`). A peer without `--name` shows a
generated `volunteer-XXXX` handle, and an identity no proven session named shows the
leaderboard's `peer XXXXXXXX`: neither is a chosen name, so they are counted, not listed. Names
are chosen by strangers: each keeps only letters, digits, spaces, `-`, `_` and `'`, cut to
`MAX_NAME_CHARS`, so none can inject markdown, HTML or a link.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from crowdtrain.peer.display import clean_display
from crowdtrain.peer.run.manifest import RunManifest

MAX_NAME_CHARS = 40  # a contributor's name on the card, once cleaned
MAX_LISTED_NAMES = 200  # chosen names listed on one card; the rest are counted
GENERATED_HANDLE = re.compile(r"volunteer-[0-9a-f]{4}")  # peer/volunteer/trainer.display_handle
HF_PREFIX = "hf:"  # a Hugging Face dataset given as --data hf:NAME[@split] (coordinator/run/sources.py)
_SPDX_LIKE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")
# an absolute local path (`/home/alice/texts`, `~/texts`, `C:\\texts`) starting a word and ending at a
# space, comma or parenthesis
_LOCAL_PATH = re.compile(r"(?<![^\s,(])(?:~|[A-Za-z]:)?[/\\][^\s,()]*")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~])")


@dataclass(frozen=True)
class DataTerms:
    """What the operator says about the run's data (`--data-url`, `--data-license`), checked by
    `coordinator.run.runs.check_settings`; "" where not given."""

    url: str = ""
    license: str = ""


NO_DATA_TERMS = DataTerms()


@dataclass(frozen=True)
class CardFacts:
    """One checkpoint's facts for its card."""

    step: int
    eval_loss: float  # nats/token on the held-out split
    contributing_peers: int  # peers in the swarm's progress records when it was published
    created: str  # "2026-12-07 12:00 UTC"
    data_read: str = ""  # how much of the data the swarm has read ("": unknown)
    # the leaderboard (peers.status.contributors): {"name", "dht_peer_id", "samples"}, most samples first
    contributors: tuple[Mapping, ...] = ()


def without_local_paths(text: str) -> str:
    """`text` with each absolute path replaced by its base name: runs made before the manifest's data
    name left out local paths still carry the operator's, which a card must not publish."""
    return _LOCAL_PATH.sub(lambda m: re.split(r"[/\\]", m.group().rstrip("/\\"))[-1], text)


def markdown_text(text: str) -> str:
    """`text` cleaned (`clean_display`) and shown as plain text in markdown: no emphasis, link or HTML."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", clean_display(text))


def card_name(name: str) -> str:
    """A contributor's chosen name as the card shows it: letters, digits, spaces, `-`, `_` and `'`
    only, at most MAX_NAME_CHARS; "" when nothing is left (the contributor is then counted)."""
    kept = "".join(c for c in clean_display(name) if c in " -_'" or unicodedata.category(c)[0] in "LMN")
    return " ".join(kept.split())[:MAX_NAME_CHARS].strip()


def is_chosen_name(row: Mapping) -> bool:
    """Whether a leaderboard row's name was chosen by its volunteer: not a generated handle, not
    the stand-in the leaderboard gives an identity no proven session named."""
    name, peer_id = str(row.get("name", "")), str(row.get("dht_peer_id", ""))
    return not GENERATED_HANDLE.fullmatch(name) and name != f"peer {peer_id[-8:]}"


def contributor_line(rows: Sequence[Mapping]) -> str:
    """Who trained it, for the card: chosen names (each once, most samples first, at most
    MAX_LISTED_NAMES), then how many others ("and 3 anonymous volunteers"); only identities with
    accepted samples count."""
    listed: list[str] = []
    seen: set[str] = set()
    anonymous = unlisted = 0  # not a chosen name; a chosen name past MAX_LISTED_NAMES
    for row in rows:
        if int(row.get("samples", 0)) <= 0:
            continue
        name = card_name(str(row.get("name", ""))) if is_chosen_name(row) else ""
        if not name:
            anonymous += 1
        elif name.casefold() in seen:
            continue  # one volunteer's several machines, or namesakes: listed once
        elif len(listed) >= MAX_LISTED_NAMES:
            unlisted += 1
        else:
            seen.add(name.casefold())
            listed.append(name.replace("_", "\\_"))
    for count, what in ((unlisted, "other"), (anonymous, "anonymous")):
        if count:
            listed.append(f"{count} {what} volunteer{'s' if count != 1 else ''}")
    if not listed:
        return "No volunteer's samples have been credited yet."
    return f"Trained by {', '.join(listed[:-1])}{' and ' if len(listed) > 1 else ''}{listed[-1]}."


def card_license(license_text: str) -> dict[str, str]:
    """The card's license metadata: an SPDX-like id as the Hub spells it (lower case); other text
    as `other` with a name made of it; nothing when the operator stated none."""
    if not license_text:
        return {}
    if _SPDX_LIKE.fullmatch(license_text):
        return {"license": license_text.lower()}
    slug = re.sub(r"[^a-z0-9.]+", "-", license_text.lower()).strip("-")[:64] or "custom"
    return {"license": "other", "license_name": slug}


def dataset_id(source: str) -> str:
    """The card's `datasets` entry: a single `hf:NAME[@split]` source's NAME, else the data's name."""
    label = without_local_paths(source)
    first = label.split(" (", 1)[0]  # without describe_source's notes ("(field text; ...)")
    if first.startswith(HF_PREFIX) and "," not in first:
        return first[len(HF_PREFIX) :].split("@", 1)[0]
    return label


def project_url() -> str:
    """The project's public address from the installed package's metadata (pyproject's
    `[project.urls]`, or its home page); "" when it names none: the card then links nothing."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        meta = metadata("crowdtrain")
    except PackageNotFoundError:
        return ""
    urls = [entry.partition(",")[2].strip() for entry in meta.get_all("Project-URL") or []]
    for url in [*urls, meta.get("Home-page") or ""]:
        if re.fullmatch(r"https?://[^\s<>]+", url):
            return url
    return ""


def model_card(
    manifest: RunManifest, facts: CardFacts, terms: DataTerms = NO_DATA_TERMS, project_url: str = ""
) -> str:
    """README.md of a checkpoint directory: YAML metadata (`ModelCardData`) and the text below it."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset = dataset_id(manifest.data.source)
    metrics = (
        ("loss", "held-out loss (nats/token)", round(facts.eval_loss, 4)),
        ("perplexity", "held-out perplexity", round(math.exp(min(facts.eval_loss, 50)), 2)),
    )
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=dataset,
            dataset_name=f"held-out split of {dataset}",
            dataset_split="held-out",
            metric_type=kind,
            metric_name=name,
            metric_value=value,
        )
        for kind, name, value in metrics
        if math.isfinite(facts.eval_loss)
    ]
    data = ModelCardData(
        **card_license(terms.license),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["crowdtrain", "decentralized-training", "hivemind"],
        datasets=[dataset],
        model_name=f"{manifest.run_id} step {facts.step}",
        eval_results=results or None,
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(manifest, facts, terms, project_url)}")
    return str(card)


def _body(manifest: RunManifest, facts: CardFacts, terms: DataTerms, project_url: str) -> str:
    m, d, swarm = manifest.model, manifest.data, manifest.swarm
    samples = facts.step * swarm.target_batch_size
    crowdtrain = f"[crowdtrain](<{project_url}>)" if project_url else "crowdtrain"
    url = f"\nAbout the data: <{terms.url}>." if terms.url else ""
    license_line = (
        f"License of the data, as the run's operator states it: {markdown_text(terms.license)}."
        if terms.license
        else "The run's operator stated no license for the data."
    )
    return f"""# {manifest.run_id}, step {facts.step}

A {m.num_parameters / 1e6:.2f}M-parameter {m.model_type} causal language model
(`{m.config["num_hidden_layers"]}` layers, hidden size `{m.config["hidden_size"]}`, vocabulary
`{m.config["vocab_size"]}`, context `{d.seq_len}` tokens), trained by volunteers with
{crowdtrain} (preset `{manifest.preset}`), published {facts.created}.

| | |
|---|---|
| swarm epoch (optimizer steps) | {facts.step} |
| samples seen (lower bound) | {samples:,} sequences = {samples * d.seq_len:,} tokens |
| held-out loss | {facts.eval_loss:.4f} nats/token (perplexity {math.exp(min(facts.eval_loss, 50)):.2f}) |
| peers in the swarm's progress records | {facts.contributing_peers} |
| run manifest sha256 | `{manifest.sha256()}` |

## Contributors

{contributor_line(facts.contributors)}

## Data

{markdown_text(without_local_paths(d.source))}; {len(d.shards)} training shards, {d.eval_fraction:.0%} of
documents held out for evaluation (the loss above is measured on {d.eval_max_sequences} held-out
sequences). Tokenizer: byte-level BPE trained on the training shards, sha256
`{manifest.tokenizer.sha256[:16]}...`.{url}
{license_line}
{f"Read so far by the swarm: {facts.data_read}." if facts.data_read else ""}

## Use

```python
from transformers import pipeline
print(pipeline("text-generation", model="path/to/this/directory")("def "))
```

Verify the download first: `crowdtrain verify DIR --public-key {manifest.signing_public_key or "<run key>"}`.

## Intended use and limitations

A research artefact of a community training run: for studying decentralized training and for
experiments at this scale. It is small, trained on a narrow corpus, unaligned and unevaluated for
safety; it will produce wrong, insecure or nonsensical text and code. Do not deploy it to users.
"""
