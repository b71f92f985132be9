"""A volunteer's identity by default: identity.key in the config directory (the key `crowdtrain
identity` prints), created once with mode 0600, held while the peer runs so that a second peer on
the same key is refused; the peer's own page by that identity."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from crowdtrain.coordinator.demo import cli_command, local_peer_command
from crowdtrain.peer.admission.identity import IdentityError, PeerIdentity, lock_path
from crowdtrain.peer.settings.commands import PeerConfig
from crowdtrain.peer.volunteer.trainer import Volunteer, own_page_url


def _identity_of(config: PeerConfig) -> PeerIdentity:
    """What `Volunteer.join` uses as its identity, without the rest of a volunteer."""
    return Volunteer._identity(SimpleNamespace(config=config))


def test_a_peer_uses_the_config_directorys_key_by_default(tmp_path, monkeypatch, capsys):
    from crowdtrain.coordinator.cli import main

    monkeypatch.setenv("CROWDTRAIN_CONFIG_DIR", str(tmp_path / "config"))
    key = tmp_path / "config" / "identity.key"
    first = _identity_of(PeerConfig(coordinator="127.0.0.1:1"))
    try:
        assert first.path == key and first.persistent
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        assert oct(lock_path(key).stat().st_mode & 0o777) == "0o600"
        assert main(["identity"]) == 0  # the same key `crowdtrain identity` prints
        assert capsys.readouterr().out.strip() == first.peer_id
    finally:
        first.release()
    again = _identity_of(PeerConfig(coordinator="127.0.0.1:1"))  # a restart: the same peer id
    again.release()
    assert again.peer_id == first.peer_id
    other = _identity_of(PeerConfig(coordinator="127.0.0.1:1", identity=str(tmp_path / "other.key")))
    other.release()
    assert other.path == tmp_path / "other.key" and other.peer_id != first.peer_id


def test_a_second_holder_of_one_key_is_refused_until_the_first_releases_it(tmp_path):
    key = tmp_path / "identity.key"
    first = PeerIdentity.held(key)
    with pytest.raises(IdentityError, match="--identity OTHER_FILE") as refused:
        PeerIdentity.held(key)
    assert str(key) in str(refused.value) and "in use by another crowdtrain peer" in str(refused.value)
    first.release()
    first.release()  # idempotent
    second = PeerIdentity.held(key)
    assert second.peer_id == first.peer_id
    second.release()


def test_a_second_peer_on_the_same_key_fails_with_one_clear_line(tmp_path):
    """The real command, while this process holds the config directory's key."""
    config_dir = tmp_path / "config"
    held = PeerIdentity.held(config_dir / "identity.key")
    try:
        result = subprocess.run(
            cli_command("peer", "--coordinator", "127.0.0.1:1", "--join-timeout-s", "3"),
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "CROWDTRAIN_CONFIG_DIR": str(config_dir)},
        )
    finally:
        held.release()
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--identity OTHER_FILE" in errors[0], result.stderr[-2000:]


def test_peers_started_by_the_harness_never_share_a_key(tmp_path):
    commands = [local_peer_command("127.0.0.1:1", tmp_path / "cache", "--name", "p") for _ in range(3)]
    keys = [Path(c[c.index("--identity") + 1]) for c in commands]
    assert len(set(keys)) == 3 and all(k.parent == tmp_path / "cache" / "identities" for k in keys)
    chosen = local_peer_command("127.0.0.1:1", tmp_path / "cache", "--identity", "mine.key")
    assert chosen.count("--identity") == 1 and "mine.key" in chosen


def test_the_peer_names_its_own_page_by_its_lasting_id():
    assert own_page_url("http://203.0.113.7:8080/", "QmPeer") == "http://203.0.113.7:8080/peer/QmPeer"
    assert own_page_url("https://run.example.org", "QmPeer") == "https://run.example.org/peer/QmPeer"
    assert own_page_url("", "QmPeer") == "" and own_page_url("http://h:1", "") == ""
