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

from tests.helpers import ROOT

# one worker for the tests that read or change the source tree (-n 2):
# its probes add modules to the source tree for a moment, and the wheel test copies that tree
pytestmark = pytest.mark.xdist_group("source_tree")

MAX_FUNCTION_LINES = 60
# size by concept, not by file: a folder is one concept, small enough to hold in one's head
MAX_FILE_LINES = 600
MAX_FOLDER_MODULES = 10  # modules in one folder, __init__.py not counted
MAX_FOLDER_LINES = 2_000
# generated code aside, a longer file or function, or a bigger folder, needs a reason here
LONGER_ALLOWED: dict[str, str] = {}


def test_the_servers_core_imports_neither_torch_nor_hivemind_nor_tokenizers():
    """What the gRPC/HTTP servers load at run time, dynamic imports included."""
    code = (
        "import sys\n"
        "import crowdtrain.coordinator.api.servicer, crowdtrain.coordinator.api.grpcserver, crowdtrain.coordinator.api.webserver\n"
        "import crowdtrain.coordinator.peers.store, crowdtrain.coordinator.peers.status, crowdtrain.coordinator.api.metrics\n"
        "import crowdtrain.coordinator.peers.health, crowdtrain.coordinator.publishing.archive, crowdtrain.peer.link.client\n"
        "heavy = sorted(m for m in ('torch', 'hivemind', 'tokenizers', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert result.returncode == 0, result.stderr


def _lint_with_probe(probe: Path, line: str) -> subprocess.CompletedProcess:
    """import-linter's verdict with `probe` (a module holding `line`) added to the tree."""
    probe.write_text(line + "  # noqa: F401\n")
    try:
        return subprocess.run([str(_lint_imports())], capture_output=True, text=True, cwd=ROOT, timeout=300)
    finally:
        probe.unlink()


def _lint_imports() -> Path:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (the dev extra)")
    return lint


@pytest.mark.parametrize(
    "probe, line, broken",
    [
        # the packages: the peer never imports the coordinator
        ("peer/zz_layer_probe.py", "from crowdtrain.coordinator.peers import health", "one-way layers"),
        # inside the peer: a lower folder never imports a higher one, siblings never each other
        ("peer/run/zz_layer_probe.py", "from crowdtrain.peer.volunteer import trainer", "peer: cli"),
        ("peer/data/zz_layer_probe.py", "from crowdtrain.peer.checkpoints import pull", "peer: cli"),
        # the participant's commands are the top: nothing in the peer runs a command
        ("peer/volunteer/zz_layer_probe.py", "from crowdtrain.peer import cli", "peer: cli"),
        # inside the coordinator: the books on peers never reach up into the servers
        (
            "coordinator/peers/zz_layer_probe.py",
            "from crowdtrain.coordinator.api import servicer",
            "coordinator: cli",
        ),
    ],
)
def test_the_layer_contracts_catch_a_wrong_import(probe: str, line: str, broken: str):
    """The contracts in pyproject.toml are live: each wrong import breaks the contract it should."""
    ok = subprocess.run([str(_lint_imports())], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert ok.returncode == 0, ok.stdout[-3000:]
    result = _lint_with_probe(ROOT / probe, line)
    assert result.returncode != 0
    module = "crowdtrain." + probe.removesuffix(".py").replace("/", ".")
    report = " ".join(result.stdout.split())  # import-linter wraps long lines
    assert f"{broken}" in report and f"{module} -> " in report, result.stdout[-3000:]
    assert report.count(" BROKEN") == 1, result.stdout[-3000:]


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
        "crowdtrain/peer/volunteer/trainer.py",
        "crowdtrain/coordinator/cli.py",
        "crowdtrain/protos/coordinator_pb2.py",
        "crowdtrain/protos/coordinator.proto",
        "crowdtrain/coordinator/dashboard/static/app.js",
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


def test_each_folder_is_one_concept_of_a_readable_size():
    """Every folder of a package (its top level and each sub-package) has a code map in its
    __init__.py naming each of its modules, at most MAX_FOLDER_MODULES modules and
    MAX_FOLDER_LINES lines."""
    folders = [ROOT / "peer", ROOT / "coordinator"]
    folders += [d for top in folders for d in sorted(top.iterdir()) if (d / "__init__.py").exists()]
    problems = []
    for folder in folders:
        name = str(folder.relative_to(ROOT))
        modules = sorted(p for p in folder.glob("*.py") if p.name != "__init__.py")
        lines = sum(len(p.read_text().splitlines()) for p in modules)
        if (len(modules) > MAX_FOLDER_MODULES or lines > MAX_FOLDER_LINES) and name not in LONGER_ALLOWED:
            problems.append(f"{name}: {len(modules)} modules, {lines} lines")
        code_map = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
        unnamed = [p.name for p in modules if p.name not in code_map]
        unnamed += [
            d.name + "/"
            for d in folder.iterdir()
            if (d / "__init__.py").exists() and d.name + "/" not in code_map
        ]
        if unnamed:
            problems.append(f"{name}/__init__.py's code map does not name {unnamed}")
    assert not problems, problems
