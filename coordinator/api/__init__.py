"""What the coordinator serves: the gRPC servicer and server, the HTTP server, metrics and
reachability (the dashboard it serves, and the status table: `crowdtrain.coordinator.dashboard`).

    grpcserver.py    The gRPC server: the plain servicer
    httpfiles.py     Sending bodies over HTTP without letting a client pin the server
    loopthread.py    An asyncio event loop on a thread of its own, driven from ordinary
    metrics.py       Prometheus metrics at /metrics
    reachability.py  Can other peers reach this peer? The coordinator dials what the peer
    servicer.py      The gRPC servicer: a thin translation layer (the server itself: `grpcserver`)
    webserver.py     The coordinator's HTTP server: data shards, checkpoint files
"""
