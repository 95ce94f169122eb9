#!/usr/bin/python3
"""Plan: a flood of silent connections cannot keep a pair apart. Twelve TCP connections to the
destination's peer port that never send a byte are held open for the whole test: a flooder
thread re-opens, within one poll, each one the destination drops (pushed out to make room, or
timed out in its handshake), so the destination's table of handshakes in progress (8) is
always full of them. With the flood on, the link between the two daemons (through a fault
proxy) is cut and later restored. The source must be connected again within a bound (its
dial back-off at most, plus one handshake timeout, plus slack), and what was written on the
source before the cut, during it and after it must reach the destination (byte-identical
images). The source's new connection must have got in through a full table (the destination's
log shows a silent connection dropped to accept it), and the flood must still be running,
unbroken, when the pair has converged. Loopback only; every wait
is bounded; only the processes this test started are stopped."""
import os
import random
import re
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import FaultProxy, Pair, Workdir, free_port, wait_identical, wait_until  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB
FLOOD_CONNECTIONS = 12  # the flood that found the lock-out: more than the table's 8 slots
FLOOD_POLL_S = 0.1  # how soon the flooder replaces a connection the destination closed
CUT_S = 6  # longer than a handshake timeout (5 s): the flood outlives its own timeouts
# After the link is restored: the source's dial back-off waits at most backoff_max_ms (5 s)
# and a handshake lasts at most handshake_timeout_ms (5 s); the rest is slack for a loaded
# machine. Before the fix, the flood kept the table full, and the real peer refused, for as
# long as the flood lasted.
RECONNECT_BOUND_S = 20


def write_random(uri, seed, count=48):
    harness.write_random(uri, seed, SIZE, count)


def closed_by_server(s):
    """True when the server has closed non-blocking socket `s` (EOF or reset); never waits."""
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


class SilentFlood:
    """`count` TCP connections to 127.0.0.1:`port` that never send anything; each one the server
    closes is replaced within FLOOD_POLL_S, until stop()."""

    def __init__(self, port, count):
        self.port = port
        self.count = count
        self.replaced = 0  # connections the server closed (and the flooder opened anew)
        self.error = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="silent-flood", daemon=True)

    def start(self):
        self._thread.start()
        if not self._ready.wait(harness.WAIT_S):
            raise AssertionError("the flood did not connect within %ss" % harness.WAIT_S)
        if self.error:
            raise AssertionError("the flood could not connect: " + self.error)
        return self

    def running(self):
        return self._thread.is_alive() and self.error is None

    def replaced_count(self):
        with self._lock:
            return self.replaced

    def stop(self):
        self._stop.set()
        self._thread.join(harness.WAIT_S)
        if self._thread.is_alive():
            raise AssertionError("the flood thread did not stop within %ss" % harness.WAIT_S)

    def _open(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.setblocking(False)
        return s

    def _run(self):
        socks = []
        try:
            for _ in range(self.count):
                socks.append(self._open())
            self._ready.set()
            while not self._stop.wait(FLOOD_POLL_S):
                for i, s in enumerate(socks):
                    if closed_by_server(s):
                        s.close()
                        socks[i] = self._open()
                        with self._lock:
                            self.replaced += 1
        except OSError as e:
            self.error = repr(e)
        finally:
            for s in socks:
                s.close()
            self._ready.set()


class PeerFlood(unittest.TestCase):
    def test_silent_flood_does_not_keep_the_pair_apart(self):
        seed = random.SystemRandom().randrange(1 << 30)
        with Workdir() as wd:
            pb = free_port()
            proxy = FaultProxy(wd.path, pb, seed)
            pair = Pair(wd.path, SIZE, rpo=1, b_port=pb, a_dials=proxy.port)
            flood = None
            try:
                pair.start()
                wait_until(lambda: pair.a.session()["data_connection_state"] == "OK", "the first connection")
                write_random(pair.a.uri("vol0"), 1)
                wait_identical(pair, timeout_s=120)

                flood = SilentFlood(pb, FLOOD_CONNECTIONS).start()
                wait_until(lambda: "handshakes already in progress: dropping the connection from" in pair.b.log(),
                           "the destination to make room in a table full of silent connections")
                ups = pair.a.log().count("replication link to site-b up")

                proxy.command("cut")
                wait_until(lambda: pair.a.session()["data_connection_state"] != "OK", "the cut to be seen")
                write_random(pair.a.uri("vol0"), 2)  # shipped only once the link is back
                time.sleep(CUT_S)
                self.assertTrue(flood.running(), "the flood broke during the cut: %s" % flood.error)

                proxy.command("heal")
                healed = time.monotonic()
                try:
                    wait_until(lambda: (pair.a.session()["data_connection_state"] == "OK"
                                        and pair.a.log().count("replication link to site-b up") > ups),
                               "the pair to reconnect", timeout_s=RECONNECT_BOUND_S)
                except TimeoutError:
                    self.fail("not reconnected within %ss of the link's return, with %d silent connections "
                              "held open; site-a's log ends:\n%s\nsite-b's log ends:\n%s"
                              % (RECONNECT_BOUND_S, FLOOD_CONNECTIONS, pair.a.log()[-6000:], pair.b.log()[-6000:]))
                print("reconnected %.1f s after the link came back, through a flood of %d silent connections"
                      % (time.monotonic() - healed, FLOOD_CONNECTIONS), flush=True)
                # It got in through a full table: the destination dropped a silent connection for it.
                accepted = re.findall(r"connected to site-a at (\S+) \(accepted\)", pair.b.log())
                self.assertTrue(accepted, pair.b.log()[-6000:])
                self.assertIn("to accept %s\n" % accepted[-1], pair.b.log())

                write_random(pair.a.uri("vol0"), 3)
                wait_identical(pair, timeout_s=120)
                self.assertTrue(flood.running(), "the flood broke: %s" % flood.error)
                self.assertGreater(flood.replaced_count(), 0, "the destination never dropped a silent connection")
                print("the destination dropped %d silent connections" % flood.replaced_count(), flush=True)
            finally:
                if flood is not None:
                    flood.stop()
                rcs = pair.stop()
                proxy.stop()
            self.assertEqual(rcs, [0, 0])


if __name__ == "__main__":
    unittest.main(verbosity=2)
