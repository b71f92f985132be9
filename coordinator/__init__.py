"""The coordinator: run manifest, gRPC API, peer registry, checkpoint publishing."""
