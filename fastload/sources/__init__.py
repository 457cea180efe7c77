"""Name -> LoadPlan: the registry, the local store, the hub cache and checkpoint folders, tried in order.

Nothing here reads weights or touches the network; `fastload.resolve` is `fastload.sources.resolve.resolve`.
"""
