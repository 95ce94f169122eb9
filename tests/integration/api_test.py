#!/usr/bin/python3
"""Plan: the control API of two real tandemd replicating over mutual TLS on loopback, spoken
to with curl over each daemon's Unix socket.

- Reading: the session list and object (fields and values of the contract), volumes, metrics.
- Bad input: unknown path and session 404, malformed JSON / unknown field / wrong type 400,
  wrong method 405, a huge body 413, wrong role 400: every one with an error_response body
  (messages[0] with code, severity, message_l10n, arguments), and the daemon stays up.
- Pause and resume, from either site: both sites Paused, writes go on at the source but do not
  reach the destination while paused, resume brings them; a pause survives SIGKILL of both
  daemons.
- A pause with the peer unreachable pauses this site only (local_only_paused); resume, sync and
  planned failover are refused until pause is issued again with the peer back.
- Pause in the middle of a (rate-limited) cycle keeps its restart address; resume goes on from
  there and the volumes end identical.
- The documents: the session and volume objects a real daemon returns (both roles) have exactly
  the fields of the OpenAPI document and of docs/api.md (the session object's field table and
  JSON example, the volume fields of its Resources table), and those agree with each other.
"""
import os
import json
import random
import re
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import Pair, Workdir, wait_identical, wait_until, xxh128  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB
SID = "s-vol0"
BASE = "/api/rest/replication_session/"
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def api_md_section(title):
    """The text of docs/api.md's `## title` section, up to the next `## ` heading."""
    with open(os.path.join(REPO, "docs", "api.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^## " + re.escape(title) + r"\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "docs/api.md has no section '## %s'" % title
    return m.group(1)


def api_md_session_fields():
    """The session object's fields as docs/api.md documents them: the first column of its field
    table (a list: a field listed twice shows) and the keys of its JSON example."""
    section = api_md_section("The session object")
    table = re.findall(r"^\| `([A-Za-z0-9_]+)` \|", section, re.M)
    example = re.search(r"^```json\n(.*?)^```", section, re.S | re.M)
    assert example, "docs/api.md: the session object has no JSON example"
    return table, set(json.loads(example.group(1)))


def api_md_volume_fields():
    """The volume object's fields as docs/api.md lists them: the names in the notes of the
    `GET /api/rest/volume` row of the Resources table (values in parentheses left out)."""
    rows = [r for r in api_md_section("Resources").splitlines() if r.startswith("| `GET /api/rest/volume`")]
    assert len(rows) == 1, rows
    notes = re.sub(r"\([^)]*\)", "", rows[0].split("|")[3])
    return set(re.findall(r"`([A-Za-z0-9_]+)`", notes))


def openapi_schemas():
    with open(os.path.join(REPO, "api", "share", "openapi.json"), encoding="utf-8") as f:
        return json.load(f)["components"]["schemas"]


def write_blocks(uri, seed, count, span=SIZE):
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    for _ in range(count):
        h.pwrite(rnd.randbytes(4096), rnd.randrange(0, span // 4096) * 4096)
    h.flush()
    h.shutdown()


class Api(unittest.TestCase):
    def setUp(self):
        self.wd = Workdir()
        self.pair = None

    def tearDown(self):
        rcs = self.pair.stop() if self.pair else []
        logs = (self.pair.a.log() + "\n----\n" + self.pair.b.log()) if self.pair else ""
        self.wd.__exit__(None, None, None)
        self.assertTrue(all(rc == 0 for rc in rcs), "a daemon did not shut down cleanly:\n" + logs[-6000:])

    def start(self, **kw):
        self.pair = Pair(self.wd.path, SIZE, **kw).start()
        # Initial sync and first cycle: the destination is consistent, both sites OK.
        wait_until(lambda: self.pair.b.session()["state"] == "OK" and self.pair.a.session()["state"] == "OK",
                   "both sites OK", timeout_s=120, interval_s=0.2)
        return self.pair

    def expect_error(self, d, method, path, status, body=None, content_type="application/json", arg=None):
        code, payload = d.api(method, path, body, content_type)
        self.assertEqual(code, status, (method, path, payload))
        self.assertIsInstance(payload, dict, payload)
        m = payload["messages"][0]
        self.assertEqual(set(m), {"code", "severity", "message_l10n", "arguments"})
        self.assertTrue(m["code"].startswith("0xE"), m)
        self.assertEqual(m["severity"], "Error")
        self.assertTrue(m["message_l10n"])
        if arg is not None:
            self.assertIn(arg, m["arguments"])
        return m

    def pause_both_then_resume(self, p, site):
        """Pause issued on `site` with the peer reachable pauses both sites; resume brings OK."""
        code, body = site.api("POST", BASE + SID + "/pause")
        self.assertEqual(code, 204, body)
        for d in (p.a, p.b):
            s = d.session()
            self.assertEqual((s["state"], s["local_only_paused"]), ("Paused", False), d.name)
        code, body = p.a.api("POST", BASE + SID + "/resume")
        self.assertEqual(code, 204, body)
        wait_until(lambda: p.a.session()["state"] == "OK" and p.b.session()["state"] == "OK", "OK after resume")

    def test_reading_and_bad_input(self):
        p = self.start()
        self.assertEqual(os.stat(p.a.api_socket()).st_mode & 0o777, 0o660)
        code, sessions = p.a.api("GET", "/api/rest/replication_session")
        self.assertEqual(code, 200)
        self.assertEqual([s["id"] for s in sessions], [SID])
        a, b = p.a.session(), p.b.session()
        self.assertEqual((a["role"], b["role"]), ("Source", "Destination"))
        self.assertEqual(a["resource_type"], "volume")
        self.assertEqual(a["storage_element_pairs"], [{"local_id": "vol0", "remote_id": "vol0"}])
        self.assertEqual(a["remote_system"], "site-b")
        self.assertEqual(b["remote_system"], "site-a")
        self.assertEqual(a["type"], "Asynchronous")
        self.assertEqual(a["data_connection_state"], "OK")
        self.assertEqual(a["data_transfer_state"], "Asynchronous")
        self.assertFalse(a["local_only_paused"])
        self.assertFalse(a["failover_test_in_progress"])
        self.assertEqual(a["rpo_seconds"], 2)
        self.assertRegex(a["last_sync_timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(set(a["restart_address"]), {"cycle", "offset"})
        for k in ("progress_percentage", "estimated_completion_timestamp", "next_sync_timestamp", "lag_bytes",
                  "last_sync_duration", "error_code", "error_message", "local_resource_id", "remote_resource_id"):
            self.assertIn(k, a)
        code, vols = p.a.api("GET", "/api/rest/volume")
        self.assertEqual(code, 200)
        self.assertEqual(vols[0]["id"], "vol0")
        self.assertEqual(vols[0]["size"], SIZE)
        self.assertEqual(vols[0]["access"], "read-write")
        code, vol = p.b.api("GET", "/api/rest/volume/vol0")
        self.assertEqual((code, vol["access"]), (200, "read-only"))
        self.assertIn("nbd+unix:///vol0?socket=" + p.b.socket("vol0"), vol["exports"])
        code, metrics = p.a.api("GET", "/metrics")
        self.assertEqual(code, 200)
        for needle in ('tandem_session_state{session="s-vol0",state="OK"} 1', "tandem_session_lag_bytes",
                       "tandem_session_lag_seconds", "tandem_session_last_cycle_duration_seconds",
                       "tandem_session_shipped_bytes_total", "tandem_session_resumes_total",
                       'tandem_session_connected{session="s-vol0"} 1', 'tandem_nbd_requests_total{volume="vol0"}'):
            self.assertIn(needle, metrics)

        self.expect_error(p.a, "GET", "/api/rest/nothing", 404)
        self.expect_error(p.a, "GET", "/nope", 404)
        self.expect_error(p.a, "GET", BASE + "s-unknown", 404, arg="s-unknown")
        self.expect_error(p.a, "POST", BASE + "s-unknown/pause", 404, arg="s-unknown")
        self.expect_error(p.a, "GET", "/api/rest/volume/vol9", 404, arg="vol9")
        self.expect_error(p.a, "POST", BASE + SID + "/explode", 404)
        self.expect_error(p.a, "GET", BASE + SID + "/pause", 405)
        self.expect_error(p.a, "DELETE", BASE + SID, 405)
        self.expect_error(p.a, "POST", BASE + SID + "/failover", 400, body="{not json")
        self.expect_error(p.a, "POST", BASE + SID + "/failover", 400, body='{"is_planned": true, "colour": 1}', arg="colour")
        self.expect_error(p.a, "POST", BASE + SID + "/failover", 400, body='{"is_planned": "yes"}', arg="is_planned")
        self.expect_error(p.a, "POST", BASE + SID + "/pause", 400, body="[1, 2]")
        self.expect_error(p.a, "POST", BASE + SID + "/pause", 400, body="{}", content_type="text/plain")
        self.expect_error(p.a, "POST", BASE + SID + "/pause", 413, body='{"x": "' + "a" * (256 * 1024) + '"}')
        # Wrong role: 400, naming the action.
        self.expect_error(p.b, "POST", BASE + SID + "/sync", 400, arg="sync")
        self.expect_error(p.b, "POST", BASE + SID + "/failover", 400, body='{"is_planned": true}')
        self.expect_error(p.a, "POST", BASE + SID + "/start_failover_test", 400)
        self.expect_error(p.a, "POST", BASE + SID + "/failover", 400, body='{"is_planned": false}')
        # Not allowed in this state: 422 naming the action and the state.
        m = self.expect_error(p.a, "POST", BASE + SID + "/resume", 422, arg="resume")
        self.assertIn("OK", m["arguments"])
        self.assertEqual(m["code"], "0xE0101001000C")
        self.expect_error(p.a, "POST", BASE + SID + "/reprotect", 422, arg="reprotect")
        self.expect_error(p.b, "POST", BASE + SID + "/stop_failover_test", 422)
        # Raw garbage on the socket: that connection is answered 400 and closed; the daemon stays.
        import socket as so
        s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
        s.settimeout(10)
        s.connect(p.a.api_socket())
        s.sendall(b"\x00\x01GARBAGE\r\n\r\n")
        self.assertIn(b"400", s.recv(4096))
        s.close()
        self.assertEqual(p.a.session()["state"], "OK")
        # sync on the source: 204, and a cycle happens.
        code, _ = p.a.api("POST", BASE + SID + "/sync")
        self.assertEqual(code, 204)

    def test_pause_from_either_site_and_resume(self):
        p = self.start()
        for site, other in ((p.a, p.b), (p.b, p.a)):
            code, body = site.api("POST", BASE + SID + "/pause", "{}")
            self.assertEqual(code, 204, body)
            for d in (site, other):
                s = d.session()
                self.assertEqual(s["state"], "Paused", d.name)
                self.assertFalse(s["local_only_paused"], d.name)
                self.assertEqual(s["data_transfer_state"], "Paused")
            self.expect_error(site, "POST", BASE + SID + "/pause", 422, arg="pause")
            # Writes go on at the source, and stay there while paused (scheduled cycles stop).
            before = xxh128(p.b.image("vol0"))
            write_blocks(p.a.uri("vol0"), seed=len(site.name), count=50)
            time.sleep(3)  # longer than a cycle period (rpo 2 s -> every 1 s)
            self.assertEqual(xxh128(p.b.image("vol0")), before, "a paused session shipped data")
            self.assertGreater(p.a.session()["lag_bytes"], 0)
            code, body = other.api("POST", BASE + SID + "/resume")
            self.assertEqual(code, 204, body)
            wait_identical(p)
            wait_until(lambda: p.a.session()["state"] == "OK" and p.b.session()["state"] == "OK", "OK after resume")
        # A pause is durable: SIGKILL both daemons while paused; they come back paused.
        code, _ = p.a.api("POST", BASE + SID + "/pause")
        self.assertEqual(code, 204)
        p.a.kill()
        p.b.kill()
        p.b.start()
        p.a.start()
        wait_until(lambda: p.a.session()["data_connection_state"] == "OK", "reconnect")
        self.assertEqual(p.a.session()["state"], "Paused")
        self.assertEqual(p.b.session()["state"], "Paused")
        code, _ = p.b.api("POST", BASE + SID + "/resume")
        self.assertEqual(code, 204)
        wait_until(lambda: p.a.session()["state"] == "OK", "OK after resume")

    def test_local_only_pause(self):
        p = self.start()
        p.b.kill()  # lost, not shut down for maintenance
        wait_until(lambda: p.a.session()["data_connection_state"] != "OK", "the link to drop")
        self.assertEqual(p.a.session()["state"], "System_Paused")
        self.assertIsNotNone(p.a.session()["error_message"])
        code, body = p.a.api("POST", BASE + SID + "/pause")
        self.assertEqual(code, 204, body)
        s = p.a.session()
        self.assertEqual((s["state"], s["local_only_paused"]), ("Paused", True))
        for verb, body in (("resume", None), ("sync", None), ("failover", '{"is_planned": true}')):
            m = self.expect_error(p.a, "POST", BASE + SID + "/" + verb, 422, body=body)
            self.assertIn("only this site", m["message_l10n"])
        # Pause again with the peer still away: refused, still paused locally.
        self.expect_error(p.a, "POST", BASE + SID + "/pause", 422, arg="pause")
        p.b.start()
        wait_until(lambda: p.a.session()["data_connection_state"] == "OK", "reconnect")
        self.assertTrue(p.a.session()["local_only_paused"])
        self.expect_error(p.a, "POST", BASE + SID + "/resume", 422)
        self.pause_both_then_resume(p, p.a)

    def test_tcp_listener_needs_tls_and_the_token(self):
        port = harness.free_port()
        token = "s3cret-token-0123456789"
        self.pair = Pair(self.wd.path, SIZE)
        a = self.pair.a
        a.base_config = a.base_config.replace('log_level = "debug"', 'log_level = "debug"\napi_listen = "127.0.0.1:%d"\n'
                                              'api_token = "%s"' % (port, token))
        a.write_config()
        self.pair.start()
        ca = os.path.join(self.pair.certs, "ca.crt")
        url = "https://site-a:%d/api/rest/replication_session" % port

        def curl(*extra):
            p = subprocess.run(["curl", "-sS", "--max-time", "30", "--cacert", ca, "--resolve",
                                "site-a:%d:127.0.0.1" % port, "-o", "-", "-w", "\n%{http_code}", *extra],
                               capture_output=True, text=True, timeout=60)
            text, _, code = p.stdout.rpartition("\n")
            return p.returncode, code, text

        rc, code, text = curl("-H", "Authorization: Bearer " + token, url)
        self.assertEqual((rc, code), (0, "200"), text)
        self.assertEqual(json.loads(text)[0]["id"], SID)
        for headers in ([], ["-H", "Authorization: Bearer wrong-token-0123456789"], ["-H", "Authorization: " + token]):
            rc, code, text = curl(*headers, url)
            self.assertEqual(code, "401", text)
            m = json.loads(text)["messages"][0]
            self.assertEqual(m["code"], "0xE04010010001")
        # Plain HTTP on the TLS port gets nothing useful.
        rc, code, text = curl("http://site-a:%d/api/rest/replication_session" % port)
        self.assertNotEqual(code, "200")
        # Actions work over TCP too.
        rc, code, text = curl("-X", "POST", "-H", "Authorization: Bearer " + token,
                              "https://site-a:%d/api/rest/replication_session/%s/sync" % (port, SID))
        self.assertEqual(code, "204", text)

    def test_openapi_document_matches_the_real_routes(self):
        # The document served is checked against the router in a unit test; here every route it
        # lists answers on a real daemon, every other method on those paths gets 405, and the
        # objects the daemon returns have exactly the documented fields.
        p = self.start()
        code, doc = p.a.api("GET", "/api/rest/openapi.json")
        self.assertEqual(code, 200)
        self.assertEqual(doc["openapi"], "3.0.3")
        self.assertGreaterEqual(len(doc["paths"]), 13)
        for path, item in doc["paths"].items():
            for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
                if method.lower() not in item:
                    self.expect_error(p.a, method, path.replace("{id}", SID), 405)
                elif path.startswith("/api/rest/import_session"):
                    # Import routes: the list answers; create refuses an empty body; the others
                    # answer for an import that does not exist with the unknown-import error.
                    if path == "/api/rest/import_session" and method == "GET":
                        code, body = p.a.api("GET", path)
                        self.assertEqual((code, body), (200, []), path)
                    elif path == "/api/rest/import_session":
                        m = self.expect_error(p.a, method, path, 400, body="{}")
                        self.assertIn("name", m["message_l10n"])
                    else:
                        m = self.expect_error(p.a, method, path.replace("{id}", "imp-none"), 404,
                                              body="{}" if method == "POST" else None)
                        self.assertEqual(m["code"], "0xE04040040001", (path, m))
                elif method == "GET":
                    concrete = path.replace("{id}", "vol0" if "/volume/" in path else SID)
                    code, body = p.a.api("GET", concrete)
                    self.assertEqual(code, 200, (path, body))
                elif path == "/api/rest/volume":
                    # Creating a volume from an empty object: the route is there (the body is
                    # refused, not the path), and nothing is created.
                    m = self.expect_error(p.a, method, path, 400, body="{}")
                    self.assertIn("id is required", m["message_l10n"])
                elif path == "/api/rest/volume/{id}":
                    m = self.expect_error(p.a, method, path.replace("{id}", "no-such-volume"), 404)
                    self.assertEqual(m["code"], "0xE04040030001", (path, m))
                else:
                    # An action on a session that does not exist: the route is there (the
                    # unknown-session error, not no-such-path), and nothing happens to s-vol0.
                    m = self.expect_error(p.a, method, path.replace("{id}", "no-such-session"), 404, body="{}")
                    self.assertEqual(m["code"], "0xE04040020001", (path, m))
        self.expect_error(p.a, "GET", "/api/rest/replication_session/%s/undocumented" % SID, 404)
        schemas = doc["components"]["schemas"]
        md_table, md_example = api_md_session_fields()
        md_volume = api_md_volume_fields()
        for d in (p.a, p.b):
            s = d.session()
            self.assertEqual(set(s), set(schemas["ReplicationSession"]["properties"]), d.name + ": vs openapi.json")
            self.assertEqual(set(s), md_example, d.name + ": vs the session object's example in docs/api.md")
            self.assertEqual(set(s), set(md_table), d.name + ": vs the session object's table in docs/api.md")
            self.assertIn(s["state"], schemas["ReplicationSession"]["properties"]["state"]["enum"])
            code, vols = d.api("GET", "/api/rest/volume")
            self.assertEqual(code, 200)
            self.assertTrue(vols)
            for v in vols:
                self.assertEqual(set(v), set(schemas["Volume"]["properties"]), d.name + ": vs openapi.json")
                self.assertEqual(set(v), md_volume, d.name + ": vs the volume fields in docs/api.md")

    def test_api_md_and_openapi_document_the_same_fields(self):
        # No daemon: the two documents agree with each other (the test above holds both to what
        # a daemon returns). Each field documented once.
        schemas = openapi_schemas()
        md_table, md_example = api_md_session_fields()
        self.assertEqual(md_example, set(schemas["ReplicationSession"]["properties"]), "example vs openapi.json")
        self.assertEqual(set(md_table), set(schemas["ReplicationSession"]["properties"]), "table vs openapi.json")
        self.assertEqual(len(md_table), len(set(md_table)), "a field listed twice: %s" % md_table)
        self.assertEqual(api_md_volume_fields(), set(schemas["Volume"]["properties"]), "volume vs openapi.json")

    def test_peer_shutdown_for_maintenance(self):
        # A peer that shuts down cleanly says so: the other site shows Paused_For_NDU (the table:
        # pause, resume, sync, planned failover refused) and goes on by itself when it is back.
        p = self.start()
        p.b.stop()
        wait_until(lambda: p.a.session()["state"] == "Paused_For_NDU", "Paused_For_NDU")
        self.assertIn("shutting down for maintenance", p.a.log())
        for verb, body in (("pause", None), ("resume", None), ("sync", None), ("failover", '{"is_planned": true}')):
            self.expect_error(p.a, "POST", BASE + SID + "/" + verb, 422, body=body, arg=verb)
        write_blocks(p.a.uri("vol0"), seed=9, count=20)
        p.b.start()
        wait_until(lambda: p.a.session()["state"] == "OK", "OK by itself", timeout_s=60)
        wait_identical(p)
        # A peer that dies without a word is a fault, not maintenance.
        p.b.kill()
        wait_until(lambda: p.a.session()["data_connection_state"] != "OK", "the link to drop")
        self.assertEqual(p.a.session()["state"], "System_Paused")
        p.b.start()

    def test_partition_during_pause(self):
        # A fault proxy between the sites cuts the link (no FIN, no RST reaching either side:
        # the keep-alives find it dead). Each site can then pause only itself.
        pb = harness.free_port()
        proxy = harness.FaultProxy(self.wd.path, pb, seed=1)
        try:
            p = self.start(b_port=pb, a_dials=proxy.port)
            proxy.command("cut")
            for d in (p.a, p.b):
                wait_until(lambda d=d: d.session()["data_connection_state"] != "OK", "the partition on " + d.name,
                           timeout_s=30)
            for d in (p.a, p.b):
                code, body = d.api("POST", BASE + SID + "/pause")
                self.assertEqual(code, 204, body)
                s = d.session()
                self.assertEqual((s["state"], s["local_only_paused"]), ("Paused", True), d.name)
                self.expect_error(d, "POST", BASE + SID + "/resume", 422)
            self.expect_error(p.a, "POST", BASE + SID + "/sync", 422)
            self.expect_error(p.a, "POST", BASE + SID + "/failover", 422, body='{"is_planned": true}')
            # Unplanned failover stays allowed in a local-only pause (refused here only because
            # of the role: it is the destination's).
            self.expect_error(p.a, "POST", BASE + SID + "/failover", 400, body='{"is_planned": false}')
            proxy.command("heal")
            wait_until(lambda: p.a.session()["data_connection_state"] == "OK", "the link to heal", timeout_s=60)
            self.pause_both_then_resume(p, p.b)
        finally:
            proxy.stop()

    def test_pause_mid_cycle_keeps_the_restart_address(self):
        p = self.start(a_overrides={"rate_limit": "4MiB"})
        # 24 MiB dirty at 4 MiB/s: a cycle of several seconds to pause in the middle of.
        rnd = random.Random(5)
        h = nbd.NBD()
        h.connect_uri(p.a.uri("vol0"))
        for i in range(24):
            h.pwrite(rnd.randbytes(MiB), (i * 2 + 8) * MiB)
        h.flush()
        h.shutdown()
        code, _ = p.a.api("POST", BASE + SID + "/sync")
        self.assertIn(code, (204, 422))  # a scheduled cycle may already be under way
        wait_until(lambda: p.a.session()["state"] == "Synchronizing"
                   and (p.a.session()["progress_percentage"] or 0) >= 20, "a cycle under way", interval_s=0.05)
        code, body = p.a.api("POST", BASE + SID + "/pause")
        self.assertEqual(code, 204, body)
        a, b = p.a.session(), p.b.session()
        self.assertEqual((a["state"], b["state"]), ("Paused", "Paused"))
        self.assertGreater(b["restart_address"]["offset"], 0, b)
        restart = b["restart_address"]
        time.sleep(2)
        self.assertEqual(p.b.session()["restart_address"], restart, "the destination moved while paused")
        code, body = p.b.api("POST", BASE + SID + "/resume")
        self.assertEqual(code, 204, body)
        self.assertEqual(p.a.session()["state"], "Synchronizing")
        wait_identical(p, timeout_s=120)
        self.assertIn("transfer paused at offset %d" % restart["offset"], p.a.log())
        # Resumed exactly where the destination's durable point was: nothing shipped twice.
        cycles = re.findall(r"cycle \d+ committed: (\d+) blocks in \d+ ms \((\d+) bytes shipped, (\d+) re-shipped",
                            p.a.log())
        # (A scheduled cycle may have cut the writes in two: count every cycle's blocks. The
        # re-shipped figure is the session's total so far.)
        self.assertGreaterEqual(sum(int(c[0]) for c in cycles), 24 * MiB // 4096)
        self.assertEqual(int(cycles[-1][2]), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
