"""The least an HTTP server can do: answer every request 200 "ok", keep-alive, on
raw asyncio streams. ``bench/intake.py`` runs it as its own process and points the
load generator at it, to show what the load generator itself can send on this
machine: the intake figure is only the server's if this is far above it.

    .venv/bin/python -m bench.trivial_http PORT
"""

from __future__ import annotations

import asyncio
import sys

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
MAX_HEADER_LINES = 100


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.readline():  # the request line; b"" when the client closes
            length = 0
            for _ in range(MAX_HEADER_LINES):
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            else:
                return  # more header lines than any real client sends: hang up
            if length:
                await reader.readexactly(length)
            writer.write(ANSWER)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass  # a client that goes away, or sends nonsense, just loses its connection
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_answer, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
