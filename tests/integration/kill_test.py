#!/usr/bin/python3
"""Plan: SIGKILL tandemd at random moments under load, restart it, and check the durability
invariants against a model. fio writes at random over the first half of the volume while a
checker writes stamped blocks (sequence number + block number) to the second half, one at a
time, some with FUA and the others covered by periodic FLUSHes, recording which writes were
acknowledged durable. After each SIGKILL:
  - every block's content is its last durably acknowledged stamp or a stamp sent after it
    (no acknowledged write lost, nothing invented);
  - every block whose content is not zero (fio's and the checker's), and every block of an
    acknowledged write, is in the recovered dirty map (tandemd --inspect);
  - the restarted daemon serves the same bytes over NBD.
The number of kills is bounded (TANDEM_KILL_ITERATIONS, default 5; the `torture` ctest label
runs more). The seed is printed; TANDEM_KILL_SEED replays a run's choices."""
import os
import random
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import Daemon, Workdir, dirty_set  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20
BLOCK = 4096
SIZE = 128 * MiB
FIO_BYTES = 64 * MiB  # fio owns [0, 64 MiB), the checker [64 MiB, 128 MiB)
CHECK_FIRST = FIO_BYTES // BLOCK
CHECK_BLOCKS = (SIZE - FIO_BYTES) // BLOCK


def stamp(seq, block):
    head = struct.pack("<QQ", seq, block)
    body = bytes([(seq * 131 + i) & 0xff for i in range(256)]) * 16
    return head + body[len(head):BLOCK]


class Model:
    def __init__(self):
        self.durable = {}   # block -> seq that must (at least) be there; absent = zeros
        self.later = {}     # block -> seqs sent after the durable one
        self.acked = set()  # blocks with an acknowledged write

    def sent(self, b, seq):
        self.later.setdefault(b, []).append(seq)

    def make_durable(self, b, seq):
        if seq <= self.durable.get(b, 0):
            return
        self.durable[b] = seq
        self.later[b] = [s for s in self.later.get(b, []) if s > seq]

    def acceptable(self, b):
        return {self.durable.get(b, 0)} | set(self.later.get(b, []))


class Checker(threading.Thread):
    """Writes stamped blocks one at a time until told to stop or the daemon dies."""

    def __init__(self, uri, model, rnd, seq0):
        super().__init__(daemon=True)
        self.uri, self.model, self.rnd, self.seq = uri, model, rnd, seq0
        self.stop_flag = threading.Event()
        self.writes = 0
        self.error = None

    def run(self):
        pending = []  # completed, not yet covered by a flush
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            # FLUSH goes out on a second connection: with CAN_MULTI_CONN a flush on any
            # connection covers writes completed on all of them, and the model relies on it.
            hf = nbd.NBD()
            hf.connect_uri(self.uri)
            while not self.stop_flag.is_set():
                b = CHECK_FIRST + self.rnd.randrange(CHECK_BLOCKS)
                self.seq += 1
                fua = self.rnd.random() < 0.3
                self.model.sent(b, self.seq)
                h.pwrite(stamp(self.seq, b), b * BLOCK, nbd.CMD_FLAG_FUA if fua else 0)
                self.model.acked.add(b)
                self.writes += 1
                if fua:
                    self.model.make_durable(b, self.seq)
                else:
                    pending.append((b, self.seq))
                if len(pending) >= 16:
                    covered, pending = pending, []
                    hf.flush()
                    for cb, cs in covered:
                        self.model.make_durable(cb, cs)
        except nbd.Error as e:
            self.error = e  # expected once the daemon is killed


def verify(d, model, it):
    vol = d.inspect()["vol0"]
    dirty = dirty_set(vol)
    with open(d.image("vol0"), "rb") as f:
        img = f.read()
    assert len(img) == SIZE
    zero = bytes(BLOCK)
    nonzero_blocks = 0
    for b in range(SIZE // BLOCK):
        blk = img[b * BLOCK:(b + 1) * BLOCK]
        if blk == zero:
            seq = 0
        else:
            nonzero_blocks += 1
            if b not in dirty:
                harness.die("kill %d: block %d was written but is not in the dirty map" % (it, b))
            if b < CHECK_FIRST:
                continue
            seq, bno = struct.unpack("<QQ", blk[:16])
            if bno != b or blk != stamp(seq, b):
                harness.die("kill %d: block %d holds bytes no write ever sent (torn or misplaced)" % (it, b))
        if b >= CHECK_FIRST and seq not in model.acceptable(b):
            harness.die("kill %d: block %d holds stamp %d but the durably acknowledged stamp is %d "
                        "(acknowledged write lost)" % (it, b, seq, model.durable.get(b, 0)))
    missing = [b for b in model.acked if b not in dirty]
    if missing:
        harness.die("kill %d: %d acknowledged blocks are not dirty, e.g. %d" % (it, len(missing), missing[0]))
    return nonzero_blocks, len(dirty)


def main():
    seed = int(os.environ.get("TANDEM_KILL_SEED", str(random.SystemRandom().randrange(1 << 30))))
    iterations = int(os.environ.get("TANDEM_KILL_ITERATIONS", "5"))
    print("kill test: seed %d, %d kills (replay with TANDEM_KILL_SEED=%d)" % (seed, iterations, seed), flush=True)
    rnd = random.Random(seed)
    model = Model()
    seq = 0
    with Workdir() as wd:
        # Small intent regions and a small hot set: evictions happen all the time under load.
        d = Daemon(wd.path, [("vol0", SIZE)],
                   extra_volume_keys={"intent_region_size": "1MiB", "intent_regions_max": 8})
        for it in range(1, iterations + 1):
            d.start()
            fio = subprocess.Popen(
                ["fio", "--name=load", "--ioengine=nbd", "--uri=" + d.uri("vol0"), "--rw=randwrite",
                 "--bsrange=4k-64k", "--iodepth=16", "--offset=0", "--size=%d" % FIO_BYTES,
                 "--time_based", "--runtime=60", "--randseed=%d" % rnd.randrange(1 << 30),
                 "--output=/dev/null"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            checker = Checker(d.uri("vol0"), model, random.Random(rnd.randrange(1 << 30)), seq)
            checker.start()
            time.sleep(rnd.uniform(0.3, 2.0))
            d.kill()
            checker.stop_flag.set()
            checker.join(timeout=harness.WAIT_S)
            if checker.is_alive():
                harness.die("checker did not stop after the kill")
            seq = checker.seq
            try:
                fio.wait(timeout=harness.WAIT_S)
            except subprocess.TimeoutExpired:
                fio.kill()
                fio.wait(timeout=harness.WAIT_S)
            nonzero, dirty = verify(d, model, it)
            print("kill %d: checker wrote %d blocks (%d durable so far); %d blocks written in all, "
                  "%d dirty after recovery" % (it, checker.writes, len(model.durable), nonzero, dirty), flush=True)
            if checker.writes == 0:
                harness.die("kill %d: the checker wrote nothing; the test proved nothing" % it)
        # Finally the restarted daemon serves what the file holds.
        d.start()
        h = nbd.NBD()
        h.connect_uri(d.uri("vol0"))
        with open(d.image("vol0"), "rb") as f:
            for b in list(model.durable)[:200]:
                f.seek(b * BLOCK)
                if h.pread(BLOCK, b * BLOCK) != f.read(BLOCK):
                    harness.die("block %d reads differently through NBD than from the file" % b)
        h.shutdown()
        rc = d.stop()
        if rc != 0:
            harness.die("tandemd exited %s on SIGTERM:\n%s" % (rc, d.log()))
    print("kill test: passed")


if __name__ == "__main__":
    main()
