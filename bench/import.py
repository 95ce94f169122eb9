#!/usr/bin/python3
"""tandem import benchmark: an import session against nbdcopy, from the same source to the same
kind of target, in the same run.

  throughput  A source of random data (default 2 GiB) served by nbdkit's file plugin on a Unix
              socket. Baseline: `nbdcopy` from that server into a new file on the same disk.
              tandem: `POST /api/rest/import_session` into a new file-backed volume, timed from
              the request to Ready_For_Cutover (everything copied and durable). Both report
              MiB/s and their CPU seconds (tandemd's own, nbdcopy's own). Goal: >= 0.8x
              nbdcopy's throughput.
  latency     fio's nbd engine writes 4 KiB at random (QD1) through the importing volume's
              export while a second import of the same source runs (rate-limited so that the
              copy outlasts the fio run), then with that import paused (writes still mirrored
              to the source), then once it is cut over (no import). Reported: p50/p99 write
              latency and IOPS in each.

Files are written back and evicted from the page cache before every timed step. Nothing here
asserts a timing: ratios are printed and recorded (--record) in docs/benchmarks.md.

Usage: bench/import.py [--size 2GiB] [--reps 3] [--record] [--build-dir DIR | --no-build]
"""

import argparse
import datetime as dt
import json
import os
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
from harness import Daemon  # noqa: E402
from replication import fill, quiet  # noqa: E402
from run import BenchError, log, settle  # noqa: E402

MiB = 1 << 20
STEP_S_MAX = 20 * 60
GOAL = 0.8


def nbdkit(work: Path, source: Path):
    sock = work / "source.sock"
    sock.unlink(missing_ok=True)
    p = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "file", str(source)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nbdbench.wait_listening(sock, p, "nbdkit")
    return p, "nbd+unix:///?socket=" + str(sock)


def stop(p):
    if p is not None and p.poll() is None:
        p.terminate()
        p.wait(timeout=60)


def rep_nbdcopy(work: Path, uri: str, size: int) -> dict:
    target = work / "nbdcopy.img"
    target.unlink(missing_ok=True)
    t0 = time.monotonic()
    r = subprocess.run(["/usr/bin/time", "-f", "%U %S", "nbdcopy", "--flush", uri, str(target)],
                       capture_output=True, text=True, timeout=STEP_S_MAX)
    secs = time.monotonic() - t0
    if r.returncode != 0:
        raise BenchError("nbdcopy failed: " + r.stderr[-2000:])
    user, system = (float(x) for x in r.stderr.strip().splitlines()[-1].split())
    target.unlink()
    return {"mibps": size / MiB / secs, "secs": secs, "cpu_s": user + system}


def new_daemon(work: Path) -> Daemon:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    d = Daemon(str(work), [("vol0", 4 * MiB)])  # a configuration names at least one volume
    d.base_config = d.base_config.replace('log_level = "debug"', 'log_level = "info"')
    d.write_config()
    return d.start()


def create(d: Daemon, uri: str, vid: str, work: Path, rate: int = 0) -> str:
    body = {"name": "bench-" + vid, "source": {"uri": uri}, "rate_limit": rate,
            "volume": {"id": vid, "path": str(work / (vid + ".img")), "nbd_socket": str(work / (vid + ".nbd"))}}
    code, imp = d.api("POST", "/api/rest/import_session", json.dumps(body))
    if code != 201:
        raise BenchError(f"import not created: {imp}")
    return imp["id"]


def wait_state(d: Daemon, iid: str, state: str):
    deadline = time.monotonic() + STEP_S_MAX
    while time.monotonic() < deadline:
        code, imp = d.api("GET", "/api/rest/import_session/" + iid)
        if code == 200 and imp["state"] == state:
            return imp
        if code != 200 or imp["state"] in ("Failed", "Cancelled"):
            raise BenchError(f"import {iid}: {imp}")
        time.sleep(0.05)
    raise BenchError(f"import {iid} not {state} after {STEP_S_MAX} s")


