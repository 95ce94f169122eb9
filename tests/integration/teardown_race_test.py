#!/usr/bin/python3
"""Plan: operators' actions that tear something down, issued while replication work uses it.

A pair at RPO 1 s with host writes going on all the time on the source, so that cycles are cut,
shipped and applied on the destination every half second:

- Failover tests started and stopped 30 times on the destination, each stop 0-1 s (seeded)
  after the test image appears: a stop often lands while a cycle's apply is copying base blocks
  into the image's overlay. The destination must stay up (under ASan a use after free aborts
  it), and every test image must be one committed point in time: in a region written by a
  sequence writer (block j % N stamped j, each write acknowledged before the next), the image
  holds exactly the state after some write k, and it does not change while the test runs.
- The destination paused and resumed from its own side, 20 times with seeded delays, under the
  same load: a pause makes what the destination staged durable while the receive loop may be
  staging the next extents.
- Afterwards the pair converges: the destination equals the source, and both shut down cleanly.

TANDEM_SEED replays a run.
"""
import os
import random
import struct
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import Pair, Workdir, wait_identical, wait_until  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20
SIZE = 32 * MiB
BASE = "/api/rest/replication_session/s-vol0"
MAGIC = b"TANDEMRC"
SEQ_FIRST = 0     # the sequence writer's region: blocks 0..SEQ_BLOCKS-1
SEQ_BLOCKS = 64
LOAD_FIRST = 1024  # the load writers' region: blocks 1024..end (4 MiB on)
TEST_CYCLES = 30
PAUSE_CYCLES = 20


