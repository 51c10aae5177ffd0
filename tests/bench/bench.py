"""spoold's throughput benchmark: one command, everything on 127.0.0.1, bounded in time.

    python tests/bench/bench.py --lines 1000000 --size 100 --clients 4 \\
        [--aggregation kpl] [--record-fail-rate 0.1] [--latency-ms 0] [--rate 75000] \\
        [--plot out.png] [--profile]

What one run does, in order, against ONE loopback endpoint (tests/bench/endpoint.py, a
subprocess: tests/tools/fakeaws.py plus line counting through KPL aggregates and latency sampling):

1. spoold: writes a config (spool in a temporary folder, synchronous = "full", defaults
   otherwise, kind = "kinesis", endpoint_url = the endpoint) and runs the real daemon
   (``python -m spoold run``). K client processes each open a connection per batch of lines,
   write it, shut down their write side and wait for the JSON acknowledgement (the accepted
   count is checked). Every line starts with its send time (16 hex digits of
   time.monotonic_ns()), so the endpoint can sample write-to-receipt latency.
   Printed: acceptance rate (acked lines/s: first write -> last ack), end-to-end rate (lines/s
   the endpoint accepted: first write -> last acceptance), p50/p99 latency, the daemon's peak
   RSS (VmHWM) and CPU seconds per million lines (utime + stime, all threads), both counting
   its HTTP sender child process too, and the CPU share of endpoint and clients (2 cores are
   shared by everything).
2. boto3 baseline: a plain ``put_records`` loop, 500 records per call (failed records resent),
   bounded by --baseline-seconds; ratio spoold/boto3.
3. Endpoint ceiling: --ceiling-connections raw sockets replay one prepared 500-record
   PutRecords request for --ceiling-seconds (with --aggregation kpl, also a prepared request of
   KPL aggregates) -> records/s and lines/s.
4. A markdown summary (date, command, figures, targets) to paste into docs/benchmarks.md.

The daemon is stopped before 2 and 3, so they do not share the cores with it.

Clients: by default each keeps one connection of --batch (1000) lines awaiting its ack (closed
loop, what a synchronous writer does); --inflight N keeps N connections open per client.
--rate R offers R lines/s in total instead (open loop: up to 64 connections per client await
their acks while the next batches go out on schedule), to measure latency below the maximum
rate, e.g. at half of it.

--profile attaches py-spy to the daemon for the spoold phase and prints where CPU time goes: by
thread, by pipeline stage, top functions by own time (scaled to the CPU time /proc measured).
--plot PNG draws throughput, latency, RSS and CPU over time with matplotlib (the bench extra:
pip install -e '.[bench]'). --dest / --spool / --daemon KEY=VALUE add config keys (e.g. --daemon
sender=process); --patch MODULE.NAME=VALUE sets a spoold constant in the daemon for what-if
experiments (spoold's files are not touched; the summary says PATCHED). --keep keeps the work folder (config, logs,
results.json, profile).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import os
import random
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
STAMP_HEX = 16
CLK_TCK = os.sysconf("SC_CLK_TCK")
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDSPOOLDBENCH",
    "AWS_SECRET_ACCESS_KEY": "spoold-bench-secret",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
MiB = 1024 * 1024
TARGETS = {"e2e": 150_000, "e2e_kpl": 500_000, "boto3_ratio": 5.0, "rss_mib": 150.0, "p99_ms": 500.0}


# ---- small helpers -----------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


def fmt_int(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def fmt_ms(ns: float | None) -> str:
    return "n/a" if ns is None else f"{ns / 1e6:,.1f} ms"


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def proc_family(pid: int) -> list[int]:
    """The process and its children (spoold's HTTP sender is one), read from /proc."""
    pids = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return pids
    for tid in tasks:  # a child belongs to the thread that started it
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                pids += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def family_cpu(pid: int) -> float:
    """proc_cpu summed over the process and its running children."""
    total = 0.0
    for p in proc_family(pid):
        try:
            total += proc_cpu(p)
        except OSError:
            pass  # a child that just exited
    return total


def family_mem(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM summed over the process and its children (the sum of peaks bounds the
    peak of the sum from above)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for p in proc_family(pid):
        try:
            for key, value in proc_mem(p).items():
                out[key] += value
        except OSError:
            pass
    return out


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the bench dies, even by SIGKILL (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def bench_line(stamp_ns: int, tag: bytes, size: int) -> bytes:
    """One line of ``size`` bytes (newline excluded) starting with its send time."""
    head = b"%016x" % stamp_ns + tag
    return (head + b"x" * (size - len(head)))[:size]


# ---- client processes --------------------------------------------------------------------------

def client_main(p: dict[str, Any]) -> int:
    """One client process: batches of lines over one connection each, acks awaited."""
    import resource

    path, n, size, batch = p["socket"], p["lines"], p["size"], p["batch"]
    rate, inflight, deadline = p["rate"], p["inflight"], p["deadline_ns"]
    tag = b" c%02d " % p["id"]
    while (d := p["start_ns"] - time.monotonic_ns()) > 0:
        time.sleep(min(d / 1e9, 0.05))
    sel = selectors.DefaultSelector()
    sent = accepted = rejected = errors = 0
    first_ns = last_ack_ns = 0
    ack_buckets: dict[int, int] = {}
    ack_lat: list[int] = []
    next_due = time.monotonic_ns()
    open_ = 0
    while sent < n or open_:
        now = time.monotonic_ns()
        if now > deadline:
            errors += open_
            break
        room = sent < n and open_ < inflight
        if room and (not rate or now >= next_due):
            k = min(batch, n - sent)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                ts = time.monotonic_ns()
                s.sendall((bench_line(ts, tag, size) + b"\n") * k)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                s.close()
                errors += 1
                sent += k
                continue
            first_ns = first_ns or ts
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, [ts, k, b""])
            open_ += 1
            sent += k
            if rate:
                next_due += int(k * 1e9 / rate)
            continue
        timeout = 1.0
        if room and rate:
            timeout = max(0.0, (next_due - now) / 1e9)
        for key, _ in sel.select(timeout):
            conn, st = key.fileobj, key.data
            assert isinstance(conn, socket.socket)
            try:
                chunk = conn.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                st[2] += chunk
                continue
            sel.unregister(conn)
            conn.close()
            open_ -= 1
            t = time.monotonic_ns()
            try:
                answer = json.loads(st[2])
                got, bad = int(answer["accepted"]), int(answer["rejected"])
            except (ValueError, KeyError, TypeError):
                errors += 1
                continue
            accepted += got
            rejected += bad
            if got != st[1]:
                errors += 1
            last_ack_ns = t
            ack_buckets[t // 100_000_000] = ack_buckets.get(t // 100_000_000, 0) + got
            if len(ack_lat) < 20_000:
                ack_lat.append(t - st[0])
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "id": p["id"], "sent": sent, "accepted": accepted, "rejected": rejected, "errors": errors,
        "first_ns": first_ns, "last_ack_ns": last_ack_ns, "ack_buckets": sorted(ack_buckets.items()),
        "ack_lat_ns": ack_lat, "cpu_s": ru.ru_utime + ru.ru_stime,
    }))
    return 0


