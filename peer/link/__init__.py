"""Talking to the coordinator: the gRPC client, TLS, heartbeats, HTTP downloads, the reachability check.

client.py     A client of the coordinator API with deadlines and capped exponential backoff
download.py   The one HTTP downloader of a peer: data shards (trainer) and checkpoint files
heartbeat.py  Heartbeats from a volunteer to the coordinator
reach.py      Reachable, or told why: after its DHT starts
tls.py        TLS for the coordinator's gRPC API and HTTP server
"""
