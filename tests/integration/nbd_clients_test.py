#!/usr/bin/python3
"""Plan: real NBD clients against a running tandemd, each checking what it wrote reads back:
nbdinfo (size and capabilities), libnbd's Python bindings (FUA write, flush, read back; with
strict mode off an out-of-range read gets EINVAL and the connection keeps working), qemu-io
(patterns, FUA, flush, write -z, discard), qemu-img convert + compare, nbdcopy -C 4 both ways +
cmp, fio's nbd engine with crc32c verification, and a filesystem: nbdfuse + losetup + mkfs.ext4
+ mount + write + umount + e2fsck. Each test runs its own daemon, stopped by PID; afterwards the
daemon must have exited cleanly and every written block must be in its dirty map."""
import errno
import os
import random
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import Daemon, Workdir, run, wait_until  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20


def errnum(e):
    """libnbd's Python errors carry the errno as a name ("EINVAL") in this version."""
    return e.errno if isinstance(e.errno, int) else getattr(errno, e.errno)
SIZE = 64 * MiB


class NbdClients(unittest.TestCase):
    def setUp(self):
        self.wd = Workdir()
        self.d = Daemon(self.wd.path, [("vol0", SIZE)]).start()
        self.uri = self.d.uri("vol0")

    def tearDown(self):
        rc = self.d.stop()
        log = self.d.log()
        self.wd.__exit__(None, None, None)
        self.assertEqual(rc, 0, "tandemd did not shut down cleanly:\n" + log)

    def src_image(self, name, size=SIZE, seed=1):
        """A source image with random data in scattered extents and zeros elsewhere."""
        path = self.wd.join(name)
        rnd = random.Random(seed)
        with open(path, "wb") as f:
            f.truncate(size)
            for _ in range(40):
                off = rnd.randrange(0, size - MiB) & ~4095
                f.seek(off)
                f.write(rnd.randbytes(rnd.randrange(1, 256) * 4096))
        return path

    def test_nbdinfo_reports_size_and_capabilities(self):
        p = run(["nbdinfo", "--json", self.uri])
        import json
        info = json.loads(p.stdout)["exports"][0]
        self.assertEqual(info["export-size"], SIZE)
        for cap in ("can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero"):
            self.assertTrue(info[cap], cap)
        self.assertFalse(info["is_read_only"])

    def test_libnbd_fua_flush_readback_and_einval(self):
        h = nbd.NBD()
        h.set_export_name("vol0")
        h.connect_unix(self.d.socket("vol0"))
        data = os.urandom(64 * 1024)
        h.pwrite(data, 4096 * 3, nbd.CMD_FLAG_FUA)
        h.pwrite(b"\x5a" * 1000, 123457)  # unaligned
        h.flush()
        self.assertEqual(h.pread(len(data), 4096 * 3), data)
        self.assertEqual(h.pread(1000, 123457), b"\x5a" * 1000)
        # Let the bad request reach the server instead of being refused by libnbd.
        h.set_strict_mode(0)
        with self.assertRaises(nbd.Error) as ctx:
            h.pread(4096, SIZE)
        self.assertEqual(errnum(ctx.exception), errno.EINVAL)
        with self.assertRaises(nbd.Error) as ctx:
            h.pwrite(b"x" * 4096, SIZE - 2048)
        self.assertEqual(errnum(ctx.exception), errno.ENOSPC)
        # The connection survived both.
        self.assertEqual(h.pread(len(data), 4096 * 3), data)
        h.shutdown()

    def test_qemu_io_patterns_fua_zero_discard(self):
        cmds = ["write -P 0xab 0 1M", "write -f -P 0xcd 1M 1M", "flush", "write -z 256k 128k",
                "discard 1536k 512k", "write -P 0x11 3000 5000",
                "read -P 0xab 0 3000", "read -P 0xab 8000 254144", "read -P 0 256k 128k", "read -P 0xab 384k 640k",
                "read -P 0xcd 1M 512k", "read -P 0 1536k 512k", "read -P 0x11 3000 5000"]
        args = ["qemu-io", "-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        p = run(args + [self.uri])
        self.assertNotIn("verification failed", p.stdout + p.stderr)
        self.assertNotIn("error", (p.stdout + p.stderr).lower())
        self.assertEqual(p.stdout.count("read "), 7, p.stdout)

    def test_qemu_img_convert_and_compare(self):
        src = self.src_image("src.img")
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, self.uri])
        p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, self.uri], check=False)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        # And a difference is detected (the comparison can fail).
        with open(src, "r+b") as f:
            f.seek(5 * MiB + 17)
            f.write(b"!")
        p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, self.uri], check=False)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)

    def test_nbdcopy_both_ways(self):
        src = self.src_image("src.img", seed=2)
        back = self.wd.join("back.img")
        run(["nbdcopy", "-C", "4", src, self.uri])
        run(["nbdcopy", "-C", "4", self.uri, back])
        run(["cmp", src, back])

    def test_fio_verify(self):
        run(["fio", "--name=verify", "--ioengine=nbd", "--uri=" + self.uri, "--rw=randwrite",
             "--bsrange=4k-64k", "--iodepth=32", "--size=%d" % (32 * MiB), "--verify=crc32c",
             "--do_verify=1", "--verify_fatal=1", "--randrepeat=1", "--output-format=terse"], timeout=600)

    def test_filesystem_on_nbdfuse_loop(self):
        mnt = self.wd.join("fuse")
        fsdir = self.wd.join("fs")
        os.mkdir(mnt)
        os.mkdir(fsdir)
        fuse = subprocess.Popen(["nbdfuse", os.path.join(mnt, "disk"), "--unix", self.d.socket("vol0")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        loop = None
        mounted = False
        try:
            wait_until(lambda: os.path.exists(os.path.join(mnt, "disk")), "nbdfuse to mount")
            loop = run(["losetup", "--find", "--show", "--direct-io=on", os.path.join(mnt, "disk")]).stdout.strip()
            run(["mkfs.ext4", "-q", "-F", loop])
            run(["mount", loop, fsdir])
            mounted = True
            payload = os.urandom(3 * MiB)
            with open(os.path.join(fsdir, "blob"), "wb") as f:
                f.write(payload)
            for i in range(50):
                with open(os.path.join(fsdir, "f%d.txt" % i), "w") as f:
                    f.write("file %d\n" % i * 100)
            run(["umount", fsdir])
            mounted = False
            run(["e2fsck", "-fn", loop])
            run(["mount", "-o", "ro", loop, fsdir])
            mounted = True
            with open(os.path.join(fsdir, "blob"), "rb") as f:
                self.assertEqual(f.read(), payload)
            run(["umount", fsdir])
            mounted = False
        finally:
            if mounted:
                run(["umount", fsdir], check=False)
            if loop:
                run(["losetup", "-d", loop], check=False)
            run(["fusermount3", "-u", mnt], check=False)
            try:
                fuse.wait(timeout=harness.WAIT_S)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait(timeout=harness.WAIT_S)

    def test_written_blocks_are_dirty_after_clean_shutdown(self):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        blocks = random.Random(3).sample(range(SIZE // 4096), 200)
        for b in blocks:
            h.pwrite(b"\x01" * 4096, b * 4096)
        h.flush()
        h.shutdown()
        self.assertEqual(self.d.stop(), 0)
        dirty = harness.dirty_set(self.d.inspect()["vol0"])
        self.assertTrue(set(blocks) <= dirty)
        self.d.start()  # tearDown stops it again


class NbdOverTcp(unittest.TestCase):
    def test_tcp_export_on_loopback(self):
        with Workdir() as wd:
            d = Daemon(wd.path, [("vol0", SIZE)], extra_volume_keys={"nbd_listen": "127.0.0.1:0"})
            d.start()
            try:
                import re
                m = None

                def port_logged():
                    nonlocal m
                    m = re.search(r"NBD export on tcp 127\.0\.0\.1:0 \(port (\d+)\)", d.log())
                    return m is not None
                wait_until(port_logged, "the TCP port in the log")
                uri = "nbd://127.0.0.1:%s/vol0" % m.group(1)
                h = nbd.NBD()
                h.connect_uri(uri)
                self.assertEqual(h.get_size(), SIZE)
                h.pwrite(b"t" * 8192, 4096, nbd.CMD_FLAG_FUA)
                h.shutdown()
                # Data written over TCP reads back over the Unix socket: one volume.
                h2 = nbd.NBD()
                h2.connect_uri(d.uri("vol0"))
                self.assertEqual(h2.pread(8192, 4096), b"t" * 8192)
                h2.shutdown()
            finally:
                self.assertEqual(d.stop(), 0, d.log())


if __name__ == "__main__":
    unittest.main(verbosity=2)