# ---- the endpoint subprocess -------------------------------------------------------------------

class Endpoint:
    def __init__(self, tmp: Path, fail_rate: float, latency_s: float, options: list[str] | None = None) -> None:
        """Start tests/bench/endpoint.py; ``options`` replace the fault options (fleet mode)."""
        self.port_file = tmp / "endpoint.port"
        self.log = open(tmp / "endpoint.log", "wb")
        cmd = [sys.executable, str(HERE / "endpoint.py"), "--port", "0", "--port-file", str(self.port_file)]
        cmd += options if options is not None else ["--record-fail-rate", str(fail_rate), "--latency", str(latency_s)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     preexec_fn=die_with_parent)
        end = time.monotonic() + 20
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"endpoint did not start; see {tmp / 'endpoint.log'}")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"
        self._conn: http.client.HTTPConnection | None = None

    def _request(self, method: str, path: str, headers: dict[str, str] | None = None,
                 body: bytes | None = None) -> Any:
        for attempt in (1, 2):
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                self._conn.request(method, path, body=body, headers=headers or {})
                resp = self._conn.getresponse()
                return json.loads(resp.read())
            except (OSError, http.client.HTTPException):
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        return None

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/_stats")  # type: ignore[no-any-return]

    def stream(self, name: str) -> dict[str, Any]:
        return self.stats().get("bench", {}).get(name, {"lines": 0, "records": 0, "first_ns": 0, "last_ns": 0})

    def dump(self) -> dict[str, Any]:
        return self._request("POST", "/", {"X-Amz-Target": "SpooldBench.Dump",  # type: ignore[no-any-return]
                                           "Content-Type": "application/x-amz-json-1.1"}, b"{}")

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---- the daemon subprocess ---------------------------------------------------------------------

def toml_value(text: str) -> str:
    """KEY=VALUE from the command line: VALUE as TOML if it parses, else as a string."""
    import tomllib

    try:
        tomllib.loads(f"v = {text}")
        return text
    except tomllib.TOMLDecodeError:
        return json.dumps(text)


class DaemonProc:
    def __init__(self, tmp: Path, endpoint_url: str, args: argparse.Namespace) -> None:
        self.tmp = tmp
        self.socket = tmp / "bench.sock"
        self.control = tmp / "control.sock"
        self.config = tmp / "spoold.toml"
        spool_extra = "".join(f"{k} = {toml_value(v)}\n" for k, v in (kv.split("=", 1) for kv in args.spool))
        dest_extra = "".join(f"{k} = {toml_value(v)}\n" for k, v in (kv.split("=", 1) for kv in args.dest))
        daemon_extra = "".join(f"{k} = {toml_value(v)}\n" for k, v in (kv.split("=", 1) for kv in args.daemon))
        agg = f'aggregation = "{args.aggregation}"\n' if args.aggregation != "none" else ""
        self.config.write_text(
            f'[spool]\npath = "{tmp / "spool.db"}"\n'
            + ('' if any(kv.startswith("synchronous=") for kv in args.spool) else 'synchronous = "full"\n')
            + f'{spool_extra}\n'
            f'[control]\nsocket = "{self.control}"\n\n[daemon]\n{daemon_extra}\n'
            f'[[destination]]\nname = "bench"\nkind = "kinesis"\nsocket = "{self.socket}"\n'
            f'stream = "spoold"\nregion = "us-east-1"\n'
            + ('' if any(kv.startswith("endpoint_url=") for kv in args.dest) else f'endpoint_url = "{endpoint_url}"\n')
            + f'{agg}{dest_extra}'
        )
        env = {**os.environ, **DUMMY_ENV}
        self.log_path = tmp / "daemon.log"
        self.log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "spoold", "run", "--config", str(self.config)]
        if args.patch:
            # What-if experiments: set module constants before the daemon starts (spoold is unchanged).
            pairs = (kv.split("=", 1) for kv in args.patch)
            patches = [(m.rsplit(".", 1)[0], m.rsplit(".", 1)[1], v) for m, v in pairs]
            code = ("import ast, importlib, sys\n"
                    f"for mod, attr, value in {patches!r}:\n"
                    "    m = importlib.import_module(mod); getattr(m, attr)\n"
                    "    setattr(m, attr, ast.literal_eval(value))\n"
                    "from spoold.cli import main\n"
                    f"sys.exit(main(['run', '--config', {str(self.config)!r}]))\n")
            cmd = [sys.executable, "-c", code]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     preexec_fn=die_with_parent)
        self.pid = self.proc.pid
        end = time.monotonic() + 30
        while not (self.socket.exists() and self.control.exists()):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.log.flush()
                raise SystemExit(f"spoold did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.02)

    def status(self) -> dict[str, Any] | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(str(self.control))
            s.sendall(b'{"command": "status"}\n')
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            doc: dict[str, Any] = json.loads(data)
            return doc["destinations"]["bench"]  # type: ignore[no-any-return]
        except (OSError, ValueError, KeyError):
            return None
        finally:
            s.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---- profiling ---------------------------------------------------------------------------------

class Profiler:
    """py-spy attached to the daemon by pid, raw collapsed stacks with thread names."""

    def __init__(self, pid: int, tmp: Path, rate: int) -> None:
        self.out = tmp / "profile.txt"
        self.rate = rate
        self.error: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        exe = shutil.which("py-spy")
        if exe is None:
            log("py-spy not found: pip install py-spy")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
            exe = shutil.which("py-spy")
        if exe is None:
            self.error = "py-spy is not installed and could not be installed"
            return
        self.log = open(tmp / "py-spy.log", "wb")
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "-o", str(self.out), "--format", "raw", "--threads",
             "--function", "--nonblocking", "--rate", str(rate)],
            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        time.sleep(1.0)
        if self.proc.poll() is not None:
            self.log.flush()
            self.error = "py-spy could not attach: " + (tmp / "py-spy.log").read_text()[-500:]
        self.started = time.monotonic()

    def stop(self) -> float:
        elapsed = time.monotonic() - self.started if self.proc else 0.0
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return elapsed


