#!/usr/bin/python3
"""Plan: failover workflows on two real tandemd over mutual TLS, driven through the control API
(curl on the Unix sockets), with real NBD clients writing.

- Planned failover while a writer issues FUA writes one after another on the source: the API
  answers 204 with the session Failing_Over, then both sites reach Failed_Over with the roles
  swapped; the old source refuses writes (EPERM); every write acknowledged before the refusal
  is on the new source (the images are identical). Reprotect on the new source: OK in the new
  direction, and its writes reach the old source. Failback: planned failover with reverse
  ends OK with the original roles.
- Unplanned failover after SIGKILL of the source, under a sequence writer that stamps block j
  with j and issues j+1 only after j is acknowledged: the destination becomes writable from a
  committed cycle, and the stamps it holds are exactly a prefix 0..k (a later write never
  without an earlier one). The old source, which also wrote while cut off, comes back as a
  destination in Failed_Over and reports its diverged blocks. Reprotect ships a number of
  bytes close to the changed set (far below the volume) and the volumes end identical.
- Unplanned failover with the source alive and writing: the old source steps down on its next
  hello (its exports refuse writes), reports diverged blocks, and reprotect converges.
- A daemon killed mid-failover (planned: the source, while Failing_Over) comes back and
  finishes it; the new source killed while Reprotecting comes back Reprotecting and finishes.
- A consistency group of three volumes keeps one write order across them through an unplanned
  failover; a failover test image stays frozen while cycles commit underneath.
- Reprotect after a source crash ships the regions written since the last committed cycle, not
  every region the volume had hot: cycles over the whole volume, a short burst, SIGKILL.
"""
import os
import random
import re
import struct
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import Pair, Workdir, wait_identical, wait_until, xxh128  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB
BIG = 256 * MiB  # the unplanned test: room for its writes to be far below the volume
BASE = "/api/rest/replication_session/s-vol0"
MAGIC = b"TANDEMSQ"


