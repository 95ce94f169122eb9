#!/usr/bin/python3
"""Plan: tests/tools/fault_proxy.py does what its commands say. A threaded echo server runs in
this process; the proxy runs as a subprocess in front of it (port 0, --port-file, --control),
and plain blocking sockets with timeouts talk through it. Each command is checked by its
effect on a live connection: forwarding works; `flip` changes exactly one byte of the echo;
`stall` holds bytes back for about its duration and then delivers them intact; `drop` gives
EOF; `reset` gives ECONNRESET; `cut` drops and refuses until `heal`; `random on` injects
faults that are printed and `random off` stops them; the seed is printed; bad commands are
answered with an error. Every wait is bounded by socket timeouts or deadlines.
"""

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY = os.path.join(HERE, "..", "..", "tools", "fault_proxy.py")
TIMEOUT_S = 10


class EchoServer:
    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.echo, args=(c,), daemon=True).start()

    @staticmethod
    def echo(c):
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)
        except OSError:
            pass
        finally:
            c.close()


class ProxyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.echo = EchoServer()
        cls.tmp = tempfile.TemporaryDirectory()
        cls.port_file = os.path.join(cls.tmp.name, "port")
        cls.control = os.path.join(cls.tmp.name, "control.sock")
        cls.proc = subprocess.Popen(
            [sys.executable, PROXY, "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{cls.echo.port}",
             "--seed", "42", "--port-file", cls.port_file, "--control", cls.control],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        cls.lines = []
        threading.Thread(target=cls.collect, daemon=True).start()
        deadline = time.monotonic() + TIMEOUT_S
        while not (os.path.exists(cls.port_file) and os.path.exists(cls.control)):
            if time.monotonic() > deadline or cls.proc.poll() is not None:
                raise RuntimeError("fault_proxy did not start")
            time.sleep(0.02)
        with open(cls.port_file) as f:
            cls.port = int(f.read())

    @classmethod
    def collect(cls):
        for line in cls.proc.stdout:
            cls.lines.append(line.rstrip("\n"))

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(timeout=TIMEOUT_S)
        cls.tmp.cleanup()

    def cmd(self, line):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(TIMEOUT_S)
            s.connect(self.control)
            s.sendall((line + "\n").encode())
            reply = b""
            while not reply.endswith(b"\n"):
                d = s.recv(1024)
                if not d:
                    break
                reply += d
            return reply.decode().strip()

    def connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT_S)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    @staticmethod
    def recv_exact(s, n):
        out = b""
        while len(out) < n:
            d = s.recv(n - len(out))
            if not d:
                break
            out += d
        return out

    def wait_for_line(self, text, timeout=TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.lines)):
                return True
            time.sleep(0.02)
        return False

    def setUp(self):
        self.assertEqual(self.cmd("heal"), "ok")
        self.assertEqual(self.cmd("random off"), "ok")

    def test_seed_is_printed(self):
        self.assertTrue(self.wait_for_line("seed 42"))

    def test_forwards_both_ways(self):
        with self.connect() as s:
            s.sendall(b"hello through the proxy")
            self.assertEqual(self.recv_exact(s, 23), b"hello through the proxy")

    def test_flip_changes_exactly_one_byte(self):
        with self.connect() as s:
            s.sendall(b"x")
            self.assertEqual(self.recv_exact(s, 1), b"x")
            self.assertEqual(self.cmd("flip"), "ok")
            data = bytes(range(256)) * 4
            s.sendall(data)
            back = self.recv_exact(s, len(data))
            self.assertEqual(len(back), len(data))
            diffs = [i for i in range(len(data)) if data[i] != back[i]]
            self.assertEqual(len(diffs), 1, diffs)
            self.assertEqual(back[diffs[0]], data[diffs[0]] ^ 0xFF)
        self.assertTrue(self.wait_for_line("fault flip byte"))

    def test_stall_holds_bytes_then_delivers(self):
        with self.connect() as s:
            s.sendall(b"a")
            self.assertEqual(self.recv_exact(s, 1), b"a")
            self.assertEqual(self.cmd("stall 700"), "ok")
            t0 = time.monotonic()
            s.sendall(b"held")
            self.assertEqual(self.recv_exact(s, 4), b"held")
            elapsed = time.monotonic() - t0
            self.assertGreaterEqual(elapsed, 0.5)
            self.assertLess(elapsed, TIMEOUT_S)

    def test_drop_gives_eof(self):
        with self.connect() as s:
            s.sendall(b"a")
            self.assertEqual(self.recv_exact(s, 1), b"a")
            self.assertEqual(self.cmd("drop"), "ok")
            self.assertEqual(s.recv(10), b"")

    def test_reset_gives_connection_reset(self):
        with self.connect() as s:
            s.sendall(b"a")
            self.assertEqual(self.recv_exact(s, 1), b"a")
            self.assertEqual(self.cmd("reset"), "ok")
            with self.assertRaises(ConnectionResetError):
                s.recv(10)

    def test_cut_refuses_until_heal(self):
        with self.connect() as s:
            s.sendall(b"a")
            self.assertEqual(self.recv_exact(s, 1), b"a")
            self.assertEqual(self.cmd("cut"), "ok")
            self.assertEqual(s.recv(10), b"")
        # Accepted, then reset at once: the reset may already hit connect() on loopback.
        try:
            with self.connect() as s:
                s.sendall(b"b")
                got = s.recv(10)
        except (ConnectionResetError, BrokenPipeError):
            got = b""
        self.assertEqual(got, b"")
        self.assertEqual(self.cmd("heal"), "ok")
        with self.connect() as s:
            s.sendall(b"c")
            self.assertEqual(self.recv_exact(s, 1), b"c")

    def test_random_faults_are_injected_and_printed(self):
        before = len(self.lines)
        self.assertEqual(self.cmd("random on"), "ok")
        self.assertIn("random=1", self.cmd("status"))
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and not any("random fault" in l for l in self.lines[before:]):
            try:
                with self.connect() as s:
                    s.settimeout(0.5)
                    s.sendall(b"z" * 100)
                    s.recv(100)
            except OSError:
                pass
            time.sleep(0.05)
        self.assertEqual(self.cmd("random off"), "ok")
        self.assertTrue(any("random fault" in l for l in self.lines[before:]), self.lines[before:])
        self.assertIn("random=0", self.cmd("status"))

    def test_bad_commands_are_errors(self):
        self.assertTrue(self.cmd("explode").startswith("error"))
        self.assertTrue(self.cmd("stall").startswith("error"))
        self.assertTrue(self.cmd("stall soon").startswith("error"))
        self.assertTrue(self.cmd("random maybe").startswith("error"))


if __name__ == "__main__":
    unittest.main(verbosity=2)
