#!/usr/bin/python3
"""Plan: tandemd as a service, driven the way systemd drives it.

- sd_notify: READY=1 only once every volume is exported and the API answers, STATUS= lines with
  the session states, WATCHDOG=1 pings from the event loop when WATCHDOG_USEC is set,
  RELOADING=1/READY=1 around a SIGHUP and STOPPING=1 on SIGTERM (a datagram socket of the test's
  own stands in for systemd's).
- SIGHUP: the rate limit, RPO and log level change at run time; a key that needs a restart is
  named and keeps its running value; a broken file is reported and changes nothing.
- Logs: "<N>" priority prefixes without timestamps when stderr is the journal's stream
  (JOURNAL_STREAM), timestamps otherwise; state changes logged once, with the session id.
- Refusals at start: a world-readable private key, a socket directory every user can write.
- SIGTERM on either site mid-transfer: acknowledged writes are all there after the restart and
  the transfer goes on from its restart address.
"""
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import Pair, Workdir, wait_until, wait_identical  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB
SID = "s-vol0"


class NotifySocket:
    """A stand-in for systemd's notification socket: collects each datagram with what the
    filesystem looked like when READY=1 arrived."""

    def __init__(self, path, ready_paths):
        self.path = path
        self.ready_paths = ready_paths
        self.messages = []  # list of dicts (one per datagram)
        self.ready_saw = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.lock = threading.Lock()
        self.done = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.done:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.lock:
                if fields.get("READY") == "1" and self.ready_saw is None:
                    self.ready_saw = {p: os.path.exists(p) for p in self.ready_paths}
                self.messages.append(fields)

    def count(self, key, value=None):
        with self.lock:
            return sum(1 for m in self.messages if key in m and (value is None or m[key] == value))

    def values(self, key):
        with self.lock:
            return [m[key] for m in self.messages if key in m]

    def index(self, key, value, start=0):
        with self.lock:
            for i in range(start, len(self.messages)):
                if self.messages[i].get(key) == value:
                    return i
        return -1

    def close(self):
        self.done = True
        self.thread.join(timeout=5)
        self.sock.close()


