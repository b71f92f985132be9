"""Published checkpoints: their format, the listing, pulling and verifying, whose keys to trust.

format.py  One published checkpoint: its format (`crowdtrain.json`), listing, and verification
pull.py    Download a published checkpoint, verify every file; the coordinator's listing
trust.py   Whose checkpoints and runs to believe: the run's signing key
"""
