"""Who may join and stay: the Join gate, identity proofs, invites, bans, the coordinator's DHT nodes.

bans.py        Evidence against peers, and the automatic action it may lead to: a ban
dhtstorage.py  The coordinator's bootstrap DHT node keeps only the run's records
gate.py        Who may join the run, and the swarm tokens that carry that decision
invites.py     Invite codes for runs that admit by invitation (`--admission invite`)
proofs.py      A session's proof of its DHT identity: checked once, failures counted
signatures.py  Proof that a peer owns the hivemind peer id it claims, checked without hivemind
swarmnodes.py  The coordinator's own DHT nodes (the bootstrap node
"""
