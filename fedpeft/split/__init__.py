"""Split-learning offload: model cut, gRPC tensor stream, split client and server."""
