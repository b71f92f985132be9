"""How crowdtrain was installed on this machine, and the one command that upgrades that install.

crowdtrain is on no package index: volunteers install a wheel or the git URL with pipx or pip, or
work in a git checkout. "pip install -U crowdtrain" would fail for all of them, so every message
that asks for an upgrade names the command for the install at hand:

    upgrade_command(InstallFacts(...), minimum)   pure: the facts -> the command
    upgrade_hint(minimum)                         this process's facts (sys.prefix, direct_url.json)

The facts are the running interpreter's prefix (a venv pipx manages holds pipx_metadata.json) and
the distribution's direct_url.json (PEP 610): absent when installed from an index, `dir_info` for a
directory (editable or not), `vcs_info` for a git URL, `archive_info` for a wheel or sdist.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

PIPX_METADATA = "pipx_metadata.json"  # pipx writes it at the root of every venv it manages
NEW_WHEEL = "NEW_WHEEL_OR_ITS_URL"  # what only the run's operator can name


@dataclasses.dataclass(frozen=True)
class InstallFacts:
    """`python`: the interpreter running crowdtrain (sys.executable); `direct_url`: the installed
    distribution's direct_url.json, None when it came from an index (or has none); `pipx`: its
    venv is one pipx manages."""

    python: str
    direct_url: dict | None
    pipx: bool


def _local_path(url: str) -> str:
    """The path of a file:// URL, quoted for a shell ("" for any other URL)."""
    parsed = urlparse(url)
    return shlex.quote(url2pathname(unquote(parsed.path))) if parsed.scheme == "file" else ""


def upgrade_command(facts: InstallFacts, minimum: str = "") -> str:
    """The shell command that upgrades crowdtrain as `facts` say it was installed, to at least
    `minimum` (a version number, already validated; "" = the newest). Where the new wheel's place is
    known only to the run's operator, the command names it NEW_WHEEL_OR_ITS_URL."""
    pip = f"{shlex.quote(facts.python)} -m pip install"
    direct = facts.direct_url or {}
    url = str(direct.get("url", ""))
    dir_info, vcs_info = direct.get("dir_info"), direct.get("vcs_info")
    if isinstance(dir_info, dict) and _local_path(url):  # a checkout (editable or not)
        path = _local_path(url)
        editable = "--editable " if dir_info.get("editable") else ""
        reinstall = f"pipx install --force {editable}{path}" if facts.pipx else f"{pip} {editable}{path}"
        return f"git -C {path} pull && {reinstall}"
    if isinstance(vcs_info, dict) and url:
        source = f"{vcs_info.get('vcs', 'git')}+{url}"
        if facts.pipx:
            return f"pipx install --force {shlex.quote(source)}"
        return f"{pip} -U {shlex.quote(f'crowdtrain @ {source}')}"
    if facts.direct_url is not None:  # a wheel or sdist, by path or URL: the new one has another name
        return f"pipx install --force {NEW_WHEEL}" if facts.pipx else f"{pip} -U {NEW_WHEEL}"
    if facts.pipx:
        return "pipx upgrade crowdtrain"
    return f"{pip} -U {shlex.quote(f'crowdtrain>={minimum}' if minimum else 'crowdtrain')}"


def this_install() -> InstallFacts:
    """The facts of the crowdtrain this process runs."""
    from importlib.metadata import distributions

    # an installer's record (pip writes INSTALLER), not the egg-info setuptools leaves in a checkout,
    # which comes first on sys.path when Python runs there
    found = [d for d in distributions(name="crowdtrain") if d.read_text("INSTALLER") is not None]
    text = found[0].read_text("direct_url.json") if found else None
    try:
        direct = json.loads(text) if text else None
    except ValueError:
        direct = None
    pipx = (Path(sys.prefix) / PIPX_METADATA).is_file()
    return InstallFacts(sys.executable, direct if isinstance(direct, dict) else None, pipx)


def upgrade_hint(minimum: str = "") -> str:
    """`upgrade with: COMMAND` for this machine's install (what messages that ask for an upgrade say)."""
    command = upgrade_command(this_install(), minimum)
    where = (
        f" ({NEW_WHEEL}: the new crowdtrain wheel the run's operator gives)" if NEW_WHEEL in command else ""
    )
    return f"upgrade crowdtrain here with: {command}{where}"
