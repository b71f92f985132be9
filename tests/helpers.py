"""Helpers the tests import: the repository's paths, a tiny run, a launcher of real `crowdtrain`
processes, an in-process gRPC server. The fixtures built on them are in conftest.py.

    from tests.helpers import ROOT, make_run, serving
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from crowdtrain.coordinator.demo import (
    Child,
    DemoError,
    cli_command,
    coordinator_command,
    local_peer_command,
    spawn,
    stop_children,
    wait_for_endpoints,
)

from scripts.harness import any_event, processes_in_groups, wait_for_event

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"


def make_run(tmp_path: Path, corpus: Path):
    """A tiny run (vocab 400) over `corpus`: (manifest, tokenizer JSON), with its shards in tmp_path/d."""
    import dataclasses

    from crowdtrain.coordinator.run import dataset
    from crowdtrain.peer.run.manifest import build_manifest, get_preset

    preset = dataclasses.replace(get_preset("tiny"), vocab_size=400, num_shards=4, eval_fraction=0.05)
    spec, tok, tokenizer_json = dataset.build_dataset(
        [corpus],
        tmp_path / "d",
        source_label="t",
        num_shards=4,
        eval_fraction=0.05,
        max_bytes=0,
        seq_len=preset.seq_len,
        eval_max_sequences=8,
        vocab_size=400,
    )
    return build_manifest(
        preset, run_id="ct_test", created_unix_s=1.0, tokenizer=tok, data=spec
    ), tokenizer_json


TEST_VOTER_AGE_S = 15.0


class Launcher:
    """Start `crowdtrain` subcommands as real processes (`--log-format json`); their logs, as text,
    go to the test's tmp dir, and tests read their progress events (child.events)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(self, name: str, *args: str) -> Child:
        child = spawn(name, cli_command(*args), self.log_dir, echo=False)
        self.children.append(child)
        return child

    def start_coordinator(self, data_dir: Path, *extra: str, name: str = "coordinator") -> Child:
        """A coordinator whose volunteers vote on published states after TEST_VOTER_AGE_S (not the
        default 120 s: every test with a publisher would wait two minutes for its first checkpoint;
        tests/test_state_trust.py and tests/test_forged_state.py are where voter age is tested)."""
        if "--min-voter-age-s" not in extra:
            extra = ("--min-voter-age-s", str(TEST_VOTER_AGE_S), *extra)
        child = spawn(name, coordinator_command(data_dir, *extra), self.log_dir, echo=False)
        self.children.append(child)
        return child

    def start_peer(
        self, name: str, grpc_address: str, cache_dir: Path, *extra: str, label: str = ""
    ) -> Child:
        """A CPU volunteer with one thread on 127.0.0.1, as the swarm tests run them."""
        args = ("--name", name, "--threads", "1", "--device", "cpu", *extra)
        child = spawn(
            label or name, local_peer_command(grpc_address, cache_dir, *args), self.log_dir, echo=False
        )
        self.children.append(child)
        return child

    def start_program(self, name: str, args: list[str]) -> Child:
        """Any other program (tests' own helpers), reaped like the rest."""
        child = spawn(name, args, self.log_dir, echo=False)
        self.children.append(child)
        return child

    def wait_for_event(
        self,
        child: Child,
        event: str,
        timeout_s: float,
        start: int = 0,
        where: Callable[[dict], bool] = any_event,
    ) -> dict:
        """scripts.harness.wait_for_event, failing the test (with the last lines) on a timeout."""
        try:
            return wait_for_event(child, event, timeout_s, start, where)
        except TimeoutError as e:
            raise AssertionError(str(e)) from None

    def wait_for_endpoints(self, data_dir: Path, child: Child, timeout_s: float = 300) -> dict:
        try:
            return wait_for_endpoints(data_dir / "endpoints.json", child, timeout_s)
        except DemoError as e:
            raise AssertionError(f"{e}:\n" + "\n".join(child.lines[-30:])) from None

    def stop_all(self) -> None:
        stop_children(self.children)


def descendants_alive(pids: list[int]) -> list[int]:
    """PIDs from `pids`' process groups that still exist (p2pd daemons, hivemind children)."""
    return [pid for pid, _ in processes_in_groups(set(pids))]


@contextlib.contextmanager
def serving(servicer, store, rpc_timeout_s: float = 10.0) -> Iterator:
    """`servicer` on an in-process gRPC server at 127.0.0.1:0: a client of it; the server and
    `store` are closed afterwards."""
    from crowdtrain.coordinator.api.grpcserver import create_server
    from crowdtrain.peer.link.client import CoordinatorClient

    server, port = create_server(servicer, "127.0.0.1", 0)
    server.start()
    client = CoordinatorClient(f"127.0.0.1:{port}", rpc_timeout_s=rpc_timeout_s)
    try:
        yield client
    finally:
        client.close()
        server.stop(0).wait()
        store.close()
