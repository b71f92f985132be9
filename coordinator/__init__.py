"""The coordinator: creates the run (dataset, manifest, signing key) and serves it - peer registry
and store, gRPC API, HTTP dashboard, bootstrap DHT node, swarm monitor, checkpoint publisher.

The run contract it serves (manifest, checkpoint format) lives in `crowdtrain.peer`, which every
participant imports; `crowdtrain.coordinator.app` wires the process together."""
