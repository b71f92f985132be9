"""crowdtrain as a stranger installs it: the wheel built from this repository, installed without the
[dev] extra into a venv of its own, runs `crowdtrain --version`, a coordinator, `status` against it
and a peer that joins and trains one epoch.

The default test keeps to seconds: its fresh venv gets the third-party packages already installed
in the repository's venv (a .pth naming a folder of links to them, crowdtrain's own left out) and
the wheel with `pip install --no-deps`; every requirement the wheel declares is checked satisfied
there, and the `crowdtrain` imported there is the wheel's, not the repository's editable one.

The `install` test installs the wheel into a bare venv as a volunteer would, resolving every
dependency from PyPI (torch first, pinned by TORCH_SPEC, so that no CUDA build is pulled):

    .venv/bin/python -m pytest -m install tests/test_install.py      # or scripts/install_check.sh
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import urllib.request
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.helpers import ROOT, Launcher

# one worker for the tests that read or change the source tree (-n 2):
# it copies the source tree, to which test_layers' probes add modules for a moment
pytestmark = pytest.mark.xdist_group("source_tree")

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, a dependency there
    import tomli as tomllib

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
OWN = ("crowdtrain", "__editable__", "_crowdtrain")  # the repository's own install in its venv


def _source_dir(checkout: Path, package: str) -> Path:
    """Where `package` (crowdtrain.peer.swarm) lives in a checkout (package-dir maps the tops)."""
    parts = package.split(".")
    top = ".".join(parts[:2])
    return checkout / SETUPTOOLS["package-dir"][top] / Path(*parts[2:])


def _copy_checkout(dest: Path) -> Path:
    """The files a clone gives the build: pyproject.toml, README.md and the package folders (a copy,
    so the build's build/ and egg-info never touch the repository, where other tests build too)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for folder in sorted(set(SETUPTOOLS["package-dir"].values())):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel` builds from a copy of this checkout."""
    work = tmp_path_factory.mktemp("wheel")
    checkout = _copy_checkout(work / "checkout")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(work / "dist"), str(checkout)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    [found] = (work / "dist").glob("crowdtrain-*-py3-none-any.whl")
    return found


def _dependency_links(dest: Path) -> Path:
    """A folder of links to every entry of this venv's site-packages but crowdtrain's own (its
    dist-info and editable finder), so a fresh venv can use them without seeing the repository."""
    dest.mkdir()
    for site in dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]):
        for entry in Path(site).iterdir():
            if entry.name.startswith(OWN) or entry.suffix == ".pth" or (dest / entry.name).exists():
                continue
            (dest / entry.name).symlink_to(entry)
    return dest


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel: Path) -> Path:
    """A new venv (no pip of its own) that sees the repository venv's third-party packages, with
    the wheel installed in it by pip without its [dev] extra."""
    work = tmp_path_factory.mktemp("venv")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "repository-venv-dependencies.pth").write_text(f"{_dependency_links(work / 'deps')}\n")
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=300, env=_clean_env(),
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without PYTHONPATH (a stranger's shell has none pointing here)."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **extra}


def test_the_wheel_holds_every_package_its_data_and_the_entry_point(wheel: Path):
    checkout = wheel.parent.parent / "checkout"  # what it was built from (the repository's files change)
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = SETUPTOOLS["packages"]
    for package in packages:
        for module in _source_dir(checkout, package).glob("*.py"):
            assert f"{package.replace('.', '/')}/{module.name}" in names, (package, module.name)
    for package, patterns in SETUPTOOLS["package-data"].items():
        for pattern in patterns:
            files = sorted(_source_dir(checkout, package).glob(pattern))
            assert files, f"package-data {package}: {pattern} matches nothing in the repository"
            for file in files:
                inside = file.relative_to(_source_dir(checkout, package)).as_posix()
                assert f"{package.replace('.', '/')}/{inside}" in names, (package, inside)
    generated = sorted(p.name for p in (checkout / "protos").glob("*_pb2*.py"))
    assert generated and all(f"crowdtrain/protos/{name}" in names for name in generated), generated
    # every folder with an __init__.py is listed: a package left out of the list is left out of the wheel
    sources = {
        ".".join((top, *init.parent.relative_to(_source_dir(checkout, top)).parts))
        for top in SETUPTOOLS["package-dir"]
        for init in _source_dir(checkout, top).rglob("__init__.py")
    }
    assert not sources - set(packages), f"not in pyproject's packages: {sorted(sources - set(packages))}"
    [dist_info] = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    for script, target in PYPROJECT["project"]["scripts"].items():
        assert f"{script} = {target}" in entry_points, entry_points


CHECK_INSTALL = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from importlib.metadata import PackageNotFoundError, distribution, version
    from packaging.requirements import Requirement
    import crowdtrain.coordinator.cli, crowdtrain.peer
    from crowdtrain.peer.machine.install import upgrade_command, this_install

    def pipx_upgrade():  # the command were this venv one pipx manages (pipx marks each so)
        marker = Path(sys.prefix, "pipx_metadata.json")
        marker.write_text("{}")
        try:
            return upgrade_command(this_install(), "0.2")
        finally:
            marker.unlink()

    dist = distribution("crowdtrain")
    unmet = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra ([hf], [dev]) or another Python's
        try:
            have = version(req.name)
        except PackageNotFoundError:
            unmet.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{req} (have {have})")
    print(json.dumps({
        "module": crowdtrain.peer.__file__, "cli": crowdtrain.coordinator.cli.__file__,
        "dist": str(dist.locate_file("")), "version": dist.version, "prefix": sys.prefix,
        "requires": [r for r in dist.requires or [] if "extra ==" not in r], "unmet": unmet,
        "upgrade": upgrade_command(this_install(), "0.2"), "upgrade_in_pipx": pipx_upgrade(),
    }))
    """
)


def _check_installed(venv: Path) -> dict:
    """The wheel's crowdtrain is the one imported in `venv`, and every requirement it declares (no
    extras) is satisfied there."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", CHECK_INSTALL],
        capture_output=True, text=True, timeout=120, cwd=venv, env=_clean_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    site = Path(facts["dist"]).resolve()
    assert site.is_relative_to(venv.resolve()), f"crowdtrain's distribution is not the venv's: {site}"
    for module in (facts["module"], facts["cli"]):
        assert Path(module).resolve().is_relative_to(site), f"imported from outside the venv: {module}"
    assert not facts["unmet"], f"declared dependencies not satisfied: {facts['unmet']}"
    assert {"torch", "hivemind", "grpcio", "transformers"} <= {r.split(">")[0] for r in facts["requires"]}
    assert not any("pytest" in r or "ruff" in r for r in facts["requires"]), "the [dev] extra stays out"
    return facts


