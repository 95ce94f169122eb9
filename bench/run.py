#!/usr/bin/python3
"""tandem benchmark harness: tandem's NBD export against nbdkit and qemu-nbd, same run, same file.

Plan: for each repetition, for each scenario, for each server (order rotated every repetition so
no server always runs first or last), start the server alone on the shared backing file, drive it
with fio's nbd engine for a fixed time after a ramp, stop it, and settle the file (fsync, evict it
from the page cache) before the next one. Only one server runs at a time. The table reports the
median over repetitions and the ratio of tandem to the faster baseline. Nothing here asserts a
timing: the ratio is reported, a human judges it (see bench/README.md).

Every process this script starts is tracked by PID and stopped (SIGTERM, then SIGKILL after a
bound) on exit, error or signal. Every wait is bounded.

Usage: bench/run.py [--quick] [--build-dir DIR] [--scenarios nbd|NAME,...] [--reps N] [--record]
"""

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"

# Bounds on every wait, with why.
SERVER_READY_S_MAX = 30.0   # tandemd opens the volume and metadata; nbdkit/qemu-nbd start in ms
SERVER_STOP_S_MAX = 30.0    # tandemd drains requests, flushes and persists the dirty map
FIO_SLACK_S = 60.0          # fio connects, lays out nothing (nbd), reports; beyond ramp+runtime
BUILD_S_MAX = 45 * 60       # a cold release build on 2 busy cores
BUILD_ATTEMPTS_MAX = 3      # another engineer's file may be mid-edit; retry a few times
BUILD_RETRY_WAIT_S = 60
FILL_S_MAX = 30 * 60        # writing the backing file once (random bytes, O_DIRECT)


@dataclass(frozen=True)
class Scenario:
    name: str
    rw: str          # fio rw=
    bs: str          # fio bs=
    iodepth: int
    metric: str      # "iops" or "mibps"
    what: str


SCENARIOS = [
    Scenario("4k-randwrite-qd32", "randwrite", "4k", 32, "iops", "4 KiB random writes, QD32"),
    Scenario("4k-randread-qd32", "randread", "4k", 32, "iops", "4 KiB random reads, QD32"),
    Scenario("1m-seqwrite-qd8", "write", "1m", 8, "mibps", "1 MiB sequential writes, QD8"),
    Scenario("1m-seqread-qd8", "read", "1m", 8, "mibps", "1 MiB sequential reads, QD8"),
]
GROUPS = {"nbd": [s.name for s in SCENARIOS]}
SERVERS = ["tandem", "nbdkit", "qemu-nbd"]
# Reference run, not a server: fio straight on the backing file (io_uring, O_DIRECT, same job), so
# every row shows what the disk itself gave at that moment. On a VM whose disk speed drifts with
# the host's load, this is what tells "the servers differ" from "the disk changed".
DISK_REF = "disk"
BASELINES = ["nbdkit", "qemu-nbd"]
GOAL_RATIO = 0.9


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Processes we started: stopped by PID only, always.

class Procs:
    def __init__(self):
        self.live = {}  # pid -> (name, Popen)

    def start(self, name, argv, **kw):
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)
        self.live[p.pid] = (name, p)
        return p

    def stop(self, p, sig=signal.SIGTERM, wait_s=SERVER_STOP_S_MAX):
        """Signals p by PID, waits (bounded), then SIGKILLs. Returns the exit code."""
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                name = self.live.get(p.pid, ("?",))[0]
                log(f"{name} (pid {p.pid}) did not stop within {wait_s:.0f} s; SIGKILL")
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        self.live.pop(p.pid, None)
        return p.returncode

    def stop_all(self):
        for pid, (name, p) in list(self.live.items()):
            log(f"cleanup: stopping {name} (pid {pid})")
            try:
                self.stop(p, wait_s=10)
            except Exception as e:  # cleanup must go on for the others
                log(f"cleanup: {name} (pid {pid}): {e}")


PROCS = Procs()


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


# ---------------------------------------------------------------------------------------------
# Build, backing file, machine facts.

