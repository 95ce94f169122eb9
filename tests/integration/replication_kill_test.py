#!/usr/bin/python3
"""Plan: kill torture for replication. A source (pre-filled, so the initial sync has data to
ship) replicates to a destination while a writer stamps blocks (sequence number + block number)
through the source's NBD export, one at a time, each with FUA, issuing write j+1 only after j
is acknowledged. At random moments (bounded count, seeded) the source or the destination is
SIGKILLed and restarted, during the initial sync and during cycles. Checked:
  - write order: after the source is killed, the destination's image (once it has committed a
    cycle) holds exactly the writes of a prefix of the acknowledged order — never a later write
    without an earlier one;
  - resumes re-ship at most one window (the source logs every resume; the window is 4 MiB);
  - at the end, with writes stopped: no acknowledged write is missing on the source and the
    destination is byte-identical to it.
TANDEM_REPL_KILLS sets the number of kills (default 4; the `torture` label runs more);
TANDEM_REPL_KILL_SEED replays a run."""
import os
import random
import re
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import Pair, Workdir, wait_identical, wait_until  # noqa: E402

import nbd  # noqa: E402

MiB = 1 << 20
BLOCK = 4096
SIZE = 64 * MiB
FIRST = (32 * MiB) // BLOCK  # the writer's blocks: the second half
COUNT = (SIZE // BLOCK) - FIRST
WINDOW = 4 * MiB
EXTENT = 1 * MiB


def stamp(seq, block):
    return struct.pack("<QQ", seq, block) + bytes([seq & 0xff]) * (BLOCK - 16)


class Writer(threading.Thread):
    def __init__(self, uri, rnd, log, seq):
        super().__init__(daemon=True)
        self.uri, self.rnd, self.log, self.seq = uri, rnd, log, seq
        self.stop_flag = threading.Event()
        self.inflight = None

    def run(self):
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            while not self.stop_flag.is_set():
                b = FIRST + self.rnd.randrange(COUNT)
                self.seq += 1
                self.inflight = (self.seq, b)
                h.pwrite(stamp(self.seq, b), b * BLOCK, nbd.CMD_FLAG_FUA)
                self.log.append((self.seq, b))
                self.inflight = None
                time.sleep(0.002)
        except nbd.Error:
            pass


def read_region(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    data = h.pread(COUNT * BLOCK, FIRST * BLOCK)
    h.shutdown()
    seqs = {}
    for i in range(COUNT):
        blk = data[i * BLOCK:(i + 1) * BLOCK]
        seq, bno = struct.unpack("<QQ", blk[:16])
        if seq == 0 and blk == bytes(BLOCK):
            continue
        if bno != FIRST + i or blk != stamp(seq, bno):
            harness.die("block %d holds bytes no write sent" % (FIRST + i))
        seqs[FIRST + i] = seq
    return seqs


def check_prefix(seqs, log, uncertain, where):
    """The destination must hold the state after some prefix k of the write order. Writes in
    flight when the source was killed (`uncertain`) may or may not have landed."""
    order = sorted(list(log) + list(uncertain))
    unsure = {s for s, _ in uncertain}
    k = max(seqs.values(), default=0)
    history = {}  # block -> seqs written to it, in order, up to k
    for seq, b in order:
        if seq > k:
            break
        history.setdefault(b, []).append(seq)
    for b in set(history) | set(seqs):
        allowed = set()
        for seq in reversed(history.get(b, [])):
            allowed.add(seq)
            if seq not in unsure:
                break
        else:
            allowed.add(0)  # every write to it was uncertain (or none): zeros allowed
        if seqs.get(b, 0) not in allowed:
            harness.die("%s: block %d holds write %s but the prefix up to %d allows only %s: a later write "
                        "is there without an earlier one" % (where, b, seqs.get(b, 0), k, sorted(allowed)))
    return k


def main():
    seed = int(os.environ.get("TANDEM_REPL_KILL_SEED", str(random.SystemRandom().randrange(1 << 30))))
    kills = int(os.environ.get("TANDEM_REPL_KILLS", "4"))
    print("replication kill test: seed %d, %d kills (replay with TANDEM_REPL_KILL_SEED=%d)" % (seed, kills, seed),
          flush=True)
    rnd = random.Random(seed)
    log = []
    uncertain = []  # writes in flight when the source was killed
    seq = 0
    with Workdir() as wd:
        pair = Pair(wd.path, SIZE, rpo=1, a_overrides={"window": "4MiB"}, b_overrides={"window": "4MiB"})
        # Pre-fill the source: the initial sync has 32 MiB of data to ship.
        with open(pair.a.image("vol0"), "wb") as f:
            f.write(random.Random(seed).randbytes(32 * MiB))
            f.truncate(SIZE)
        pair.start()
        checked = 0
        for it in range(1, kills + 1):
            writer = Writer(pair.a.uri("vol0"), random.Random(rnd.randrange(1 << 30)), log, seq)
            writer.start()
            time.sleep(rnd.uniform(0.2, 2.5))
            victim = pair.a if rnd.random() < 0.5 else pair.b
            victim.kill()
            if victim is pair.a:
                writer.stop_flag.set()
                writer.join(timeout=harness.WAIT_S)
                seq = writer.seq
                if writer.inflight:
                    uncertain.append(writer.inflight)
                consistent = "committed and applied" in pair.b.log()
                # Restarting the destination finishes any apply before its export opens.
                pair.b.stop()
                pair.b.start()
                if consistent:
                    k = check_prefix(read_region(pair.b.uri("vol0")), log, uncertain, "kill %d" % it)
                    checked += 1
                    print("kill %d (source): destination holds the first %d of %d acknowledged writes" %
                          (it, k, len(log)), flush=True)
                else:
                    print("kill %d (source): during the initial sync; destination not consistent yet" % it, flush=True)
                pair.a.start()
            else:
                pair.b.start()
                writer.stop_flag.set()
                writer.join(timeout=harness.WAIT_S)
                seq = writer.seq
                print("kill %d (destination): %d acknowledged writes so far" % (it, len(log)), flush=True)
        wait_identical(pair, timeout_s=180)
        final = read_region(pair.a.uri("vol0"))
        latest = {}
        for s, b in log:
            latest[b] = s
        for b, s in latest.items():
            if final.get(b, 0) < s:  # a later (uncertain) write may be there instead
                harness.die("acknowledged write %d to block %d is missing on the source" % (s, b))
        resumes = re.findall(r"resume of (.*?) re-shipped (\d+) bytes", pair.a.log())
        for what, reship in resumes:
            reship = int(reship)
            print("resume of %s re-shipped %d bytes (window %d)" % (what, reship, WINDOW), flush=True)
            if reship > WINDOW + EXTENT:
                harness.die("a resume re-shipped %d bytes, more than one window" % reship)
        rcs = pair.stop()
        if rcs != [0, 0]:
            harness.die("daemons exited %s:\n%s\n---\n%s" % (rcs, pair.a.log(), pair.b.log()))
        print("replication kill test: passed (%d writes, %d prefix checks, %d resumes)" % (len(log), checked, len(resumes)))


if __name__ == "__main__":
    main()
