#!/usr/bin/env python3
"""A TCP path to a dependency that the chaos suite can break (scripts/chaos.sh).

    chaos-proxy.py PORT TARGET_FILE

Forwards 127.0.0.1:PORT to the host:port written in TARGET_FILE.
  SIGUSR1  black hole: nothing is forwarded and nothing is closed (new connections are
           accepted and left silent), as a dropped route or a NAT that forgot the flow does
  SIGUSR2  the path is back; the connections held during the hole are closed
  SIGHUP   TARGET_FILE is read again: new connections go there (a DNS name that moved)
"""
import asyncio
import signal
import sys

port, target_file = int(sys.argv[1]), sys.argv[2]
state = {"hole": False, "target": None}
held = set()  # writers of connections caught in a hole
restored = asyncio.Event()


def read_target():
    host, _, target_port = open(target_file).read().strip().rpartition(":")
    state["target"] = (host, int(target_port))


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            while state["hole"]:
                await restored.wait()  # data stays here: it never arrives
                raise ConnectionResetError
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(client_reader, client_writer):
    if state["hole"]:
        held.add(client_writer)
        await restored.wait()
        client_writer.close()
        return
    try:
        server_reader, server_writer = await asyncio.open_connection(*state["target"])
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))


def hole():
    global restored
    restored = asyncio.Event()
    state["hole"] = True


def restore():
    state["hole"] = False
    restored.set()
    for writer in held:
        writer.close()
    held.clear()


async def main():
    read_target()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, hole)
    loop.add_signal_handler(signal.SIGUSR2, restore)
    loop.add_signal_handler(signal.SIGHUP, read_target)
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


asyncio.run(main())