def run_installed(venv: Path, tmp_path: Path, launcher: Launcher, version: str) -> None:
    """What its users type first: --version, a coordinator, status against it, and a peer that joins
    the run and its swarm (hivemind's DHT), all from `venv`'s `crowdtrain` script."""
    crowdtrain = str(venv / "bin" / "crowdtrain")
    shown = subprocess.run([crowdtrain, "--version"], capture_output=True, text=True, timeout=60)
    assert (shown.returncode, shown.stdout) == (0, f"crowdtrain {version}\n"), shown.stderr[-2000:]
    data_dir = tmp_path / "run"
    coordinator = launcher.start_program("coordinator", [
        crowdtrain, "--log-format", "json", "coordinator", "--data-dir", str(data_dir), "--preset", "tiny",
        "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
    ])  # fmt: skip
    grpc_address = launcher.wait_for_endpoints(data_dir, coordinator, timeout_s=120)["grpc"]
    status = subprocess.run(
        [crowdtrain, "status", "--coordinator", grpc_address], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0 and status.stdout.startswith("run ct_tiny_"), status.stderr[-2000:]
    cache = tmp_path / "cache"
    peer = launcher.start_program("peer", [
        crowdtrain, "--log-format", "json", "peer", "--coordinator", grpc_address, "--name", "installed",
        "--listen-host", "127.0.0.1", "--cache-dir", str(cache), "--identity", str(cache / "id.key"),
        "--threads", "1", "--device", "cpu",
    ])  # fmt: skip
    launcher.wait_for_event(peer, "joined", timeout_s=120)
    launcher.wait_for_event(peer, "admitted", timeout_s=120)  # in the swarm: hivemind's DHT runs
    listed = subprocess.run(
        [crowdtrain, "status", "--coordinator", grpc_address, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    [seen] = [p for p in json.loads(listed.stdout)["peers"] if p["name"] == "installed"]
    assert seen["version"] == version


def test_the_wheel_installed_without_dev_runs_a_coordinator_status_and_a_peer(
    fresh_venv: Path, tmp_path: Path, launcher: Launcher, monkeypatch
):
    facts = _check_installed(fresh_venv)
    # installed from a wheel, its upgrade is the new wheel's: by pip here, by pipx in pipx's venvs
    assert facts["upgrade"] == f"{fresh_venv}/bin/python -m pip install -U NEW_WHEEL_OR_ITS_URL"
    assert facts["upgrade_in_pipx"] == "pipx install --force NEW_WHEEL_OR_ITS_URL"
    monkeypatch.delenv("PYTHONPATH", raising=False)
    run_installed(fresh_venv, tmp_path, launcher, facts["version"])


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10):
            return True
    except OSError:
        return False


def _bare_venv(tmp_path: Path, wheel: Path) -> Path:
    """A venv with nothing but the wheel and what pip resolves for it: torch first (TORCH_SPEC, else
    the torch of this venv: a CPU build here, where a bare `torch` would pull gigabytes of CUDA),
    then the wheel (no extra), then `pip check`. Skips when PyPI is unreachable."""
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    torch_spec = os.environ.get("TORCH_SPEC") or f"torch=={version('torch').split('+')[0]}"
    for step in (["install", "-q", torch_spec], ["install", "-q", str(wheel)], ["check"]):
        done = subprocess.run([*pip, *step], capture_output=True, text=True, timeout=1800, env=_clean_env())
        if done.returncode != 0 and step[0] == "install" and not _pypi_reachable():
            pytest.skip("PyPI is unreachable, so the wheel's dependencies cannot be installed")
        assert done.returncode == 0, f"pip {' '.join(step)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return venv


@pytest.mark.install
def test_the_wheel_installs_from_pypi_into_a_bare_venv_and_runs(
    wheel: Path, tmp_path: Path, launcher: Launcher, request, monkeypatch
):
    # a `-m` given on the command line replaces the `not install` of addopts
    if "install" not in request.config.getoption("markexpr"):
        pytest.skip("installs from PyPI (minutes): run it with `-m install` or scripts/install_check.sh")
    venv = _bare_venv(tmp_path, wheel)
    facts = _check_installed(venv)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    run_installed(venv, tmp_path, launcher, facts["version"])


PY = "/opt/py 3/bin/python"  # a path with a space: every path in a command is quoted
EDITABLE = {"url": "file:///home/v/crowd%20train", "dir_info": {"editable": True}}
CHECKOUT = {"url": "file:///home/v/crowdtrain", "dir_info": {}}
GIT = {"url": "https://example.org/crowdtrain.git", "vcs_info": {"vcs": "git", "commit_id": "ab12"}}
WHEEL = {"url": "file:///tmp/crowdtrain-0.1.0-py3-none-any.whl", "archive_info": {"hashes": {}}}


@pytest.mark.parametrize(
    "direct_url, pipx, command",
    [
        (None, False, f"'{PY}' -m pip install -U 'crowdtrain>=0.2'"),  # from an index
        (None, True, "pipx upgrade crowdtrain"),
        (
            EDITABLE,
            False,
            f"git -C '/home/v/crowd train' pull && '{PY}' -m pip install --editable '/home/v/crowd train'",
        ),
        (
            EDITABLE,
            True,
            "git -C '/home/v/crowd train' pull && pipx install --force --editable '/home/v/crowd train'",
        ),
        (CHECKOUT, False, f"git -C /home/v/crowdtrain pull && '{PY}' -m pip install /home/v/crowdtrain"),
        (GIT, False, f"'{PY}' -m pip install -U 'crowdtrain @ git+https://example.org/crowdtrain.git'"),
        (GIT, True, "pipx install --force git+https://example.org/crowdtrain.git"),
        (WHEEL, False, f"'{PY}' -m pip install -U NEW_WHEEL_OR_ITS_URL"),
        (WHEEL, True, "pipx install --force NEW_WHEEL_OR_ITS_URL"),
    ],
)
def test_the_upgrade_command_is_the_one_for_how_crowdtrain_was_installed(direct_url, pipx, command):
    from crowdtrain.peer.machine.install import InstallFacts, upgrade_command

    assert upgrade_command(InstallFacts(PY, direct_url, pipx), "0.2") == command


def test_this_checkout_is_upgraded_with_git_pull_and_an_editable_install():
    from crowdtrain.peer.machine.install import upgrade_hint

    assert upgrade_hint("0.2") == (
        f"upgrade crowdtrain here with: git -C {ROOT} pull && {sys.executable} -m pip install --editable {ROOT}"
    )


@pytest.mark.parametrize(
    "refusal, minimum",
    [
        ("refused: FAILED_PRECONDITION: this run needs crowdtrain >= 0.2 and this peer runs 0.1.9", "0.2"),
        ("this run needs crowdtrain >= 1.4.0rc1; upgrade", "1.4.0rc1"),
        ("this run needs crowdtrain >= 0.2;rm -rf ~ and", "0.2"),  # only a version number is kept
        ("this run needs crowdtrain >= $(curl evil) and", ""),
        ("no minimum named", ""),
    ],
)
def test_a_refusal_passes_on_only_a_well_formed_minimum_to_the_command(refusal, minimum):
    from crowdtrain.peer.link.client import _minimum_named

    assert _minimum_named(refusal) == minimum
