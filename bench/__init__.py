"""renderwatch's benchmarks (issue 5): `python -m bench` (full) or `python -m bench --quick`.

Everything a run needs is created for it and removed after it: a PostgreSQL database,
a redis-server, the API instances and reference apps, the load generators.
"""
