#!/usr/bin/python3
"""Plan: replication converges whatever the network does. A fault proxy (tests/tools) sits
between the daemons and, seeded, drops, stalls, resets, flips bytes in and partitions the link
at random while a writer changes the source; once the faults stop, the destination becomes
byte-identical to the source. Separately, a probe corrupts extents after they are hashed (as a
bad NIC or memory would): the destination catches each by its hash, refuses it, and the
session resumes and still converges. The seed is printed (TANDEM_FAULT_SEED replays it)."""
import os
import random
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import FaultProxy, Pair, Workdir, free_port, wait_identical  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB


def write_for(uri, seconds, seed):
    """Random writes with periodic flushes for a bounded time; survives nothing failing."""
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        off = rnd.randrange(0, SIZE // 4096 - 32) * 4096
        h.pwrite(rnd.randbytes(rnd.randrange(1, 32) * 4096), off)
        n += 1
        if n % 32 == 0:
            h.flush()
        time.sleep(0.001)
    h.flush()
    h.shutdown()
    return n


class Faults(unittest.TestCase):
    def test_random_network_faults_converge(self):
        seed = int(os.environ.get("TANDEM_FAULT_SEED", str(random.SystemRandom().randrange(1 << 30))))
        print("fault seed %d" % seed, flush=True)
        with Workdir() as wd:
            pb = free_port()
            proxy = FaultProxy(wd.path, pb, seed)
            pair = Pair(wd.path, SIZE, rpo=1, b_port=pb, a_dials=proxy.port)
            try:
                pair.start()
                proxy.command("random on")
                writes = write_for(pair.a.uri("vol0"), 8, seed)
                proxy.command("random off")
                proxy.command("heal")
                wait_identical(pair, timeout_s=180)
                log = proxy.log()
                kinds = {k for k in ("drop", "stall", "reset", "flip", "cut") if "fault " + k in log or "random fault " + k in log}
                print("%d writes; faults injected: %s" % (writes, sorted(kinds)), flush=True)
                self.assertGreaterEqual(len(kinds), 2, "the proxy injected too few kinds of fault:\n" + log)
            finally:
                rcs = pair.stop()
                proxy.stop()
            self.assertEqual(rcs, [0, 0])

    def test_corrupted_extent_is_caught_by_its_hash(self):
        with Workdir() as wd:
            pair = Pair(wd.path, SIZE, rpo=1, a_env={"TANDEM_PROBES": "corrupt_extent_every=7"})
            try:
                pair.start()
                write_for(pair.a.uri("vol0"), 3, 42)
                wait_identical(pair, timeout_s=180)
                self.assertIn("probe corrupt_extent_every", pair.a.log())
                self.assertIn("fails its xxh3 hash", pair.b.log())
            finally:
                rcs = pair.stop()
            self.assertEqual(rcs, [0, 0])


if __name__ == "__main__":
    unittest.main(verbosity=2)