def run_capture(argv, timeout=30):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def build_tandemd(build_dir: Path, default_dir: bool) -> Path:
    binary = build_dir / "daemon" / "tandemd"
    if not (build_dir / "build.ninja").exists() and not (build_dir / "Makefile").exists():
        if not default_dir:
            raise BenchError(f"{build_dir} is not a configured build directory")
        log("configuring: cmake --preset release")
        subprocess.run(["cmake", "--preset", "release"], cwd=REPO, check=True, timeout=BUILD_S_MAX,
                       stdout=subprocess.DEVNULL)
    for attempt in range(1, BUILD_ATTEMPTS_MAX + 1):
        log(f"building tandemd in {build_dir} (attempt {attempt})")
        r = subprocess.run(["cmake", "--build", str(build_dir), "--target", "tandemd", "-j2"],
                           cwd=REPO, timeout=BUILD_S_MAX, capture_output=True, text=True)
        if r.returncode == 0:
            return binary
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-15:])
        log(f"build failed:\n{tail}")
        if attempt < BUILD_ATTEMPTS_MAX:
            log(f"retrying in {BUILD_RETRY_WAIT_S} s (a file may be mid-edit)")
            time.sleep(BUILD_RETRY_WAIT_S)
    if binary.exists():
        log(f"WARNING: build keeps failing; using the existing {binary}, which may be stale")
        return binary
    raise BenchError("cannot build tandemd")


def build_type(build_dir: Path) -> str:
    try:
        for line in (build_dir / "CMakeCache.txt").read_text().splitlines():
            if line.startswith("CMAKE_BUILD_TYPE:"):
                return line.split("=", 1)[1]
    except OSError:
        pass
    return "?"


def prepare_backing(path: Path, size_bytes: int):
    """Writes the whole file once with random bytes, so no run pays for allocation and reads
    hit real blocks (fallocate would leave unwritten extents that read back as zeros without
    touching the disk, flattering every server)."""
    marker = path.with_name(path.name + ".filled")
    if path.exists() and path.stat().st_size == size_bytes and marker.exists():
        return
    log(f"writing {size_bytes >> 20} MiB of random data to {path} (once)")
    marker.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    mib = 1 << 20
    if size_bytes % mib:
        raise BenchError("--size must be a whole number of MiB")
    subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={size_bytes // mib}",
                    "oflag=direct", "status=none"], check=True, timeout=FILL_S_MAX)
    os.sync()
    marker.write_text("filled by bench/run.py\n")