def _package(frame: str) -> str:
    """'func (trio/_core/_run.py:12)' -> 'trio'; spoold frames keep their file."""
    where = frame.rpartition(" (")[2].rstrip(")").rsplit(":", 1)[0]
    if where.startswith("spoold/"):
        return where[:-3] if where.endswith(".py") else where
    head = where.split("/", 1)[0]
    return head[:-3] if head.endswith(".py") else head


# Pipeline stages, matched from the innermost frame outwards (first marker found wins).
STAGES = [
    ("sign (SigV4)", ("sign (spoold/signing.py",)),
    ("request body (JSON + base64)", ("Api.body ",)),
    ("parse reply", ("Api.parse ", "Api.parse_single ")),
    ("ack entries -> row deletes", ("Flusher._ack ",)),
    ("HTTP (httpx/httpcore/h11 + socket)", ("Flusher._post ", "post (spoold/sender.py", "ProcessSender.")),
    ("encode lines -> entries/aggregates", ("Encoder.", "Flusher._encode_ahead ")),
    ("batching (take_batch, loop)", ("Flusher._next_batch ", "Flusher.run ")),
    ("flusher, other", ("Flusher.",)),
    ("spool write (SQLite insert/delete/commit, writer thread)", ("Spool.commit ", "Spool.drop ")),
    ("spool read (reader thread)", ("Spool.read ", "Spool.summary ")),
    ("committer (group commit, main thread)", ("Committer.",)),
    ("ingest (socket read, line split, ack)", ("Ingest.", "LineBuffer.")),
    ("status/control/heartbeat", ("ControlServer.", "MetricsServer.", "Server.", "Daemon.snapshot", "Daemon._heartbeat")),
    ("worker threads, other", ("Worker._loop ",)),
]


def _stage(frames: list[str]) -> str:
    for f in reversed(frames):
        for name, markers in STAGES:
            if any(f.startswith(m) for m in markers):
                return name
    return "trio scheduler / other"


def summarize_profile(path: Path, rate: int, seconds: float, top: int, cpu_s: float, lines: int) -> list[str]:
    """Where the daemon's CPU went. py-spy's samples give the shares; the daemon's measured CPU
    time (/proc utime + stime) turns them into cores and CPU seconds per million lines, since
    py-spy's idea of an "active" thread (one in a syscall counts) does not match CPU time."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    own_threads: dict[str, Counter[str]] = defaultdict(Counter)
    stages: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        label = frames[0]
        thread = label.split(": ", 1)[1] if ": " in label else label
        if thread.startswith("Trio thread") or " from " in thread:
            thread = "trio to_thread"
        frames = frames[1:] or ["<no python frame>"]
        total += count
        threads[thread] += count
        leaf = frames[-1]
        own[leaf] += count
        own_threads[leaf][thread] += count
        for f in set(frames):
            incl[f] += count
        stages[_stage(frames)] += count
    if not total:
        return ["py-spy recorded no samples"]
    packages: Counter[str] = Counter()
    for f, n in own.items():
        packages[_package(f)] += n
    per_sample = cpu_s / total  # CPU seconds one sample stands for
    per_m = 1e6 / lines if lines else 0.0

    def cols(n: int) -> str:
        return f"{n / total * 100:5.1f}%  {n * per_sample / seconds * 100:5.1f}%  {n * per_sample * per_m:5.2f}s"

    out = [f"py-spy: {total} samples at {rate} Hz over {seconds:.1f} s of push (py-spy counted"
           f" {total / (rate * seconds):.2f} threads active on average; /proc says the daemon used"
           f" {cpu_s:.2f} CPU s = {cpu_s / seconds:.2f} cores, which the columns below are scaled to)"]
    out.append("columns: % of samples | % of one core | CPU s per million lines")
    out.append("by thread:")
    for t, n in threads.most_common():
        out.append(f"  {cols(n)}  {t}")
    out.append("by pipeline stage (inclusive; the innermost stage of a stack wins):")
    for name, n in stages.most_common():
        out.append(f"  {cols(n)}  {name}")
    out.append("own time by module: " + ", ".join(f"{m} {n / total * 100:.0f}%" for m, n in packages.most_common(12)))
    out.append(f"top {top} functions by own time [thread]:")
    for f, n in own.most_common(top):
        where = ", ".join(t for t, _ in own_threads[f].most_common(2))
        out.append(f"  {cols(n)}  {f}  [{where}]")
    out.append(f"top {top} spoold functions by inclusive time:")
    shown = 0
    for f, n in incl.most_common():
        if "(spoold/" in f and not f.startswith(("<module> (spoold/__main__", "main (spoold/cli", "_run (spoold/cli")):
            out.append(f"  {cols(n)}  {f}")
            shown += 1
            if shown >= top:
                break
    return out


# ---- baseline and ceiling ----------------------------------------------------------------------

def boto3_baseline(url: str, lines: int, size: int, seconds: float) -> dict[str, Any]:
    import boto3
    from botocore.config import Config

    client = boto3.client("kinesis", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
                          config=Config(retries={"max_attempts": 10, "mode": "standard"}))
    rng = random.Random(1)
    sent = calls = failed_total = 0
    cpu0 = time.thread_time()
    t0 = time.monotonic()
    end = t0 + seconds
    while sent < lines and time.monotonic() < end:
        k = min(500, lines - sent)
        line = bench_line(time.monotonic_ns(), b" boto3 ", size)
        records = [{"Data": line, "PartitionKey": f"{rng.getrandbits(64):016x}"} for _ in range(k)]
        while records:
            resp = client.put_records(StreamName="boto3", Records=records)
            calls += 1
            if not resp.get("FailedRecordCount"):
                break
            failed_total += resp["FailedRecordCount"]
            records = [r for r, res in zip(records, resp["Records"]) if "ErrorCode" in res]
        sent += k
    elapsed = time.monotonic() - t0
    return {"lines": sent, "seconds": elapsed, "rate": sent / elapsed, "calls": calls,
            "failed_records": failed_total, "cpu_s": time.thread_time() - cpu0}


def peers_python() -> str:
    """The peers' virtual environment's Python, created and filled on first use."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.bench.peers import PEERS, PEERS_VENV

    python = os.path.join(PEERS_VENV, "bin", "python")
    if not os.path.exists(python):
        log(f"creating {PEERS_VENV} and installing {' '.join(PEERS)} into it ...")
        subprocess.run([sys.executable, "-m", "venv", PEERS_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *PEERS], check=True)
    return python


