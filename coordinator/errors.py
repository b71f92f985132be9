"""The coordinator's expected failures (all `CrowdtrainError`s, so the CLI prints one line)."""

from crowdtrain.peer.errors import CrowdtrainError


class PortInUseError(CrowdtrainError):
    """A port the operator asked for is taken; the message names the flag that picks a free one."""
