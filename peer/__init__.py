"""What every participant runs, and the contract the coordinator serves. Depends only on
`crowdtrain.protos`; the coordinator builds on it, never the reverse. Layers, top down (enforced by
import-linter, pyproject.toml): a folder imports only from the folders below it.

    cli.py        the participant's commands: peer, identity, pull, checkpoints, verify, doctor
    volunteer/    the training loop and its steps: join, recover, train, measure, pause
    doctor/       `crowdtrain doctor`: this machine and a coordinator checked before joining
    swarm/        all hivemind wiring: DHT, optimizers, averagers, DiLoCo, state transfer, leaving
    admission/    who may take part in the swarm: identity, tokens, the DHT's and averagers' gates
    checkpoints/  published checkpoints: format, listing, pull and verify, whose keys to trust
    data/         the run's text: shards, token blocks, the feed and read-ahead
    link/         talking to the coordinator: gRPC client, TLS, heartbeats, downloads, reachability
    run/          what every peer agrees on: the signed manifest, swarm settings, model, reports
    machine/      the volunteer's machine: device, memory fit, precision, pausing, upload cap
    robust/       robust reduction of all-reduce parts, scores and evidence of rejections
    settings/     where a participant's settings come from: flags, environment, peer.toml, unit
    checks.py     names, numbers, digests and signatures that arrive over the network
    display.py    text from someone else made safe to show
    events.py     progress events, for people and programs
    errors.py     the one base class of every error crowdtrain expects and explains
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("crowdtrain")  # the one place the version is read: pyproject.toml's
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"
