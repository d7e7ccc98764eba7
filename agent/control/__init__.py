"""The control service: policy sources (folder, Kubernetes) → Resolver → per-node gRPC streams.

`hub` holds the version counter and the open streams, `server` the gRPC services, `encode` turns
compiled NodePolicy into Sync messages, `source_*` feed the hub, `main`/`status` are the commands.
"""
