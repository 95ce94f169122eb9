#!/usr/bin/python3
"""Plan: the control API's transition table on a real pair of daemons. The pair is walked
through the states it can reach (Initializing, OK, Paused on both sites, System_Paused, Paused
on one site only, Paused_For_NDU, Failed_Over on both roles); in each, every action the spec's table refuses
is issued on each site, and the answer must be the spec's status (400 for the wrong role, 422
otherwise) with an error_response body, and the state must not change. The accepted cells are
exercised by the workflow tests (api_test, failover_test); the table itself is also checked
cell by cell in tests/unit/replication/control_test.cpp.
"""
import os
import random
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import Pair, Workdir, wait_until  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB
BASE = "/api/rest/replication_session/s-vol0/"

# The spec's table: state -> cells for P R S PF UF RP T+ T-.
TABLE = {
    "Initializing": ["422", "422", "422", "422", "422 unless force", "422", "422", "422"],
    "OK": ["→Paused", "422", "→Synchronizing", "→Failing_Over", "→Failing_Over_For_DR", "422", "test on", "422"],
    "System_Paused": ["→Paused", "422", "→Synchronizing", "→Failing_Over", "→Failing_Over_For_DR", "422", "test on",
                      "422"],
    "Paused": ["422", "→OK or →Synchronizing", "422", "422", "→Failing_Over_For_DR", "422", "test on", "422"],
    "Paused, local only": ["→Paused both if peer reachable, else 422", "422", "422", "422", "→Failing_Over_For_DR",
                           "422", "test on", "422"],
    "Paused_For_NDU": ["422", "422", "422", "422", "→Failing_Over_For_DR", "422", "422", "422"],
    "Failed_Over": ["422", "422", "422", "422", "force only", "→Reprotecting", "422", "422"],
}
ACTIONS = [("pause", None), ("resume", None), ("sync", None), ("failover", '{"is_planned": true}'),
           ("failover", '{"is_planned": false}'), ("reprotect", None), ("start_failover_test", None),
           ("stop_failover_test", None)]


def expected(row, col, role, peer_reachable):
    """The status the spec gives for a refused cell, or None when the cell accepts."""
    verb = ACTIONS[col][0]
    unplanned = col == 4
    # Wrong role first (400).
    if verb == "sync" and role == "Destination":
        return 400
    if col == 3 and role == "Destination":
        return 400
    if unplanned and role == "Source" and row != "Failed_Over":
        return 400
    if verb in ("start_failover_test", "stop_failover_test") and role == "Source":
        return 400
    if verb == "reprotect" and role == "Destination" and row == "Failed_Over":
        return 400
    cell = TABLE[row][col]
    if cell in ("422", "422 unless force", "force only"):
        return 422
    if cell.startswith("→Paused both"):
        return None if peer_reachable else 422
    return None


class Table(unittest.TestCase):
    def setUp(self):
        self.wd = Workdir()
        self.pair = Pair(self.wd.path, SIZE, a_overrides={"rate_limit": "4MiB"})
        self.checked = 0

    def tearDown(self):
        rcs = self.pair.stop()
        logs = self.pair.a.log()[-6000:] + "\n----\n" + self.pair.b.log()[-6000:]
        self.wd.__exit__(None, None, None)
        self.assertTrue(all(rc == 0 for rc in rcs), "a daemon did not shut down cleanly:\n" + logs)

    def row(self, d, row, state, peer_reachable=True):
        s = d.session()
        self.assertEqual(s["state"], state, (d.name, row))
        role = s["role"]
        for col, (verb, body) in enumerate(ACTIONS):
            want = expected(row, col, role, peer_reachable)
            if want is None:
                continue
            code, payload = d.api("POST", BASE + verb, body)
            where = "%s / %s%s on %s (%s)" % (row, verb, " " + body if body else "", d.name, role)
            self.assertEqual(code, want, "%s: %s" % (where, payload))
            m = payload["messages"][0]
            self.assertEqual(set(m), {"code", "severity", "message_l10n", "arguments"}, where)
            self.assertEqual(m["severity"], "Error")
            self.assertEqual(m["code"], "0xE0101001000D" if want == 400 else "0xE0101001000C", where)
            self.assertEqual(d.session()["state"], state, "state changed by a refused " + where)
            self.checked += 1

    def test_refused_cells_on_a_real_pair(self):
        p = self.pair
        # 16 MiB of data at 4 MiB/s: several seconds of Initializing.
        with open(p.a.image("vol0"), "wb") as f:
            f.truncate(SIZE)
            f.write(random.Random(3).randbytes(16 * MiB))
        p.start()
        wait_until(lambda: p.b.session()["state"] == "Initializing" and p.b.session()["data_connection_state"] == "OK",
                   "the initial sync", timeout_s=30, interval_s=0.05)
        self.row(p.b, "Initializing", "Initializing")
        code, _ = p.b.api("POST", BASE + "failover", '{"is_planned": false}')
        self.assertEqual(code, 422)
        wait_until(lambda: p.a.session()["state"] == "OK" and p.b.session()["state"] == "OK", "OK",
                   timeout_s=120, interval_s=0.2)
        for d in (p.a, p.b):
            self.row(d, "OK", "OK")
        code, _ = p.a.api("POST", BASE + "pause")
        self.assertEqual(code, 204)
        for d in (p.a, p.b):
            self.row(d, "Paused", "Paused")
        code, _ = p.b.api("POST", BASE + "resume")
        self.assertEqual(code, 204)
        p.b.kill()  # lost: a fault, not a maintenance shutdown
        wait_until(lambda: p.a.session()["state"] == "System_Paused", "System_Paused")
        self.row(p.a, "System_Paused", "System_Paused", peer_reachable=False)
        code, _ = p.a.api("POST", BASE + "pause")
        self.assertEqual(code, 204)
        self.assertTrue(p.a.session()["local_only_paused"])
        self.row(p.a, "Paused, local only", "Paused", peer_reachable=False)
        p.b.start()
        wait_until(lambda: p.a.session()["data_connection_state"] == "OK", "reconnect")
        code, _ = p.a.api("POST", BASE + "pause")
        self.assertEqual(code, 204)
        code, _ = p.a.api("POST", BASE + "resume")
        self.assertEqual(code, 204)
        wait_until(lambda: p.a.session()["state"] == "OK" and p.b.session()["state"] == "OK", "OK again")
        p.b.stop()  # a maintenance shutdown
        wait_until(lambda: p.a.session()["state"] == "Paused_For_NDU", "Paused_For_NDU")
        self.row(p.a, "Paused_For_NDU", "Paused_For_NDU", peer_reachable=False)
        p.b.start()
        wait_until(lambda: p.a.session()["state"] == "OK" and p.b.session()["state"] == "OK", "back from the NDU")
        code, _ = p.a.api("POST", BASE + "failover", '{"is_planned": true}')
        self.assertEqual(code, 204)
        wait_until(lambda: p.a.session()["state"] == "Failed_Over" and p.b.session()["state"] == "Failed_Over",
                   "Failed_Over", timeout_s=120)
        for d in (p.a, p.b):
            self.row(d, "Failed_Over", "Failed_Over")
        print("%d refused cells checked" % self.checked, flush=True)
        self.assertGreaterEqual(self.checked, 40)


if __name__ == "__main__":
    unittest.main(verbosity=2)