def stamp(j):
    return (MAGIC + struct.pack("<Q", j)) * (4096 // 16)


def stamps_of(data):
    out = []
    for b in range(len(data) // 4096):
        blk = data[b * 4096:(b + 1) * 4096]
        out.append(struct.unpack("<Q", blk[8:16])[0] if blk[:8] == MAGIC else None)
    return out


def one_point_in_time(got):
    """The stamps of the sequence region are those after some write k (or before the first)."""
    seen = [s for s in got if s is not None]
    if not seen:
        return True, None
    k = max(seen)
    expect = [k - ((k - b) % SEQ_BLOCKS) if b <= k else None for b in range(SEQ_BLOCKS)]
    return got == expect, k


class Writers:
    """A sequence writer (FUA, one at a time) and two load writers (random 4 KiB blocks, as fast as
    they go) on the source, until stop()."""

    def __init__(self, uri, seed):
        self.uri = uri
        self.stop_flag = threading.Event()
        self.errors = []
        self.seq_acked = -1
        self.load_writes = 0
        self.threads = [threading.Thread(target=self.sequence, daemon=True)]
        self.threads += [threading.Thread(target=self.load, args=(seed + i,), daemon=True) for i in range(2)]

    def start(self):
        for t in self.threads:
            t.start()

    def sequence(self):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        j = 0
        try:
            while not self.stop_flag.is_set():
                h.pwrite(stamp(j), (SEQ_FIRST + j % SEQ_BLOCKS) * 4096, nbd.CMD_FLAG_FUA)
                self.seq_acked = j
                j += 1
        except nbd.Error as e:
            self.errors.append(e)
            return
        h.shutdown()

    def load(self, seed):
        rnd = random.Random(seed)
        h = nbd.NBD()
        h.connect_uri(self.uri)
        blocks = SIZE // 4096 - LOAD_FIRST
        try:
            while not self.stop_flag.is_set():
                h.pwrite(rnd.randbytes(4096), (LOAD_FIRST + rnd.randrange(blocks)) * 4096)
                self.load_writes += 1
        except nbd.Error as e:
            self.errors.append(e)
            return
        h.shutdown()

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=harness.WAIT_S)
            assert not t.is_alive(), "a writer did not stop"


class TeardownRaces(unittest.TestCase):
    def setUp(self):
        self.seed = int(os.environ.get("TANDEM_SEED", random.randrange(1 << 30)))
        print("seed", self.seed, flush=True)
        self.rnd = random.Random(self.seed)
        self.wd = Workdir()
        self.pair = Pair(self.wd.path, SIZE, rpo=1)

    def tearDown(self):
        rcs = self.pair.stop()
        logs = self.pair.a.log()[-6000:] + "\n----\n" + self.pair.b.log()[-6000:]
        self.wd.__exit__(None, None, None)
        self.assertTrue(all(rc == 0 for rc in rcs), "a daemon did not shut down cleanly:\n" + logs)

    def post(self, d, verb, body=None, expect=204):
        code, payload = d.api("POST", BASE + "/" + verb, body)
        self.assertEqual(code, expect, (d.name, verb, payload, d.log()[-3000:]))
        return payload

    def alive(self, d):
        self.assertIsNone(d.proc.poll(), "%s died; log:\n%s" % (d.name, d.log()[-6000:]))

    def start_pair(self):
        p = self.pair.start()
        wait_until(lambda: p.a.session()["state"] == "OK" and p.b.session()["state"] == "OK", "both OK",
                   timeout_s=120, interval_s=0.2)
        w = Writers(p.a.uri("vol0"), self.seed)
        w.start()
        wait_until(lambda: w.seq_acked >= 2 * SEQ_BLOCKS and w.load_writes >= 200, "the writers to get going")
        return p, w

    def test_failover_test_stopped_while_cycles_apply(self):
        p, w = self.start_pair()
        points = []
        for i in range(TEST_CYCLES):
            self.post(p.b, "start_failover_test")
            code, vol = p.b.api("GET", "/api/rest/volume/vol0-test")
            self.assertEqual(code, 200, vol)
            t = nbd.NBD()
            t.connect_uri(vol["exports"][0])
            first = t.pread(SEQ_BLOCKS * 4096, SEQ_FIRST * 4096)
            ok, k = one_point_in_time(stamps_of(first))
            self.assertTrue(ok, "test image %d is not one point in time: %s" % (i, stamps_of(first)))
            points.append(k)
            time.sleep(self.rnd.uniform(0.0, 1.0))
            again = t.pread(SEQ_BLOCKS * 4096, SEQ_FIRST * 4096)
            self.assertEqual(stamps_of(again), stamps_of(first), "test image %d changed under the test" % i)
            t.shutdown()
            # Without a client on the image, the stop lands at any moment of a cycle's apply.
            time.sleep(self.rnd.uniform(0.0, 0.3))
            self.post(p.b, "stop_failover_test")
            self.alive(p.b)
            self.assertFalse(p.b.session()["failover_test_in_progress"])
        w.stop()
        self.assertEqual(w.errors, [])
        # The images moved on: replication went on under the tests.
        self.assertGreater(max(k for k in points if k is not None), min(k for k in points if k is not None))
        self.alive(p.b)
        wait_identical(p, timeout_s=180)
        self.assertNotIn("AddressSanitizer", p.b.log())

    def test_destination_paused_and_resumed_while_it_stages(self):
        p, w = self.start_pair()
        for i in range(PAUSE_CYCLES):
            time.sleep(self.rnd.uniform(0.0, 0.7))
            self.post(p.b, "pause")
            self.alive(p.b)
            time.sleep(self.rnd.uniform(0.0, 0.2))
            self.post(p.b, "resume")
            self.alive(p.a)
            self.alive(p.b)
        w.stop()
        self.assertEqual(w.errors, [])
        wait_until(lambda: p.a.session()["state"] == "OK" and p.b.session()["state"] == "OK", "both OK",
                   timeout_s=120, interval_s=0.2)
        wait_identical(p, timeout_s=180)
        # The destination's image is one point in time too, and it is the latest one.
        with open(p.b.image("vol0"), "rb") as f:
            ok, k = one_point_in_time(stamps_of(f.read(SEQ_BLOCKS * 4096)))
        self.assertTrue(ok)
        self.assertEqual(k, w.seq_acked)
        # The destination times its cycles too (sync_begin to applied), as the source does.
        self.assertGreater(p.b.session()["last_sync_duration"], 0)


if __name__ == "__main__":
    unittest.main()
