"""All hivemind wiring: DHT nodes, optimizers, averagers, DiLoCo, state transfer, leaving and rejoining.

averaging.py   hivemind averaging that a bad groupmate cannot ruin
diloco.py      The low-communication mode (`swarm.mode = "diloco"`)
lifecycle.py   A hivemind peer's life: its processes, leaving in order, rejoining after a restart
optimizers.py  The run's torch optimizers, built from its manifest (no hivemind here)
stateload.py   Loading a peer's state only from admitted donors
statewire.py   The one bounded reader of hivemind's state download stream
wiring.py      hivemind wiring shared by volunteers and the coordinator
"""
