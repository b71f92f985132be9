"""Who may take part in the swarm: this peer's identity, swarm tokens, and the DHT's and averagers' gates.

access.py      This volunteer's admission, and the DHT authorizer and averagers' gate
dhtrecords.py  The run's records in the DHT
identity.py    This peer's hivemind (libp2p) identity, made before the swarm is joined
sessionkeys.py Ed25519 session keys: what signs each DHT request and response, vouched for by the identity key
tokens.py      Swarm access tokens: who may take part in the swarm itself
"""
