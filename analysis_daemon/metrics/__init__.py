"""The math: pure functions on CPU tensors (drift, exact and sampled geometry, insight extras,
galaxy map, clumps) and the alert rules. No sockets, no files, no W&B."""
