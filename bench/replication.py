#!/usr/bin/python3
"""tandem replication benchmarks: two tandemd on loopback over mutual TLS, against baselines
measured in the same run on the same image.

Scenarios (each repetition runs all three, in this order):

  initial  Initial sync of a volume full of random data (default 2 GiB) into an empty
           destination. Baselines: fio sequential O_DIRECT read of the source image (io_uring,
           1 MiB, QD8: the physical bound of reading it) and rsync of the image into a new file.
           tandem's figure is its own "initial sync complete in N ms" (transfer start to the
           destination's durable checkpoint of the last extent). Goal: >= 0.7x the fio read rate.
  delta    With the pair in sync, the destination daemon is stopped and 1% of the volume's
           4 KiB blocks are rewritten at random through the source's NBD export. Baseline:
           `rsync --inplace --no-whole-file` of the source image onto the destination's (old)
           image, run while both daemons are stopped. Then both daemons run and tandem ships
           the cycle: its figure is the cycle's "committed ... in N ms", its wire bytes the
           TLS connection's bytes_sent (ss -ti: handshake, hellos, frames, keep-alives: all of
           it). Goals: >= 20x faster than rsync; wire bytes <= 1.1x the changed bytes.
  resume   Initial sync again into an empty destination; when the destination holds half the
           volume the source is SIGKILLed and restarted. The destination logs how many bytes it
           had received that the resumed transfer ships again. Goal: < 1% of the volume.

Before every timed step the files involved are written back and evicted from the page cache
(settle), so no run reads what the previous one cached. Nothing here asserts a timing: ratios
are printed and recorded (--record) in docs/benchmarks.md; a human judges them.

Every process started here is stopped by PID (the integration harness kills its daemons at
exit); every wait is bounded.

Usage: bench/replication.py [--size 2GiB] [--reps 3] [--record] [--build-dir DIR | --no-build]
"""

import argparse
import datetime as dt
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
import run as nbdbench  # noqa: E402  (shared helpers: log, settle, build, machine facts)
import harness  # noqa: E402
from harness import Pair  # noqa: E402

import nbd  # noqa: E402

from run import BenchError, log, settle  # noqa: E402

MiB = 1 << 20
SYNC_S_MAX = 30 * 60      # an initial sync of the image on a slow, busy disk
STEP_S_MAX = 10 * 60      # rsync, fio, one cycle
GOALS = {"initial": 0.7, "delta": 20.0, "wire": 1.1, "resume": 0.01}


def settle_all(*paths):
    for p in paths:
        if Path(p).exists():
            settle(Path(p))


def quiet(args):
    waited = nbdbench.wait_quiet(args.quiet_wait, args.quiet_busy)
    if waited > 1:
        log(f"waited {waited:.0f} s for a lull in other load")


def fill(path: Path, size: int):
    """The source image: random bytes, written once (fio refills every buffer)."""
    if path.exists() and path.stat().st_size == size:
        return
    log(f"writing {size >> 20} MiB of random data to {path}")
    path.unlink(missing_ok=True)
    subprocess.run(["fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1m", "--direct=1",
                    f"--size={size}", "--refill_buffers", "--buffer_compress_percentage=0",
                    "--ioengine=io_uring", "--iodepth=8", "--output-format=terse"],
                   check=True, timeout=nbdbench.FILL_S_MAX, stdout=subprocess.DEVNULL)


def new_pair(work: Path, master: Path, size: int, rpo: int):
    """A fresh pair whose source image is the master image (hard link: nothing copied)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    pair = Pair(str(work), size, rpo=rpo)
    for d in (pair.a, pair.b):
        d.base_config = d.base_config.replace('log_level = "debug"', 'log_level = "info"')
        d.write_config()
    os.link(master, pair.a.image("vol0"))
    return pair


def wait_log(daemon, pattern, start_at, timeout_s):
    """Waits (bounded) for a regex in the daemon's log after byte offset start_at."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = rx.search(daemon.log()[start_at:])
        if m:
            return m
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise BenchError(f"tandemd {daemon.name} exited with {daemon.proc.returncode}; log:\n{daemon.log()[-3000:]}")
        time.sleep(0.1)
    raise BenchError(f"timed out after {timeout_s} s waiting for /{pattern}/ in {daemon.log_path}")


