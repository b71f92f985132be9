"""The one base class of every error crowdtrain expects and explains.

A `CrowdtrainError` means "the user (or a peer, or the network) did something we can describe": the
CLI prints its message on one line and exits 1. Anything else is a bug: the CLI prints the full
traceback and asks for a report. Messages say what failed, why, and what to do.
"""


class CrowdtrainError(Exception):
    """An expected failure with an actionable message."""


class ManifestError(CrowdtrainError, ValueError):
    """A run manifest, its swarm settings or a preset is unknown, malformed or from an incompatible version."""