def write_blocks(uri, seed, count, span=SIZE, fua=False):
    """Random 4 KiB writes; returns {offset: data} of what the server acknowledged."""
    import random
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    acked = {}
    for _ in range(count):
        off = rnd.randrange(0, span // 4096) * 4096
        data = rnd.randbytes(4096)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
        acked[off] = data
    h.flush()
    h.shutdown()
    return acked


def fill(uri, size, seed):
    """Writes the whole volume with random data (1 MiB writes), flushed."""
    import random
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    for off in range(0, size, MiB):
        h.pwrite(rnd.randbytes(MiB), off)
    h.flush()
    h.shutdown()


def metric(daemon, name):
    code, text = daemon.api("GET", "/metrics")
    assert code == 200, code
    m = re.search(r'^%s\{session="%s"\} (\d+)$' % (name, SID), text, re.M)
    assert m, "%s not in /metrics:\n%s" % (name, text)
    return int(m.group(1))


class Service(unittest.TestCase):
    def setUp(self):
        self.wd = Workdir()
        self.pair = None
        self.notify = None

    def tearDown(self):
        if self.pair is not None:
            self.pair.stop()
        if self.notify is not None:
            self.notify.close()
        self.wd.__exit__(None, None, None)

    def test_notify_ready_status_watchdog_reload_stopping(self):
        path = os.path.join(self.wd.path, "notify.sock")
        pair = Pair(self.wd.path, SIZE, a_env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        self.notify = NotifySocket(path, [pair.a.socket("vol0"), pair.a.api_socket()])
        self.pair = pair.start()
        n = self.notify
        wait_until(lambda: n.count("READY", "1") >= 1, "READY=1")
        # READY came after the export and the API socket were there, never before.
        self.assertEqual(n.ready_saw, {pair.a.socket("vol0"): True, pair.a.api_socket(): True})
        # Watchdog pings keep coming from the event loop (WATCHDOG_USEC / 4 apart).
        wait_until(lambda: n.count("WATCHDOG", "1") >= 8, "eight watchdog pings", timeout_s=60)
        # STATUS names the session and follows its state.
        wait_until(lambda: any(re.search(r"s-vol0 OK \(source, lag 0B\)", s) for s in n.values("STATUS")),
                   "STATUS with s-vol0 OK", timeout_s=120)
        self.assertTrue(all(s.startswith("site-a:") for s in n.values("STATUS")), n.values("STATUS"))
        # SIGHUP: RELOADING=1, then READY=1 again once applied.
        readies = n.count("READY", "1")
        pair.a.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: n.count("READY", "1") > readies, "READY=1 after the reload")
        i = n.index("RELOADING", "1")
        self.assertGreaterEqual(i, 0)
        self.assertGreater(n.index("READY", "1", i + 1), i)
        # SIGTERM: STOPPING=1 first.
        self.assertEqual(pair.a.stop(), 0)
        self.assertGreaterEqual(n.count("STOPPING", "1"), 1)
        pings = n.count("WATCHDOG")
        # Without WATCHDOG_USEC there are no pings at all.
        pair.a.env = {"NOTIFY_SOCKET": path}
        pair.a.start()
        wait_until(lambda: n.count("READY", "1") > readies + 1, "READY=1 after the restart")
        wait_until(lambda: len(n.values("STATUS")) > 0, "a STATUS")
        time.sleep(1.5)  # three ticker rounds; not a timing assertion, only a chance for pings
        self.assertEqual(n.count("WATCHDOG"), pings)

    def reload(self, daemon, marker):
        """SIGHUP, then waits (bounded) for `marker` to show up in the log after the signal."""
        before = len(daemon.log())
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: marker in daemon.log()[before:], "the reload to log %r" % marker)
        return daemon.log()[before:]

    def test_sighup_reloads_rate_rpo_and_log_level(self):
        pair = Pair(self.wd.path, SIZE, rpo=2)
        self.pair = pair.start()
        a = pair.a
        wait_until(lambda: a.session()["state"] == "OK" and pair.b.session()["state"] == "OK", "OK", timeout_s=120)
        self.assertEqual(a.session()["rpo_seconds"], 2)
        # RPO and rate limit: applied and said so; a volume's socket path needs a restart.
        # RPO 3600: no cycle of the timer's starts during the fill below and ships part of it early.
        a.extra_config = a.extra_config.replace("rpo_seconds = 2", 'rpo_seconds = 3600\nrate_limit = "4MiB"')
        a.base_config = a.base_config.replace('nbd_socket = "%s"' % a.socket("vol0"),
                                              'nbd_socket = "%s"' % os.path.join(self.wd.path, "moved.nbd"))
        a.write_config()
        out = self.reload(a, "needs a restart")
        self.assertIn("SIGHUP: applied session s-vol0 rpo_seconds: 2 -> 3600", out)
        self.assertIn("SIGHUP: applied session s-vol0 rate_limit: unlimited -> 4194304 B/s", out)
        self.assertIn("SIGHUP: volume vol0 nbd_socket changed: this needs a restart", out)
        self.assertEqual(a.session()["rpo_seconds"], 3600)
        self.assertTrue(os.path.exists(a.socket("vol0")))  # the export stays where it was
        # The new limit holds: 16 MiB at 4 MiB/s cannot ship in under ~3 s (a lower bound that only
        # a limit not applied can break).
        fill(a.uri("vol0"), 16 * MiB, seed=3)
        t0 = time.monotonic()
        code, body = a.api("POST", "/api/rest/replication_session/%s/sync" % SID)
        self.assertEqual(code, 204, body)
        wait_until(lambda: a.session()["lag_bytes"] == 0, "the cycle to commit", timeout_s=120)
        self.assertGreater(time.monotonic() - t0, 3.0)  # 16 MiB at 4 MiB/s: about 4 s
        wait_identical(pair)
        # A broken file: reported, nothing changes, still serving.
        with open(a.config, "a") as f:
            f.write("\nno_such_key = 1\n")
        out = self.reload(a, "keeping the running configuration")
        self.assertIn("no_such_key", out)
        self.assertEqual(a.session()["rpo_seconds"], 3600)
        # Log level. The file as running (the socket back where it is), at warn: an info line
        # ("applied") is no longer written, though the change it reports is made (the API shows it).
        a.base_config = a.base_config.replace('nbd_socket = "%s"' % os.path.join(self.wd.path, "moved.nbd"),
                                              'nbd_socket = "%s"' % a.socket("vol0"))
        a.base_config = a.base_config.replace('log_level = "debug"', 'log_level = "warn"')
        a.extra_config = a.extra_config.replace("rpo_seconds = 3600", "rpo_seconds = 3599")
        a.write_config()
        before = len(a.log())
        a.proc.send_signal(signal.SIGHUP)  # the level is set before the changes are logged
        wait_until(lambda: a.session()["rpo_seconds"] == 3599, "the RPO change, at warn")
        self.assertNotIn("rpo_seconds: 3600 -> 3599", a.log()[before:])
        self.assertNotIn("log_level: debug -> warn", a.log()[before:])
        # Back at info, the next reload's lines show again.
        a.base_config = a.base_config.replace('log_level = "warn"', 'log_level = "info"')
        a.extra_config = a.extra_config.replace("rpo_seconds = 3599", "rpo_seconds = 3598")
        a.write_config()
        out = self.reload(a, "SIGHUP: applied [node] log_level: warn -> info")
        self.assertIn("SIGHUP: applied session s-vol0 rpo_seconds: 3599 -> 3598", out)
        self.assertNotIn("[debug]", out)

    def test_journald_lines_and_state_changes(self):
        pair = Pair(self.wd.path, SIZE, rpo=60)
        # stderr will be the log file: tell tandemd it is the journal's stream.
        open(pair.a.log_path, "a").close()
        st = os.stat(pair.a.log_path)
        pair.a.env = {"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)}
        # site-b's JOURNAL_STREAM names another file: not its stderr, so plain lines.
        other = os.stat(pair.a.config)
        pair.b.env = {"JOURNAL_STREAM": "%d:%d" % (other.st_dev, other.st_ino)}
        self.pair = pair.start()
        wait_until(lambda: pair.a.session()["state"] == "OK", "OK", timeout_s=120)
        # The ticker looks at the states twice a second: wait for it to have seen OK.
        wait_until(lambda: "state Initializing -> OK" in pair.a.log(), "Initializing -> OK in the log")
        code, body = pair.a.api("POST", "/api/rest/replication_session/%s/pause" % SID)
        self.assertEqual(code, 204, body)
        wait_until(lambda: "state OK -> Paused" in pair.a.log(), "the state change in the log")
        code, body = pair.a.api("POST", "/api/rest/replication_session/%s/pause" % SID)  # refused: a warning
        self.assertEqual(code, 422, body)
        self.assertEqual(pair.a.stop(), 0)
        lines = [l for l in pair.a.log().splitlines() if l]
        self.assertTrue(lines)
        for l in lines:
            self.assertRegex(l, r"^<[2-7]>\S", l)
            self.assertNotRegex(l, r"^<\d>\d{4}-\d\d-\d\d", l)  # journald stamps the time itself
        text = "\n".join(lines)
        self.assertRegex(text, r"(?m)^<6>tandemd site-a ready")
        self.assertRegex(text, r"(?m)^<6>session s-vol0: state OK -> Paused \(source\)$")
        self.assertRegex(text, r"(?m)^<6>session s-vol0: pause refused: ")
        # Each change once: the Paused transition is not repeated by the ticker.
        self.assertEqual(len(re.findall(r"state OK -> Paused", text)), 1, text)
        for l in pair.b.log().splitlines():
            if l:
                self.assertRegex(l, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} \[\w+\] ", l)

    def refused(self, config, expect):
        """tandemd and tandemd --check-config both refuse `config` with exit 2 (a configuration
        error: the unit does not restart on it), naming the problem; nothing is created."""
        for extra in ([], ["--check-config"]):
            p = subprocess.run([harness.TANDEMD, "-c", config] + extra, capture_output=True, text=True, timeout=120)
            self.assertEqual(p.returncode, 2, (extra, p.stdout, p.stderr))
            self.assertIn(expect, p.stderr)

    def test_refuses_world_readable_key_and_open_socket_dir(self):
        pair = Pair(self.wd.path, SIZE)
        key = os.path.join(pair.certs, "site-a.key")
        os.chmod(key, 0o644)
        self.refused(pair.a.config, "tls.key: %s is accessible to every user (mode 0644); chmod 600 it" % key)
        self.assertFalse(os.path.exists(pair.a.api_socket()))
        os.chmod(key, 0o640)  # a group that may read it: allowed
        p = subprocess.run([harness.TANDEMD, "-c", pair.a.config, "--check-config"], capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        os.chmod(key, 0o600)
        # An API socket in a directory every user can write (even with the sticky bit, like /tmp).
        for mode in (0o777, 0o1777):
            d = os.path.join(self.wd.path, "open-%o" % mode)
            os.makedirs(d, exist_ok=True)
            os.chmod(d, mode)
            sock = os.path.join(d, "api.sock")
            a = harness.Daemon(self.wd.path, [("vol0", SIZE)], name="solo")
            a.base_config = a.base_config.replace('api_socket = "%s"' % a.api_socket(), 'api_socket = "%s"' % sock)
            a.write_config()
            self.refused(a.config, "node.api_socket: directory %s is writable by every user (mode %04o)" % (d, mode))
            self.assertFalse(os.path.exists(sock))
        # The same for an NBD socket.
        d = os.path.join(self.wd.path, "open-nbd")
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o777)
        a = harness.Daemon(self.wd.path, [("vol0", SIZE)], name="solo2")
        a.base_config = a.base_config.replace('nbd_socket = "%s"' % a.socket("vol0"),
                                              'nbd_socket = "%s"' % os.path.join(d, "vol0.nbd"))
        a.write_config()
        self.refused(a.config, "volume vol0.nbd_socket: directory %s is writable by every user" % d)

    def test_runs_with_only_the_units_capabilities(self):
        # The unit's CapabilityBoundingSet and NoNewPrivileges, applied with setpriv: the pair
        # still replicates, and the API socket still gets its group (CAP_CHOWN).
        unit = os.path.join(os.path.dirname(__file__), "..", "..", "systemd", "tandemd.service")
        with open(unit) as f:
            caps = [l.split("=", 1)[1].split() for l in f if l.startswith("CapabilityBoundingSet=")][0]
        self.assertTrue(caps)
        bounding = "-all," + ",".join("+" + c[len("CAP_"):].lower() for c in caps)
        prefix = ["setpriv", "--bounding-set", bounding, "--inh-caps", "-all", "--no-new-privs", "--"]
        pair = Pair(self.wd.path, SIZE)
        for d in (pair.a, pair.b):
            d.prefix = prefix
            d.base_config = d.base_config.replace("[node]", '[node]\napi_socket_group = "disk"')
            d.write_config()
        self.pair = pair.start()
        with open("/proc/%d/status" % pair.a.proc.pid) as f:
            capbnd = [l.split()[1] for l in f if l.startswith("CapBnd:")][0]
        self.assertNotEqual(int(capbnd, 16) & (1 << 21), 1 << 21, "CAP_SYS_ADMIN still in the bounding set")
        wait_until(lambda: pair.a.session()["state"] == "OK" and pair.b.session()["state"] == "OK", "OK",
                   timeout_s=120)
        import grp
        self.assertEqual(os.stat(pair.a.api_socket()).st_gid, grp.getgrnam("disk").gr_gid)
        write_blocks(pair.a.uri("vol0"), seed=8, count=300)
        code, body = pair.a.api("POST", "/api/rest/replication_session/%s/sync" % SID)
        self.assertEqual(code, 204, body)
        wait_identical(pair)
        self.assertEqual(pair.stop(), [0, 0])

    def sigterm_mid_transfer(self, victim):
        pair = Pair(self.wd.path, SIZE, rpo=60, a_overrides={"rate_limit": "8MiB"})
        self.pair = pair.start()
        a, b = pair.a, pair.b
        fill(a.uri("vol0"), SIZE, seed=5)
        # The initial sync runs at 8 MiB/s: stop `victim` with SIGTERM half way.
        wait_until(lambda: metric(a, "tandem_session_shipped_bytes_total") >= SIZE // 2, "half the volume shipped",
                   timeout_s=120)
        d = a if victim == "a" else b
        acked = write_blocks(a.uri("vol0"), seed=6, count=200, fua=True)
        self.assertEqual(d.stop(), 0)
        self.assertIn("closed cleanly", d.log())
        other = b if victim == "a" else a
        wait_until(lambda: other.session()["state"] == "Paused_For_NDU", "Paused_For_NDU on the other site")
        d.start()
        wait_until(lambda: a.session()["state"] == "OK" and b.session()["state"] == "OK", "OK again", timeout_s=180)
        code, body = a.api("POST", "/api/rest/replication_session/%s/sync" % SID)
        self.assertEqual(code, 204, body)
        wait_identical(pair)
        with open(b.image("vol0"), "rb") as f:
            for off, data in acked.items():
                f.seek(off)
                self.assertEqual(f.read(4096), data, "acknowledged write at %d lost" % off)
        return a, b

    def test_sigterm_destination_mid_transfer(self):
        a, b = self.sigterm_mid_transfer("b")
        # The time of the last commit survives a crash of the destination: the age of its
        # image is known before anyone decides on an unplanned failover.
        wait_until(lambda: b.session()["last_sync_timestamp"] is not None, "a last sync on site-b")
        wait_until(lambda: a.session()["lag_bytes"] == 0, "nothing left to ship")
        code, _ = a.api("POST", "/api/rest/replication_session/%s/pause" % SID)  # no cycle meanwhile
        self.assertEqual(code, 204)
        wait_until(lambda: b.session()["state"] == "Paused", "Paused on site-b")
        before = b.session()["last_sync_timestamp"]
        b.kill()
        b.start()
        self.assertEqual(b.session()["last_sync_timestamp"], before)
        reshipped = metric(a, "tandem_session_reshipped_bytes_total")
        self.assertLess(reshipped, SIZE // 4, "re-shipped %d bytes of %d" % (reshipped, SIZE))
        # The destination kept its restart address through the stop, and the transfer went on
        # from there rather than from the start of the cycle.
        m = re.search(r"cycle (\d+) staged up to offset (\d+) before restart", b.log())
        self.assertTrue(m, b.log())
        self.assertGreater(int(m.group(2)), 0)
        self.assertIn("transfer begins: mode 2, cycle %s, offset %s" % (m.group(1), m.group(2)), b.log())

    def test_sigterm_source_mid_transfer(self):
        a, b = self.sigterm_mid_transfer("a")
        # After the restart the source resumed the cycle it had cut, from the restart address the
        # destination kept: the cycle's 64 MiB are not shipped again in full.
        after = a.log().split("signal SIGTERM: shutting down", 1)[1]
        m = re.search(r"resuming cycle (\d+) after restart", after)
        self.assertTrue(m, after)
        c = re.search(r"cycle %s committed: \d+ blocks in \d+ ms \((\d+) bytes shipped" % m.group(1), after)
        self.assertTrue(c, after)
        self.assertLess(int(c.group(1)), SIZE * 3 // 4, after)


if __name__ == "__main__":
    unittest.main(verbosity=2)
