#!/usr/bin/python3
"""fault_proxy.py: a TCP proxy for loopback tests that injects network faults on command.

Usage:
    fault_proxy.py --listen 127.0.0.1:0 --target 127.0.0.1:PORT [--seed N]
                   [--port-file FILE] [--control SOCKET_PATH]

Every connection accepted on --listen is forwarded to --target, both ways, until one side
closes (a half-close is passed on). Standard library only; runs with /usr/bin/python3.

--port-file FILE   once listening, the bound port is written to FILE (atomically, "PORT\\n"),
                   so --listen may use port 0.
--control PATH     a Unix socket taking one command per line; each gets one reply line,
                   "ok ..." or "error: ...", after the command has taken effect.
stdin              also takes commands, one per line (replies go to stdout); EOF on stdin is
                   ignored, so the proxy can run with stdin from /dev/null.
--seed N           seeds the random choices (which byte `flip` changes, and everything
                   `random on` does); default: from the clock. Printed at start.

Commands:
    drop           close all current connections (FIN to both sides)
    stall MS       stop forwarding, both ways and for new connections, for MS milliseconds;
                   bytes are held (not lost), and TCP pushes back once buffers fill
    reset          abort all current connections with a TCP RST to both sides
    flip           flip (xor 0xff) one byte, at a seeded-random offset, in the next chunk
                   forwarded in either direction
    cut            a partition: drop all current connections and refuse new ones (accepted,
                   then reset at once) until `heal`
    heal           accept new connections again
    random on|off  inject the above at random (seeded): one fault every 200-1000 ms,
                   stalls of 50-500 ms, cuts healed after 100-500 ms
    status         reply "ok connections=N stalled_ms=M cut=0|1 random=0|1"
    quit           exit

Output (stdout, flushed per line): "fault_proxy: listening on HOST:PORT -> TARGET seed N",
then one line per injected fault ("fault_proxy: fault drop (2 connections)",
"fault_proxy: fault flip byte 17 of 512 (client->target)", "fault_proxy: random fault stall 120 ms",
...), so a failing test's log shows exactly what the network did.
"""

import argparse
import asyncio
import os
import random
import socket
import struct
import sys
import time

CHUNK_BYTES = 64 * 1024  # read size per forwarding step
RANDOM_GAP_S = (0.2, 1.0)  # bounded fault rate in `random on`
RANDOM_STALL_MS = (50, 500)
RANDOM_CUT_MS = (100, 500)


def log(msg):
    print(f"fault_proxy: {msg}", flush=True)


def split_addr(text):
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


class Conn:
    """One proxied connection: the client's streams and the target's."""

    def __init__(self, proxy, cid, c_reader, c_writer, t_reader, t_writer):
        self.proxy = proxy
        self.cid = cid
        self.c_writer = c_writer
        self.t_writer = t_writer
        self.tasks = [
            asyncio.ensure_future(self.pump(c_reader, t_writer, "client->target")),
            asyncio.ensure_future(self.pump(t_reader, c_writer, "target->client")),
        ]
        self.closed = False

    async def pump(self, reader, writer, direction):
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    # A half-close is passed on; the other direction may still be flowing,
                    # and the connection is done when both pumps are.
                    if writer.can_write_eof():
                        writer.write_eof()
                    if all(t.done() or t is asyncio.current_task() for t in self.tasks):
                        self.close()
                    return
                await self.proxy.wait_unstalled()
                if self.closed:
                    return
                if self.proxy.flip_pending:
                    self.proxy.flip_pending = False
                    buf = bytearray(data)
                    i = self.proxy.rng.randrange(len(buf))
                    buf[i] ^= 0xFF
                    data = bytes(buf)
                    log(f"fault flip byte {i} of {len(buf)} ({direction})")
                writer.write(data)
                await writer.drain()
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError):
            self.close()  # one side broke: nothing useful can flow the other way either

    def close(self, rst=False):
        if self.closed:
            return
        self.closed = True
        for w in (self.c_writer, self.t_writer):
            try:
                if rst:
                    sock = w.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    w.transport.abort()
                else:
                    w.close()
            except (OSError, RuntimeError):
                pass
        for t in self.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self.proxy.conns.pop(self.cid, None)


