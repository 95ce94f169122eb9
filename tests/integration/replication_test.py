#!/usr/bin/python3
"""Plan: two real tandemd processes on loopback replicate over mutual TLS with certificates
made for the test. Real clients write to the source's NBD export (nbdcopy, fio with
verification, an ext4 filesystem through nbdfuse + loop); after each sync the destination's
backing file is byte-identical to the source's (xxh128), and the destination's export is
read-only. Split brain (both sides made writable and written, then connected) is refused with
the reason logged and both volumes untouched. Certificates from the wrong CA, with the wrong
name, and a plaintext client are each refused, and the daemons stay up."""
import os
import random
import re
import socket
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import Pair, Workdir, run, wait_identical, wait_until, xxh128  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB


def write_random(uri, seed, count=64):
    harness.write_random(uri, seed, SIZE, count)


class Replication(unittest.TestCase):
    def setUp(self):
        self.wd = Workdir()
        self.pair = Pair(self.wd.path, SIZE)

    def tearDown(self):
        rcs = self.pair.stop()
        logs = self.pair.a.log() + "\n----\n" + self.pair.b.log()
        self.wd.__exit__(None, None, None)
        self.assertTrue(all(rc == 0 for rc in rcs), "a daemon did not shut down cleanly:\n" + logs)

    def test_real_clients_then_identical(self):
        p = self.pair.start()
        src = self.wd.join("src.img")
        with open(src, "wb") as f:
            rnd = random.Random(1)
            f.truncate(SIZE)
            for _ in range(30):
                f.seek(rnd.randrange(0, SIZE - MiB) & ~4095)
                f.write(rnd.randbytes(rnd.randrange(1, 128) * 4096))
        run(["nbdcopy", "-C", "4", src, p.a.uri("vol0")])
        wait_identical(p)
        run(["fio", "--name=w", "--ioengine=nbd", "--uri=" + p.a.uri("vol0"), "--rw=randwrite",
             "--bsrange=4k-64k", "--iodepth=16", "--size=%d" % (16 * MiB), "--verify=crc32c",
             "--do_verify=1", "--verify_fatal=1", "--output-format=terse"], timeout=600)
        wait_identical(p)
        # A filesystem built on the source shows up intact at the destination.
        mnt, fsdir = self.wd.join("fuse"), self.wd.join("fs")
        os.mkdir(mnt)
        os.mkdir(fsdir)
        fuse = subprocess.Popen(["nbdfuse", os.path.join(mnt, "disk"), "--unix", p.a.socket("vol0")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        loop = None
        try:
            wait_until(lambda: os.path.exists(os.path.join(mnt, "disk")), "nbdfuse")
            loop = run(["losetup", "--find", "--show", "--direct-io=on", os.path.join(mnt, "disk")]).stdout.strip()
            run(["mkfs.ext4", "-q", "-F", loop])
            run(["mount", loop, fsdir])
            with open(os.path.join(fsdir, "payload"), "wb") as f:
                f.write(os.urandom(2 * MiB))
            run(["umount", fsdir])
        finally:
            if loop:
                run(["losetup", "-d", loop], check=False)
            run(["fusermount3", "-u", mnt], check=False)
            fuse.wait(timeout=harness.WAIT_S)
        wait_identical(p)
        run(["e2fsck", "-fn", p.b.image("vol0")])
        # The destination's export is read-only to hosts.
        h = nbd.NBD()
        h.connect_uri(p.b.uri("vol0"))
        self.assertTrue(h.is_read_only())
        h.shutdown()
        self.assertIn("committed and applied", p.b.log())

    def test_session_rate_limit_paces_the_transfer(self):
        # 12 MiB of data at 4 MiB/s cannot ship in less than ~3 s: the limiter lets a frame go
        # when the bytes before it are paid for to within its 100 ms burst, so the last 1 MiB
        # extent leaves after (shipped - 1 MiB) / rate - 100 ms. A lower bound that only a
        # missing limit can break, never a slow machine (unlimited, it takes ~0.1 s).
        rate = 4 * MiB
        self.pair = Pair(self.wd.path, SIZE, a_overrides={"rate_limit": "4MiB"})
        with open(self.pair.a.image("vol0"), "wb") as f:
            f.truncate(SIZE)
            f.seek(8 * MiB)
            f.write(random.Random(7).randbytes(12 * MiB))
        p = self.pair.start()
        wait_identical(p)
        # The images match once the last extent is written, a moment before the commit returns.
        done = r"initial sync complete in (\d+) ms \((\d+) bytes shipped"
        wait_until(lambda: re.search(done, p.a.log()), "the source to log the initial sync's end")
        m = re.search(done, p.a.log())
        ms, shipped = int(m.group(1)), int(m.group(2))
        self.assertGreaterEqual(shipped, 12 * MiB)
        floor_ms = (shipped - MiB) * 1000 // rate - 100
        self.assertGreaterEqual(ms, floor_ms, "shipped %d bytes in %d ms at a 4 MiB/s limit" % (shipped, ms))

    def test_compare_mode_initial_sync_resumes_comparing(self):
        # The destination already holds the first half (pre-seeded); the second half differs.
        # The source is killed after the destination's first checkpoint; the resumed initial
        # sync compares again from the restart address, and what matched is never shipped.
        self.pair = Pair(self.wd.path, SIZE, a_overrides={"rate_limit": "8MiB"})
        p = self.pair
        rnd = random.Random(21)
        same = rnd.randbytes(SIZE // 2)
        with open(p.a.image("vol0"), "wb") as f:
            f.write(same + rnd.randbytes(SIZE // 2))
        with open(p.b.image("vol0"), "wb") as f:
            f.write(same + rnd.randbytes(SIZE // 2))
        p.start()
        wait_until(lambda: p.b.session()["restart_address"]["offset"] > 0, "a checkpoint", interval_s=0.05)
        self.assertIn("initial sync (compare hashes) from site-a at offset 0", p.b.log())
        p.a.kill()
        p.a.start()
        wait_identical(p)
        starts = re.findall(r"initial sync \((.*?)\) from site-a at offset (\d+)", p.b.log())
        self.assertGreaterEqual(len(starts), 2, starts)
        self.assertEqual(starts[-1][0], "compare hashes")
        self.assertGreater(int(starts[-1][1]), 0)
        # The images match once the last extent is written, a moment before the commit returns.
        ended = r"initial sync complete in \d+ ms \((\d+) bytes shipped"
        wait_until(lambda: re.findall(ended, p.a.log()), "the source to log the initial sync's end")
        done = re.findall(ended, p.a.log())
        self.assertLessEqual(int(done[-1]), SIZE // 2)  # the matching half never shipped

    def test_split_brain_is_refused_and_nothing_changes(self):
        p = self.pair.start()
        write_random(p.a.uri("vol0"), 2)
        wait_identical(p)
        self.assertEqual(p.a.stop(), 0)
        self.assertEqual(p.b.stop(), 0)
        # site-b is forced to be a source and written, alone.
        run([harness.TANDEMD, "-c", p.b.config, "--set-role", "s-vol0=source"])
        p.b.start()
        write_random(p.b.uri("vol0"), 3, count=8)
        self.assertEqual(p.b.stop(), 0)
        run([harness.TANDEMD, "-c", p.b.config, "--set-role", "s-vol0=destination"])
        # site-a is written while site-b is away: both have written since they last agreed.
        p.a.start()
        write_random(p.a.uri("vol0"), 4, count=8)
        time.sleep(0.5)
        before_a, before_b = xxh128(p.a.image("vol0")), xxh128(p.b.image("vol0"))
        p.b.start()
        wait_until(lambda: "split brain" in p.a.log(), "the split brain to be reported on site-a")
        wait_until(lambda: "split brain" in p.b.log(), "the split brain to be reported on site-b")
        time.sleep(1)
        self.assertEqual(p.a.stop(), 0)
        self.assertEqual(p.b.stop(), 0)
        self.assertEqual(xxh128(p.a.image("vol0")), before_a, "site-a's volume changed")
        self.assertEqual(xxh128(p.b.image("vol0")), before_b, "site-b's volume changed")


class Certificates(unittest.TestCase):
    def refused(self, b_overrides, expect):
        with Workdir() as wd:
            pair = Pair(wd.path, SIZE, b_overrides=b_overrides)
            pair.start()
            try:
                wait_until(lambda: expect in pair.a.log() + pair.b.log(), "a refusal naming: " + expect)
                self.assertNotIn("replication link to", pair.a.log())
                self.assertNotIn("initial sync", pair.b.log())
            finally:
                rcs = pair.stop()
            self.assertEqual(rcs, [0, 0])

    def test_wrong_ca(self):
        self.refused({"cert_name": "other-site-b"}, "certificate verify failed")

    def test_wrong_name(self):
        self.refused({"cert_name": "site-c"}, "site-c")

    def test_plaintext_client(self):
        with Workdir() as wd:
            pair = Pair(wd.path, SIZE)
            pair.b.start()
            try:
                with socket.create_connection(("127.0.0.1", pair.pb), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"\x00" * 100)
                    s.settimeout(5)
                    try:
                        s.recv(100)
                    except OSError:
                        pass
                wait_until(lambda: "refused" in pair.b.log() or "handshake" in pair.b.log(),
                           "the plaintext client to be refused")
                self.assertIsNone(pair.b.proc.poll(), "site-b died")
            finally:
                rcs = pair.stop()
            self.assertEqual(rcs, [0])


if __name__ == "__main__":
    unittest.main(verbosity=2)
