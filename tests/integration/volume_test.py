#!/usr/bin/python3
"""Plan: volumes created and removed at run time, on a real tandemd, used by real NBD clients.

- Lifecycle: POST /api/rest/volume creates a file-backed volume and exports it at once (201, the
  volume object); libnbd writes and reads it; DELETE is refused while that client is connected;
  the volume survives a clean restart and a SIGKILL right after it was created (it was kept
  before the answer), with its data; DELETE then removes the export and keeps the data, and the
  volume is not back after a restart; created again over the same file without a size, it opens
  the file as it is.
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


if __name__ == "__main__":
    unittest.main(verbosity=2)
