"""What every participant runs, and the contract the coordinator serves: the run manifest,
checkpoint format and verification, model, data reading, hivemind wiring, the training loop,
heartbeats, the coordinator client, pull, settings, errors and progress events. Depends only on
`crowdtrain.protos`; the coordinator builds on it, never the reverse."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("crowdtrain")  # the one place the version is read: pyproject.toml's
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"
