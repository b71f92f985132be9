"""Creating and opening a run: its data dir, ports, dataset and the operator's corpus.

dataset.py  Run creation's data: the corpus, a deterministic eval/train split, shards
ports.py    Which address and ports the coordinator listens on: checked before a run is built
runs.py     The run a coordinator serves: created in DATA_DIR on the first start
sources.py  The operator's corpus, read one document at a time from every form `--data` accepts
"""
