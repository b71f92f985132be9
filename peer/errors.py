"""The one base class of every error crowdtrain expects and explains.

A `CrowdtrainError` means "the user (or a peer, or the network) did something we can describe": the
CLI prints its message on one line and exits with its `exit_status` (1; `RefusedByRun`: 3, so a
service manager can tell "restarting will not help" apart, see peer/settings/service.py). Anything else is a bug: the CLI prints the full
traceback and asks for a report. Messages say what failed, why, and what to do.
"""


class CrowdtrainError(Exception):
    """An expected failure with an actionable message."""

    exit_status = 1  # the CLI's exit status for it (peer/cli.py exit_code)


REFUSED_EXIT_STATUS = 3  # the systemd unit's RestartPreventExitStatus=


class RefusedByRun(CrowdtrainError):
    """The run refused this participant (banned, not admitted, or an incompatible version):
    restarting it unchanged will not help, so a service does not restart it."""

    exit_status = REFUSED_EXIT_STATUS


class ManifestError(CrowdtrainError, ValueError):
    """A run manifest, its swarm settings or a preset is unknown, malformed or from an incompatible version."""
