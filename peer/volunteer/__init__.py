"""The volunteer's training loop and its steps: join, recover, train, measure, pause.

control.py     `crowdtrain ctl`: a local socket to read and steer a running peer; live settings, SIGHUP
meter.py       The training loop's numbers, its epoch log line, "am I contributing?"
pause_gate.py  A volunteer that pauses: hand in what it accumulated, stay visible as PAUSED
recovery.py    A joining peer's model before its first step: the swarm's current state
trainer.py     A volunteer: join the run, build the model, load the swarm's state, train
"""