def settle(path: Path):
    """Makes the next run start from the same state whatever ran before: written back and out of
    the page cache (nbdkit is buffered even with cache=none; O_DIRECT servers bypass the cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def machine_facts(backing: Path, build_dir: Path) -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    df = run_capture(["df", "--output=source,fstype", str(backing)]).splitlines()
    source, fstype = (df[-1].split() + ["?", "?"])[:2] if df else ("?", "?")
    head = run_capture(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = run_capture(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem_gib),
        "kernel": platform.release(),
        "backing_fs": fstype,
        "backing_dev": source,
        "fio": run_capture(["fio", "--version"]),
        "nbdkit": run_capture(["nbdkit", "--version"]),
        "qemu_nbd": run_capture(["qemu-nbd", "--version"]).splitlines()[0] if shutil.which("qemu-nbd") else "?",
        "tandem_commit": head + (" (+ uncommitted changes in the tree)" if dirty else ""),
        "tandem_build_type": build_type(build_dir),
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


# ---------------------------------------------------------------------------------------------
# Servers.

def server_argv(server: str, tandemd: Path, cfg: Path, sock: Path, backing: Path, nbdkit_cache: str):
    if server == "tandem":
        return ["tandemd", [str(tandemd), "-c", str(cfg)]]
    if server == "nbdkit":
        return ["nbdkit", ["nbdkit", "-U", str(sock), "-f", "--exit-with-parent", "file",
                           f"file={backing}", f"cache={nbdkit_cache}"]]
    if server == "qemu-nbd":
        # -t: keep serving after the first client leaves (fio connects twice).
        return ["qemu-nbd", ["qemu-nbd", "-t", "-k", str(sock), "--cache=none", "--aio=io_uring",
                             "-f", "raw", str(backing)]]
    raise AssertionError(server)


def write_tandem_config(work: Path, backing: Path, size_bytes: int, sock: Path) -> Path:
    # Defaults for everything else: write-intent tracking (intent log + dirty bitmap) is always on
    # in tandem, with the default region size and hot-region cap.
    cfg = work / "tandemd.toml"
    cfg.write_text(
        "# written by bench/run.py\n"
        "[node]\n"
        'name = "bench"\n'
        f'state_dir = "{work / "state"}"\n'
        'log_level = "info"\n'
        "[[volume]]\n"
        'id = "vol0"\n'
        f'path = "{backing}"\n'
        f"size = {size_bytes}\n"
        f'nbd_socket = "{sock}"\n')
    return cfg


def wait_listening(sock: Path, p: subprocess.Popen, name: str):
    deadline = time.monotonic() + SERVER_READY_S_MAX
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise BenchError(f"{name} exited with {p.returncode} before listening")
        if sock.exists():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(1.0)
                s.connect(str(sock))
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    raise BenchError(f"{name} not listening on {sock} within {SERVER_READY_S_MAX:.0f} s")


def disk_stat_path(path: Path) -> Path:
    """/sys/dev/block/M:m/stat of the block device (or partition) holding path."""
    st = os.stat(path)
    return Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat")


def disk_stat(stat_path: Path):
    """(ios, sectors, time_in_queue_ms) for reads+writes; zeros if the kernel does not say."""
    try:
        v = [int(x) for x in stat_path.read_text().split()]
        return v[0] + v[4], v[2] + v[6], v[10]
    except (OSError, ValueError, IndexError):
        return 0, 0, 0


def wait_quiet(wait_s_max: float, busy_pct_max: float) -> float:
    """Waits (at most wait_s_max) for a second in which the machine is at most busy_pct_max busy.
    Nothing of ours runs now, so this is other people's load: starting a run in a lull makes
    runs less noisy, but we never wait without bound for a quiet that may not come."""
    t0 = time.monotonic()
    while True:
        b0, t_0 = machine_cpu()
        time.sleep(1.0)
        b1, t_1 = machine_cpu()
        waited = time.monotonic() - t0
        if 100.0 * (b1 - b0) / max(1, t_1 - t_0) <= busy_pct_max or waited >= wait_s_max:
            return waited


def proc_cpu_s(p) -> float:
    """utime+stime of a process (all its threads), in seconds; 0 for no process."""
    if p is None:
        return 0.0
    fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu():
    """(busy, total) jiffies over all CPUs."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]  # idle + iowait
    total = sum(vals[:8])     # guest time is already counted in user
    return total - idle, total


# ---------------------------------------------------------------------------------------------
# One measurement.

@dataclass
class Result:
    value: float            # IOPS or MiB/s
    clat_p99_us: float
    server_cpu_pct: float   # of one core, during the measured window
    fio_cpu_pct: float
    machine_busy_pct: float  # all cores, everyone (other engineers' builds included)
    others_cores: float     # CPU used by everything but this server and fio, in cores
    disk_io_kib: float      # mean size of a request the disk completed (merges included)
    disk_qd: float          # mean requests in flight at the disk
    quiet_wait_s: float     # how long we waited for the machine to calm down first
    cpu_us_per_op: float    # server CPU time per request


@dataclass
class Cell:
    results: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    def median(self, attr="value"):
        return statistics.median(getattr(r, attr) for r in self.results) if self.results else None


