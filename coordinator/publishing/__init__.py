"""Publishing checkpoints: fetch the swarm's state, choose and vet it, sign and archive it.

agreement.py   Do the states that different peers serve agree? Pure: no network, no clock
archive.py     The coordinator's checkpoint archive: atomic writing, retention
card.py        The model card published with each checkpoint (huggingface_hub's ModelCard)
choice.py      One round of choosing the swarm's state to publish: whom to ask, what to refuse
publisher.py   The checkpoint publisher: fetches the swarm's state as a client peer
statefetch.py  Download the training state from chosen peers (hivemind wiring, no decisions)
vetting.py     What a state must pass before it is published
voters.py      Whose state counts when the publisher picks the swarm's state
"""