class Proxy:
    def __init__(self, target, seed):
        self.target = target
        self.seed = seed
        self.rng = random.Random(seed)
        self.conns = {}
        self.next_id = 1
        self.stalled_until = 0.0
        self.flip_pending = False
        self.cut = False
        self.random_task = None
        self.quit = asyncio.Event()

    def now(self):
        return asyncio.get_running_loop().time()

    async def wait_unstalled(self):
        while self.now() < self.stalled_until:
            await asyncio.sleep(self.stalled_until - self.now())

    async def on_client(self, c_reader, c_writer):
        if self.cut:
            log("refused a connection (cut)")
            sock = c_writer.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            c_writer.transport.abort()
            return
        await self.wait_unstalled()
        try:
            t_reader, t_writer = await asyncio.open_connection(*self.target)
        except OSError as e:
            log(f"target {self.target[0]}:{self.target[1]} unreachable: {e}")
            c_writer.close()
            return
        cid = self.next_id
        self.next_id += 1
        self.conns[cid] = Conn(self, cid, c_reader, c_writer, t_reader, t_writer)

    def close_all(self, rst):
        n = len(self.conns)
        for c in list(self.conns.values()):
            c.close(rst=rst)
        return n

    def fault(self, name, arg=None, source="fault"):
        """Applies one fault; returns the reply text."""
        if name == "drop":
            log(f"{source} drop ({self.close_all(rst=False)} connections)")
        elif name == "reset":
            log(f"{source} reset ({self.close_all(rst=True)} connections)")
        elif name == "stall":
            ms = int(arg)
            if ms < 0 or ms > 3_600_000:
                raise ValueError("stall MS must be within 0..3600000")
            self.stalled_until = max(self.stalled_until, self.now() + ms / 1000.0)
            log(f"{source} stall {ms} ms")
        elif name == "flip":
            self.flip_pending = True
            log(f"{source} flip armed")
        elif name == "cut":
            self.cut = True
            log(f"{source} cut ({self.close_all(rst=False)} connections dropped)")
        elif name == "heal":
            self.cut = False
            log(f"{source} heal")
        else:
            raise ValueError(f"unknown fault {name!r}")

    async def random_faults(self):
        while True:
            await asyncio.sleep(self.rng.uniform(*RANDOM_GAP_S))
            kind = self.rng.choice(["drop", "stall", "reset", "flip", "cut"])
            if kind == "stall":
                self.fault("stall", self.rng.randint(*RANDOM_STALL_MS), source="random fault")
            elif kind == "cut":
                self.fault("cut", source="random fault")
                await asyncio.sleep(self.rng.randint(*RANDOM_CUT_MS) / 1000.0)
                self.fault("heal", source="random fault")
            else:
                self.fault(kind, source="random fault")

    def command(self, line):
        words = line.split()
        if not words:
            return "error: empty command"
        cmd, args = words[0], words[1:]
        try:
            if cmd in ("drop", "reset", "flip", "cut", "heal") and not args:
                self.fault(cmd)
            elif cmd == "stall" and len(args) == 1:
                self.fault("stall", args[0])
            elif cmd == "random" and args in (["on"], ["off"]):
                if args[0] == "on" and self.random_task is None:
                    self.random_task = asyncio.ensure_future(self.random_faults())
                elif args[0] == "off" and self.random_task is not None:
                    self.random_task.cancel()
                    self.random_task = None
                    self.cut = False
                log(f"random {args[0]}")
            elif cmd == "status" and not args:
                stalled_ms = max(0, int((self.stalled_until - self.now()) * 1000))
                return (f"ok connections={len(self.conns)} stalled_ms={stalled_ms} "
                        f"cut={int(self.cut)} random={int(self.random_task is not None)}")
            elif cmd == "quit" and not args:
                self.quit.set()
            else:
                return f"error: bad command {line.strip()!r}"
        except ValueError as e:
            return f"error: {e}"
        return "ok"

    async def on_control(self, reader, writer):
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                writer.write((self.command(line.decode(errors="replace")) + "\n").encode())
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def read_stdin(self):
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return  # EOF: keep running, commands may still come on --control
            if line.strip():
                print(self.command(line), flush=True)


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=split_addr, required=True)
    ap.add_argument("--target", type=split_addr, required=True)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--port-file")
    ap.add_argument("--control")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else int(time.time() * 1000) % (2**31)
    proxy = Proxy(a.target, seed)
    server = await asyncio.start_server(proxy.on_client, a.listen[0], a.listen[1])
    host, port = server.sockets[0].getsockname()[:2]
    control = None
    if a.control:
        if os.path.exists(a.control):
            os.unlink(a.control)
        control = await asyncio.start_unix_server(proxy.on_control, a.control)
    if a.port_file:
        tmp = a.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, a.port_file)
    log(f"listening on {host}:{port} -> {a.target[0]}:{a.target[1]} seed {seed}")
    stdin_task = None
    if sys.stdin is not None and not sys.stdin.closed:
        stdin_task = asyncio.ensure_future(proxy.read_stdin())
    await proxy.quit.wait()
    server.close()
    if control is not None:
        control.close()
        os.unlink(a.control)
    proxy.close_all(rst=False)
    log("quit")
    if stdin_task is not None:
        stdin_task.cancel()
    os._exit(0)  # the stdin reader thread may still be blocked in readline()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
