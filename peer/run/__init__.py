"""What every peer of a run agrees on: the signed manifest, its swarm settings, the model, what peers report.

manifest.py     The run manifest, its presets and its swarm settings (how the swarm averages)
model.py        The shared transformer
modelconfig.py  The model a run manifest may ask a volunteer to build: known model types
modelsize.py    Whether the run's model may be built here
report.py       What a peer says about itself: one record from the trainer to the heartbeat
runproof.py     Is the run a coordinator hands us at Join the run its key signed?
tensors.py      The tensors a state of the model must hold, and the one check that it does
"""
