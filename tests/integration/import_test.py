#!/usr/bin/python3
"""Plan: import sessions on a real tandemd, from real foreign NBD servers (nbdkit, qemu-nbd),
used by real NBD clients (libnbd's Python bindings).

- Migrate then cut over: a host writer with stamped blocks runs through the whole copy (reads
  verified against what it wrote over what the source had); after Ready_For_Cutover the tandem
  volume and the source both hold exactly that; cutover makes the volume ordinary (later writes
  reach it alone); the import's figures add up (copied + skipped = size).
- Cancel: afterwards the source file holds exactly what the host wrote over what it had, byte for
  byte, and the import's volume and its files are gone.
- Pause mid-copy: the restart address stands still; resume goes on from it; nothing copied twice.
- The source killed mid-copy: host writes go on, reads of blocks not yet copied get EIO, the
  import says Disconnected and why; the source restarted: the blocks it lacked reach it, then
  the copy finishes and both copies are equal.
- tandemd SIGKILLed at seeded random moments of the copy while the host writes: each time it
  comes back in its state, the copy goes on from its restart address; no acknowledged write is
  lost on either side, a block reads back as before unless written, and the bytes the source was
  asked for twice (nbdkit's log filter) stay under 1% of the volume.
- Sources: nbdkit's file, memory and sparse-random plugins, qemu-nbd; a sparse source (16 GiB,
  about 1 GiB of data) is imported with its holes skipped (skipped_bytes says so, copied_bytes
  is its data) and compared with qemu-img against nbdcopy's copy of the source.
- TLS: an nbds:// source on TCP loopback (nbdkit requiring TLS and a client certificate):
  refused without TLS and with a client certificate another CA signed, nothing created;
  imported with the right one while the host writes; the URI is shown without its query.
- Bad input: an unreachable URI, a source of the wrong size for an existing volume, bad bodies,
  an action in the wrong state, an unknown import: each a clear error_response; nothing is
  created or changed.
- A filesystem: ext4 mounted through nbdfuse on the importing volume during the copy, then
  e2fsck -fn clean on the volume after cutover and on the source after cancel.
- Admission: with max_concurrent_imports = 1 a second import waits Queued (its volume already
  serves the host) while the first copies or is paused; an import with a start time is Scheduled
  until then and copies by itself.
- A volume imported on a replicating pair is protected by a session added with SIGHUP right
  after its cutover, while the host still writes; the destination ends identical.
- tandemctl: import create --wait draws progress (percentage, ETA) until everything is copied;
  list/show; a refused action exits 1 with the daemon's message; cutover --wait; delete.
"""
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from harness import Daemon, Workdir, free_port, make_certs, run, wait_until  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB
SEED = int(os.environ.get("TANDEM_IMPORT_SEED", "20261202"))


class Nbdkit:
    """An nbdkit server on a Unix socket, started by the test and stopped by its PID."""

    def __init__(self, wd, name, plugin_args, filters=(), params=(), options=(), port=None):
        self.sock = wd.join(name + ".sock")
        self.port = port
        where = ["-p", str(port), "-i", "127.0.0.1"] if port else ["-U", self.sock]
        self.args = ["nbdkit", "-f"] + where + list(options) + list(filters) + list(plugin_args) + list(params)
        self.proc = None

    def listening(self):
        if self.port is None:
            return os.path.exists(self.sock)
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: self.listening() or self.proc.poll() is not None, "nbdkit to listen")
        if self.proc.poll() is not None:
            raise AssertionError("nbdkit exited: %s" % self.proc.stderr.read().decode(errors="replace"))
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # it may wait for a client that is gone
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.proc is not None:
            self.proc.stderr.close()
        self.proc = None

    def uri(self):
        return "nbd+unix:///?socket=" + self.sock


def make_source(path, size, seed, data_ranges):
    """A sparse file: random bytes in data_ranges, holes elsewhere. Returns its contents."""
    rng = random.Random(seed)
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in data_ranges:
            chunk = rng.randbytes(n)
            content[off:off + n] = chunk
            f.seek(off)
            f.write(chunk)
    return content


