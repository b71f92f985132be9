"""Protocol buffers of the coordinator API (package crowdtrain.v1); generated code is committed."""