def run_peers(ep: Endpoint, lines: int, size: int, seconds: float) -> list[dict[str, Any]]:
    """Each producer of tests/bench/peers.py in turn, alone on the machine with the endpoint."""
    python = peers_python()
    from tests.bench.peers import PRODUCERS

    out = []
    for name in PRODUCERS:
        log(f"peer {name}: up to {lines:,} lines or {seconds:g}s ...")
        cpu0 = ep.cpu()
        try:
            done = subprocess.run([python, str(HERE / "peers.py"), name, ep.url, str(lines), str(size), str(seconds)],
                                  capture_output=True, timeout=seconds + 120, cwd=ROOT)
            r = json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 else {
                "error": (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1][:200]}
        except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            r = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        st = ep.stream(f"peer-{name}")
        r.update(producer=name, endpoint_lines=st["lines"], endpoint_records=st["records"],
                 endpoint_cpu=ep.cpu() - cpu0)
        span = (st["last_ns"] - st["first_ns"]) / 1e9 if st["first_ns"] else 0.0
        if st["lines"] and (span >= 1.0 or r.get("seconds")):
            # First to last acceptance; a run shorter than a second (one or two requests) by the
            # producer's own clock instead.
            r["rate"] = st["lines"] / (span if span >= 1.0 else r["seconds"])
        if r.get("cpu_s") is not None and st["lines"]:
            r["cpu_s_per_million"] = r["cpu_s"] / (st["lines"] / 1e6)
        log(f"  {r}")
        out.append(r)
    return out


def put_records_request(port: int, stream: str, records: list[tuple[bytes, str]]) -> bytes:
    body = json.dumps({"StreamName": stream, "Records": [
        {"Data": base64.b64encode(d).decode(), "PartitionKey": k} for d, k in records]}).encode()
    head = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-amz-json-1.1\r\n"
            f"X-Amz-Target: Kinesis_20131202.PutRecords\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def replay(port: int, request: bytes, seconds: float, connections: int) -> dict[str, Any]:
    """Send one prepared request over and over on each connection; count answers."""
    done = [0] * connections
    statuses: Counter[int] = Counter()
    stop_at = time.monotonic() + seconds

    def worker(i: int) -> None:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while time.monotonic() < stop_at:
                s.sendall(request)
                while b"\r\n\r\n" not in buf:
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for h in head.split(b"\r\n")[1:]:
                    name, _, value = h.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                buf = buf[length:]
                statuses[status] += 1
                done[i] += 1
        finally:
            s.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    return {"requests": sum(done), "seconds": time.monotonic() - t0, "statuses": dict(statuses)}


def ceiling(ep: Endpoint, size: int, seconds: float, connections: int, kpl: bool) -> dict[str, Any]:
    rng = random.Random(2)
    line = bench_line(time.monotonic_ns(), b" ceiling ", size)
    plain = put_records_request(ep.port, "ceiling", [(line, f"{rng.getrandbits(64):016x}") for _ in range(500)])
    out: dict[str, Any] = {}
    cpu0 = ep.cpu()
    before = ep.stream("ceiling")
    r = replay(ep.port, plain, seconds, connections)
    after = ep.stream("ceiling")
    n = after["lines"] - before["lines"]
    out["plain"] = {"records_per_s": n / r["seconds"], "requests": r["requests"], "statuses": r["statuses"],
                    "endpoint_cpu_share": (ep.cpu() - cpu0) / r["seconds"]}
    if kpl:
        from spoold.aggregation import AggregateBuilder

        records = []
        budget = 5 * MiB
        lines_per_request = 0
        while budget > 2 * 1024:
            builder = AggregateBuilder(min(MiB, budget), f"{rng.getrandbits(64):016x}")
            lines_per_request += builder.extend([line] * 20_000)
            data = builder.build()
            records.append((data, builder.partition_key))
            budget -= builder.size
            if len(records) >= 5:
                break
        req = put_records_request(ep.port, "ceiling-kpl", records)
        before = ep.stream("ceiling-kpl")
        r = replay(ep.port, req, seconds, connections)
        after = ep.stream("ceiling-kpl")
        n = after["lines"] - before["lines"]
        out["kpl"] = {"lines_per_s": n / r["seconds"], "requests": r["requests"], "statuses": r["statuses"],
                      "records_per_request": len(records), "lines_per_request": lines_per_request}
    return out


# ---- the plot ----------------------------------------------------------------------------------

def plot(path: Path, title: str, panels: list[dict[str, Any]], t_max: float) -> None:
    """panels: {"title", "unit", "series": [(label, (r, g, b), [(t, y)...], "line"|"dots")]}."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the plot only goes to a file
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(9, 2.1 * len(panels) + 0.6),
                             squeeze=False, layout="constrained")
    fig.suptitle(title, fontsize=10)
    for ax, panel in zip(axes[:, 0], panels):
        for label, color, points, style in panel["series"]:
            rgb = tuple(c / 255 for c in color)
            ts = [t for t, _ in points]
            ys = [y for _, y in points]
            if style == "dots":
                ax.scatter(ts, ys, s=1, color=rgb, label=label, rasterized=True)
            else:
                ax.plot(ts, ys, color=rgb, linewidth=1.2, label=label)
        ax.set_ylabel(panel["unit"], fontsize=8)
        ax.set_title(panel["title"], fontsize=9, loc="left")
        top = max((y for _, _, points, _ in panel["series"] for _, y in points), default=0.0)
        ax.set_ylim(0, top * 1.15 or 1.0)  # headroom: a flat series must not sit on the frame
        ax.grid(True, color="0.9")
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="lower left", markerscale=4, ncols=len(panel["series"]))
    axes[-1, 0].set_xlim(0, max(t_max, 1e-3))
    axes[-1, 0].set_xlabel("seconds since the first write", fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def require_matplotlib() -> None:
    """Fail before the run, not after it, when --plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None


