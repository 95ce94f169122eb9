#!/usr/bin/python3
"""Plan: volumes created and removed at run time, on a real tandemd, used by real NBD clients.

- Lifecycle: POST /api/rest/volume creates a file-backed volume and exports it at once (201, the
  volume object); libnbd writes and reads it; DELETE is refused while that client is connected;
  the volume survives a clean restart and a SIGKILL right after it was created (it was kept
  before the answer), with its data; DELETE then removes the export and keeps the data, and the
  volume is not back after a restart; created again over the same file without a size, it opens
  the file as it is.
- SIGHUP: a [[volume]] added to the file is opened and exported, one removed is withdrawn, but
  not while an NBD client uses it (named, kept); one that collides with a run-time volume is
  refused by name; added back, it has its data.
- Refusals, each a clear error_response, nothing created or changed, the daemon up: a body that
  is not JSON, not an object, with an unknown key, a relative path, an id or path or socket of
  another volume, no size for a file that does not exist (no metadata left behind), deleting a
  volume of the configuration file or one that does not exist.
"""
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from harness import Daemon, Workdir, wait_until  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20


class RuntimeVolumes(unittest.TestCase):
    def setUp(self):
        self.wd = Workdir()
        self.d = Daemon(self.wd.path, [("vol0", 8 * MiB)]).start()
        self.state = os.path.join(self.wd.path, "site-a-state")

    def tearDown(self):
        if self.d.proc is not None:
            self.assertEqual(self.d.stop(), 0, self.d.log())
        self.wd.__exit__(None, None, None)

    def body(self, vid, size=None, **extra):
        b = {"id": vid, "path": os.path.join(self.wd.path, vid + ".img"),
             "nbd_socket": os.path.join(self.wd.path, vid + ".nbd")}
        if size is not None:
            b["size"] = size
        b.update(extra)
        return b

    def create(self, body, status=201):
        import json
        code, payload = self.d.api("POST", "/api/rest/volume", json.dumps(body))
        self.assertEqual(code, status, payload)
        return payload

    def ids(self):
        code, vols = self.d.api("GET", "/api/rest/volume")
        self.assertEqual(code, 200, vols)
        return sorted(v["id"] for v in vols)

    def error(self, method, path, status, body=None, content_type="application/json"):
        code, payload = self.d.api(method, path, body, content_type)
        self.assertEqual(code, status, (method, path, body, payload))
        m = payload["messages"][0]
        self.assertTrue(m["code"].startswith("0xE") and m["message_l10n"], m)
        return m["message_l10n"]

    def restart(self, kill=False):
        if kill:
            self.d.kill()
        else:
            self.assertEqual(self.d.stop(), 0, self.d.log())
        self.d.start()

    def connect(self, vid):
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///%s?socket=%s" % (vid, os.path.join(self.wd.path, vid + ".nbd")))
        return h

    def test_create_use_restart_delete(self):
        v = self.create(self.body("db0", "16MiB"))
        self.assertEqual(v["id"], "db0")
        self.assertEqual(v["size"], 16 * MiB)
        self.assertEqual(v["access"], "read-write")
        self.assertEqual(v["backing"], os.path.join(self.wd.path, "db0.img"))
        self.assertIsNone(v["replication_session_id"])
        self.assertEqual(v["exports"], ["nbd+unix:///db0?socket=" + os.path.join(self.wd.path, "db0.nbd")])
        self.assertEqual(self.ids(), ["db0", "vol0"])

        pattern = bytes(range(256)) * 16 * 64  # 256 KiB
        h = self.connect("db0")
        self.assertEqual(h.get_size(), 16 * MiB)
        h.pwrite(pattern, 3 * MiB)
        h.flush()
        msg = self.error("DELETE", "/api/rest/volume/db0", 422)
        self.assertIn("NBD client", msg)
        h.shutdown()
        del h

        # Kept before it was answered: a SIGKILL now loses nothing; then a clean restart.
        self.restart(kill=True)
        self.assertEqual(self.ids(), ["db0", "vol0"])
        self.restart()
        self.assertIn("created at run time", self.d.log())
        h = self.connect("db0")
        self.assertEqual(h.pread(len(pattern), 3 * MiB), pattern)
        h.shutdown()
        del h

        code, _ = self.d.api("DELETE", "/api/rest/volume/db0")
        self.assertEqual(code, 204)
        self.assertEqual(self.ids(), ["vol0"])
        self.error("GET", "/api/rest/volume/db0", 404)
        wait_until(lambda: not os.path.exists(os.path.join(self.wd.path, "db0.nbd")), "the export's socket to go")
        self.assertTrue(os.path.exists(os.path.join(self.wd.path, "db0.img")), "the data went with the volume")
        self.restart()
        self.assertEqual(self.ids(), ["vol0"])

        # Over the same file, no size: the file as it is.
        v = self.create(self.body("db0"))
        self.assertEqual(v["size"], 16 * MiB)
        h = self.connect("db0")
        self.assertEqual(h.pread(len(pattern), 3 * MiB), pattern)
        h.shutdown()

    def test_refusals_change_nothing(self):
        import json
        before = self.ids()
        self.assertIn("not valid JSON", self.error("POST", "/api/rest/volume", 400, "{nope"))
        self.assertIn("JSON object", self.error("POST", "/api/rest/volume", 400, "[1]"))
        self.assertIn("must be JSON", self.error("POST", "/api/rest/volume", 400, "x", content_type="text/plain"))
        cases = [
            (self.body("db1", "1MiB", colour="red"), "unknown key 'colour'"),
            (dict(self.body("db1", "1MiB"), path="db1.img"), "absolute path"),
            (self.body("vol0", "1MiB"), "duplicate volume id"),
            (dict(self.body("db1", "1MiB"), path=self.d.image("vol0")), "path: used by another volume"),
            (dict(self.body("db1", "1MiB"), nbd_socket=self.d.socket("vol0")), "nbd_socket: used by another volume"),
            (self.body("db1", 12345), "multiple of 4096"),
        ]
        for body, expect in cases:
            msg = self.error("POST", "/api/rest/volume", 400, json.dumps(body))
            self.assertIn(expect, msg, body)
        # Valid, but the file is not there and no size says to create it: 422, nothing left.
        msg = self.error("POST", "/api/rest/volume", 422, json.dumps(self.body("db1")))
        self.assertIn("db1.img", msg)
        self.assertFalse(os.path.exists(os.path.join(self.state, "db1.meta")), "metadata left behind")
        self.assertFalse(os.path.exists(os.path.join(self.wd.path, "db1.nbd")), "a socket left behind")
        # The export cannot listen where a file is: 422, and that file, not tandem's, stays.
        precious = os.path.join(self.wd.path, "precious.txt")
        with open(precious, "w") as f:
            f.write("keep me")
        msg = self.error("POST", "/api/rest/volume", 422, json.dumps(self.body("db1", "1MiB", nbd_socket=precious)))
        self.assertIn("precious.txt", msg)
        with open(precious) as f:
            self.assertEqual(f.read(), "keep me")
        self.assertFalse(os.path.exists(os.path.join(self.wd.path, "db1.img")), "the data file it made stayed")
        self.assertFalse(os.path.exists(os.path.join(self.state, "db1.meta")), "the metadata it made stayed")
        self.assertIn("configuration file", self.error("DELETE", "/api/rest/volume/vol0", 422))
        self.error("DELETE", "/api/rest/volume/db9", 404)
        self.assertEqual(self.ids(), before)
        self.assertFalse(os.path.exists(os.path.join(self.state, "volumes.toml")), "the list written for nothing")
        # And the daemon is up and serving.
        v = self.create(self.body("db1", "1MiB"))
        self.assertEqual(v["size"], MiB)

    def test_tandemctl(self):
        import subprocess
        import harness
        ctl = os.path.join(os.path.dirname(harness.TANDEMD), "tandemctl")

        def run(*args):
            return subprocess.run([ctl, "--socket", self.d.api_socket(), *args], capture_output=True, text=True,
                                  timeout=60)
        p = run("volume", "create", "db2", "--path", os.path.join(self.wd.path, "db2.img"), "--size", "4MiB",
                "--nbd-socket", os.path.join(self.wd.path, "db2.nbd"))
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("db2", p.stdout)
        self.assertEqual(self.ids(), ["db2", "vol0"])
        p = run("volume", "create", "db3", "--path", "relative.img", "--size", "4MiB", "--nbd-socket", "/x.nbd")
        self.assertEqual(p.returncode, 1)
        self.assertIn("absolute path", p.stderr)
        p = run("volume", "delete", "vol0")
        self.assertEqual(p.returncode, 1)
        self.assertIn("configuration file", p.stderr)
        p = run("volume", "delete", "db2")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(self.ids(), ["vol0"])

    def test_sighup_adds_and_removes_configured_volumes(self):
        import signal
        base = self.d.base_config

        def reload(extra, expect):
            n = self.d.log().count(expect)
            with open(self.d.config, "w") as f:
                f.write(base + "\n" + extra + "\n")
            self.d.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: self.d.log().count(expect) > n, "SIGHUP: " + expect)

        vol1 = ('[[volume]]\nid = "vol1"\npath = "%s"\nsize = 2097152\nnbd_socket = "%s"\n'
                % (self.d.image("vol1"), self.d.socket("vol1")))
        reload(vol1, "applied volume vol1 (added)")
        self.assertEqual(self.ids(), ["vol0", "vol1"])
        h = nbd.NBD()
        h.connect_uri(self.d.uri("vol1"))
        h.pwrite(b"\x5a" * 4096, 8192)
        h.flush()
        # Taken out of the file while a client uses it: named and kept.
        reload("", "volume vol1 was removed from the file but 1 NBD client(s) are connected")
        self.assertEqual(self.ids(), ["vol0", "vol1"])
        self.assertEqual(h.pread(4096, 8192), b"\x5a" * 4096)
        h.shutdown()
        reload("", "applied volume vol1 (removed)")
        self.assertEqual(self.ids(), ["vol0"])
        self.assertFalse(os.path.exists(self.d.socket("vol1")))
        # A volume of the file that collides with one created at run time is refused, by name.
        self.create(self.body("db0", "1MiB"))
        clash = ('[[volume]]\nid = "vol2"\npath = "%s"\nsize = 1048576\nnbd_socket = "%s"\n'
                 % (os.path.join(self.wd.path, "db0.img"), self.d.socket("vol2")))
        reload(clash, "volume vol2 (added) not opened")
        self.assertIn("is used by volume db0", self.d.log())
        self.assertEqual(self.ids(), ["db0", "vol0"])
        # Back in the file as it was: the same data.
        reload(vol1, "applied volume vol1 (added)")
        h = nbd.NBD()
        h.connect_uri(self.d.uri("vol1"))
        self.assertEqual(h.pread(4096, 8192), b"\x5a" * 4096)
        h.shutdown()


