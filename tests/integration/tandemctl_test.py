#!/usr/bin/python3
"""Plan: tandemctl against two real tandemd. Tables for people (the columns and values a person
reads), --json for scripts (the daemon's objects), a refused action exits 1 with the daemon's
message_l10n on stderr, an unreachable daemon exits 3, and `sync --wait` / `failover --wait` /
`reprotect --wait` return once the session got there, printing plain progress lines when stdout
is not a terminal.
"""
import json
import os
import re
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import Pair, Workdir, wait_until  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20
TANDEMCTL = os.path.join(os.path.dirname(harness.TANDEMD), "tandemctl") if harness.TANDEMD else ""


def ctl(daemon, *args, check=True):
    p = subprocess.run([TANDEMCTL, "--socket", daemon.api_socket(), *args], capture_output=True, text=True,
                       timeout=180)
    if check and p.returncode != 0:
        raise AssertionError("tandemctl %s failed (%d): %s%s" % (" ".join(args), p.returncode, p.stdout, p.stderr))
    return p


class Tandemctl(unittest.TestCase):
    def setUp(self):
        self.wd = Workdir()
        self.pair = Pair(self.wd.path, 64 * MiB, rpo=60, a_overrides={"rate_limit": "8MiB"})

    def tearDown(self):
        rcs = self.pair.stop()
        self.wd.__exit__(None, None, None)
        self.assertTrue(all(rc == 0 for rc in rcs))

    def test_tables_json_errors_and_waits(self):
        p = self.pair.start()
        wait_until(lambda: p.a.session()["state"] == "OK" and p.b.session()["state"] == "OK", "OK", timeout_s=120)
        out = ctl(p.a, "session", "list").stdout
        self.assertRegex(out.splitlines()[0], r"^ID\s+ROLE\s+STATE\s+PEER")
        self.assertRegex(out, r"s-vol0\s+Source\s+OK\s+site-b")
        out = ctl(p.b, "session", "show", "s-vol0").stdout
        self.assertRegex(out, r"role:\s+Destination")
        self.assertRegex(out, r"volumes:\s+vol0 -> vol0")
        sessions = json.loads(ctl(p.a, "--json", "session", "list").stdout)
        self.assertEqual(sessions[0]["id"], "s-vol0")
        vols = json.loads(ctl(p.b, "--json", "volume", "list").stdout)
        self.assertEqual(vols[0]["access"], "read-only")
        self.assertRegex(ctl(p.a, "volume", "show", "vol0").stdout, r"vol0\s+64\.0 MiB\s+read-write\s+s-vol0")
        # Refused: exit 1, the daemon's message on stderr.
        r = ctl(p.a, "session", "resume", "s-vol0", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("Operation resume is not allowed when the replication session is in state OK", r.stderr)
        r = ctl(p.b, "session", "sync", "s-vol0", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("destination", r.stderr)
        r = ctl(p.a, "session", "show", "nope", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("does not exist", r.stderr)
        r = subprocess.run([TANDEMCTL, "--socket", self.wd.join("absent.sock"), "session", "list"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 3)
        self.assertIn("cannot reach tandemd", r.stderr)
        # sync --wait: 16 MiB at 8 MiB/s takes a couple of seconds; progress lines, then done.
        h = nbd.NBD()
        h.connect_uri(p.a.uri("vol0"))
        for i in range(16):
            h.pwrite(os.urandom(MiB), i * 2 * MiB)
        h.flush()
        h.shutdown()
        r = ctl(p.a, "session", "sync", "s-vol0", "--wait")
        self.assertIn("sync accepted", r.stdout)
        self.assertRegex(r.stdout, r"sync: Synchronizing \d+% \(ETA ")
        self.assertTrue(r.stdout.rstrip().endswith("sync: done, OK (Source)"), r.stdout)
        self.assertNotIn("\r", r.stdout)  # not a terminal: plain lines, no bar redrawing
        self.assertEqual(p.a.session()["lag_bytes"], 0)
        # On a terminal (script(1) gives it a pseudo-terminal): one redrawn line with a bar,
        # the percentage, the rate and the ETA.
        h = nbd.NBD()
        h.connect_uri(p.a.uri("vol0"))
        for i in range(16):
            h.pwrite(os.urandom(MiB), i * 2 * MiB + MiB)
        h.flush()
        h.shutdown()
        cmd = "%s --socket %s session sync s-vol0 --wait" % (TANDEMCTL, p.a.api_socket())
        r = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, timeout=180)
        out = r.stdout.decode(errors="replace")
        self.assertEqual(r.returncode, 0, out)
        bars = re.findall(r"\r\x1b\[Ksync: Synchronizing \[(#*)\.*\] +(\d+)%  ([\d.]+) MiB/s  ETA \S+", out)
        self.assertTrue(bars, repr(out))
        self.assertNotIn("-", "".join(b[2] for b in bars))  # a rate is never negative
        self.assertIn("sync: done, OK (Source)", out)
        # Planned failover and reprotect, each waited for.
        r = ctl(p.a, "session", "failover", "s-vol0", "--wait")
        self.assertIn("failover: done, Failed_Over (Destination)", r.stdout)
        self.assertEqual(p.b.session()["role"], "Source")
        r = ctl(p.b, "session", "reprotect", "s-vol0", "--wait")
        self.assertIn("reprotect: done, OK (Source)", r.stdout)
        r = ctl(p.a, "session", "test-start", "s-vol0")  # a is the destination now
        self.assertIn("test-start accepted", r.stdout)
        self.assertTrue(json.loads(ctl(p.a, "--json", "session", "show", "s-vol0").stdout)["failover_test_in_progress"])
        self.assertRegex(ctl(p.a, "volume", "list").stdout, r"vol0-test\s+64\.0 MiB\s+read-write")
        r = ctl(p.a, "session", "test-stop", "s-vol0")
        self.assertIn("test-stop accepted", r.stdout)
        self.assertFalse(json.loads(ctl(p.a, "--json", "session", "show", "s-vol0").stdout)["failover_test_in_progress"])
        r = ctl(p.b, "session", "failover", "s-vol0", "--reverse", "--wait")
        self.assertIn("failover: done, OK (Destination)", r.stdout)
        self.assertEqual(p.a.session()["role"], "Source")


if __name__ == "__main__":
    unittest.main(verbosity=2)