class Writer:
    """Stamped 4 KiB writes and verified reads through libnbd; `model` is what the host wrote over
    what the source had (every acknowledged write applied)."""

    def __init__(self, uri, model, seed):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.model = model
        self.rng = random.Random(seed)
        self.writes = 0

    def step(self):
        size = len(self.model)
        off = self.rng.randrange(size // 4096) * 4096
        n = 4096 * self.rng.randint(1, 4)
        n = min(n, size - off)
        data = (b"W%08d@%012d" % (self.writes, off)).ljust(64, b".") * (n // 64)
        self.h.pwrite(data, off)
        self.model[off:off + n] = data
        self.writes += 1
        roff = self.rng.randrange(size // 4096) * 4096
        got = self.h.pread(4096, roff)
        if got != bytes(self.model[roff:roff + 4096]):
            raise AssertionError("read at %d differs from what the host wrote over the source" % roff)

    def close(self):
        self.h.flush()
        self.h.shutdown()


class ImportTest(unittest.TestCase):
    def setUp(self):
        self.wd = Workdir()
        self.d = Daemon(self.wd.path, [("vol0", 16 * MiB)], extra_config="").start()
        self.state = self.wd.join("site-a-state")
        self.kits = []

    def tearDown(self):
        outcome = getattr(self, "_outcome", None)
        failed = outcome is not None and not outcome.success
        if failed:
            print("tandemd log (tail):\n" + self.d.log()[-5000:], file=sys.stderr)
        for k in self.kits:
            k.stop()
        if self.d.proc is not None:
            self.assertEqual(self.d.stop(), 0, self.d.log()[-6000:])
        self.wd.__exit__(None, None, None)

    # -- helpers ---------------------------------------------------------------------------

    def kit(self, name, plugin_args, filters=(), params=(), **kw):
        k = Nbdkit(self.wd, name, plugin_args, filters, params, **kw).start()
        self.kits.append(k)
        return k

    def body(self, uri, vid="imp0", **extra):
        b = {"name": "migrate-" + vid, "source": {"uri": uri},
             "volume": {"id": vid, "path": self.wd.join(vid + ".img"), "nbd_socket": self.wd.join(vid + ".nbd")}}
        b.update(extra)
        return b

    def vuri(self, vid):
        return "nbd+unix:///%s?socket=%s" % (vid, self.wd.join(vid + ".nbd"))

    def create(self, body, status=201):
        code, payload = self.d.api("POST", "/api/rest/import_session", json.dumps(body))
        self.assertEqual(code, status, payload)
        return payload

    def get(self, iid):
        code, payload = self.d.api("GET", "/api/rest/import_session/" + iid)
        self.assertEqual(code, 200, payload)
        return payload

    def act(self, iid, verb, body=None, status=204):
        code, payload = self.d.api("POST", "/api/rest/import_session/%s/%s" % (iid, verb),
                                   json.dumps(body) if body is not None else None)
        self.assertEqual(code, status, (verb, payload))
        return payload

    def wait_state(self, iid, state, timeout_s=120):
        wait_until(lambda: self.get(iid)["state"] == state, "import %s to be %s (now %s)"
                   % (iid, state, self.get(iid)["state"]), timeout_s=timeout_s, interval_s=0.1)

    def error(self, method, path, status, body=None):
        code, payload = self.d.api(method, path, body)
        self.assertEqual(code, status, (method, path, body, payload))
        m = payload["messages"][0]
        self.assertTrue(m["code"].startswith("0xE") and m["message_l10n"], m)
        return m["message_l10n"]

    def volume_ids(self):
        code, vols = self.d.api("GET", "/api/rest/volume")
        self.assertEqual(code, 200, vols)
        return sorted(v["id"] for v in vols)

    def read_all(self, uri, size):
        h = nbd.NBD()
        h.connect_uri(uri)
        out = bytearray()
        for off in range(0, size, 4 * MiB):
            out += h.pread(min(4 * MiB, size - off), off)
        h.shutdown()
        return bytes(out)

    def file_bytes(self, path):
        with open(path, "rb") as f:
            return f.read()

    def assert_same(self, got, want, what):
        if got != want:
            first = next(i for i in range(min(len(got), len(want))) if got[i] != want[i]) \
                if len(got) == len(want) else min(len(got), len(want))
            self.fail("%s differs from what the host wrote over the source, first at byte %d" % (what, first))

    # -- tests -----------------------------------------------------------------------------

    def test_migrate_with_writer_then_cutover(self):
        src = self.wd.join("source.img")
        model = make_source(src, SIZE, SEED, [(0, 8 * MiB), (20 * MiB, 2 * MiB), (60 * MiB, 4 * MiB)])
        k = self.kit("src", ["file", src])
        # 3 MiB/s over 14 MiB of data: the writer runs through the whole copy.
        imp = self.create(self.body(k.uri(), rate_limit=3 * MiB))
        iid = imp["id"]
        self.assertTrue(iid)
        self.assertEqual(imp["source"], {"uri": "nbd+unix:///", "size": SIZE})
        self.assertEqual(imp["type"], "Non_Disruptive")
        self.assertIn(imp["state"], ("Queued", "Copy_In_Progress"))
        self.assertIn("imp0", self.volume_ids())
        w = Writer(self.vuri("imp0"), model, SEED + 1)
        seen_rates = False
        while self.get(iid)["state"] == "Copy_In_Progress" or w.writes < 20:
            w.step()
            if w.writes % 10 == 0:
                cur = self.get(iid)
                if cur["state"] == "Copy_In_Progress" and cur["current_transfer_rate"]:
                    seen_rates = True
                    self.assertGreater(cur["progress_percentage"], 0)
            self.assertLess(w.writes, 20000, "the copy does not end")
        w.close()
        self.wait_state(iid, "Ready_For_Cutover")
        self.assertTrue(seen_rates, "no transfer rate was shown during the copy")
        imp = self.get(iid)
        self.assertEqual(imp["restart_address"], {"offset": SIZE})
        # Blocks the host wrote before the copy got there were not copied.
        self.assertLessEqual(imp["copied_bytes"] + imp["skipped_bytes"], SIZE, imp)
        self.assertGreaterEqual(imp["copied_bytes"] + imp["skipped_bytes"], SIZE - w.writes * 16384, imp)
        self.assertGreaterEqual(imp["skipped_bytes"], 40 * MiB, imp)
        self.assertEqual(imp["data_connection_state"], "Connected")
        self.assert_same(self.read_all(self.vuri("imp0"), SIZE), bytes(model), "the tandem volume")
        self.assert_same(self.file_bytes(src), bytes(model), "the source")
        # Cutover; the volume is ordinary; a later write does not reach the source.
        self.act(iid, "cutover")
        self.wait_state(iid, "Import_Completed")
        h = nbd.NBD()
        h.connect_uri(self.vuri("imp0"))
        h.pwrite(b"\xee" * 4096, 0)
        h.flush()
        h.shutdown()
        self.assertNotEqual(self.file_bytes(src)[:4096], b"\xee" * 4096)
        self.assertEqual(self.get(iid)["data_connection_state"], "Not_Applicable")
        # Metrics per import.
        code, metrics = self.d.api("GET", "/metrics")
        self.assertIn('tandem_import_state{import="%s",state="Import_Completed"} 1' % iid, metrics)
        # The record survives a restart; then it can be deleted.
        self.assertEqual(self.d.stop(), 0, self.d.log()[-4000:])
        self.d.start()
        self.assertEqual(self.get(iid)["state"], "Import_Completed")
        self.assertIn("imp0", self.volume_ids())
        code, _ = self.d.api("DELETE", "/api/rest/import_session/" + iid)
        self.assertEqual(code, 204)
        self.error("GET", "/api/rest/import_session/" + iid, 404)

    def test_cancel_goes_back_to_the_source(self):
        src = self.wd.join("source.img")
        model = make_source(src, SIZE, SEED + 2, [(0, 16 * MiB)])
        k = self.kit("src", ["file", src])
        imp = self.create(self.body(k.uri(), rate_limit=4 * MiB))
        iid = imp["id"]
        w = Writer(self.vuri("imp0"), model, SEED + 3)
        for _ in range(300):
            w.step()
        w.close()
        self.assertEqual(self.get(iid)["state"], "Copy_In_Progress")
        # Not in this state.
        self.error("POST", "/api/rest/import_session/%s/cutover" % iid, 422)
        self.error("POST", "/api/rest/import_session/%s/resume" % iid, 422)
        self.error("DELETE", "/api/rest/import_session/" + iid, 422)
        self.act(iid, "cancel", {"force": False})
        self.wait_state(iid, "Cancelled")
        wait_until(lambda: "imp0" not in self.volume_ids(), "the cancelled import's volume to go")
        self.assertFalse(os.path.exists(self.wd.join("imp0.img")))
        self.assert_same(self.file_bytes(src), bytes(model), "the source after cancel")
        self.error("POST", "/api/rest/import_session/%s/pause" % iid, 422)
        code, _ = self.d.api("DELETE", "/api/rest/import_session/" + iid)
        self.assertEqual(code, 204)

    def test_pause_and_resume_from_the_restart_address(self):
        src = self.wd.join("source.img")
        model = make_source(src, SIZE, SEED + 4, [(0, 24 * MiB)])
        k = self.kit("src", ["file", src])
        iid = self.create(self.body(k.uri(), rate_limit=8 * MiB))["id"]
        wait_until(lambda: self.get(iid)["restart_address"]["offset"] >= 4 * MiB, "the copy to get going",
                   timeout_s=60, interval_s=0.1)
        self.act(iid, "pause")
        self.assertEqual(self.get(iid)["state"], "Paused")
        self.error("POST", "/api/rest/import_session/%s/pause" % iid, 422)
        time.sleep(0.5)  # chunks in flight land
        at = self.get(iid)["restart_address"]["offset"]
        copied = self.get(iid)["copied_bytes"]
        time.sleep(1.5)
        self.assertEqual(self.get(iid)["restart_address"]["offset"], at)
        self.assertEqual(self.get(iid)["copied_bytes"], copied)
        self.assertIsNone(self.get(iid)["current_transfer_rate"])
        self.assertLess(at, SIZE)
        self.act(iid, "resume")
        self.wait_state(iid, "Ready_For_Cutover")
        imp = self.get(iid)
        # Nothing was copied twice: copied + skipped is the volume exactly.
        self.assertEqual(imp["copied_bytes"] + imp["skipped_bytes"], SIZE, imp)
        self.assert_same(self.read_all(self.vuri("imp0"), SIZE), bytes(model), "the tandem volume")

    def test_source_killed_then_back(self):
        src = self.wd.join("source.img")
        model = make_source(src, SIZE, SEED + 5, [(0, 32 * MiB)])
        k = self.kit("src", ["file", src])
        iid = self.create(self.body(k.uri(), rate_limit=8 * MiB))["id"]
        wait_until(lambda: self.get(iid)["restart_address"]["offset"] >= 2 * MiB, "the copy to get going",
                   timeout_s=60, interval_s=0.1)
        k.stop(signal.SIGKILL)
        h = nbd.NBD()
        h.connect_uri(self.vuri("imp0"))
        # Writes go on (acknowledged on tandem's volume, recorded as missing at the source).
        h.pwrite(b"\x5a" * 8192, 40 * MiB)
        h.flush()
        model[40 * MiB:40 * MiB + 8192] = b"\x5a" * 8192
        wait_until(lambda: self.get(iid)["data_connection_state"] == "Disconnected", "the import to notice")
        imp = self.get(iid)
        self.assertEqual(imp["error_code"], "source_unreachable", imp)
        self.assertTrue(imp["error_message"])
        self.assertGreaterEqual(imp["source_missing_blocks"], 2)
        # A block not yet copied cannot be read.
        with self.assertRaises(nbd.Error) as ctx:
            h.pread(4096, 50 * MiB)
        self.assertEqual(ctx.exception.errno, "EIO")
        # What was written reads back.
        self.assertEqual(h.pread(8192, 40 * MiB), b"\x5a" * 8192)
        h.shutdown()
        k.start()
        self.wait_state(iid, "Ready_For_Cutover", timeout_s=180)
        imp = self.get(iid)
        self.assertEqual(imp["source_missing_blocks"], 0, imp)
        self.assertIsNone(imp["error_code"], imp)
        self.assert_same(self.read_all(self.vuri("imp0"), SIZE), bytes(model), "the tandem volume")
        self.assert_same(self.file_bytes(src), bytes(model), "the source")

    def test_tandemd_killed_during_the_copy(self):
        src = self.wd.join("source.img")
        size = 256 * MiB
        model = make_source(src, size, SEED + 6, [(0, 200 * MiB)])
        log = self.wd.join("nbdkit.log")
        k = self.kit("src", ["file", src], filters=["--filter=log"], params=["logfile=" + log])
        iid = self.create(self.body(k.uri(), rate_limit=20 * MiB))["id"]
        rng = random.Random(SEED + 7)
        kills = 3
        for i in range(kills):
            w = Writer(self.vuri("imp0"), model, SEED + 10 + i)
            deadline = time.monotonic() + rng.uniform(0.5, 2.5)
            while time.monotonic() < deadline:
                w.step()
            # Acknowledged writes: model has them. SIGKILL now, with no flush of our own.
            self.d.kill()
            self.d.start()
            st = self.get(iid)
            self.assertIn(st["state"], ("Copy_In_Progress", "Queued"), st)
            # What the host read and wrote is still what it reads.
            w2 = Writer(self.vuri("imp0"), model, SEED + 20 + i)
            for _ in range(50):
                w2.step()
            w2.close()
        self.wait_state(iid, "Ready_For_Cutover", timeout_s=300)
        self.assert_same(self.read_all(self.vuri("imp0"), size), bytes(model), "the tandem volume")
        self.assert_same(self.file_bytes(src), bytes(model), "the source")
        # Bytes read from the source more than once, per 4 KiB block: a block is read once (by the
        # copy, or by a host read that keeps it) unless a crash lost that it was read.
        counts = bytearray(size // 4096)
        with open(log) as f:
            for line in f:
                m = re.search(r" Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)", line)
                if m:
                    off, n = int(m.group(1), 16), int(m.group(2), 16)
                    for b in range(off // 4096, (off + n + 4095) // 4096):
                        counts[b] = min(255, counts[b] + 1)
        again = sum(c - 1 for c in counts if c > 1) * 4096
        read_once = sum(1 for c in counts if c > 0) * 4096
        # The log was read: the reads cover most of the source's data.
        self.assertGreaterEqual(read_once, 100 * MiB, "the source's log shows %d bytes read" % read_once)
        print("import kill test: %d kills, %.1f MiB read again from the source (%.2f%% of %d MiB)"
              % (kills, again / MiB, 100.0 * again / size, size // MiB), file=sys.stderr)
        self.assertLess(again, size // 100 * kills, "re-copied %d bytes" % again)

    def test_sparse_and_memory_and_qemu_nbd_sources(self):
        # sparse-random: 16 GiB with about 1 GiB of data in runs, imported at the speed of its
        # data: only the extents its block status calls data are read.
        k = self.kit("sparse", ["sparse-random", "16G", "percent=5", "seed=7"])
        data = runs = 0
        for line in run(["nbdinfo", "--map", k.uri()]).stdout.splitlines():
            off, n, kind = line.split()[:3]
            if int(kind) == 0:
                data += int(n)
                runs += 1
        self.assertGreater(data, 512 * MiB)
        iid = self.create(self.body(k.uri(), vid="sp0", automatic_cutover=True))["id"]
        self.wait_state(iid, "Import_Completed", timeout_s=600)
        imp = self.get(iid)
        self.assertEqual(imp["copied_bytes"] + imp["skipped_bytes"], 16 * 1024 * MiB, imp)
        self.assertEqual(imp["copied_bytes"], data, (runs, imp))  # its runs are whole blocks
        # Equal to the source, byte for byte: the source copied to a sparse file by nbdcopy,
        # then qemu-img compare, which skips what is a hole in both.
        copy = self.wd.join("sparse-copy.img")
        run(["nbdcopy", k.uri(), copy], timeout=600)
        out = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", copy, self.wd.join("sp0.img")],
                  check=False, timeout=600)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        os.unlink(copy)
        # qemu-nbd serving a raw file.
        raw = self.wd.join("qemu.img")
        model = make_source(raw, 32 * MiB, SEED + 8, [(4 * MiB, 8 * MiB)])
        qsock = self.wd.join("qemu.sock")
        q = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", qsock, "--cache=none", "--aio=threads", "-t", raw],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: os.path.exists(qsock), "qemu-nbd to listen")
            iid = self.create(self.body("nbd+unix:///?socket=" + qsock, vid="q0"))["id"]
            self.wait_state(iid, "Ready_For_Cutover")
            self.assert_same(self.read_all(self.vuri("q0"), 32 * MiB), bytes(model), "the volume from qemu-nbd")
            self.act(iid, "cutover")
            self.wait_state(iid, "Import_Completed")
        finally:
            q.terminate()
            q.wait(timeout=30)
        # nbdkit memory: an empty source, all holes.
        km = self.kit("mem", ["memory", "16M"])
        iid = self.create(self.body(km.uri(), vid="m0"))["id"]
        self.wait_state(iid, "Ready_For_Cutover")
        self.assertEqual(self.get(iid)["skipped_bytes"], 16 * MiB)

    def tls_dirs(self):
        """x509 files as nbdkit and libnbd read them: a server directory (a certificate for
        127.0.0.1 signed by the test CA), a client directory (site-b, same CA) and a client
        directory whose certificate another CA signed."""
        pki = make_certs(self.wd.join("pki"))
        j = lambda *p: os.path.join(pki, *p)  # noqa: E731
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", j("lo.key")])
        run(["openssl", "req", "-new", "-key", j("lo.key"), "-subj", "/CN=localhost", "-out", j("lo.csr")])
        with open(j("lo.ext"), "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run(["openssl", "x509", "-req", "-in", j("lo.csr"), "-CA", j("ca.crt"), "-CAkey", j("ca.key"),
             "-CAcreateserial", "-days", "30", "-sha256", "-extfile", j("lo.ext"), "-out", j("lo.crt")])
        dirs = {}
        for name, files in (("server", {"ca-cert.pem": "ca.crt", "server-cert.pem": "lo.crt", "server-key.pem": "lo.key"}),
                            ("client", {"ca-cert.pem": "ca.crt", "client-cert.pem": "site-b.crt",
                                        "client-key.pem": "site-b.key"}),
                            ("stranger", {"ca-cert.pem": "ca.crt", "client-cert.pem": "other-site-b.crt",
                                          "client-key.pem": "other-site-b.key"})):
            d = self.wd.join("tls-" + name)
            os.mkdir(d, 0o700)
            for dst, src in files.items():
                with open(j(src), "rb") as fi, open(os.path.join(d, dst), "wb") as fo:
                    fo.write(fi.read())
            dirs[name] = d
        return dirs

    def test_nbds_source_with_client_certificates(self):
        # nbdkit requiring TLS and a client certificate from its CA, on TCP loopback.
        tls = self.tls_dirs()
        src = self.wd.join("source.img")
        model = make_source(src, 16 * MiB, SEED + 12, [(0, 3 * MiB), (9 * MiB, MiB)])
        port = free_port()
        self.kit("tls", ["file", src], port=port,
                 options=["--tls=require", "--tls-certificates=" + tls["server"], "--tls-verify-peer"])
        base = "nbds://127.0.0.1:%d/" % port
        before = self.volume_ids()
        # Refused, nothing created: no TLS at all; a client certificate another CA signed.
        msg = self.error("POST", "/api/rest/import_session", 422,
                         json.dumps(self.body("nbd://127.0.0.1:%d/" % port, vid="t0")))
        self.assertIn("Import not created", msg)
        self.assertEqual(msg.count("nbd://127.0.0.1"), 1, msg)
        msg = self.error("POST", "/api/rest/import_session", 422,
                         json.dumps(self.body(base + "?tls-certificates=" + tls["stranger"], vid="t0")))
        self.assertEqual(msg.count(base), 1, msg)
        self.assertNotIn("tls-certificates", msg)
        self.assertEqual(self.volume_ids(), before)
        # Accepted: the copy runs over TLS while the host writes; the URI is shown without its query.
        imp = self.create(self.body(base + "?tls-certificates=" + tls["client"], vid="t0", rate_limit=4 * MiB))
        iid = imp["id"]
        self.assertEqual(imp["source"], {"uri": base, "size": 16 * MiB})
        w = Writer(self.vuri("t0"), model, SEED + 13)
        for _ in range(100):
            w.step()
        w.close()
        self.wait_state(iid, "Ready_For_Cutover")
        self.assertEqual(self.get(iid)["data_connection_state"], "Connected")
        self.assert_same(self.read_all(self.vuri("t0"), 16 * MiB), bytes(model), "the volume imported over TLS")
        self.assert_same(self.file_bytes(src), bytes(model), "the TLS source")
        self.act(iid, "cutover")
        self.wait_state(iid, "Import_Completed")

    def test_bad_input(self):
        src = self.wd.join("source.img")
        make_source(src, SIZE, SEED + 9, [(0, MiB)])
        k = self.kit("src", ["file", src])
        before = self.volume_ids()
        files = sorted(os.listdir(self.wd.path))

        def refused(body, status, text=None):
            msg = self.error("POST", "/api/rest/import_session",
                             status, body if isinstance(body, str) else json.dumps(body))
            if text:
                self.assertIn(text, msg)
            return msg

        refused(self.body("nbd://127.0.0.1:1/x"), 422, "Import not created")
        refused(self.body("nbd+unix:///?socket=" + self.wd.join("nobody.sock")), 422)
        refused(self.body(k.uri(), vid="vol0") | {"volume": {"id": "vol0"}}, 422, "bytes")  # 16 MiB vs 64 MiB
        refused("{", 400)
        refused("[]", 400)
        refused(self.body(k.uri()) | {"colour": 1}, 400, "colour")
        refused(self.body(k.uri()) | {"rate_limit": -1}, 400, "rate_limit")
        refused(self.body(k.uri()) | {"automatic_cutover": "yes"}, 400, "automatic_cutover")
        refused(self.body(k.uri()) | {"scheduled_timestamp": "tomorrow"}, 400, "scheduled_timestamp")
        refused({"name": "x", "volume": {"id": "a"}}, 400, "source")
        refused(self.body(k.uri()) | {"source": {"uri": k.uri(), "user": "x"}}, 400, "user")
        b = self.body(k.uri())
        b["volume"]["size"] = SIZE
        refused(b, 400, "size")
        b = self.body(k.uri())
        b["volume"]["path"] = "relative.img"
        refused(b, 400)
        refused(self.body(k.uri()) | {"name": "bad name!"}, 400, "name")
        self.assertEqual(self.volume_ids(), before)
        self.assertEqual(sorted(os.listdir(self.wd.path)), files)
        code, lst = self.d.api("GET", "/api/rest/import_session")
        self.assertEqual((code, lst), (200, []))
        self.error("GET", "/api/rest/import_session/imp-nope", 404)
        self.error("POST", "/api/rest/import_session/imp-nope/pause", 404)
        self.error("POST", "/api/rest/import_session/imp-nope/explode", 404)
        # A scheduled import waits for its time; cancel from Scheduled.
        iid = self.create(self.body(k.uri()) | {"scheduled_timestamp": "2099-01-01T00:00:00Z"})["id"]
        imp = self.get(iid)
        self.assertEqual(imp["state"], "Scheduled")
        self.assertEqual(imp["scheduled_timestamp"], "2099-01-01T00:00:00.000Z")
        self.error("POST", "/api/rest/import_session/%s/cancel" % iid, 400, json.dumps({"force": "yes"}))
        self.error("POST", "/api/rest/import_session/%s/pause" % iid, 422)
        self.act(iid, "cancel", {"force": True})
        self.wait_state(iid, "Cancelled")
        self.assertTrue(self.d.proc.poll() is None)

    def test_ext4_through_nbdfuse_during_the_copy(self):
        src = self.wd.join("source.img")
        with open(src, "wb") as f:
            f.truncate(SIZE)
        run(["mkfs.ext4", "-q", "-F", src])
        k = self.kit("src", ["file", src])
        for finish in ("cutover", "cancel"):
            vid = "fs-" + finish
            iid = self.create(self.body(k.uri(), vid=vid, rate_limit=256 * 1024))["id"]
            mnt = self.wd.join("fuse-" + finish)
            fsdir = self.wd.join("fs-" + finish)
            os.mkdir(mnt)
            os.mkdir(fsdir)
            fuse = subprocess.Popen(["nbdfuse", os.path.join(mnt, "disk"), "--unix", self.wd.join(vid + ".nbd")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            loop = None
            mounted = False
            try:
                wait_until(lambda: os.path.exists(os.path.join(mnt, "disk")), "nbdfuse to mount")
                loop = run(["losetup", "--find", "--show", "--direct-io=on", os.path.join(mnt, "disk")]).stdout.strip()
                run(["mount", loop, fsdir])
                mounted = True
                self.assertEqual(self.get(iid)["state"], "Copy_In_Progress")
                for i in range(40):
                    with open(os.path.join(fsdir, "f%d" % i), "wb") as f:
                        f.write(os.urandom(64 * 1024))
                run(["umount", fsdir])
                mounted = False
            finally:
                if mounted:
                    run(["umount", "-l", fsdir], check=False)
                if loop:
                    run(["losetup", "-d", loop], check=False)
                run(["fusermount3", "-u", mnt], check=False)
                fuse.wait(timeout=30)
            if finish == "cutover":
                self.wait_state(iid, "Ready_For_Cutover", timeout_s=180)
                self.act(iid, "cutover")
                self.wait_state(iid, "Import_Completed")
                img = self.wd.join(vid + "-copy.img")
                run(["nbdcopy", self.vuri(vid), img])
                run(["e2fsck", "-fn", img])
            else:
                self.act(iid, "cancel")
                self.wait_state(iid, "Cancelled")
                k.stop()
                run(["e2fsck", "-fn", src])
                k.start()


    def test_one_copy_at_a_time_and_a_start_time(self):
        # max_concurrent_imports = 1: a second import waits Queued (its volume usable all the
        # same) until the first no longer holds the slot; a third waits for its start time.
        self.assertEqual(self.d.stop(), 0)
        self.d.base_config = self.d.base_config.replace('log_level = "debug"',
                                                        'log_level = "debug"\nmax_concurrent_imports = 1')
        self.d.write_config()
        self.d.start()
        src = self.wd.join("source.img")
        model = make_source(src, SIZE, SEED + 14, [(0, 12 * MiB)])
        k = self.kit("src", ["file", src])
        first = self.create(self.body(k.uri(), vid="q1", rate_limit=4 * MiB))["id"]
        second = self.create(self.body(k.uri(), vid="q2"))["id"]
        self.assertEqual(self.get(first)["state"], "Copy_In_Progress")
        self.assertEqual(self.get(second)["state"], "Queued")
        # The queued import's volume serves the host already (reads come from the source).
        h = nbd.NBD()
        h.connect_uri(self.vuri("q2"))
        self.assertEqual(h.pread(4096, 8 * MiB), bytes(model[8 * MiB:8 * MiB + 4096]))
        h.shutdown()
        # A paused import keeps its slot.
        self.act(first, "pause")
        time.sleep(1.5)
        self.assertEqual(self.get(second)["state"], "Queued")
        self.act(first, "resume")
        self.wait_state(first, "Ready_For_Cutover")
        self.wait_state(second, "Ready_For_Cutover", timeout_s=60)
        # A start time a few seconds ahead: Scheduled, then it copies by itself.
        when = time.gmtime(time.time() + 3)
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", when)
        third = self.create(self.body(k.uri(), vid="q3") | {"scheduled_timestamp": at})["id"]
        self.assertEqual(self.get(third)["state"], "Scheduled")
        self.wait_state(third, "Ready_For_Cutover", timeout_s=60)
        self.assert_same(self.read_all(self.vuri("q3"), SIZE), bytes(model), "the scheduled import's volume")

    # tandemctl's import verbs against the same daemon.
    def ctl(self, *args, check=True):
        import harness
        ctl = os.path.join(os.path.dirname(harness.TANDEMD), "tandemctl")
        p = subprocess.run([ctl, "--socket", self.d.api_socket(), *args], capture_output=True, text=True, timeout=300)
        if check and p.returncode != 0:
            self.fail("tandemctl %s: %d\n%s%s" % (" ".join(args), p.returncode, p.stdout, p.stderr))
        return p

    def test_tandemctl_import_verbs(self):
        src = self.wd.join("source.img")
        model = make_source(src, SIZE, SEED + 11, [(0, 6 * MiB)])
        k = self.kit("src", ["file", src])
        p = self.ctl("import", "create", "mig1", "--source", k.uri(), "--volume", "c0", "--path",
                     self.wd.join("c0.img"), "--nbd-socket", self.wd.join("c0.nbd"), "--rate-limit", "2MiB", "--wait")
        # Without a terminal: one line per change, with the percentage and an ETA, then the end.
        self.assertRegex(p.stdout, r"Copy_In_Progress \d+% \(ETA ")
        self.assertIn("Ready_For_Cutover", p.stdout)
        lst = json.loads(self.ctl("import", "list", "--json").stdout)
        self.assertEqual(len(lst), 1)
        iid = lst[0]["id"]
        self.assertIn("mig1", self.ctl("import", "list").stdout)
        self.assertIn("restart_address:", self.ctl("import", "show", iid).stdout)
        # A refused action exits 1 with the daemon's message.
        r = self.ctl("import", "pause", iid, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("Ready_For_Cutover", r.stderr)
        self.assertIn("Import_Completed", self.ctl("import", "cutover", iid, "--wait").stdout)
        self.assert_same(self.read_all(self.vuri("c0"), SIZE), bytes(model), "the imported volume")
        self.ctl("import", "delete", iid)
        self.assertEqual(json.loads(self.ctl("import", "list", "--json").stdout), [])
        r = self.ctl("import", "create", "bad", "--source", k.uri(), "--volume", "c1", "--rate-limit", "lots",
                     check=False)
        self.assertEqual(r.returncode, 2)


class ProtectAfterImport(unittest.TestCase):
    """A volume imported on a replicating pair's source is protected by a session added with
    SIGHUP right after its cutover, while the host still uses it: the file takes the run-time
    volume over (same path and socket), a source session starts beside s-vol0, and the
    destination ends identical."""

    def test_protect_an_imported_volume_at_once(self):
        from harness import Pair, xxh128
        with Workdir() as wd:
            src = os.path.join(wd.path, "source.img")
            model = make_source(src, 16 * MiB, SEED + 12, [(0, 12 * MiB)])
            k = Nbdkit(wd, "src", ["file", src]).start()
            p = Pair(wd.path, 8 * MiB).start()
            try:
                wait_until(lambda: p.b.session()["state"] == "OK", "s-vol0 OK")
                sock = p.a.socket("imp1")
                body = {"name": "m", "source": {"uri": k.uri()},
                        "volume": {"id": "imp1", "path": p.a.image("imp1"), "nbd_socket": sock}}
                code, imp = p.a.api("POST", "/api/rest/import_session", json.dumps(body))
                self.assertEqual(code, 201, imp)
                # The host uses the volume from here on.
                w = Writer(p.a.uri("imp1"), model, SEED + 13)
                for _ in range(100):
                    w.step()
                wait_until(lambda: p.a.api("GET", "/api/rest/import_session/" + imp["id"])[1]["state"]
                           == "Ready_For_Cutover", "the import to be copied", timeout_s=120)
                code, _ = p.a.api("POST", "/api/rest/import_session/%s/cutover" % imp["id"])
                self.assertEqual(code, 204)
                wait_until(lambda: p.a.api("GET", "/api/rest/import_session/" + imp["id"])[1]["state"]
                           == "Import_Completed", "the cutover")
                for _ in range(50):
                    w.step()
                base = {d: d.base_config + "\n" + d.extra_config for d in (p.a, p.b)}
                for d, role in ((p.b, "destination"), (p.a, "source")):
                    extra = ('[[volume]]\nid = "imp1"\npath = "%s"\nsize = %d\nnbd_socket = "%s"\n'
                             '[[session]]\nid = "s-imp1"\nvolumes = ["imp1"]\nremote_volumes = ["imp1"]\n'
                             'role = "%s"\nrpo_seconds = 2\n' % (d.image("imp1"), 16 * MiB, d.socket("imp1"), role))
                    n = d.log().count("applied session s-imp1 (added)")
                    with open(d.config, "w") as f:
                        f.write(base[d] + "\n" + extra + "\n")
                    d.proc.send_signal(signal.SIGHUP)
                    wait_until(lambda: d.log().count("applied session s-imp1 (added)") > n,
                               "SIGHUP on %s adds s-imp1" % d.name)
                # The host kept writing through all of it.
                for _ in range(50):
                    w.step()
                w.close()
                # A sync is taken once the initial copy is done (422 while Initializing; the
                # states pass through OK on a re-hello before the initial sync starts).
                wait_until(lambda: p.a.api("POST", "/api/rest/replication_session/s-imp1/sync")[0] == 204,
                           "s-imp1 to take a sync", timeout_s=120, interval_s=0.2)
                wait_until(lambda: xxh128(p.a.image("imp1")) == xxh128(p.b.image("imp1"))
                           and p.b.session("s-imp1")["state"] == "OK", "imp1 identical on both sites", timeout_s=120)
                with open(p.b.image("imp1"), "rb") as f:
                    self.assertEqual(f.read(), bytes(model))
                self.assertNotIn("imp1", open(os.path.join(wd.path, "site-a-state", "volumes.toml")).read())
            except BaseException:
                for d in (p.a, p.b):
                    print("--- %s:\n%s" % (d.name, d.log()[-4000:]), file=sys.stderr)
                raise
            finally:
                rcs = p.stop()
                k.stop()
            self.assertEqual(rcs, [0, 0])


if __name__ == "__main__":
    unittest.main(verbosity=2)
