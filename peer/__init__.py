"""What every participant runs: the run contract, model, data reading, hivemind wiring, the training
loop, heartbeats, pull and verify. Depends only on `crowdtrain.protos`."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("crowdtrain")  # the one place the version is read: pyproject.toml's
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"