# ---- the run -----------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="spoold throughput benchmark (see the module docstring)")
    p.add_argument("--lines", type=int, default=1_000_000, help="lines pushed through spoold")
    p.add_argument("--size", type=int, default=100, help="bytes per line, newline excluded (>= 24)")
    p.add_argument("--clients", type=int, default=4, help="concurrent client processes")
    p.add_argument("--batch", type=int, default=None,
                   help="lines per connection (default 1000; with --rate about 20 ms of a client's share)")
    p.add_argument("--inflight", type=int, default=None,
                   help="connections a client keeps awaiting acks (default 1; with --rate 64, open loop)")
    p.add_argument("--aggregation", choices=("none", "kpl"), default="none")
    p.add_argument("--record-fail-rate", type=float, default=0.0, help="endpoint: per-record failure rate")
    p.add_argument("--latency-ms", type=float, default=0.0, help="endpoint: delay added to each answer")
    p.add_argument("--rate", type=float, default=None, help="offer this many lines/s in total (open loop)")
    p.add_argument("--plot", type=Path, default=None, help="write throughput/latency/RSS/CPU over time as PNG (needs .[bench])")
    p.add_argument("--profile", action="store_true", help="attach py-spy to the daemon and print the top functions")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=15, help="functions listed by --profile")
    p.add_argument("--baseline-seconds", type=float, default=8.0, help="time cap of the boto3 loop (0: skip)")
    p.add_argument("--ceiling-seconds", type=float, default=4.0, help="time of each ceiling replay (0: skip)")
    p.add_argument("--ceiling-connections", type=int, default=2)
    p.add_argument("--peers", action="store_true",
                   help="also run other Python producers (tests/bench/peers.py), installed on first use into "
                        "a separate virtual environment (~/.cache/spoold-bench/peers)")
    p.add_argument("--peer-seconds", type=float, default=20.0, help="time cap of each producer of --peers")
    p.add_argument("--timeout", type=float, default=90.0, help="cap on the spoold phase, seconds")
    p.add_argument("--dest", action="append", default=[], metavar="KEY=VALUE",
                   help="extra [[destination]] key (TOML value), e.g. --dest linger=0.05; "
                        "endpoint_url=... replaces the bench endpoint (a dead port: ingest alone)")
    p.add_argument("--spool", action="append", default=[], metavar="KEY=VALUE", help="extra [spool] key")
    p.add_argument("--daemon", action="append", default=[], metavar="KEY=VALUE",
                   help="extra [daemon] key, e.g. --daemon sender=process")
    p.add_argument("--patch", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="what-if: set a spoold module constant in the daemon, e.g. "
                        "--patch spoold.committer.DELETE_LINGER=0.005 (reported with the results)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, config, profile)")
    args = p.parse_args(argv)
    if args.size < STAMP_HEX + 8:
        p.error("--size must be at least 24")
    if args.batch is None:
        args.batch = 1000 if not args.rate else max(1, min(1000, int(args.rate / args.clients / 50)))
    if args.inflight is None:
        args.inflight = 64 if args.rate else 1
    if args.plot:
        require_matplotlib()
    return args


