"""Where a participant's settings come from: flags, environment, peer.toml, and the systemd unit.

commands.py  Frozen settings of the participant's commands (peer, pull, checkpoints
layered.py   Where each setting of a command comes from: its `--flag`
service.py   `crowdtrain peer --install-service`: a systemd user unit that starts this peer
"""
