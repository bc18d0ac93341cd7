"""--link-delay-ms: a network's latency on loopback, as a proxy process between the nodes."""

from __future__ import annotations


async def proxy_main(spec: dict) -> None:
    """Forward each route's listen port to its target port on 127.0.0.1, holding every chunk of bytes
    `delay_ms` in each direction: a network's latency on loopback, for --link-delay-ms."""
    import asyncio
    import socket

    loop = asyncio.get_running_loop()
    delay = spec["delay_ms"] / 1e3

    def nodelay(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:  # in order, each chunk once its delay is up
            while (item := await queue.get())[1]:
                wait = item[0] - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(item[1])
                await writer.drain()

        task = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(1 << 20):
                queue.put_nowait((loop.time() + delay, data))
        except ConnectionError:
            pass
        finally:
            queue.put_nowait((0.0, b""))
            try:
                await task
            except Exception:  # the other side went away: nothing left to deliver
                pass
            writer.close()

    async def connection(listen_reader, listen_writer, target: int) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            listen_writer.close()  # the worker is down: so is the emulated link
            return
        nodelay(listen_writer)
        nodelay(target_writer)
        await asyncio.gather(pipe(listen_reader, target_writer), pipe(target_reader, listen_writer),
                             return_exceptions=True)

    for listen, target in spec["routes"]:
        await asyncio.start_server(lambda r, w, t=target: connection(r, w, t), "127.0.0.1", listen)
    print("ready", flush=True)
    await asyncio.Event().wait()
