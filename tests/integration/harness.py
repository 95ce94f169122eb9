"""Test harness for integration tests: real tandemd processes, real NBD clients.

Every daemon is started by the test, on a private temporary directory, and stopped by its
PID. Every wait is bounded. Run with /usr/bin/python3 (it has the libnbd bindings).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

TANDEMD = os.environ.get("TANDEMD", "")
_started = []  # daemons this process started: killed by PID at exit if a test left them running


def _kill_leftovers():
    for d in _started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=WAIT_S)


import atexit  # noqa: E402
atexit.register(_kill_leftovers)
WAIT_S = 30  # bound on every wait for a daemon to become ready or exit


def die(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def wait_until(pred, what, timeout_s=WAIT_S, interval_s=0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval_s)
    raise TimeoutError("timed out after %ss waiting for %s" % (timeout_s, what))


def run(cmd, check=True, timeout=300, **kw):
    """Runs a command with a bounded time; returns CompletedProcess with text output."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError("command failed (%d): %s\nstdout: %s\nstderr: %s"
                             % (p.returncode, " ".join(cmd), p.stdout[-4000:], p.stderr[-4000:]))
    return p


class Workdir:
    def __init__(self, prefix="tandem-it-"):
        # /var/tmp is on a real disk: O_DIRECT works there (tmpfs may refuse it).
        self.path = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if os.environ.get("TANDEM_KEEP"):
            print("keeping " + self.path, file=sys.stderr)
            return
        shutil.rmtree(self.path, ignore_errors=True)

    def join(self, *p):
        return os.path.join(self.path, *p)