def rep_import(work: Path, uri: str, size: int) -> dict:
    d = new_daemon(work / "daemon")
    try:
        cpu0 = nbdbench.proc_cpu_s(d.proc)
        t0 = time.monotonic()
        iid = create(d, uri, "imp", work / "daemon")
        imp = wait_state(d, iid, "Ready_For_Cutover")
        secs = time.monotonic() - t0
        cpu = nbdbench.proc_cpu_s(d.proc) - cpu0
    finally:
        d.stop()
    shutil.rmtree(work / "daemon", ignore_errors=True)
    return {"mibps": size / MiB / secs, "secs": secs, "cpu_s": cpu, "copied": imp["copied_bytes"]}


def fio_lat(uri_sock: Path, export: str, secs: int) -> dict:
    out = subprocess.run(["fio", "--name=lat", "--ioengine=nbd", f"--uri=nbd+unix:///{export}?socket={uri_sock}",
                          "--rw=randwrite", "--bs=4k", "--iodepth=1", "--size=1g", f"--runtime={secs}",
                          "--time_based", "--output-format=json"],
                         check=True, capture_output=True, text=True, timeout=STEP_S_MAX).stdout
    w = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    pct = w["clat_ns"]["percentile"]
    return {"iops": w["iops"], "p50_us": pct["50.000000"] / 1000, "p99_us": pct["99.000000"] / 1000}


