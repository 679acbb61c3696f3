"""A mounted store's control socket: lets ``hubfs gc`` run inside the daemon that owns it.

Only one process writes a store (it holds ``STORE/lock``), so maintenance of a mounted store
must run in its daemon, where the pack writer, the pending chunks and the readers' caches live.
``STORE/control.sock`` (inside the root-only store directory) takes one JSON line, a command,
and answers with ``progress DONE TOTAL`` lines and one ``result {json}`` or ``error MESSAGE``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .errors import HubfsError
from .store import Store

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
PROGRESS_EVERY_S = 0.2


def socket_path(store: Path) -> Path:
    return store / SOCKET_NAME


async def serve_control(store: Store, commands: dict[str, Callable[..., Any]]) -> None:
    """Answer commands until cancelled; each command runs in a worker thread, or on the trio
    thread if it is a coroutine function (quick reads of the mount's state)."""
    path = socket_path(store.path)
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(4)
    listener = trio.SocketListener(sock)
    try:
        async def handler(stream: trio.SocketStream) -> None:
            await _handle(stream, commands)

        await trio.serve_listeners(handler, [listener])
    finally:
        path.unlink(missing_ok=True)


async def _handle(stream: trio.abc.Stream, commands: dict[str, Callable[..., Any]]) -> None:
    async with stream:
        request = b""
        while not request.endswith(b"\n"):
            data = await stream.receive_some(4096)
            if not data or len(request) > 4096:
                return
            request += data
        try:
            name = json.loads(request)["command"]
            command = commands[name]
        except (ValueError, KeyError, TypeError):
            await stream.send_all(b"error unknown command\n")
            return
        state = {"done": 0, "total": 0}

        def progress(done: int, total: int) -> None:
            state.update(done=done, total=total)

        async def report() -> None:
            while True:
                await trio.sleep(PROGRESS_EVERY_S)
                await stream.send_all(f"progress {state['done']} {state['total']}\n".encode())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(report)
            try:
                if inspect.iscoroutinefunction(command):  # answers from the trio thread
                    result = await command(progress)
                else:
                    result = await trio.to_thread.run_sync(command, progress)
                reply = f"result {json.dumps(result)}\n"
            except HubfsError as exc:
                reply = f"error {exc.message}\n"
            except Exception as exc:
                log.exception("control command %s failed", name)
                reply = f"error {name} failed in the daemon: {exc}; see its log\n"
            nursery.cancel_scope.cancel()
        try:
            await stream.send_all(reply.encode())
        except trio.BrokenResourceError:
            log.info("control client left before %s finished", name)


def request(store: Path, command: str, progress: Callable[[int, int], None]) -> Any:
    """Run ``command`` in the daemon that has ``store`` mounted; returns its result."""
    path = socket_path(store)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(path))
    except OSError as exc:
        raise HubfsError(f"store {store} is busy but its daemon does not answer on {path} "
                         f"({exc.strerror}): is it mounted by an older hubfs? unmount it and "
                         "retry", 4) from None
    with client, client.makefile("rwb") as conn:
        conn.write(json.dumps({"command": command}).encode() + b"\n")
        conn.flush()
        for raw in conn:
            kind, _, rest = raw.decode().rstrip("\n").partition(" ")
            if kind == "progress":
                done, total = rest.split()
                progress(int(done), int(total))
            elif kind == "result":
                return json.loads(rest)
            elif kind == "error":
                raise HubfsError(rest, 1)
    raise HubfsError(f"the daemon of {store} closed the control socket before answering; see "
                     f"{store}/hubfs.log", 1)