class Daemon:
    """One tandemd process with file-backed volumes exported on Unix sockets."""

    def __init__(self, workdir, volumes, name="site-a", extra_volume_keys=None, extra_config="", env=None):
        self.dir = workdir
        self.env = env
        self.name = name
        self.volumes = volumes  # list of (id, size_bytes)
        self.proc = None
        self.config = os.path.join(workdir, name + ".toml")
        self.log_path = os.path.join(workdir, name + ".log")
        lines = ["[node]", 'name = "%s"' % name, 'state_dir = "%s"' % os.path.join(workdir, name + "-state"),
                 'log_level = "debug"', 'api_socket = "%s"' % self.api_socket(), ""]
        for vid, size in volumes:
            lines += ["[[volume]]", 'id = "%s"' % vid, 'path = "%s"' % self.image(vid),
                      'size = %d' % size, 'nbd_socket = "%s"' % self.socket(vid)]
            for k, v in (extra_volume_keys or {}).items():
                lines.append("%s = %s" % (k, json.dumps(v)))
            lines.append("")
        self.extra_config = extra_config
        self.base_config = "\n".join(lines)
        self.write_config()

    def write_config(self):
        with open(self.config, "w") as f:
            f.write(self.base_config + "\n" + self.extra_config + "\n")

    def api_socket(self):
        return os.path.join(self.dir, self.name + "-api.sock")

    def api(self, method, path, body=None, content_type="application/json"):
        """One request to the control API with curl over the Unix socket: (status, parsed JSON or text)."""
        cmd = ["curl", "-sS", "--max-time", "30", "--unix-socket", self.api_socket(), "-X", method,
               "-o", "-", "-w", "\n%{http_code}"]
        if body is not None:
            cmd += ["-H", "Content-Type: " + content_type, "--data-binary", "@-"]
        p = subprocess.run(cmd + ["http://localhost" + path], input=body if body is not None else "",
                           capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise AssertionError("curl failed (%d): %s" % (p.returncode, p.stderr))
        text, _, code = p.stdout.rpartition("\n")
        try:
            payload = json.loads(text) if text.strip() else None
        except ValueError:
            payload = text
        return int(code), payload

    def session(self, sid="s-vol0"):
        code, body = self.api("GET", "/api/rest/replication_session/" + sid)
        assert code == 200, (code, body)
        return body

    def image(self, vid):
        return os.path.join(self.dir, "%s-%s.img" % (self.name, vid))

    def socket(self, vid):
        return os.path.join(self.dir, "%s-%s.nbd" % (self.name, vid))

    def uri(self, vid):
        return "nbd+unix:///%s?socket=%s" % (vid, self.socket(vid))

    def start(self):
        assert TANDEMD, "TANDEMD is not set"
        for path in [self.socket(vid) for vid, _ in self.volumes] + [self.api_socket()]:
            if os.path.exists(path):
                os.unlink(path)
        self.logf = open(self.log_path, "a")
        env = dict(os.environ, **(self.env or {}))
        # prefix: a wrapper command (setpriv, say) the daemon runs under.
        self.proc = subprocess.Popen(list(getattr(self, "prefix", [])) + [TANDEMD, "-c", self.config],
                                     stdout=self.logf, stderr=self.logf, env=env)
        _started.append(self)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError("tandemd exited with %s during start; log:\n%s" % (self.proc.returncode, self.log()))
            return (all(os.path.exists(self.socket(v)) for v, _ in self.volumes)
                    and os.path.exists(self.api_socket()))
        wait_until(ready, "tandemd %s to export its volumes" % self.name)
        return self

    def log(self):
        try:
            # Whole log (tests search it); a SIGKILLed daemon may leave a torn last line.
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM):
        """Stops this daemon by its PID; returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=WAIT_S)
            raise AssertionError("tandemd did not exit within %ss of signal %s" % (WAIT_S, sig))
        finally:
            self.logf.close()
        self.proc = None
        return rc

    def kill(self):
        return self.stop(signal.SIGKILL)

    def inspect(self):
        p = run([TANDEMD, "-c", self.config, "--inspect"], timeout=120)
        return {v["id"]: v for v in json.loads(p.stdout)}


def dirty_set(vol_json):
    s = set()
    for first, count in vol_json["dirty_extents"]:
        s.update(range(first, first + count))
    return s


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(directory):
    here = os.path.dirname(os.path.abspath(__file__))
    run(["bash", os.path.join(here, "..", "tools", "make_certs.sh"), directory])
    return directory


def session_config(certs, name, peer, my_port, peer_port, role, volumes=("vol0",), rpo=2,
                   cert_name=None, ca="ca.crt", peer_timeout_ms=2000, window=None, rate_limit=None):
    cert = cert_name or name
    vols = ", ".join('"%s"' % v for v in volumes)
    return "\n".join([
        "[tls]",
        'ca = "%s"' % os.path.join(certs, ca),
        'cert = "%s"' % os.path.join(certs, cert + ".crt"),
        'key = "%s"' % os.path.join(certs, cert + ".key"),
        "[peer]",
        'name = "%s"' % peer,
        'address = "127.0.0.1:%d"' % peer_port,
        'listen = "127.0.0.1:%d"' % my_port,
        "keepalive_interval_ms = 250",
        "peer_timeout_ms = %d" % peer_timeout_ms,
        "[[session]]",
        'id = "s-vol0"',
        "volumes = [%s]" % vols,
        "remote_volumes = [%s]" % vols,
        'role = "%s"' % role,
        "rpo_seconds = %d" % rpo,
    ] + (['window = "%s"' % window] if window else [])
      + (['rate_limit = "%s"' % rate_limit] if rate_limit else []))


class Pair:
    """site-a (source) and site-b (destination) replicating over mutual TLS on loopback."""

    def __init__(self, workdir, size, volumes=("vol0",), rpo=2, b_overrides=None, a_overrides=None,
                 extra_volume_keys=None, a_env=None, b_port=None, a_dials=None):
        self.certs = make_certs(os.path.join(workdir, "certs"))
        self.pa, self.pb = free_port(), (b_port or free_port())
        a_dials = a_dials or self.pb  # where site-a dials site-b (a fault proxy may sit there)
        vols = [(v, size) for v in volumes]
        self.a = Daemon(workdir, vols, name="site-a", extra_volume_keys=extra_volume_keys, env=a_env,
                        extra_config=session_config(self.certs, "site-a", "site-b", self.pa, a_dials, "source",
                                                    volumes, rpo, **(a_overrides or {})))
        self.b = Daemon(workdir, vols, name="site-b", extra_volume_keys=extra_volume_keys,
                        extra_config=session_config(self.certs, "site-b", "site-a", self.pb, self.pa,
                                                    "destination", volumes, rpo, **(b_overrides or {})))

    def start(self):
        self.b.start()
        self.a.start()
        return self

    def stop(self):
        rcs = []
        for d in (self.a, self.b):
            if d.proc is not None:
                rcs.append(d.stop())
        return rcs


def write_random(uri, seed, size, count=64):
    """Writes `count` runs of 1-63 random 4 KiB blocks at random offsets of a `size`-byte volume
    through NBD, then flushes."""
    import random
    import nbd
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    for _ in range(count):
        off = rnd.randrange(0, size // 4096 - 64) * 4096
        h.pwrite(rnd.randbytes(rnd.randrange(1, 64) * 4096), off)
    h.flush()
    h.shutdown()


def xxh128(path):
    return run(["xxh128sum", path]).stdout.split()[0]


def wait_identical(pair, volumes=("vol0",), timeout_s=120):
    """Waits (bounded) until every destination image equals its source image."""
    def same():
        return all(xxh128(pair.a.image(v)) == xxh128(pair.b.image(v)) for v in volumes)
    wait_until(same, "the destination to match the source", timeout_s=timeout_s, interval_s=0.5)


class FaultProxy:
    """tests/tools/fault_proxy.py between two addresses, driven through its stdin."""

    def __init__(self, workdir, target_port, seed):
        here = os.path.dirname(os.path.abspath(__file__))
        port_file = os.path.join(workdir, "proxy.port")
        self.log_path = os.path.join(workdir, "proxy.log")
        self.logf = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", os.path.join(here, "..", "tools", "fault_proxy.py"), "--listen", "127.0.0.1:0",
             "--target", "127.0.0.1:%d" % target_port, "--seed", str(seed), "--port-file", port_file],
            stdin=subprocess.PIPE, stdout=self.logf, stderr=self.logf, text=True)
        wait_until(lambda: os.path.exists(port_file), "the fault proxy to listen")
        with open(port_file) as f:
            self.port = int(f.read().strip())

    def command(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        self.command("quit")
        try:
            self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=WAIT_S)
        self.logf.close()
