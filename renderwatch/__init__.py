"""The operator's tools: the `renderwatch` CLI, its HTTP client, the local stack runner,
health checks, the demo and the database migrations.

Nothing in `api/`, `worker/` or `shared/` imports this package; it may import all three.
"""
