"""The volunteer's machine: device, memory fit, precision, pausing for its owner, the upload cap.

accumulate.py  One training step that fits the machine, and the precision it computes in
bandwidth.py   `--max-upload-mbps`: one cap on what a peer's processes send to other peers
device.py      Where a volunteer trains: the torch device from `--device`
fit.py         Fitting training to the volunteer's machine
install.py     How crowdtrain was installed here, and the command that upgrades that install
pause.py       When a peer pauses (schedule, owner's work, battery, signals) and the machine's load
"""
