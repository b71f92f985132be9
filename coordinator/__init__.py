"""The operator's service: creates the run (dataset, manifest, signing key), serves it, keeps the
books on every peer, and publishes the community's checkpoints. Builds on `crowdtrain.peer` (the
run contract), never the reverse. Layers, top down (enforced by import-linter, pyproject.toml):

    cli.py        the `crowdtrain` program: the operator's commands, and the participant's
                  (crowdtrain.peer.cli) mounted beside them
    demo.py       `crowdtrain demo`: a local swarm of real processes, and how it starts and stops them
    app.py        the coordinator process: starts its components in order, stops them in reverse
    config.py     the operator's settings, composed of the components' own
    api/          what it serves: gRPC servicer and server, HTTP server, metrics, reachability
    dashboard/    how the run is read: the web dashboard, its numbers, the status table, shared views
    run/          creating and opening a run: data dir, ports, dataset, the operator's corpus
    publishing/   fetch the swarm's state, choose and vet it, sign and archive it
    admission/    who may join and stay: Join gate, identity proofs, invites, bans, DHT nodes
    flood/        the servers under a flood: call and connection budgets, rate limits
    peers/        the books on every peer: health, policy, SQLite store, shards, credit, status
    limits.py     every field a request may carry, with its limit
    signing.py    the run's Ed25519 signing key
    errors.py     the coordinator's expected failures
"""
