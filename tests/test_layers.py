"""The shape of the codebase, kept: one installed namespace, one-way layers, a light server core,
and functions and files small enough to read (issue 9). `lint-imports` (scripts/test.sh) checks
the layers statically; these tests check what it cannot see."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400
# generated code aside, a longer file or function needs a reason here
LONGER_ALLOWED: dict[str, str] = {}


def test_the_servers_core_imports_neither_torch_nor_hivemind_nor_tokenizers():
    """What the gRPC/HTTP servers load at run time, dynamic imports included."""
    code = (
        "import sys\n"
        "import crowdtrain.coordinator.service, crowdtrain.coordinator.grpcserver, crowdtrain.coordinator.webserver\n"
        "import crowdtrain.coordinator.store, crowdtrain.coordinator.status, crowdtrain.coordinator.metrics\n"
        "import crowdtrain.coordinator.registry, crowdtrain.coordinator.archive, crowdtrain.peer.client\n"
        "heavy = sorted(m for m in ('torch', 'hivemind', 'tokenizers', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert result.returncode == 0, result.stderr


def test_the_layer_contract_catches_a_peer_module_importing_the_coordinator(tmp_path: Path):
    """The contract in pyproject.toml is live: a peer-side import of the coordinator breaks it."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (the dev extra)")
    ok = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert ok.returncode == 0, ok.stdout[-3000:]
    probe = ROOT / "peer" / "zz_layer_probe.py"
    probe.write_text("from crowdtrain.coordinator import registry  # noqa: F401\n")
    try:
        broken = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    finally:
        probe.unlink()
    assert broken.returncode != 0
    assert "crowdtrain.peer.zz_layer_probe -> crowdtrain.coordinator.registry" in broken.stdout


def test_a_built_wheel_installs_only_the_crowdtrain_namespace(tmp_path: Path):
    # setuptools builds in ROOT/build and packs whatever it finds there, stale files included
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    [wheel] = tmp_path.glob("crowdtrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"crowdtrain"}, top
    for expected in (
        "crowdtrain/peer/trainer.py",
        "crowdtrain/coordinator/cli.py",
        "crowdtrain/protos/coordinator_pb2.py",
        "crowdtrain/protos/coordinator.proto",
        "crowdtrain/coordinator/static/app.js",
    ):
        assert expected in names, expected
    assert not [n for n in names if "chaos" in n or "/wan.py" in n], "test harnesses stay out of the wheel"


def _long_functions(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - start + 1
            if length > MAX_FUNCTION_LINES:
                found.append((f"{path.relative_to(ROOT)}:{node.name}", length))
    return found


def test_functions_and_files_stay_small_enough_to_read():
    too_long = []
    for package in ("peer", "coordinator"):
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            name = str(path.relative_to(ROOT))
            if lines > MAX_FILE_LINES and name not in LONGER_ALLOWED:
                too_long.append((name, lines))
            too_long += [(f, n) for f, n in _long_functions(path) if f not in LONGER_ALLOWED]
    assert not too_long, (
        f"over {MAX_FUNCTION_LINES} lines per function / {MAX_FILE_LINES} per file: {too_long}"
    )