def run_one(args, sc: Scenario, server: str, env: dict, run_id: str) -> Result:
    work, backing, sock = env["work"], env["backing"], env["sock"]
    settle(backing)
    waited = wait_quiet(args.quiet_wait, args.quiet_busy)
    sock.unlink(missing_ok=True)
    p, name, logf = None, server, None
    if server == DISK_REF:
        target = [f"--filename={backing}", "--ioengine=io_uring", "--direct=1"]
    else:
        name, argv = server_argv(server, env["tandemd"], env["cfg"], sock, backing, args.nbdkit_cache)
        logf = open(work / "logs" / f"{run_id}-{server}.log", "wb")
        p = PROCS.start(name, argv, stdout=logf, stderr=subprocess.STDOUT)
        target = ["--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}"]
    fio = None
    try:
        if p is not None:
            wait_listening(sock, p, name)
        out = work / "logs" / f"{run_id}-{server}.fio.json"
        fio_argv = [
            "fio", f"--name={sc.name}", *target, f"--rw={sc.rw}", f"--bs={sc.bs}", f"--iodepth={sc.iodepth}", "--numjobs=1",
            "--time_based", f"--runtime={args.runtime}", f"--ramp_time={args.ramp}",
            "--norandommap", "--randrepeat=0", "--output-format=json", f"--output={out}"]
        fio = PROCS.start("fio", fio_argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Sample CPU over (roughly) the measured window: after the ramp, until the runtime ends.
        t0 = time.monotonic()
        time.sleep(args.ramp + 0.2)
        s_cpu0, f_cpu0, (m_busy0, m_tot0), t1 = proc_cpu_s(p), proc_cpu_s(fio), machine_cpu(), time.monotonic()
        d_ios0, d_sec0, d_q0 = disk_stat(env["disk_stat"])
        time.sleep(max(0.0, args.runtime - 0.4))
        s_cpu1, f_cpu1, (m_busy1, m_tot1), t2 = proc_cpu_s(p), proc_cpu_s(fio), machine_cpu(), time.monotonic()
        d_ios1, d_sec1, d_q1 = disk_stat(env["disk_stat"])
        try:
            _, err = fio.communicate(timeout=args.ramp + args.runtime + FIO_SLACK_S - (t2 - t0))
        except subprocess.TimeoutExpired:
            raise BenchError("fio did not finish in time")
        PROCS.live.pop(fio.pid, None)
        if fio.returncode != 0:
            raise BenchError(f"fio exited with {fio.returncode}: {err.decode(errors='replace')[-500:]}")
        job = json.loads(out.read_text())["jobs"][0]
        if job.get("error"):
            raise BenchError(f"fio job error {job['error']}")
        side = job["write" if "write" in sc.rw else "read"]
        if side["total_ios"] == 0:
            raise BenchError("fio completed no I/O")
        value = side["iops"] if sc.metric == "iops" else side["bw_bytes"] / (1 << 20)
        pct = side.get("clat_ns", {}).get("percentile", {})
        p99 = pct.get("99.000000", 0) / 1000.0
        window = t2 - t1
        server_cpu = s_cpu1 - s_cpu0
        busy_s = (m_busy1 - m_busy0) / os.sysconf("SC_CLK_TCK")
        return Result(
            value=value, clat_p99_us=p99,
            server_cpu_pct=100.0 * server_cpu / window,
            fio_cpu_pct=job["usr_cpu"] + job["sys_cpu"],
            machine_busy_pct=100.0 * (m_busy1 - m_busy0) / max(1, m_tot1 - m_tot0),
            others_cores=max(0.0, busy_s - server_cpu - (f_cpu1 - f_cpu0)) / window,
            quiet_wait_s=waited,
            disk_io_kib=(d_sec1 - d_sec0) * 512 / 1024 / max(1, d_ios1 - d_ios0),
            disk_qd=(d_q1 - d_q0) / 1000.0 / window,
            cpu_us_per_op=1e6 * server_cpu / max(1.0, side["iops"] * window))
    except (OSError, ValueError, KeyError, IndexError) as e:  # a dead server, a torn fio report
        raise BenchError(f"{type(e).__name__}: {e}") from e
    finally:
        if fio is not None and fio.poll() is None:
            PROCS.stop(fio, wait_s=10)
        rc = PROCS.stop(p) if p is not None else 0
        if logf is not None:
            logf.close()
        if rc not in (0, -signal.SIGTERM, 143):
            log(f"{name} exited with {rc} (see {work / 'logs' / f'{run_id}-{server}.log'})")


# ---------------------------------------------------------------------------------------------
# Reporting.

def fmt(sc: Scenario, v):
    if v is None:
        return "failed"
    if sc.metric == "iops":
        return f"{v / 1000:.1f}k IOPS"
    return f"{v:.0f} MiB/s"


def summary_rows(scenarios, cells):
    rows = []
    for sc in scenarios:
        med = {s: cells[(sc.name, s)].median() for s in SERVERS}
        base = [(med[b], b) for b in BASELINES if med[b] is not None]
        best = max(base) if base else (None, None)
        ratio = med["tandem"] / best[0] if med["tandem"] is not None and best[0] else None
        rows.append((sc, med, best, ratio))
    return rows


def table(scenarios, cells):
    ref = any((sc.name, DISK_REF) in cells for sc in scenarios)
    lines = ["| scenario | tandem | nbdkit | qemu-nbd | faster baseline | ratio (tandem / faster) |"
             + (" disk alone, no NBD (reference) |" if ref else ""),
             "|---|---:|---:|---:|---|---:|" + ("---:|" if ref else "")]
    for sc, med, best, ratio in summary_rows(scenarios, cells):
        r = "n/a" if ratio is None else f"{ratio:.2f}×" + ("" if ratio >= GOAL_RATIO else " ⚠ below 0.9")
        extra = f" {fmt(sc, cells[(sc.name, DISK_REF)].median())} |" if ref else ""
        lines.append(f"| {sc.name} | {fmt(sc, med['tandem'])} | {fmt(sc, med['nbdkit'])} | "
                     f"{fmt(sc, med['qemu-nbd'])} | {best[1] or 'n/a'} | {r} |{extra}")
    return "\n".join(lines)


def detail_table(scenarios, cells):
    lines = ["| scenario | server | runs | p99 latency | server CPU (% of 1 core) | "
             "server CPU µs / request | fio CPU % | other load (cores) | disk: mean I/O | disk: mean QD |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for sc in scenarios:
        for s in SERVERS + [DISK_REF]:
            if (sc.name, s) not in cells:
                continue
            c = cells[(sc.name, s)]
            if not c.results:
                lines.append(f"| {sc.name} | {s} | failed: {'; '.join(c.errors)[:80]} | | | | | | | |")
                continue
            runs = ", ".join(fmt(sc, r.value).split()[0] for r in c.results)
            lines.append(
                f"| {sc.name} | {s} | {runs} | {c.median('clat_p99_us'):.0f} µs | "
                f"{c.median('server_cpu_pct'):.0f} | {c.median('cpu_us_per_op'):.1f} | "
                f"{c.median('fio_cpu_pct'):.0f} | {c.median('others_cores'):.2f} | "
                f"{c.median('disk_io_kib'):.0f} KiB | {c.median('disk_qd'):.1f} |")
    return "\n".join(lines)


DOC_HEADER = """# Benchmarks

Recorded by `bench/run.py --record` (see `bench/README.md` for what each scenario measures and the
caveats). Each section is one run of the harness: tandem and both baselines measured in the same
run, on the same backing file, interleaved; the numbers are medians over the repetitions. The
goal is tandem ≥ 0.9× the faster baseline on every row. These are numbers from one machine at one
time, for comparing servers against each other, not absolute figures.
"""


def record(args, facts, scenarios, cells, started: dt.datetime):
    date = started.strftime("%Y-%m-%d")
    begin, end = f"<!-- bench:{date}:{args.label} -->", f"<!-- /bench:{date}:{args.label} -->"
    f = facts
    below = [sc.name for sc, _, _, ratio in summary_rows(scenarios, cells)
             if ratio is not None and ratio < GOAL_RATIO]
    body = f"""{begin}
## {date} — {args.label}

Run {started.strftime('%Y-%m-%d %H:%M')} (`bench/run.py {' '.join(sys.argv[1:])}`):
{args.reps} repetition(s) of every scenario, servers interleaved (order rotated each repetition),
{args.ramp} s ramp + {args.runtime} s measured per run, median reported.

{table(scenarios, cells)}

{"Below the 0.9× goal: " + ", ".join(below) + "." if below else "Every row meets the 0.9× goal."}

Machine: {f['nproc']} vCPU ({f['cpu']}), {f['mem_gib']} GiB RAM, Linux {f['kernel']}; backing file
{args.size >> 20} MiB on {f['backing_fs']} ({f['backing_dev']}), written once with random data.
Load average at start: {f['loadavg_start']}. Other engineers were building and testing on the same
cores: before each run the harness waited up to {args.quiet_wait:.0f} s for a second with the machine
≤ {args.quiet_busy:.0f}% busy, and the "other load" column below shows how much CPU everything else
took during the measured window, so expect noise.
Software: {f['fio']}, {f['nbdkit']}, {f['qemu_nbd']}; tandem {f['tandem_commit']}, build type
{f['tandem_build_type']} (asserts on).
Servers: `tandemd` (O_DIRECT + io_uring, write-intent log and dirty bitmap on, default
region size), `nbdkit file cache={args.nbdkit_cache}`, `qemu-nbd -t --cache=none --aio=io_uring -f raw`.
Client: fio nbd engine (libnbd), one connection, `--norandommap`. "disk alone" is the same fio
job straight on the backing file (io_uring, O_DIRECT, no NBD), interleaved with the servers: the
disk's own speed at that moment, which on this VM drifts with the host's load.

<details><summary>Per-run values and CPU use</summary>

{detail_table(scenarios, cells)}

</details>
{end}
"""
    write_section(begin, end, body)


def write_section(begin: str, end: str, body: str):
    """Puts a dated section (between its begin/end markers) into docs/benchmarks.md: replaced
    when the same date and label are there already, appended otherwise."""
    text = DOC.read_text() if DOC.exists() else DOC_HEADER
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end) + 1
        text = text[:a] + body + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + body
    DOC.write_text(text)
    log(f"recorded in {DOC}")


# ---------------------------------------------------------------------------------------------

def parse_size(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower().removesuffix("ib").removesuffix("b")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition, 2 s ramp, 5 s runs (smoke test)")
    ap.add_argument("--build-dir", type=Path, default=None, help="tandem build dir (default build/release)")
    ap.add_argument("--no-build", action="store_true", help="use the existing tandemd, do not build")
    ap.add_argument("--scenarios", default="nbd",
                    help="comma list of scenario names or groups: " + ", ".join(list(GROUPS) + [s.name for s in SCENARIOS]))
    ap.add_argument("--reps", type=int, default=None, help="repetitions per scenario and server (default 3)")
    ap.add_argument("--runtime", type=int, default=None, help="measured seconds per run (default 15)")
    ap.add_argument("--ramp", type=int, default=None, help="ramp seconds before measuring (default 5)")
    ap.add_argument("--size", type=parse_size, default=parse_size("2GiB"), help="backing file size (default 2GiB)")
    ap.add_argument("--work-dir", type=Path, default=Path("/var/tmp/tandem-bench"),
                    help="backing file, sockets, logs, fio JSON (default /var/tmp/tandem-bench)")
    ap.add_argument("--nbdkit-cache", choices=["none", "default"], default="none",
                    help="nbdkit file plugin cache= mode (default none: see bench/README.md)")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="before each run, wait up to this many seconds for a lull in other load (default 60, quick 0)")
    ap.add_argument("--quiet-busy", type=float, default=25.0,
                    help="a lull: machine at most this %% busy over 1 s (default 25)")
    ap.add_argument("--no-disk-ref", action="store_true",
                    help="skip the reference run of fio straight on the backing file (O_DIRECT, no NBD)")
    ap.add_argument("--record", action="store_true", help="add/update a dated section in docs/benchmarks.md")
    ap.add_argument("--label", default="nbd", help="section label in docs/benchmarks.md (default nbd)")
    args = ap.parse_args()
    args.reps = args.reps or (1 if args.quick else 3)
    args.runtime = args.runtime or (5 if args.quick else 15)
    args.ramp = args.ramp if args.ramp is not None else (2 if args.quick else 5)
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0 if args.quick else 60)
    if args.reps < 1 or args.reps > 20 or args.runtime < 1 or args.ramp < 0:
        ap.error("--reps must be 1..20, --runtime ≥ 1, --ramp ≥ 0")

    wanted = []
    for tok in args.scenarios.split(","):
        names = GROUPS.get(tok.strip(), [tok.strip()])
        for n in names:
            if n not in [s.name for s in SCENARIOS]:
                ap.error(f"unknown scenario {n!r}")
            if n not in wanted:
                wanted.append(n)
    scenarios = [s for s in SCENARIOS if s.name in wanted]

    for tool in ("fio", "nbdkit", "qemu-nbd", "cmake", "dd"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    default_dir = args.build_dir is None
    build_dir = (args.build_dir or REPO / "build" / "release").resolve()
    tandemd = build_dir / "daemon" / "tandemd"
    if not args.no_build:
        tandemd = build_tandemd(build_dir, default_dir)
    if not tandemd.exists():
        raise BenchError(f"{tandemd} does not exist (build it or drop --no-build)")

    work = args.work_dir.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    # Fresh tandem metadata every harness run: the backing file's contents are whatever the last
    # run left, which is fine for every server, but tandem's metadata must match this file.
    shutil.rmtree(work / "state", ignore_errors=True)
    (work / "state").mkdir()
    backing = work / "backing.img"
    sock = work / "nbd.sock"
    prepare_backing(backing, args.size)
    env = {"work": work, "backing": backing, "sock": sock, "tandemd": tandemd,
           "disk_stat": disk_stat_path(backing),
           "cfg": write_tandem_config(work, backing, args.size, sock)}
    r = subprocess.run([str(tandemd), "--check-config", "-c", str(env["cfg"])], capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0:
        raise BenchError(f"tandemd rejects the generated config: {r.stdout}{r.stderr}")

    started = dt.datetime.now()
    facts = machine_facts(backing, build_dir)
    log(f"{len(scenarios)} scenario(s) × {len(SERVERS)} servers × {args.reps} rep(s), "
        f"{args.ramp}+{args.runtime} s each; load {facts['loadavg_start']}")
    runs = SERVERS + ([] if args.no_disk_ref else [DISK_REF])
    cells = {(sc.name, s): Cell() for sc in scenarios for s in runs}
    for rep in range(args.reps):
        order = runs[rep % len(runs):] + runs[:rep % len(runs)]
        for sc in scenarios:
            for server in order:
                run_id = f"{started:%Y%m%d-%H%M%S}-r{rep + 1}-{sc.name}"
                try:
                    res = run_one(args, sc, server, env, run_id)
                    cells[(sc.name, server)].results.append(res)
                    log(f"rep {rep + 1} {sc.name:18} {server:9} {fmt(sc, res.value):>14}  "
                        f"server CPU {res.server_cpu_pct:3.0f}%  other load {res.others_cores:.2f} cores"
                        f"  (waited {res.quiet_wait_s:.0f} s for a lull)")
                except BenchError as e:
                    cells[(sc.name, server)].errors.append(str(e))
                    log(f"rep {rep + 1} {sc.name} {server}: FAILED: {e}")

    raw = {"started": started.isoformat(), "facts": facts, "args": {k: str(v) for k, v in vars(args).items()},
           "results": {f"{k[0]}/{k[1]}": [vars(r) for r in c.results] for k, c in cells.items()},
           "errors": {f"{k[0]}/{k[1]}": c.errors for k, c in cells.items() if c.errors}}
    (work / "logs" / f"{started:%Y%m%d-%H%M%S}-results.json").write_text(json.dumps(raw, indent=1))

    print()
    print(table(scenarios, cells))
    print()
    print(detail_table(scenarios, cells))
    if args.record:
        record(args, facts, scenarios, cells, started)
    return 1 if any(c.errors for c in cells.values()) else 0


if __name__ == "__main__":
    code = 1
    try:
        code = main()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e})")
        code = 130
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        log(f"error: {e}")
        code = 1
    finally:
        PROCS.stop_all()
    sys.exit(code)
