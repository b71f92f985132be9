"""The books on every peer: health, policy, the SQLite store, shards, credit, standings, status.

credit.py     Credit is what the swarm accepted: per epoch, the run's target batch size
groups.py     Who averaged with whom: the all-reduce groups peers report
health.py     Peer health as pure functions of (now, record, settings): no clocks, no I/O
monitor.py    The swarm monitor: reads hivemind's signed progress records from the DHT
policy.py     What the coordinator decides about peers, as pure functions: no clocks, no I/O
shardbook.py  Which data shard each peer reads
standings.py  Am I contributing? Accepted samples, share, rank, and the peer page
status.py     The swarm as operators see it
store.py      The coordinator's durable state in SQLite (WAL)
"""