def rep_latency(work: Path, uri: str, size: int, secs: int) -> dict:
    d = new_daemon(work / "daemon")
    try:
        # Paced so that the copy outlasts the fio run (it starts in the first second).
        rate = max(16 * MiB, size // (secs + 10))
        iid = create(d, uri, "lat", work / "daemon", rate)
        during = fio_lat(work / "daemon" / "lat.nbd", "lat", secs)
        code, imp = d.api("GET", "/api/rest/import_session/" + iid)
        still = imp["state"] == "Copy_In_Progress"
        # Paused: no copy, but every write still goes to both copies (and its write-intent
        # region is made durable first): what the mirror alone costs.
        code, _ = d.api("POST", f"/api/rest/import_session/{iid}/pause")
        wait_state(d, iid, "Paused")
        paused = fio_lat(work / "daemon" / "lat.nbd", "lat", secs)
        code, _ = d.api("POST", f"/api/rest/import_session/{iid}/resume")
        wait_state(d, iid, "Ready_For_Cutover")
        code, _ = d.api("POST", f"/api/rest/import_session/{iid}/cutover")
        wait_state(d, iid, "Import_Completed")
        after = fio_lat(work / "daemon" / "lat.nbd", "lat", secs)
    finally:
        d.stop()
    shutil.rmtree(work / "daemon", ignore_errors=True)
    return {"during": during, "paused": paused, "after": after, "copy_outlasted_fio": still}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fio-seconds", type=int, default=10)
    ap.add_argument("--work-dir", default="/var/tmp/tandem-bench-import")
    ap.add_argument("--build-dir", default=None)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--quiet-busy", type=float, default=25.0)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    args.size = nbdbench.parse_size(args.size)
    default_dir = args.build_dir is None
    build_dir = Path(args.build_dir or nbdbench.REPO / "build" / "release").resolve()
    tandemd = build_dir / "daemon" / "tandemd" if args.no_build else nbdbench.build_tandemd(build_dir, default_dir)
    harness.TANDEMD = str(tandemd)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    source = work / "source.img"
    fill(source, args.size)
    started = dt.datetime.now()
    facts = nbdbench.machine_facts(source, build_dir)
    kit, uri = nbdkit(work, source)
    copies, imports, lats = [], [], []
    try:
        for rep in range(args.reps):
            log(f"repetition {rep + 1}/{args.reps}")
            for first in ((rep_nbdcopy, copies), (rep_import, imports))[:: 1 if rep % 2 == 0 else -1]:
                settle(source)
                quiet(args)
                fn, out = first
                out.append(fn(work, uri, args.size))
                log(f"  {fn.__name__}: {out[-1]}")
        settle(source)
        quiet(args)
        lats.append(rep_latency(work, uri, args.size, args.fio_seconds))
        log(f"  latency: {lats[-1]}")
    finally:
        stop(kit)
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    ratio = med(imports, "mibps") / med(copies, "mibps")
    lat = lats[0]
    summary = "\n".join([
        "| measure | nbdcopy | tandem import | ratio |",
        "|---|---|---|---|",
        f"| throughput, {args.size >> 20} MiB random data (MiB/s) | {med(copies, 'mibps'):.0f} | "
        f"{med(imports, 'mibps'):.0f} | **{ratio:.2f}×** (goal ≥ {GOAL}×) |",
        f"| CPU seconds for the whole copy | {med(copies, 'cpu_s'):.2f} | {med(imports, 'cpu_s'):.2f} | "
        f"{med(imports, 'cpu_s') / max(med(copies, 'cpu_s'), 1e-9):.2f}× |",
        "",
        "| host 4 KiB random writes, QD1 | no import | import paused (writes mirrored) | ratio "
        "| import copying | ratio |",
        "|---|---|---|---|---|---|",
    ] + [f"| {label} | {lat['after'][k]:.0f} | {lat['paused'][k]:.0f} | {lat['paused'][k] / lat['after'][k]:.2f}× | "
         f"{lat['during'][k]:.0f} | {lat['during'][k] / lat['after'][k]:.2f}× |"
         for label, k in (("p50 latency (µs)", "p50_us"), ("p99 latency (µs)", "p99_us"), ("IOPS", "iops"))])
    detail = "\n".join(["| rep | nbdcopy MiB/s | nbdcopy CPU s | import MiB/s | import CPU s |", "|---|---|---|---|---|"] +
                       [f"| {i + 1} | {c['mibps']:.0f} | {c['cpu_s']:.2f} | {m['mibps']:.0f} | {m['cpu_s']:.2f} |"
                        for i, (c, m) in enumerate(zip(copies, imports))])
    note = "" if lat["copy_outlasted_fio"] else "\n(the copy ended before the fio run did: the 'during' figures are partly without it)\n"
    print(summary + "\n" + note + "\n" + detail)
    if args.record:
        date = started.strftime("%Y-%m-%d")
        begin, end = f"<!-- bench:{date}:import -->", f"<!-- /bench:{date}:import -->"
        f = facts
        body = f"""{begin}
## {date} — import

Run {started.strftime('%Y-%m-%d %H:%M')} (`bench/import.py {' '.join(sys.argv[1:])}`): {args.reps} repetition(s),
median reported, the order of nbdcopy and tandem alternating. Source: nbdkit's file plugin on a
Unix socket over {args.size >> 20} MiB of random data; both targets are new files on the same disk as
the source; tandem's figure runs from the create request to Ready_For_Cutover (the restart
address durable at the end). The latency rows: fio's nbd engine through the importing volume's
export while an import of the same source copies at {max(16 * MiB, args.size // (args.fio_seconds + 10)) >> 20} MiB/s, then with that import
paused (no copy; every write still mirrored to the source), then after its cutover.
{note}
{summary}

Machine: {f['nproc']} vCPU ({f['cpu']}), {f['mem_gib']} GiB RAM, Linux {f['kernel']}; files on
{f['backing_fs']} ({f['backing_dev']}). Load average at start: {f['loadavg_start']}. tandem
{f['tandem_commit']}, {f['tandem_build_type']}; {f['fio']}; nbdkit and nbdcopy from Debian 12.

<details><summary>Per-repetition values</summary>

{detail}

</details>
{end}
"""
        nbdbench.write_section(begin, end, body)


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