class ReloadSessions(unittest.TestCase):
    """SIGHUP on a replicating pair: a session (and its volume) added to both files starts and
    replicates over the running link, beside the one already there; removed again, it stops on
    both sites, its volume stays exported (writable on the old destination), and the first
    session goes on."""

    def test_a_session_added_and_removed_by_sighup(self):
        import signal
        from harness import Pair, wait_identical, write_random
        with Workdir() as wd:
            p = Pair(wd.path, 8 * MiB).start()
            try:
                wait_until(lambda: p.b.session()["state"] == "OK", "s-vol0 OK")
                added = {}
                for d, role in ((p.a, "source"), (p.b, "destination")):
                    added[d] = ('[[volume]]\nid = "vol1"\npath = "%s"\nsize = 4194304\nnbd_socket = "%s"\n'
                                '[[session]]\nid = "s-vol1"\nvolumes = ["vol1"]\nremote_volumes = ["vol1"]\n'
                                'role = "%s"\nrpo_seconds = 2\n' % (d.image("vol1"), d.socket("vol1"), role))
                base = {d: d.base_config + "\n" + d.extra_config for d in (p.a, p.b)}

                def reload(d, extra, expect):
                    n = d.log().count(expect)
                    with open(d.config, "w") as f:
                        f.write(base[d] + "\n" + extra + "\n")
                    d.proc.send_signal(signal.SIGHUP)
                    wait_until(lambda: d.log().count(expect) > n, "SIGHUP on %s: %s" % (d.name, expect))

                for d in (p.b, p.a):
                    reload(d, added[d], "applied session s-vol1 (added)")
                wait_until(lambda: p.b.session("s-vol1")["state"] == "OK", "s-vol1 OK", timeout_s=120)
                write_random(p.a.uri("vol1"), 7, 4 * MiB, count=16)
                code, _ = p.a.api("POST", "/api/rest/replication_session/s-vol1/sync")
                self.assertEqual(code, 204)
                wait_identical(p, volumes=("vol0", "vol1"))
                self.assertEqual(p.a.session("s-vol0")["state"], "OK")

                for d in (p.a, p.b):
                    reload(d, added[d].split("[[session]]")[0], "applied session s-vol1 (removed)")
                for d in (p.a, p.b):
                    code, _ = d.api("GET", "/api/rest/replication_session/s-vol1")
                    self.assertEqual(code, 404)
                    code, v = d.api("GET", "/api/rest/volume/vol1")
                    self.assertEqual((code, v["access"]), (200, "read-write"))
                h = nbd.NBD()
                h.connect_uri(p.b.uri("vol1"))
                h.pwrite(b"\x11" * 4096, 0)
                h.shutdown()
                wait_until(lambda: p.b.session("s-vol0")["state"] == "OK", "s-vol0 still OK")
            except BaseException:
                for d in (p.a, p.b):
                    lines = [x for x in d.log().splitlines() if "s-vol1" in x or "SIGHUP" in x or "vol1" in x]
                    print("--- %s:\n%s" % (d.name, "\n".join(lines[-40:])), file=sys.stderr)
                raise
            finally:
                rcs = p.stop()
            self.assertEqual(rcs, [0, 0])


if __name__ == "__main__":
    unittest.main(verbosity=2)