def fio_read_mibps(path: Path, size: int) -> float:
    out = subprocess.run(["fio", "--name=seqread", f"--filename={path}", "--rw=read", "--bs=1m", "--iodepth=8",
                          "--direct=1", "--ioengine=io_uring", f"--size={size}", "--output-format=json"],
                         check=True, timeout=STEP_S_MAX, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["read"]["bw_bytes"] / MiB


def timed(argv):
    t0 = time.monotonic()
    r = subprocess.run(argv, check=True, timeout=STEP_S_MAX, capture_output=True, text=True)
    return time.monotonic() - t0, r.stdout


def tls_bytes_sent(dst_port: int) -> int:
    """bytes_sent of the established TCP connection(s) to 127.0.0.1:dst_port (the source dials)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", "dst", f"127.0.0.1:{dst_port}"],
                         check=True, timeout=30, capture_output=True, text=True).stdout
    sent = [int(x) for x in re.findall(r"bytes_sent:(\d+)", out)]
    if len(sent) != 1:
        raise BenchError(f"expected one replication connection to port {dst_port}, ss shows:\n{out}")
    return sent[0]


def same(a: str, b: str) -> bool:
    h = [subprocess.run(["xxh128sum", p], check=True, capture_output=True, text=True, timeout=STEP_S_MAX).stdout.split()[0]
         for p in (a, b)]
    return h[0] == h[1]


def rep_initial_and_delta(args, work: Path, master: Path, rep: int) -> dict:
    size = args.size
    r = {}
    # Baselines first, on the master image.
    quiet(args)
    settle_all(master)
    r["fio_mibps"] = fio_read_mibps(master, size)
    log(f"  fio O_DIRECT sequential read: {r['fio_mibps']:.0f} MiB/s")
    copy = work.parent / "rsync-copy.img"
    copy.unlink(missing_ok=True)
    quiet(args)
    settle_all(master)
    secs, _ = timed(["rsync", "--inplace", str(master), str(copy)])
    copy.unlink()
    r["rsync_mibps"] = size / MiB / secs
    log(f"  rsync of the image: {r['rsync_mibps']:.0f} MiB/s ({secs:.1f} s)")

    pair = new_pair(work, master, size, rpo=2)
    try:
        quiet(args)
        settle_all(master)
        pair.start()
        m = wait_log(pair.a, r"initial sync complete in (\d+) ms \((\d+) bytes shipped", 0, SYNC_S_MAX)
        ms = max(1, int(m.group(1)))
        r["tandem_mibps"] = size / MiB / (ms / 1000)
        log(f"  tandem initial sync: {r['tandem_mibps']:.0f} MiB/s ({ms} ms, {int(m.group(2))} bytes shipped)")
        # Initializing ends with the first cycle; wait for it so the pair is in sync.
        wait_log(pair.b, r"cycle \d+ committed and applied", 0, STEP_S_MAX)

        # Delta: 1% of the 4 KiB blocks rewritten at random while the destination is down.
        rcb = pair.b.stop()
        if rcb != 0:
            raise BenchError(f"site-b exited with {rcb}")
        blocks = size // 4096
        changed = sorted(random.Random(1000 + rep).sample(range(blocks), blocks // 100))
        h = nbd.NBD()
        h.connect_uri(pair.a.uri("vol0"))
        rnd = random.Random(2000 + rep)
        for b in changed:
            h.pwrite(rnd.randbytes(4096), b * 4096)
        h.flush()
        h.shutdown()
        r["changed_bytes"] = len(changed) * 4096
        rca = pair.a.stop()
        if rca != 0:
            raise BenchError(f"site-a exited with {rca}")
        # rsync's delta transfer onto the destination's old image (both daemons down). tandem
        # then ships its dirty blocks regardless of what the destination file already holds.
        quiet(args)
        settle_all(pair.a.image("vol0"), pair.b.image("vol0"))
        secs, out = timed(["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--stats", pair.a.image("vol0"), pair.b.image("vol0")])
        r["rsync_delta_s"] = secs
        m = re.search(r"Total bytes sent: ([\d,]+)", out)
        r["rsync_sent"] = int(m.group(1).replace(",", "")) if m else None
        log(f"  rsync --inplace --no-whole-file: {secs:.2f} s, {r['rsync_sent']} bytes sent")
        quiet(args)
        settle_all(pair.a.image("vol0"), pair.b.image("vol0"))
        a_mark, b_mark = len(pair.a.log()), len(pair.b.log())
        pair.b.start()
        pair.a.start()
        m = wait_log(pair.a, r"cycle \d+ committed: (\d+) blocks in (\d+) ms \((\d+) bytes shipped", a_mark, STEP_S_MAX)
        r["tandem_delta_s"] = max(1, int(m.group(2))) / 1000
        r["tandem_wire"] = tls_bytes_sent(pair.pb)
        r["cycle_blocks"] = int(m.group(1))
        log(f"  tandem delta cycle: {r['tandem_delta_s']:.3f} s, {r['cycle_blocks']} blocks, "
            f"{r['tandem_wire']} bytes on the wire for {r['changed_bytes']} changed")
        wait_log(pair.b, r"cycle \d+ committed and applied", b_mark, STEP_S_MAX)
    finally:
        rcs = pair.stop()
    if any(rc != 0 for rc in rcs):
        raise BenchError(f"a daemon did not stop cleanly: {rcs}")
    if not same(pair.a.image("vol0"), pair.b.image("vol0")):
        raise BenchError("after the delta cycle the images differ")
    return r


def rep_resume(args, work: Path, master: Path) -> dict:
    size = args.size
    pair = new_pair(work, master, size, rpo=2)
    r = {}
    try:
        quiet(args)
        settle_all(master)
        pair.start()
        dest = Path(pair.b.image("vol0"))
        deadline = time.monotonic() + SYNC_S_MAX
        while dest.stat().st_blocks * 512 < size // 2:
            if time.monotonic() > deadline:
                raise BenchError("the destination did not reach half the volume in time")
            if pair.a.proc.poll() is not None:
                raise BenchError("site-a exited during the initial sync")
            time.sleep(0.02)
        r["killed_at"] = dest.stat().st_blocks * 512
        pair.a.kill()
        pair.a.start()
        wait_log(pair.a, r"initial sync complete in", 0, SYNC_S_MAX)
        # The resumed transfer's sync_begin; the destination says what of it it had received
        # already (no such line: the source stopped exactly at a checkpoint, nothing again).
        starts = [int(x) for x in re.findall(r"initial sync \(full copy\) from \S+ at offset (\d+)", pair.b.log())]
        if len(starts) < 2 or starts[-1] == 0:
            raise BenchError("the destination logged no resumed initial sync:\n" + pair.b.log()[-3000:])
        m = re.search(r"initial sync resumes at offset (\d+): (\d+) bytes received before", pair.b.log())
        r["resume_offset"] = starts[-1]
        r["reshipped"] = int(m.group(2)) if m else 0
        log(f"  resume: killed at {r['killed_at'] >> 20} MiB received, resumed at {r['resume_offset'] >> 20} MiB, "
            f"{r['reshipped']} bytes shipped again ({100 * r['reshipped'] / size:.2f}% of the volume)")
        wait_log(pair.b, r"cycle \d+ committed and applied", 0, STEP_S_MAX)
    finally:
        pair.stop()
    if not same(pair.a.image("vol0"), pair.b.image("vol0")):
        raise BenchError("after the resumed initial sync the images differ")
    return r


def med(rows, key):
    vals = [x[key] for x in rows if x.get(key) is not None]
    return statistics.median(vals) if vals else None


def report(args, rows, resumes):
    fio, rs, tdm = med(rows, "fio_mibps"), med(rows, "rsync_mibps"), med(rows, "tandem_mibps")
    rsd, tdd = med(rows, "rsync_delta_s"), med(rows, "tandem_delta_s")
    wire = med(rows, "tandem_wire")
    changed = rows[0]["changed_bytes"]
    resh = med(resumes, "reshipped")

    def ok(met):
        return "meets" if met else "**misses**"

    init_ratio, delta_ratio, wire_ratio = tdm / fio, rsd / tdd, wire / changed
    resume_frac = resh / args.size
    lines = [
        "| scenario | tandem | baseline(s), same run | ratio | goal |",
        "|---|---:|---|---:|---|",
        f"| initial sync {args.size >> 20} MiB | {tdm:.0f} MiB/s | fio O_DIRECT read {fio:.0f} MiB/s; rsync {rs:.0f} MiB/s "
        f"| {init_ratio:.2f}× fio, {tdm / rs:.2f}× rsync | ≥ 0.7× fio: {ok(init_ratio >= GOALS['initial'])} |",
        f"| delta, 1% of 4 KiB blocks | {tdd * 1000:.0f} ms | rsync --inplace --no-whole-file {rsd * 1000:.0f} ms "
        f"| {delta_ratio:.1f}× faster | ≥ 20×: {ok(delta_ratio >= GOALS['delta'])} |",
        f"| delta: bytes on the wire | {wire / MiB:.1f} MiB (TLS, all frames) | changed {changed / MiB:.1f} MiB; "
        f"rsync sent {med(rows, 'rsync_sent') / MiB:.1f} MiB | {wire_ratio:.3f}× changed | ≤ 1.1×: {ok(wire_ratio <= GOALS['wire'])} |",
        f"| resume after SIGKILL at 50% | {resh / MiB:.1f} MiB shipped again | volume {args.size >> 20} MiB "
        f"| {100 * resume_frac:.2f}% | < 1%: {ok(resume_frac < GOALS['resume'])} |",
    ]
    detail = ["| rep | fio MiB/s | rsync MiB/s | tandem MiB/s | rsync delta s | tandem delta s | wire bytes | cycle blocks | re-shipped |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, (x, y) in enumerate(zip(rows, resumes), 1):
        detail.append(f"| {i} | {x['fio_mibps']:.0f} | {x['rsync_mibps']:.0f} | {x['tandem_mibps']:.0f} | "
                      f"{x['rsync_delta_s']:.2f} | {x['tandem_delta_s']:.3f} | {x['tandem_wire']} | {x['cycle_blocks']} | "
                      f"{y['reshipped']} |")
    return "\n".join(lines), "\n".join(detail)


def record(args, started, summary, detail, facts):
    date = started.strftime("%Y-%m-%d")
    begin, end = f"<!-- bench:{date}:replication -->", f"<!-- /bench:{date}:replication -->"
    f = facts
    body = f"""{begin}
## {date} — replication

Run {started.strftime('%Y-%m-%d %H:%M')} (`bench/replication.py {' '.join(sys.argv[1:])}`): {args.reps}
repetition(s), median reported. Two `tandemd` on loopback over mutual TLS 1.3, one volume of
{args.size >> 20} MiB of random data, default window (64 MiB) and extent size (1 MiB), info logging.
Files written back and evicted from the page cache before every timed step.

{summary}

Machine: {f['nproc']} vCPU ({f['cpu']}), {f['mem_gib']} GiB RAM, Linux {f['kernel']}; images on
{f['backing_fs']} ({f['backing_dev']}), source and destination on the same disk (the destination's
writes compete with the source's reads; a real pair has two disks). Load average at start:
{f['loadavg_start']}. tandem {f['tandem_commit']}, {f['tandem_build_type']}; {f['fio']};
{subprocess.run(['rsync', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}.

<details><summary>Per-repetition values</summary>

{detail}

</details>
{end}
"""
    nbdbench.write_section(begin, end, body)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GiB", help="volume size (default 2GiB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work-dir", default="/var/tmp/tandem-bench-repl")
    ap.add_argument("--build-dir", default=None)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--quiet-busy", type=float, default=25.0)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    args.size = nbdbench.parse_size(args.size)
    if args.size % (4 * MiB) != 0:
        raise SystemExit("--size must be a multiple of 4 MiB")
    default_dir = args.build_dir is None
    build_dir = Path(args.build_dir or nbdbench.REPO / "build" / "release").resolve()
    tandemd = build_dir / "daemon" / "tandemd" if args.no_build else nbdbench.build_tandemd(build_dir, default_dir)
    harness.TANDEMD = str(tandemd)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    master = work / "source.img"
    fill(master, args.size)
    started = dt.datetime.now()
    facts = nbdbench.machine_facts(master, build_dir)
    rows, resumes = [], []
    for rep in range(args.reps):
        log(f"repetition {rep + 1}/{args.reps}")
        rows.append(rep_initial_and_delta(args, work / "pair", master, rep))
        resumes.append(rep_resume(args, work / "pair", master))
    shutil.rmtree(work / "pair", ignore_errors=True)
    summary, detail = report(args, rows, resumes)
    print(summary)
    print()
    print(detail)
    if args.record:
        record(args, started, summary, detail, facts)


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
