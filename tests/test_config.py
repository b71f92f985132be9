"""Each operator default is written once: a component's settings class holds it, the coordinator's
flags take it from there (`config.setting`), and settings are built from flags by name, never
copied field by field; a flag several commands share is declared once."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from crowdtrain.coordinator import config
from crowdtrain.coordinator.admission.bans import AutobanConfigError, AutobanSettings
from crowdtrain.coordinator.admission.gate import AdmissionSettings
from crowdtrain.coordinator.api.reachability import ReachSettings
from crowdtrain.coordinator.api.servicer import AbuseLimits
from crowdtrain.coordinator.config import CoordinatorConfig, setting
from crowdtrain.coordinator.peers.credit import CreditSettings
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.publishing.publisher import PublisherSettings
from crowdtrain.coordinator.run.runs import RunSettings
from crowdtrain.peer.settings import commands

OWNERS = (
    RunSettings,
    PublisherSettings,
    HealthSettings,
    AbuseLimits,
    AdmissionSettings,
    AutobanSettings,
    ReachSettings,
)
# the coordinator process's own settings: no component holds them, so config.py writes their defaults
PROCESS_SETTINGS = {
    "data_dir",
    "public_host",
    "grpc_port",
    "http_port",
    "dht_port",
    "tls_cert",
    "tls_key",
    "min_peer_version",
}
PACKAGE = Path(config.__file__).resolve().parents[1]  # the crowdtrain package: coordinator/, peer/


def _backed_flags() -> dict[str, tuple[type, str]]:
    """CoordinatorConfig's flags declared with `setting`: flag -> (owner, the owner's field)."""
    return {
        f.name: (f.metadata["owner"], f.metadata["setting"])
        for f in dataclasses.fields(CoordinatorConfig)
        if "owner" in f.metadata
    }


def _calls(path: Path, name: str) -> list[ast.Call]:
    tree = ast.parse(path.read_text())
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
    ]


def test_each_flag_backed_by_a_component_has_the_components_default():
    backed = _backed_flags()
    assert {owner for owner, _ in backed.values()} == set(OWNERS)
    flags = {f.name: f for f in dataclasses.fields(CoordinatorConfig)}
    for flag, (owner, name) in backed.items():
        [declared] = [f for f in dataclasses.fields(owner) if f.name == name]
        assert flags[flag].default == declared.default, flag
    defaults = CoordinatorConfig(data_dir="run")
    for owner in OWNERS:
        assert defaults.settings(owner) == owner(), owner.__name__


def test_every_other_flag_is_the_coordinator_process_own():
    """config.py writes a default only for what no component holds; every other flag is `setting`."""
    assert (
        set(f.name for f in dataclasses.fields(CoordinatorConfig)) - set(_backed_flags()) == PROCESS_SETTINGS
    )
    source = PACKAGE / "coordinator" / "config.py"
    [cls] = [
        n
        for n in ast.parse(source.read_text()).body
        if isinstance(n, ast.ClassDef) and n.name == "CoordinatorConfig"
    ]
    written_here = {
        stmt.target.id
        for stmt in cls.body
        if isinstance(stmt, ast.AnnAssign)
        and isinstance(stmt.value, ast.Call)
        and getattr(stmt.value.func, "id", "") == "option"
    }
    assert written_here == PROCESS_SETTINGS


def test_flags_reach_the_components_by_name_not_by_hand():
    """No module copies a backed flag into a component's settings (`HealthSettings(cfg.heartbeat_
    interval_s, ...)`): `config.settings(Owner)` does, for every owner."""
    backed = set(_backed_flags())
    copies = []
    for path in (PACKAGE / "coordinator").rglob("*.py"):
        for owner in OWNERS:
            for call in _calls(path, owner.__name__):
                values = [*call.args, *(k.value for k in call.keywords)]
                copies += [
                    f"{path.name}:{call.lineno} {owner.__name__}(...{v.attr}...)"
                    for v in values
                    if isinstance(v, ast.Attribute) and v.attr in backed
                ]
    assert not copies
    config = CoordinatorConfig(
        data_dir="run", keep_last_checkpoints=9, host="0.0.0.0", join_burst=3, admission="invite"
    )
    assert config.settings(PublisherSettings).keep_last == 9
    assert config.settings(PublisherSettings).listen_host == "0.0.0.0"
    assert config.settings(AbuseLimits) == AbuseLimits(joins_burst=3)
    assert config.settings(AdmissionSettings).mode == "invite"


def test_settings_say_what_is_wrong():
    with pytest.raises(AutobanConfigError, match="--autoban-min-reporters 0"):
        CoordinatorConfig(data_dir="run", autoban_min_reporters=0).settings(AutobanSettings)
    with pytest.raises(TypeError, match="no flag for CreditSettings"):
        CoordinatorConfig(data_dir="run").settings(CreditSettings)
    with pytest.raises(TypeError, match="no setting 'target_batch_size' with a default"):
        setting(CreditSettings, "target_batch_size", "a setting without a default cannot be a flag")


def test_a_flag_several_commands_share_is_declared_once():
    """No two `option(...)` declarations in the settings modules are the same default and help."""
    seen: dict[str, str] = {}
    repeated = []
    for path in (PACKAGE / "coordinator" / "config.py", Path(commands.__file__)):
        for call in _calls(path, "option"):
            key = ast.dump(ast.Tuple([*call.args, *(k.value for k in call.keywords)], ast.Load()))
            where = f"{path.name}:{call.lineno}"
            if key in seen:
                repeated.append(f"{where} repeats {seen[key]}")
            seen.setdefault(key, where)
    assert not repeated
