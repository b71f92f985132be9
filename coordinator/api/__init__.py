"""What the coordinator serves: the gRPC servicer and server, the HTTP server, metrics, reachability,
and the status table it is read as.

    grpcserver.py    The gRPC server: the plain servicer
    httpfiles.py     Sending bodies over HTTP without letting a client pin the server
    loopthread.py    An asyncio event loop on a thread of its own, driven from ordinary
    metrics.py       Prometheus metrics at /metrics
    reachability.py  Can other peers reach this peer? The coordinator dials what the peer
    render.py        The operator's status table, as `crowdtrain status` prints it
    servicer.py      The gRPC servicer: a thin translation layer (the server itself: `grpcserver`)
    snapshots.py     Status views built at most once per second, off the event loops
    webserver.py     The coordinator's HTTP server: data shards, checkpoint files
"""
