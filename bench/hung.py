"""A hung Redis: accept TCP connections, read whatever comes, never answer.

`python -m bench.hung PORT` — used to check that a Redis that hangs (rather than
refusing) costs the API nothing beyond its short socket timeout.
"""

from __future__ import annotations

import asyncio
import sys


async def _swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.read(65_536):
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    """Serve forever on 127.0.0.1:`port`."""
    server = await asyncio.start_server(_swallow, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