class ProgressBar:
    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0

    def show(self, elapsed: float, acked: int, sent: int, rate: float, final: bool = False) -> None:
        now = time.monotonic()
        if not self.tty and not final and now - self.last_print < 2.0:
            return
        self.last_print = now
        width = 30
        frac_a = min(1.0, acked / self.total) if self.total else 1.0
        frac_s = min(1.0, sent / self.total) if self.total else 1.0
        bar = "".join("#" if i < int(frac_s * width) else ("+" if i < int(frac_a * width) else ".")
                      for i in range(width))
        text = (f"[{bar}] {frac_s * 100:5.1f}% sent  acked {acked:>10,}  sent {sent:>10,}  "
                f"{rate:>9,.0f} lines/s  {elapsed:5.1f}s")
        if self.tty:
            sys.stderr.write("\r" + text + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            log(text)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    command = "python tests/bench/bench.py " + " ".join(shlex.quote(a) for a in argv)
    tmp = Path(tempfile.mkdtemp(prefix="spoold-bench-"))
    log(f"workdir {tmp}")
    ep = Endpoint(tmp, args.record_fail_rate, args.latency_ms / 1000.0)
    daemon: DaemonProc | None = None
    profiler: Profiler | None = None
    results: dict[str, Any] = {"command": command, "date": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    try:
        log(f"endpoint {ep.url} (pid {ep.proc.pid})")
        daemon = DaemonProc(tmp, ep.url, args)
        log(f"spoold pid {daemon.pid}, socket {daemon.socket}")
        if args.profile:
            profiler = Profiler(daemon.pid, tmp, args.profile_rate)
            if profiler.error:
                log(profiler.error)
        spoold_phase(args, tmp, ep, daemon, profiler, results)
        daemon.stop()
        if profiler is not None:
            profiler.proc = None  # already stopped
        # The baseline and the ceiling run with the daemon stopped: it does not share the cores.
        if args.baseline_seconds > 0:
            log(f"boto3 put_records loop, 500 records per call, up to {args.baseline_seconds:g}s ...")
            cpu0 = ep.cpu()
            b = boto3_baseline(ep.url, args.lines, args.size, args.baseline_seconds)
            b["endpoint_cpu_share"] = (ep.cpu() - cpu0) / b["seconds"]
            b["endpoint_lines"] = ep.stream("boto3")["lines"]
            results["boto3"] = b
        if args.peers:
            results["peers"] = run_peers(ep, args.lines, args.size, args.peer_seconds)
        if args.ceiling_seconds > 0:
            log(f"endpoint ceiling: replaying one prepared request on {args.ceiling_connections} connections "
                f"for {args.ceiling_seconds:g}s ...")
            results["ceiling"] = ceiling(ep, args.size, args.ceiling_seconds, args.ceiling_connections,
                                         args.aggregation == "kpl")
    finally:
        if profiler is not None and profiler.proc is not None:
            profiler.stop()
        if daemon is not None:
            daemon.stop()
        ep.stop()
    report(args, results)
    if args.plot:
        make_plot(args, results)
    (tmp / "results.json").write_text(json.dumps(results))
    if args.keep:
        log(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def read_clients(tmp: Path, k: int) -> list[dict[str, Any]]:
    out = []
    for i in range(k):
        try:
            out.append(json.loads((tmp / f"client{i}.json").read_bytes() or b"{}"))
        except ValueError:
            out.append({})
    return out


def spoold_phase(args: argparse.Namespace, tmp: Path, ep: Endpoint, daemon: DaemonProc,
                 profiler: Profiler | None, results: dict[str, Any]) -> None:
    k = args.clients
    per = [args.lines // k + (1 if i < args.lines % k else 0) for i in range(k)]
    start_ns = time.monotonic_ns() + 1_500_000_000  # room for the clients to import and connect
    deadline_ns = start_ns + int(args.timeout * 1e9)
    procs = []
    for i in range(k):
        params = {"id": i, "socket": str(daemon.socket), "lines": per[i], "size": args.size, "batch": args.batch,
                  "rate": (args.rate / k) if args.rate else 0, "inflight": args.inflight,
                  "start_ns": start_ns, "deadline_ns": deadline_ns}
        with open(tmp / f"client{i}.json", "wb") as out:  # a file: a pipe could fill and block the client
            procs.append(subprocess.Popen([sys.executable, str(HERE / "bench.py"), "_client", json.dumps(params)],
                                          stdout=out, cwd=ROOT, preexec_fn=die_with_parent))
    mode = f"offered {args.rate:,.0f} lines/s" if args.rate else "as fast as acks allow"
    log(f"pushing {args.lines:,} lines x {args.size} B from {k} clients, {args.batch} lines per connection, "
        f"{args.inflight} in flight per client, {mode}; aggregation={args.aggregation}")
    while time.monotonic_ns() < start_ns - 100_000_000:
        time.sleep(0.01)
    cpu0 = family_cpu(daemon.pid)
    main_cpu0 = proc_cpu(daemon.pid)
    ep_cpu0 = ep.cpu()
    rss_idle = family_mem(daemon.pid).get("VmRSS", 0)
    t0 = time.monotonic()
    bar = ProgressBar(args.lines)
    samples: list[tuple[float, int, int, int, float]] = []  # t, rss, lines_in, endpoint lines, daemon cpu
    target: int | None = None
    clients: list[dict[str, Any]] = []
    last_rate_point = (t0, 0)
    rate = 0.0
    stalled_since: float | None = None
    last_sent = -1
    timed_out = False
    while True:
        time.sleep(0.25)
        now = time.monotonic()
        if daemon.proc.poll() is not None:
            daemon.log.flush()
            raise SystemExit(f"spoold exited with {daemon.proc.returncode} during the run:\n"
                             f"{daemon.log_path.read_text()[-3000:]}")
        st = ep.stream("spoold")
        ds = daemon.status() or {}
        mem = family_mem(daemon.pid)
        samples.append((now, mem.get("VmRSS", 0), ds.get("lines_in", 0), st["lines"], family_cpu(daemon.pid)))
        if now - last_rate_point[0] >= 1.0:
            rate = (st["lines"] - last_rate_point[1]) / (now - last_rate_point[0])
            last_rate_point = (now, st["lines"])
        bar.show(now - t0, ds.get("lines_in", 0), st["lines"], rate)
        if target is None and all(p.poll() is not None for p in procs):
            clients = read_clients(tmp, k)
            target = sum(c.get("accepted", 0) for c in clients)
        if target is not None:
            if st["lines"] >= target:
                break
            # The daemon says it sent everything but the endpoint counted fewer: do not wait forever.
            if ds.get("lines_sent", 0) >= target and ds.get("spooled_lines", 1) == 0:
                stalled_since = stalled_since or now
                if now - stalled_since > 3.0:
                    break
            if st["lines"] != last_sent:
                last_sent = st["lines"]
        if now - t0 > args.timeout + 5:
            timed_out = True
            break
    cpu1 = family_cpu(daemon.pid)
    main_cpu1 = proc_cpu(daemon.pid)
    ep_cpu1 = ep.cpu()
    t1 = time.monotonic()
    mem = family_mem(daemon.pid)
    ds = daemon.status() or {}
    st = ep.stream("spoold")
    bar.show(t1 - t0, ds.get("lines_in", 0), st["lines"], rate, final=True)
    if profiler is not None and profiler.proc is not None and not profiler.error:
        profiler.stop()
        # Percentages of a core are over the push (the daemon idles, unsampled, before it).
        # py-spy samples the daemon's own process, not its sender child.
        results["profile"] = summarize_profile(profiler.out, profiler.rate, t1 - t0, args.top,
                                               main_cpu1 - main_cpu0,
                                               ep.stream("spoold")["lines"])
        results["profile_file"] = str(profiler.out)
    if not clients:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        clients = read_clients(tmp, k)
    dump = ep.dump()["bench"].get("spoold", {})
    first_write = min((c["first_ns"] for c in clients if c.get("first_ns")), default=0)
    last_ack = max((c["last_ack_ns"] for c in clients if c.get("last_ack_ns")), default=0)
    accepted = sum(c.get("accepted", 0) for c in clients)
    lat = [s[1] for s in dump.get("samples", [])]
    ack_lat = [x for c in clients for x in c.get("ack_lat_ns", [])]
    e2e_lines = dump.get("lines", 0)
    e2e_seconds = (dump.get("last_ns", 0) - first_write) / 1e9 if first_write and dump.get("last_ns") else 0
    acc_seconds = (last_ack - first_write) / 1e9 if last_ack else 0
    span = t1 - t0
    results["spoold"] = {
        "lines_requested": args.lines, "accepted": accepted,
        "rejected": sum(c.get("rejected", 0) for c in clients),
        "client_errors": sum(c.get("errors", 0) for c in clients),
        "acceptance_rate": accepted / acc_seconds if acc_seconds > 0 else None,
        "acceptance_seconds": acc_seconds,
        "e2e_lines": e2e_lines, "e2e_records": dump.get("records", 0), "e2e_seconds": e2e_seconds,
        "e2e_rate": e2e_lines / e2e_seconds if e2e_seconds > 0 else None,
        "daemon_lines_sent": ds.get("lines_sent"), "daemon_records_sent": ds.get("records_sent"),
        "daemon_requests": ds.get("requests"), "daemon_retried_records": ds.get("retried_records"),
        "latency_samples": len(lat), "latency_seen": dump.get("samples_seen", 0),
        "p50_ns": pct(lat, 50), "p99_ns": pct(lat, 99), "max_ns": max(lat) if lat else None,
        "ack_p50_ns": pct(ack_lat, 50), "ack_p99_ns": pct(ack_lat, 99),
        "peak_rss": mem.get("VmHWM"), "idle_rss": rss_idle, "daemon_cpu_s": cpu1 - cpu0,
        "cpu_s_per_million": (cpu1 - cpu0) / (e2e_lines / 1e6) if e2e_lines else None,
        "daemon_cores": (cpu1 - cpu0) / span, "sender_cores": ((cpu1 - cpu0) - (main_cpu1 - main_cpu0)) / span,
        "endpoint_cores": (ep_cpu1 - ep_cpu0) / span,
        "client_cpu_s": sum(c.get("cpu_s", 0) for c in clients),
        "client_cores": sum(c.get("cpu_s", 0) for c in clients) / span,
        "timed_out": timed_out,
    }
    results["series"] = {"first_write": first_write, "t0_mono": t0, "samples": samples, "dump": dump,
                         "ack_buckets": [c.get("ack_buckets", []) for c in clients]}


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    s = r.get("spoold", {})
    b = r.get("boto3")
    c = r.get("ceiling", {})
    kpl = args.aggregation == "kpl"
    out = print
    out("")
    out("== spoold ==")
    out(f"lines acked            {fmt_int(s.get('accepted'))} of {fmt_int(s.get('lines_requested'))}"
        f" (rejected {s.get('rejected')}, client errors {s.get('client_errors')})")
    out(f"acceptance rate        {fmt_int(s.get('acceptance_rate'))} lines/s (durable in the spool, acked;"
        f" {s.get('acceptance_seconds', 0):.2f}s)")
    out(f"end-to-end rate        {fmt_int(s.get('e2e_rate'))} lines/s (accepted by the endpoint;"
        f" {fmt_int(s.get('e2e_lines'))} lines in {fmt_int(s.get('e2e_records'))} records,"
        f" {s.get('e2e_seconds', 0):.2f}s)")
    out(f"daemon's own count     lines_sent {fmt_int(s.get('daemon_lines_sent'))}, records_sent"
        f" {fmt_int(s.get('daemon_records_sent'))}, requests {fmt_int(s.get('daemon_requests'))},"
        f" retried records {fmt_int(s.get('daemon_retried_records'))}")
    out(f"latency write->receipt p50 {fmt_ms(s.get('p50_ns'))}, p99 {fmt_ms(s.get('p99_ns'))},"
        f" max {fmt_ms(s.get('max_ns'))} ({s.get('latency_samples')} samples"
        + (", first and last sub-record of each aggregate)" if kpl
           else ", first, middle and last record of each request)"))
    out(f"latency write->ack     p50 {fmt_ms(s.get('ack_p50_ns'))}, p99 {fmt_ms(s.get('ack_p99_ns'))}")
    rss = s.get("peak_rss")
    out(f"daemon peak RSS        {rss / MiB:.1f} MiB (VmHWM, daemon + its HTTP sender process;"
        f" {s.get('idle_rss', 0) / MiB:.1f} MiB before the first line)" if rss else "daemon peak RSS        n/a")
    cpm = s.get("cpu_s_per_million")
    out(f"daemon CPU             {s.get('daemon_cpu_s', 0):.2f}s = "
        f"{cpm:.2f} s per million lines" if cpm else "daemon CPU             n/a")
    out(f"cores busy (avg)       daemon {s.get('daemon_cores', 0):.2f} (of which the sender process"
        f" {s.get('sender_cores', 0):.2f}), endpoint {s.get('endpoint_cores', 0):.2f},"
        f" clients {s.get('client_cores', 0):.2f} (of {os.cpu_count()})")
    if s.get("timed_out"):
        out("WARNING: the spoold phase timed out; figures are partial")
    if b:
        out("== boto3 put_records loop (500 records per call) ==")
        out(f"rate                   {fmt_int(b['rate'])} lines/s ({fmt_int(b['lines'])} lines in"
            f" {b['seconds']:.2f}s, {b['calls']} calls, {b['failed_records']} records resent;"
            f" endpoint counted {fmt_int(b['endpoint_lines'])}; endpoint {b['endpoint_cpu_share']:.2f} cores)")
        if s.get("e2e_rate"):
            out(f"spoold / boto3         {s['e2e_rate'] / b['rate']:.2f}x"
                + (" (spoold ran at an offered rate, not at its maximum)" if args.rate else ""))
    if c:
        p = c["plain"]
        out("== endpoint ceiling ==")
        out(f"500-record request     {fmt_int(p['records_per_s'])} records/s ({p['requests']} requests,"
            f" statuses {p['statuses']}, endpoint {p['endpoint_cpu_share']:.2f} cores)")
        if "kpl" in c:
            k = c["kpl"]
            out(f"KPL request            {fmt_int(k['lines_per_s'])} lines/s ({k['records_per_request']} aggregates,"
                f" {k['lines_per_request']:,} lines per request, {k['requests']} requests)")
        ref = c["kpl"]["lines_per_s"] if "kpl" in c else p["records_per_s"]
        if s.get("e2e_rate") and ref:
            out(f"spoold / ceiling       {s['e2e_rate'] / ref * 100:.0f}%")
    if r.get("profile"):
        out("== profile (spoold phase) ==")
        for line in r["profile"]:
            out(line)
        out(f"(collapsed stacks: {r.get('profile_file')}; use --keep to keep them)")
    # The markdown summary.
    out("")
    out(f"#### spoold benchmark, {r['date']}")
    out("")
    out(f"`{r['command']}`  ")
    out(f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {args.lines:,} lines x {args.size} B,"
        f" {args.clients} clients, {args.batch} lines/connection, aggregation {args.aggregation},"
        f" record fail rate {args.record_fail_rate:g}, endpoint latency {args.latency_ms:g} ms"
        + (f", offered {args.rate:,.0f} lines/s" if args.rate else "") + (", under py-spy" if args.profile else "")
        + (f", PATCHED {', '.join(args.patch)}" if args.patch else "") + (f", destination {', '.join(args.dest)}"
        if args.dest else "") + (f", spool {', '.join(args.spool)}" if args.spool else "")
        + (f", daemon {', '.join(args.daemon)}" if args.daemon else ""))
    out("")
    out("| figure | value | target |")
    out("|---|---|---|")

    def row(name: str, value: str, target: str = "") -> None:
        out(f"| {name} | {value} | {target} |")

    e2e = s.get("e2e_rate")
    row("acceptance (acked, durable)", f"{fmt_int(s.get('acceptance_rate'))} lines/s")
    goal = TARGETS["e2e_kpl"] if kpl else TARGETS["e2e"]
    row("end-to-end (accepted by endpoint)", f"{fmt_int(e2e)} lines/s",
        f">= {goal:,} {'met' if e2e and e2e >= goal else 'NOT met'}" if not args.rate else "")
    p99 = s.get("p99_ns")
    row("latency write->endpoint p50 / p99", f"{fmt_ms(s.get('p50_ns'))} / {fmt_ms(p99)}",
        (f"p99 <= 500 ms at half max {'met' if p99 is not None and p99 <= 500e6 else 'NOT met'}"
         if args.rate else ""))
    row("latency write->ack p50 / p99", f"{fmt_ms(s.get('ack_p50_ns'))} / {fmt_ms(s.get('ack_p99_ns'))}")
    row("daemon peak RSS (idle before the push)", f"{rss / MiB:.1f} MiB ({s.get('idle_rss', 0) / MiB:.1f} MiB)"
        if rss else "n/a",
        f"<= 150 MiB {'met' if rss and rss <= 150 * MiB else 'NOT met'}")
    row("daemon CPU per million lines", f"{cpm:.2f} s" if cpm else "n/a")
    row("cores: daemon (sender) / endpoint / clients",
        f"{s.get('daemon_cores', 0):.2f} ({s.get('sender_cores', 0):.2f}) / {s.get('endpoint_cores', 0):.2f}"
        f" / {s.get('client_cores', 0):.2f}")
    if b:
        row("boto3 put_records loop", f"{fmt_int(b['rate'])} lines/s")
        if e2e:
            ratio = e2e / b["rate"]
            row("spoold / boto3", f"{ratio:.1f}x" + (" (spoold at an offered rate)" if args.rate else ""),
                f">= 5x {'met' if ratio >= 5 else 'NOT met'}" if not kpl and not args.rate else "")
    for peer in r.get("peers", []):
        cpm_peer = peer.get("cpu_s_per_million")
        row(f"peer {peer['producer']}: lines/s end to end, CPU s per million lines",
            f"{fmt_int(peer.get('rate'))}, {cpm_peer:.1f}" if cpm_peer else f"n/a ({peer.get('error', 'no lines')})")
    if c:
        row("endpoint ceiling (500-record request)", f"{fmt_int(c['plain']['records_per_s'])} records/s")
        if "kpl" in c:
            row("endpoint ceiling (KPL request)", f"{fmt_int(c['kpl']['lines_per_s'])} lines/s")


def make_plot(args: argparse.Namespace, r: dict[str, Any]) -> None:
    series = r.get("series")
    if not series or not series["first_write"]:
        log("no data to plot")
        return
    t0 = series["first_write"]
    dump = series["dump"]
    bucket_ns = dump.get("bucket_ns", 100_000_000)
    # Throughput in 500 ms windows (the raw buckets are 100 ms).
    window = 5

    def rate_points(buckets: list[tuple[int, int]]) -> list[tuple[float, float]]:
        by: dict[int, int] = {}
        for b, n in buckets:
            by[b // window] = by.get(b // window, 0) + n
        return [((w * window * bucket_ns - t0) / 1e9, n / (window * bucket_ns / 1e9)) for w, n in sorted(by.items())]

    acks: list[tuple[int, int]] = [tuple(x) for c in series["ack_buckets"] for x in c]  # type: ignore[misc]
    sent = rate_points([tuple(x) for x in dump.get("buckets", [])])  # type: ignore[misc]
    acked = rate_points(acks)
    lat = [((t - t0) / 1e9, ns / 1e6) for t, ns in dump.get("samples", [])]
    by_sec: dict[int, list[float]] = defaultdict(list)
    for t, ms in lat:
        by_sec[int(t * 2)].append(ms)
    p50 = [((k + 0.5) / 2, pct(v, 50) or 0) for k, v in sorted(by_sec.items())]
    p99 = [((k + 0.5) / 2, pct(v, 99) or 0) for k, v in sorted(by_sec.items())]
    mono0 = series["t0_mono"]
    off = (mono0 * 1e9 - t0) / 1e9  # monotonic seconds -> seconds since first write
    rss = [(t - mono0 + off, m / MiB) for t, m, _, _, _ in series["samples"]]
    cpu_pts = []
    smp = series["samples"]
    for a, b2 in zip(smp, smp[2:]):  # daemon cores over ~0.5 s windows
        if b2[0] > a[0]:
            cpu_pts.append(((a[0] + b2[0]) / 2 - mono0 + off, (b2[4] - a[4]) / (b2[0] - a[0])))
    t_max = max([p[0] for p in sent + acked + rss] or [1.0])
    s = r.get("spoold", {})
    title = (f"spoold: {args.lines:,} lines x {args.size} B, {args.clients} clients, aggregation {args.aggregation}"
             + (f", offered {args.rate:,.0f} lines/s" if args.rate else "")
             + f"; end to end {fmt_int(s.get('e2e_rate'))} lines/s, p99 {fmt_ms(s.get('p99_ns'))}")
    panels = [
        {"title": "throughput", "unit": "lines/s", "series": [("acked", (31, 119, 180), acked, "line"),
                                                             ("accepted by endpoint", (255, 127, 14), sent, "line")]},
        {"title": "latency, write to endpoint", "unit": "ms", "series": [
            ("samples", (170, 170, 170), lat, "dots"), ("p50", (44, 160, 44), p50, "line"),
            ("p99", (214, 39, 40), p99, "line")]},
        {"title": "daemon RSS", "unit": "MiB", "series": [("VmRSS", (148, 103, 189), rss, "line")]},
        {"title": "daemon CPU", "unit": "cores", "series": [("utime+stime", (140, 86, 75), cpu_pts, "line")]},
    ]
    plot(args.plot, title, panels, t_max)
    log(f"plot written to {args.plot}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_client"]:
        return client_main(json.loads(argv[1]))
    args = parse_args(argv)
    return run(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
