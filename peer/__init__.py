"""The volunteer side: model, data, hivemind training loop, heartbeats, pull."""