def stamp(j):
    return (MAGIC + struct.pack("<Q", j)) * (4096 // 16)


class SequenceWriter(threading.Thread):
    """Writes block j (stamped j) with FUA, then j+1, until told to stop or a write fails."""

    def __init__(self, uri, first_block=0, limit=4000):
        super().__init__(daemon=True)
        self.uri, self.first, self.limit = uri, first_block, limit
        self.acked = -1
        self.error = None
        self.stop_flag = threading.Event()

    def run(self):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        try:
            for j in range(self.limit):
                if self.stop_flag.is_set():
                    break
                h.pwrite(stamp(j), (self.first + j) * 4096, nbd.CMD_FLAG_FUA)
                self.acked = j
        except nbd.Error as e:
            self.error = e
        try:
            h.shutdown()
        except nbd.Error:
            pass


def write_run(uri, rnd, offset, blocks):
    """Writes `blocks` random 4 KiB blocks from `offset` through NBD, then flushes."""
    h = nbd.NBD()
    h.connect_uri(uri)
    for i in range(blocks):
        h.pwrite(rnd.randbytes(4096), offset + i * 4096)
    h.flush()
    h.shutdown()


def stamps(image, first_block, count):
    """The sequence numbers found in blocks first..first+count of an image (None: no stamp)."""
    out = []
    with open(image, "rb") as f:
        f.seek(first_block * 4096)
        for _ in range(count):
            b = f.read(4096)
            if b[:8] == MAGIC:
                out.append(struct.unpack("<Q", b[8:16])[0])
            else:
                out.append(None)
    return out


class Failover(unittest.TestCase):
    def setUp(self):
        self.wd = Workdir()
        self.pair = Pair(self.wd.path, SIZE)

    def tearDown(self):
        rcs = self.pair.stop()
        logs = self.pair.a.log()[-8000:] + "\n----\n" + self.pair.b.log()[-8000:]
        self.wd.__exit__(None, None, None)
        self.assertTrue(all(rc == 0 for rc in rcs), "a daemon did not shut down cleanly:\n" + logs)

    def both(self, state):
        return self.pair.a.session()["state"] == state and self.pair.b.session()["state"] == state

    def start(self):
        p = self.pair.start()
        wait_until(lambda: self.both("OK"), "both sites OK", timeout_s=120, interval_s=0.2)
        return p

    def post(self, d, verb, body=None, expect=204):
        code, payload = d.api("POST", BASE + "/" + verb, body)
        self.assertEqual(code, expect, (d.name, verb, payload))
        return payload

    def test_planned_failover_reprotect_and_failback(self):
        p = self.start()
        w = SequenceWriter(p.a.uri("vol0"), first_block=1000)
        w.start()
        wait_until(lambda: w.acked >= 50, "the writer to get going")
        self.post(p.a, "failover", '{"is_planned": true}')
        self.assertIn(p.a.session()["state"], ("Failing_Over", "Failed_Over"))
        wait_until(lambda: self.both("Failed_Over"), "both sites Failed_Over", timeout_s=120, interval_s=0.1)
        w.join(timeout=harness.WAIT_S)
        self.assertIsNotNone(w.error, "the old source kept accepting writes")
        self.assertIn("EPERM", str(w.error))
        self.assertEqual((p.a.session()["role"], p.b.session()["role"]), ("Destination", "Source"))
        # No acknowledged write lost: the new source holds every acknowledged stamp; the two
        # images are the same.
        got = stamps(p.b.image("vol0"), 1000, w.acked + 1)
        self.assertEqual(got, list(range(w.acked + 1)))
        self.assertEqual(xxh128(p.a.image("vol0")), xxh128(p.b.image("vol0")))
        h = nbd.NBD()
        h.connect_uri(p.a.uri("vol0"))
        self.assertTrue(h.is_read_only())
        h.shutdown()
        # Actions the table refuses in Failed_Over.
        self.post(p.a, "pause", expect=422)
        self.post(p.b, "sync", expect=422)
        self.post(p.a, "reprotect", expect=400)  # the destination side
        # Reprotect from the new source; its writes reach the old source.
        self.post(p.b, "reprotect")
        wait_until(lambda: self.both("OK"), "OK in the new direction", timeout_s=120, interval_s=0.1)
        w2 = SequenceWriter(p.b.uri("vol0"), first_block=5000, limit=200)
        w2.run()
        self.assertIsNone(w2.error)
        wait_identical(p)
        # Failback in one step.
        self.post(p.b, "failover", '{"is_planned": true, "reverse": true}')
        wait_until(lambda: p.a.session()["role"] == "Source" and self.both("OK"), "failback", timeout_s=120,
                   interval_s=0.1)
        self.assertEqual(p.b.session()["role"], "Destination")
        w3 = SequenceWriter(p.a.uri("vol0"), first_block=9000, limit=100)
        w3.run()
        self.assertIsNone(w3.error)
        wait_identical(p)

    def test_unplanned_failover_prefix_then_old_source_returns_and_reprotect(self):
        seed = int(os.environ.get("TANDEM_SEED", random.randrange(1 << 30)))
        print("seed", seed, flush=True)
        rnd = random.Random(seed)
        self.pair = Pair(self.wd.path, BIG)
        p = self.start()
        w = SequenceWriter(p.a.uri("vol0"), first_block=256, limit=8000)
        w.start()
        # Kill once cycles have carried some of the sequence over, at a random moment after.
        wait_until(lambda: stamps(p.b.image("vol0"), 256, 1)[0] == 0, "the first stamps to be committed",
                   timeout_s=60, interval_s=0.05)
        time.sleep(rnd.uniform(0.1, 1.0))
        p.a.kill()
        w.join(timeout=harness.WAIT_S)
        acked = w.acked
        code, s = p.b.api("GET", BASE)
        self.assertEqual(s["role"], "Destination")
        self.post(p.b, "failover", '{"is_planned": true}', expect=400)  # planned is the source's
        self.post(p.b, "failover", '{"is_planned": false}')
        s = p.b.session()
        self.assertEqual((s["state"], s["role"]), ("Failed_Over", "Source"))
        # The image is a committed cycle: the stamps form a prefix, never a gap.
        got = stamps(p.b.image("vol0"), 256, acked + 1)
        k = next((i for i, v in enumerate(got) if v is None), len(got))
        self.assertEqual(got[:k], list(range(k)), "seed %d" % seed)
        self.assertTrue(all(v is None for v in got[k:]), "a later write without an earlier one (seed %d)" % seed)
        self.assertGreater(k, 0)
        print("acknowledged %d writes; the committed image holds the first %d" % (acked + 1, k), flush=True)
        # The new source is writable; the old one comes back, having written while cut off.
        write_run(p.b.uri("vol0"), rnd, 40 * MiB, 16)
        p.b.stop()
        p.a.start()
        write_run(p.a.uri("vol0"), rnd, 50 * MiB, 8)
        p.b.start()
        wait_until(lambda: p.a.session()["state"] == "Failed_Over", "the old source to step down", timeout_s=60)
        a = p.a.session()
        self.assertEqual(a["role"], "Destination")
        self.assertGreaterEqual(a["diverged_blocks"], 8)
        self.assertIn("will be overwritten by reprotect", p.a.log())
        self.post(p.b, "reprotect")
        wait_until(lambda: self.both("OK"), "reprotect to finish", timeout_s=120, interval_s=0.1)
        wait_identical(p)
        m = re.findall(r"reprotect: (\d+) block\(s\) changed here, (\d+) there, (\d+) to ship", p.b.log())
        self.assertTrue(m, p.b.log()[-3000:])
        ours, theirs, union = (int(x) for x in m[-1])
        print("reprotect: %d changed on the new source, %d on the old one, %d shipped" % (ours, theirs, union),
              flush=True)
        self.assertGreaterEqual(union, 16 + 8)
        # Close to the changed set: what the old source wrote that the destination had not
        # committed, the old source's 8 and the new source's 16 -- where the old source crashed,
        # rounded up to whole 4 MiB write-intent regions (every region still hot in its intent
        # log counts in full after a crash: docs/metadata-format.md). Far below the volume.
        region = 4 * MiB // 4096
        writer_regions = (256 + acked + 1) // region - 256 // region + 1
        bound = (writer_regions + 2) * region
        print("union %d blocks, bound %d blocks, volume %d blocks" % (union, bound, BIG // 4096), flush=True)
        self.assertLessEqual(union, bound)
        self.assertLess(bound * 4096, BIG // 4)
        shipped = re.findall(r"cycle \d+ committed: (\d+) blocks", p.b.log())
        self.assertEqual(int(shipped[-1]), union)

    def test_reprotect_after_a_crash_ships_the_burst_not_the_volume(self):
        # Cycles over the whole volume leave every write-intent region hot until the cycle
        # holding its blocks commits; then they cool. A source killed right after a short burst
        # therefore counts only the burst's regions as changed, and reprotect ships those.
        self.pair = Pair(self.wd.path, BIG)
        p = self.start()
        region = 4 * MiB
        regions = BIG // region
        rnd = random.Random(7)
        h = nbd.NBD()
        h.connect_uri(p.a.uri("vol0"))
        for round_ in range(3):  # every region written, in several cycles
            for r in range(regions):
                h.pwrite(rnd.randbytes(4096), r * region + round_ * 8192)
            h.flush()
            code, _ = p.a.api("POST", BASE + "/sync")
            self.assertIn(code, (204, 422))  # a scheduled cycle may be under way
            wait_until(lambda: p.a.session()["state"] == "OK" and p.a.session()["lag_bytes"] == 0,
                       "round %d committed" % round_, timeout_s=120, interval_s=0.1)
        wait_identical(p)
        # The burst: two regions, then the source dies before a cycle can carry it.
        for i in range(16):
            h.pwrite(rnd.randbytes(4096), 10 * region + i * 4096)
            h.pwrite(rnd.randbytes(4096), 33 * region + i * 4096)
        h.flush()
        p.a.kill()
        self.post(p.b, "failover", '{"is_planned": false}')
        p.a.start()
        wait_until(lambda: p.a.session()["state"] == "Failed_Over", "the old source to step down", timeout_s=60)
        diverged = p.a.session()["diverged_blocks"]
        print("old source: %d diverged block(s) after the crash (volume %d blocks)" % (diverged, BIG // 4096),
              flush=True)
        self.assertGreaterEqual(diverged, 32)
        self.assertLessEqual(diverged, 2 * region // 4096)
        self.post(p.b, "reprotect")
        wait_until(lambda: self.both("OK"), "reprotect to finish", timeout_s=120, interval_s=0.1)
        m = re.findall(r"reprotect: (\d+) block\(s\) changed here, (\d+) there, (\d+) to ship", p.b.log())
        self.assertTrue(m, p.b.log()[-3000:])
        ours, theirs, union = (int(x) for x in m[-1])
        self.assertEqual(ours, 0)
        self.assertEqual(theirs, diverged)
        self.assertLessEqual(union, 2 * region // 4096)
        wait_identical(p)

    def test_unplanned_failover_with_the_source_alive(self):
        # Disaster recovery declared while the source still runs (and writes): the destination
        # takes over from its last committed cycle; the old source, on its next hello, steps
        # down to a destination in Failed_Over and refuses host writes.
        p = self.start()
        w = SequenceWriter(p.a.uri("vol0"), first_block=100, limit=100000)
        w.start()
        wait_until(lambda: stamps(p.b.image("vol0"), 100, 1)[0] == 0, "a committed cycle", timeout_s=60)
        self.post(p.b, "failover", '{"is_planned": false}')
        s = p.b.session()
        self.assertEqual((s["state"], s["role"]), ("Failed_Over", "Source"))
        wait_until(lambda: p.a.session()["state"] == "Failed_Over", "the old source to step down", timeout_s=60)
        w.join(timeout=harness.WAIT_S)
        self.assertIn("EPERM", str(w.error))  # the old source's exports are read-only now
        a = p.a.session()
        self.assertEqual(a["role"], "Destination")
        self.assertGreater(a["diverged_blocks"], 0)  # what it wrote after the failover point
        got = stamps(p.b.image("vol0"), 100, w.acked + 1)
        k = next((i for i, v in enumerate(got) if v is None), len(got))
        self.assertEqual(got[:k], list(range(k)))
        self.assertTrue(all(v is None for v in got[k:]))
        self.post(p.b, "reprotect")
        wait_until(lambda: self.both("OK"), "reprotect", timeout_s=120, interval_s=0.1)
        wait_identical(p)

    def test_consistency_group_unplanned_failover_keeps_cross_volume_order(self):
        # Three volumes in one session; write j goes to volume j % 3 and depends on write j-1
        # on another volume. After SIGKILL of the source and an unplanned failover, the stamps
        # across the three volumes form one prefix: the group was cut and committed as one.
        seed = int(os.environ.get("TANDEM_SEED", random.randrange(1 << 30)))
        print("seed", seed, flush=True)
        rnd = random.Random(seed)
        vols = ("g0", "g1", "g2")
        self.pair = Pair(self.wd.path, 32 * MiB, volumes=vols)
        p = self.start()
        self.assertEqual(p.a.session()["resource_type"], "volume_group")
        self.assertEqual([x["local_id"] for x in p.a.session()["storage_element_pairs"]], list(vols))
        handles = []
        for v in vols:
            h = nbd.NBD()
            h.connect_uri(p.a.uri(v))
            handles.append(h)
        acked = [-1]
        stop = threading.Event()

        def writer():
            try:
                for j in range(6000):
                    if stop.is_set():
                        return
                    handles[j % 3].pwrite(stamp(j), (j // 3) * 4096, nbd.CMD_FLAG_FUA)
                    acked[0] = j
            except nbd.Error:
                pass

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        wait_until(lambda: stamps(p.b.image("g2"), 0, 1)[0] == 2, "the first group cycle", timeout_s=60, interval_s=0.05)
        time.sleep(rnd.uniform(0.1, 1.0))
        p.a.kill()
        t.join(timeout=harness.WAIT_S)
        self.post(p.b, "failover", '{"is_planned": false}')
        self.assertEqual(p.b.session()["state"], "Failed_Over")
        n = acked[0] + 1
        present = {}
        for vi, v in enumerate(vols):
            for blk, val in enumerate(stamps(p.b.image(v), 0, n // 3 + 1)):
                if val is not None:
                    self.assertEqual(val % 3, vi)
                    self.assertEqual(val // 3, blk)
                    present[val] = True
        k = 0
        while k in present:
            k += 1
        self.assertGreater(k, 0)
        self.assertEqual(sorted(present), list(range(k)), "a write present without an earlier one on another "
                         "volume (seed %d)" % seed)
        print("group: %d writes acknowledged, the committed image holds the first %d" % (n, k), flush=True)
        for h in handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass

    def test_failover_test_image_while_replication_goes_on(self):
        p = self.start()
        rnd = random.Random(11)
        h = nbd.NBD()
        h.connect_uri(p.a.uri("vol0"))
        for i in range(32):
            h.pwrite(rnd.randbytes(65536), i * MiB)
        h.flush()
        wait_identical(p)
        with open(p.b.image("vol0"), "rb") as f:
            before = f.read()
        self.post(p.a, "start_failover_test", expect=400)  # the destination's
        self.post(p.b, "start_failover_test")
        s = p.b.session()
        self.assertTrue(s["failover_test_in_progress"])
        self.assertEqual(s["state"], "OK")  # the state does not change
        code, vol = p.b.api("GET", "/api/rest/volume/vol0-test")
        self.assertEqual(code, 200, vol)
        self.assertEqual(vol["access"], "read-write")
        uri = vol["exports"][0]
        self.post(p.b, "start_failover_test", expect=422)       # one test at a time
        self.post(p.b, "failover", '{"is_planned": false}', expect=422)  # no failover during a test
        # Nor a planned one from the source: it asks the destination first, and nothing changes.
        refused = self.post(p.a, "failover", '{"is_planned": true}', expect=422)
        self.assertIn("a failover test is running on the destination", refused["messages"][0]["message_l10n"])
        self.assertEqual(p.a.session()["state"], "OK")
        self.assertEqual(p.a.session()["role"], "Source")
        # The test writes its image; the source writes on (some of the same places).
        t = nbd.NBD()
        t.connect_uri(uri)
        self.assertFalse(t.is_read_only())
        test_data = rnd.randbytes(4 * 65536)
        t.pwrite(test_data, 40 * MiB)
        t.pwrite(test_data[:4096], 3 * MiB)  # a block the source also rewrites below
        t.flush()
        for i in range(0, 32, 3):
            h.pwrite(rnd.randbytes(65536), i * MiB)
        h.flush()
        # Replication goes on underneath: the destination's base follows the source.
        wait_identical(p)
        # The test image did not move: the start image plus the test's own writes.
        expect = bytearray(before)
        expect[40 * MiB:40 * MiB + len(test_data)] = test_data
        expect[3 * MiB:3 * MiB + 4096] = test_data[:4096]
        got = b"".join(t.pread(8 * MiB, o) for o in range(0, SIZE, 8 * MiB))
        self.assertTrue(got == bytes(expect), "the test image changed under the test")
        t.shutdown()
        # Stop: the image and its writes are gone; the destination is the source's image.
        self.post(p.b, "stop_failover_test")
        self.assertFalse(p.b.session()["failover_test_in_progress"])
        code, _ = p.b.api("GET", "/api/rest/volume/vol0-test")
        self.assertEqual(code, 404)
        wait_identical(p)
        self.post(p.b, "stop_failover_test", expect=422)
        # With the peer away, stopping needs force.
        self.post(p.b, "start_failover_test")
        h.shutdown()
        p.a.stop()
        wait_until(lambda: p.b.session()["data_connection_state"] != "OK", "the link to drop")
        self.post(p.b, "stop_failover_test", expect=422)
        self.post(p.b, "stop_failover_test", '{"force": true}')
        self.assertFalse(p.b.session()["failover_test_in_progress"])
        # A destination killed during a test comes back with it: the same image, the test's
        # writes, and replication still going on underneath.
        p.a.start()
        wait_until(lambda: self.both("OK"), "both OK again")
        self.post(p.b, "start_failover_test")
        code, vol = p.b.api("GET", "/api/rest/volume/vol0-test")
        t = nbd.NBD()
        t.connect_uri(vol["exports"][0])
        mark = rnd.randbytes(8192)
        t.pwrite(mark, 5 * MiB, nbd.CMD_FLAG_FUA)
        frozen = t.pread(SIZE // 2, 0)
        t.shutdown()
        p.b.kill()
        p.b.start()
        s = p.b.session()
        self.assertTrue(s["failover_test_in_progress"])
        self.assertIn("the failover test that was running goes on", p.b.log())
        h = nbd.NBD()
        h.connect_uri(p.a.uri("vol0"))
        h.pwrite(rnd.randbytes(4 * MiB), 0)  # the source overwrites what the image shows
        h.flush()
        h.shutdown()
        wait_identical(p)
        code, vol = p.b.api("GET", "/api/rest/volume/vol0-test")
        t = nbd.NBD()
        t.connect_uri(vol["exports"][0])
        self.assertEqual(t.pread(8192, 5 * MiB), mark)
        self.assertTrue(t.pread(SIZE // 2, 0) == frozen, "the test image changed across the restart")
        t.shutdown()
        self.post(p.b, "stop_failover_test")
        self.assertFalse(os.path.exists(os.path.join(self.wd.path, "site-b-state", "vol0.test-overlay")))

    def test_source_killed_while_failing_over_finishes_after_restart(self):
        p = self.start()
        h = nbd.NBD()
        h.connect_uri(p.a.uri("vol0"))
        for i in range(64):
            h.pwrite(os.urandom(65536), i * 65536 * 3)
        h.flush()
        h.shutdown()
        p.b.kill()  # the rest cannot ship: the failover waits in Failing_Over (a lost peer:
        # System_Paused; a peer away for maintenance would make it Paused_For_NDU, where the
        # table refuses a planned failover)
        self.post(p.a, "failover", '{"is_planned": true}')
        self.assertEqual(p.a.session()["state"], "Failing_Over")
        p.a.kill()
        p.a.start()
        self.assertEqual(p.a.session()["state"], "Failing_Over")
        h = nbd.NBD()
        h.connect_uri(p.a.uri("vol0"))
        self.assertTrue(h.is_read_only())
        h.shutdown()
        p.b.start()
        wait_until(lambda: self.both("Failed_Over"), "the failover to finish", timeout_s=120, interval_s=0.1)
        self.assertEqual(p.b.session()["role"], "Source")
        self.assertEqual(xxh128(p.a.image("vol0")), xxh128(p.b.image("vol0")))
        # Reprotect with the new destination away, and the new source killed in Reprotecting:
        # it comes back Reprotecting and finishes when the peer returns.
        write_run(p.b.uri("vol0"), random.Random(4), 20 * MiB, 8)
        p.a.stop()
        self.post(p.b, "reprotect")
        self.assertEqual(p.b.session()["state"], "Reprotecting")
        p.b.kill()
        p.b.start()
        self.assertEqual(p.b.session()["state"], "Reprotecting")
        p.a.start()
        wait_until(lambda: self.both("OK"), "the reprotect to finish", timeout_s=120, interval_s=0.1)
        wait_identical(p)


if __name__ == "__main__":
    unittest.main(verbosity=2)
