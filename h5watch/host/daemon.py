"""``h5watch daemon``: every instrumented process on this host, in one ``/metrics``.

Each scan reads every state file in ``state_dir`` and sorts its process:

- **dead** (gone, a zombie, marked exited, or its pid now names another
  process): its final counters are folded into persisted totals, then its
  files are removed; counters therefore never go backwards when workers
  exit, are killed or are replaced;
- **stuck** or **ok**, as :func:`~h5watch.host.verdict.judge` says at
  ``--stuck-after`` (an orphaned lock, a hold or a wait, or the heartbeat,
  older than it): ``h5watch status`` says the same with the same options.

The scan publishes a fresh :class:`~h5watch.export.metrics.Aggregate`; scrapes
only read the latest one. With ``--kill-after``, a worker the verdict finds
past it (the kill's ``reason`` is the verdict's at that threshold) has its stacks
read from outside (:mod:`h5watch.host.outside`: pystack, else its
``faulthandler`` dump signal, else none), its incident file written
(:mod:`h5watch.host.incidents`), ``worker.killed`` logged with the lock
evidence of its state file and that file's name, then it gets SIGTERM, and
SIGKILL after ``--grace``.

A stopped or traced worker is ``stopped`` in ``h5watch_processes{state}``
and is not killed (``worker.spared_stopped``, once) unless ``--kill-stopped``.

Never the wrong process: a pid is signalled only through a pidfd opened
first and then checked against the state file's start time and uid, so a
pid reused by another process in between cannot be hit.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import ssl
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

import numpy as np

from h5watch import logs
from h5watch.errors import UsageError
from h5watch.export.metrics import (
    Aggregate,
    AggregateCollector,
    ForkTotals,
    LockGauges,
    LockTotals,
    OperationTotals,
    installed_versions,
    metrics_registry,
)
from h5watch.export.server import MetricsServer
from h5watch.host import claim, incidents, reaper, totals
from h5watch.host.totals import Totals
from h5watch.host.verdict import KILL_REASONS, OK, Finding, Thresholds, Verdict, judge_live, parse_seconds
from h5watch.schema import O_CAUSED_WAIT_SUM, O_HOLD_SUM, O_HOLDS, O_WAIT_SUM, O_WAITS
from h5watch.statedir import STACKS_SUFFIX, OpenDir, list_names, open_user_dir, readable_user_dirs
from h5watch.statefile import (
    STATE_SUFFIX,
    ProcessState,
    StateDirError,
    StateFileError,
    concat_headers,
    concat_records,
    holds_seen_at,
    process_identity,
    read_state_file,
    text_from_file,
)

__all__ = ["Daemon", "add_arguments", "main", "parse_listen"]

TOTALS_FILE = totals.TOTALS_FILE
K = TypeVar("K")
# The versions in h5watch_workload_info's label order (after the workload).
_INFO_VERSIONS = ("h5py_version", "hdf5_version", "h5watch_version", "python_version")
# OperationTotals' fields, as columns of a row's words (statefile.OPERATION_COUNTERS).
_OPERATION_TOTALS = [O_HOLDS, O_HOLD_SUM, O_CAUSED_WAIT_SUM, O_WAITS, O_WAIT_SUM]
STATE_FILE_ERRORS = ("symlink", "not_regular", "foreign_owner", "unreadable", "truncated", "corrupt", "version", "busy", "unremovable")
# Dead processes' files read (and folded) per scan, after every live one.
MAX_DEAD_PER_SCAN = 2000
# Files that are not a process's state (or its stacks), temporary files left
# by a writer that died, and unreadable files of dead processes are removed
# this long after their last change; at most MAX_JUNK_PER_SCAN per scan.
JUNK_GRACE_SECONDS = 600.0
MAX_JUNK_PER_SCAN = 2000
MAX_CONCURRENT_KILLS = 8
DEFAULT_WORKLOAD_RETENTION = 86400.0
# How stale a live workload's saved last_seen may get before it alone makes
# the totals be saved again (a restart after a crash may see it this old).
LAST_SEEN_SAVE_SECONDS = 300.0

_log = logs.get_logger(logger="h5watch.daemon")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", help=(
        "the shared state directory (default: as H5WATCH_STATE_DIR, else /run/h5watch if it exists, else "
        "$XDG_RUNTIME_DIR/h5watch); as root, every user's <uid> subdirectory is read, else this user's own; created if missing, but not its parents"
    ))
    parser.add_argument("--listen", default="127.0.0.1:9464", help=(
        "HOST:PORT of /metrics and /healthz: [IPV6]:PORT for an IPv6 address, :PORT for every address (default 127.0.0.1:9464)"
    ))
    parser.add_argument("--scan-interval", default="2", help="seconds between scans of the state dir (default 2)")
    parser.add_argument("--kill-after", default=None, help=(
        "kill a worker whose heartbeat, wait or hold is older than this many seconds (default: never kill)"
    ))
    parser.add_argument("--grace", default="5", help="seconds between SIGTERM and SIGKILL (default 5)")
    parser.add_argument("--stuck-after", default=None, help="seconds after which a process counts as stuck (default: --kill-after, else 30)")
    parser.add_argument("--dry-run", action="store_true", help=(
        "log the evidence against stuck workers (worker.would_kill), but send no signal at all: no stack dump, no "
        "kill"
    ))
    parser.add_argument("--kill-stopped", action="store_true", help=(
        "with --kill-after, kill a stuck worker that is stopped (SIGSTOP) or traced (a debugger) too (default: report it "
        "as state=\"stopped\" and log worker.spared_stopped, never kill it)"
    ))
    parser.add_argument("--tls-cert", default=None, help="serve HTTPS: this PEM certificate (chain), with --tls-key")
    parser.add_argument("--tls-key", default=None, help="the PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", default=None, help=(
        "with --tls-cert: accept only clients with a certificate signed by one of these PEM CA certificates (mutual TLS)"
    ))
    parser.add_argument("--workload-retention", default="24h", help=(
        "forget a workload that has had no process for this long (seconds, or with s, m, h or d; 0 or off: never): its "
        "series leave /metrics and its saved totals are dropped, so a later return starts its counters from 0 (default 24h)"
    ))
    parser.add_argument("--incidents-keep", default=str(incidents.DEFAULT_KEEP), help=(
        "keep this many incident files (one per kill, in <state dir>/<uid>/incidents/; the oldest are removed first; "
        f"0: write none) (default {incidents.DEFAULT_KEEP})"
    ))
    parser.add_argument("--log-format", choices=("json", "console"), default=None, help="json (default) or console")


def parse_listen(text: str) -> tuple[str, int]:
    """``--listen``: HOST:PORT, [IPV6]:PORT, or :PORT (every address, IPv6 and
    IPv4); the host "" for every address."""
    host, sep, port_text = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if (not sep or (not host and bracketed) or ("[" in host or "]" in host) or (":" in host and not bracketed)
            or not port_text.isdigit() or not 0 <= int(port_text) <= 65535):
        raise UsageError(f"--listen: expected HOST:PORT, [IPV6]:PORT or :PORT such as 127.0.0.1:9464, [::1]:9464 or :9464, got {text!r}")
    return host, int(port_text)


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_retention(text: str) -> float | None:
    """``--workload-retention``: seconds (None: keep every workload forever)."""
    text = text.strip().lower()
    if text in ("0", "off"):
        return None
    number, scale = (text[:-1], _DURATION_UNITS[text[-1]]) if text[-1:] in _DURATION_UNITS else (text, 1.0)
    try:
        value = float(number) * scale
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e10:  # NaN fails too
        raise UsageError(f"--workload-retention: expected a duration such as 3600, 90m, 24h or 7d, or 0 or off, got {text!r}")
    return value or None


def parse_keep(text: str) -> int:
    """``--incidents-keep``: how many incident files to keep (0: none written)."""
    if not (text.strip().isdigit() and int(text) < 10**7):
        raise UsageError(f"--incidents-keep: expected a whole number of files such as 100, or 0 for none, got {text!r}")
    return int(text)


def tls_context(cert: str | None, key: str | None, client_ca: str | None) -> ssl.SSLContext | None:
    """The daemon's TLS, from ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``
    (None: plain HTTP); :class:`UsageError` naming the option to fix."""
    if cert is None and key is None:
        if client_ca is not None:
            raise UsageError("--tls-client-ca: needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise UsageError("--tls-cert and --tls-key: give both (a PEM certificate and its private key), or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--tls-cert {cert} / --tls-key {key}: cannot load them: {getattr(exc, 'strerror', None) or exc}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--tls-client-ca {client_ca}: cannot load it: {getattr(exc, 'strerror', None) or exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def format_listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(args: argparse.Namespace) -> int:
    from h5watch.options import env_name, resolve, unknown_variables

    options = resolve({"state_dir": args.state_dir} if args.state_dir else {})
    listen = parse_listen(args.listen)
    scan_interval = parse_seconds("--scan-interval", args.scan_interval)
    thresholds = Thresholds.parse(args.stuck_after, args.kill_after)
    grace = parse_seconds("--grace", args.grace)
    retention = parse_retention(args.workload_retention)
    incidents_keep = parse_keep(args.incidents_keep)
    tls = tls_context(args.tls_cert, args.tls_key, args.tls_client_ca)
    # The daemon's own events name it, unless H5WATCH_SERVICE names it otherwise.
    workload = options.service if env_name("service") in os.environ else "h5watch-daemon"
    logs.configure(args.log_format or options.log_format, workload=workload)
    for variable, closest in unknown_variables():  # a misspelt H5WATCH_STATE_DIR: another directory watched
        _log.warning("options.unknown_variable", variable=variable, did_you_mean=closest, action="ignored")
    try:
        # Only the state dir itself is made when missing, never its parents: a
        # mistyped path is an error, not a new tree.
        own_dir = open_user_dir(options.state_dir, parents=False)
        # Held (open, flock'ed) until this process ends: one daemon per state dir.
        claim_fd = claim.claim(own_dir)
    except (StateDirError, claim.ClaimError) as exc:
        raise UsageError(str(exc)) from None
    daemon = Daemon(options.state_dir, scan_interval, thresholds.kill_after, grace, thresholds.stuck_after, args.dry_run,
                    args.kill_stopped, workload_retention=retention, incidents_keep=incidents_keep)
    daemon.claim_fd = claim_fd
    # What h5watch status judges by, when it is given no thresholds of its own.
    claim.announce(claim_fd, {**thresholds.to_json(), "kill_stopped": args.kill_stopped, "dry_run": args.dry_run})
    try:
        daemon.serve(*listen, tls=tls)
    except OSError as exc:
        raise UsageError(f"--listen {args.listen}: cannot listen there: {exc.strerror or exc}") from None
    return 0


class Daemon:
    def __init__(
        self,
        state_dir: str,
        scan_interval: float = 2.0,
        kill_after: float | None = None,
        grace: float = 5.0,
        stuck_after: float = 30.0,
        dry_run: bool = False,
        kill_stopped: bool = False,
        workload_retention: float | None = DEFAULT_WORKLOAD_RETENTION,
        incidents_keep: int = incidents.DEFAULT_KEEP,
    ) -> None:
        self.state_dir = state_dir
        self.workload_retention = workload_retention
        self.scan_interval = scan_interval
        self.grace = grace
        self.thresholds = Thresholds(stuck_after, kill_after)
        self.dry_run = dry_run
        self.kill_stopped = kill_stopped
        self.aggregate: Aggregate | None = None
        self.last_scan_unix = 0.0
        self._stop = threading.Event()
        # The daemon's own per-user directory holds its totals and lock file.
        self._own_dir = open_user_dir(state_dir, parents=False)
        self._totals_path = os.path.join(self._own_dir.path, TOTALS_FILE)
        self.incidents = incidents.IncidentStore(self._own_dir, incidents_keep)
        self._unsaved = False
        self._unsaved_logged = False
        self._save_failures = 0
        # When the totals (and so each workload's last_seen) were last saved.
        self._last_seen_saved_unix = 0.0
        # Each state file's last good read, by path (this scan's files only).
        self._last_read: dict[str, ProcessState] = {}
        # Per-user directories this daemon reads, locked for it: (dev, ino) -> fd.
        self._claims: dict[tuple[int, int], int] = {}
        self._claim_refused: set[tuple[int, int]] = set()
        self.claim_fd: int | None = None
        # Dead processes' counts and the kills (these also from kill threads,
        # under _kills_lock), saved across restarts.
        self._totals = Totals()
        self._errors: dict[str, int] = {}
        self._logged_errors: dict[str, str] = {}
        self._handled: dict[tuple[int, int], float] = {}
        # Stopped processes spared a kill, logged once each: (pid, start ticks).
        self._spared: set[tuple[int, int]] = set()
        self._kill_threads: list[threading.Thread] = []
        self._kills_lock = threading.Lock()
        self._kills_unsaved = False  # under _kills_lock
        self._load_totals()

    # -- running -----------------------------------------------------------

    def serve(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        registry = metrics_registry(AggregateCollector(lambda: self.aggregate, installed_versions))
        server = MetricsServer(registry, host, port, healthy=self.healthy, tls=tls)
        self.port = server.port
        stopped_by: list[str] = []

        def stop_on(signum: int, _frame: object) -> None:
            stopped_by.append(signal.Signals(signum).name)
            self._stop.set()

        # SIGHUP too (a closed terminal, a supervisor's reload): a clean stop,
        # the totals saved, never the default death that loses them.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, stop_on)
        try:
            # One scan before the first request: the first scrape after a
            # start already carries every series.
            self.scan()
            server.start()
            _log.info("daemon.started", state_dir=self.state_dir, listen=format_listen(host, server.port), kill_after=self.thresholds.kill_after,
                      grace=self.grace, stuck_after=self.thresholds.stuck_after, dry_run=self.dry_run, scan_interval=self.scan_interval,
                      kill_stopped=self.kill_stopped, workload_retention=self.workload_retention, tls=tls is not None,
                      incidents_dir=self.incidents.path, incidents_keep=self.incidents.keep)
            while not self._stop.wait(self.scan_interval):
                self.scan()
        finally:
            server.stop()
            saved = self._save_totals()
            _log.info("daemon.stopped", signal=stopped_by[0] if stopped_by else None, totals_saved=saved)

    def stop(self) -> None:
        self._stop.set()

    def healthy(self) -> bool:
        return time.time() - self.last_scan_unix < 3 * self.scan_interval + 5

    # -- one scan ----------------------------------------------------------

    def scan(self) -> Aggregate:
        """One tick, in named steps: read every state file, reap the dead,
        sum the live, judge them, publish the aggregate, act on the stuck."""
        started, now = time.perf_counter(), time.time()
        sweep = self._open_dirs()
        try:
            self._read_states(sweep, now)
            self._reap_dead(sweep, now)
        finally:
            sweep.close()
        self._expire_workloads(sweep, now)
        live = self._aggregate(sweep.live, now)
        self._judge(sweep.live, now)
        self._spared &= {(p.state.pid, p.state.start_ticks) for p in sweep.live if p.verdict.stopped is not None}
        aggregate = self._publish(sweep, live, started)
        self._act(sweep.live)
        return aggregate

    def _open_dirs(self) -> Sweep:
        """Every per-user directory this daemon may read, opened."""
        try:
            dirs, refused = readable_user_dirs(self.state_dir)
        except (StateDirError, OSError) as exc:
            self._error(self.state_dir, "unreadable_dir", str(exc))
            return Sweep(dirs=[], success=False)
        for path, message in refused:
            self._error(path, "foreign_owner", message)
        return Sweep(dirs=dirs)

    def _read_states(self, sweep: Sweep, now: float) -> None:
        """Read each directory's state files and sort them into live and dead:
        every live process, however many files a directory holds; dead ones
        up to MAX_DEAD_PER_SCAN (the rest next scan)."""
        dead_budget = MAX_DEAD_PER_SCAN
        for directory in sweep.dirs:
            if not self._claim(directory):
                continue
            try:
                names = list_names(directory)
            except OSError as exc:
                self._error(directory.path, "unreadable_dir", f"cannot list it: {exc.strerror}")
                sweep.success = False
                continue
            live_names, dead_names, junk, letters = _sort_names(names, directory.uid)
            sweep.present.update(f"{directory.uid}/{name}" for name in live_names + dead_names)
            dead_names, dead_budget = dead_names[:dead_budget], max(0, dead_budget - len(dead_names))
            dead_set = set(dead_names)
            for name in live_names + dead_names:
                state = self._read_state(directory, name, name in dead_set, junk)
                if state is None:
                    continue
                sweep.read[state.path] = state
                fate = self._classify(state, name, now, directory.uid, name not in dead_set)
                if fate == "dead":
                    sweep.dead.append(Scanned(directory, name, state))
                elif fate in ("live", "exiting"):
                    sweep.live.append(Scanned(directory, name, state, state_letter=letters.get(name)))
            sweep.junk.append((directory, junk))

    def _read_state(self, directory: OpenDir, name: str, dead: bool, junk: list[str]) -> ProcessState | None:
        """One state file, or None (skipped and logged; ``junk`` gets a dead
        process's file no reader can use)."""
        path = os.path.join(directory.path, name)
        try:
            if dead:
                # As it stands: a writer that died in the middle of a write
                # left old or new values (see statefile), and every record
                # it made counts, also one its header never counted.
                return read_state_file(path, daemon_uid=directory.uid, dir_fd=directory.fd, accept_torn=True)
            try:
                return read_state_file(path, daemon_uid=directory.uid, dir_fd=directory.fd)
            except StateFileError as exc:
                if exc.reason != "busy":
                    raise
                if path in self._last_read:
                    # Live, and being written at each try: its last read
                    # stands for it (dropping it for one scan would make
                    # every counter of its workload go down).
                    return self._last_read[path]
                raise
        except StateFileError as exc:
            self._error(path, exc.reason, str(exc))
            if dead and exc.reason in ("truncated", "corrupt"):
                junk.append(name)
            return None

    def _reap_dead(self, sweep: Sweep, now: float) -> None:
        """Fold the dead processes' counters into the totals, save them, then
        remove their files and the junk; forget what is gone."""
        for process in sweep.dead:
            self._fold(process.state, process.key)
        for directory, junk in sweep.junk:
            self._remove_junk(directory, junk, now)
        # Persist before removing: a crash in between must not count a
        # process twice, and a failed save keeps its files for the next scan.
        if sweep.dead and (not self._unsaved or self._save_totals()):
            for process in sweep.dead:
                self._remove_files(process.directory, process.state)
        self._last_read = sweep.read
        if sweep.success:
            self._forget_missing(sweep.present)

    def _expire_workloads(self, sweep: Sweep, now: float) -> None:
        """Note when each workload last had a process; drop from the totals
        (and so from /metrics) every workload without one for longer than
        ``--workload-retention``."""
        seen = {process.state.workload for process in sweep.live + sweep.dead}
        if seen - set(self._totals.last_seen) or (seen and now - self._last_seen_saved_unix > LAST_SEEN_SAVE_SECONDS):
            self._unsaved = True
        self._totals.last_seen.update(dict.fromkeys(seen, now))
        if not sweep.success:
            return  # a directory could not be listed: its workloads may be live
        with self._kills_lock:
            for workload in sorted(self._totals.workloads() - seen):
                # Known from a save that did not record it: the clock starts now.
                last_seen = self._totals.last_seen.setdefault(workload, now)
                if self.workload_retention is None or now - last_seen <= self.workload_retention:
                    continue
                self._totals.drop(workload)
                self._unsaved = True
                _log.info("daemon.workload_expired", workload=workload, last_seen_unix=last_seen,
                          retention_seconds=self.workload_retention,
                          effect="its series are gone from /metrics; if it returns, its counters start from 0")

    def _judge(self, processes: list[Scanned], now: float) -> None:
        """Each live process's verdict (:mod:`h5watch.host.verdict`)."""
        for process in processes:
            process.verdict = judge_live(process.state, now, self.thresholds, oldest_age_seconds=process.oldest_age_seconds,
                                         state_letter=process.state_letter)

    def _publish(self, sweep: Sweep, live: Aggregate, started: float) -> Aggregate:
        """This scan's aggregate, the one scrapes read from now on; the totals
        saved if they changed."""
        live.processes = dict(Counter([(p.state.workload, "dead") for p in sweep.dead]
                                      + [(p.state.workload, p.verdict.state) for p in sweep.live]))
        aggregate = self._combine(live)
        aggregate.totals_save_failures = self._save_failures
        aggregate.scan_seconds = time.perf_counter() - started
        aggregate.scan_success = sweep.success
        self.aggregate = aggregate
        self.last_scan_unix = time.time()
        if self._unsaved or self._kills_unsaved:
            self._save_totals()
        return aggregate

    def _act(self, processes: list[Scanned]) -> None:
        """Kill the processes past ``--kill-after`` (in threads of their own);
        a stopped or traced one only with ``--kill-stopped``."""
        for process in processes:
            verdict = process.verdict
            if verdict.kill is None:
                continue
            if (process.state.pid, process.state.start_ticks) in self._handled:
                continue  # being killed: pystack's read shows it traced meanwhile
            if verdict.stopped is not None and not self.kill_stopped:
                self._spare_stopped(process.state, verdict)
                continue
            self._handle_stuck(process.state, verdict.kill)

    def _spare_stopped(self, state: ProcessState, verdict: Verdict) -> None:
        """Log once per process (until it runs again) that it is not killed because it is stopped."""
        key = (state.pid, state.start_ticks)
        if key in self._spared:
            return
        self._spared.add(key)
        assert verdict.kill is not None
        _log.warning("worker.spared_stopped", workload=state.workload, worker_pid=state.pid, reason=verdict.kill.reason,
                     stopped=verdict.stopped, lock=None if verdict.kill.culprit is None else verdict.kill.culprit.lock,
                     action="not killed: it is stopped or traced (someone may be debugging it); --kill-stopped kills it")

    def _claim(self, directory: OpenDir) -> bool:
        """One daemon per user directory (a root daemon and a user's own on one
        base would otherwise both fold that user's files): a lock on the
        directory itself, held while this daemon lives."""
        key = (directory.dev, directory.ino)
        if key in self._claims:
            return True
        held = os.dup(directory.fd)
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(held)
            if key not in self._claim_refused:
                self._claim_refused.add(key)
                _log.warning("daemon.dir_claimed", path=directory.path,
                             hint="another h5watch daemon reads this directory; this one leaves it to it")
            return False
        self._claims[key] = held
        self._claim_refused.discard(key)
        return True

    def _classify(self, state: ProcessState, name: str, now: float, dir_uid: int,
                  seen_alive: bool) -> Literal["dead", "foreign", "exiting", "live"]:
        """dead, foreign (a file that does not name itself, or is not its
        directory owner's), exiting or live. ``seen_alive``: its name's
        process (pid, start time, uid) was found alive by this scan."""
        expected = f"{state.pid}-{state.start_ticks}{STATE_SUFFIX}"
        if name != expected:
            self._error(state.path, "corrupt", f"names pid {state.pid}, start {state.start_ticks}, not its own file name")
            return "foreign"
        if state.file_uid != dir_uid or int(state.header["uid"]) != dir_uid:
            self._error(state.path, "foreign_owner", f"owned by uid {state.file_uid} in the directory of uid {dir_uid}")
            return "foreign"
        if name in self._totals.folded:
            return "dead"
        if not seen_alive:
            identity = process_identity(state.pid)
            if identity is None or identity[0] != state.start_ticks or identity[1] != int(state.header["uid"]):
                return "dead"
        # Marked exited, yet still there: its last threads may still count in
        # the file (daemon threads run until the interpreter is gone), so it is
        # folded once the process is gone, and never judged stuck meanwhile.
        return "exiting" if int(state.header["exited"]) else "live"

    # -- aggregation ---------------------------------------------------------

    @staticmethod
    def _record_totals(record: np.void) -> LockTotals:
        return LockTotals(
            acquisitions=int(record["acquisitions"]), contentions=int(record["contentions"]), reentries=int(record["reentries"]),
            wait_buckets=record["wait_buckets"].astype(np.uint64), wait_sum_ns=int(record["wait_sum_ns"]),
            hold_buckets=record["hold_buckets"].astype(np.uint64), hold_sum_ns=int(record["hold_sum_ns"]),
            timeouts=record["timeouts"].astype(np.uint64), orphans=record["orphans"].astype(np.uint64),
        )

    @staticmethod
    def _add_operations(into: dict[tuple[str, str, str], OperationTotals], states: list[ProcessState]) -> None:
        """Contention by operation, summed per (workload, lock, operation)
        over ``states`` in one pass over all their entries at once."""
        counted = [state for state in states if state.operation_keys]
        if not counted:
            return
        # By the names' raw bytes first; two that read as one text (see
        # text_from_file) are added into one total below.
        keys, index = _groups(((state.workload, lock, operation) for state in counted for lock, operation in state.operation_keys),
                              sum(len(state.operation_keys) for state in counted))
        counts = np.concatenate([state.operation_counts for state in counted])
        sums = _sum_by(index, len(keys), counts[:, _OPERATION_TOTALS])
        for (workload, lock, operation), row in zip(keys, sums.tolist()):
            key = (workload, text_from_file(lock), text_from_file(operation))
            totals = into.get(key)
            if totals is None:
                totals = into[key] = OperationTotals()
            totals.add(OperationTotals(*row))

    @staticmethod
    def _fork_totals_of(state: ProcessState) -> ForkTotals:
        header = state.header
        return ForkTotals(int(header["forks"]), header["fork_wait_buckets"].astype(np.uint64), int(header["fork_wait_sum_ns"]),
                          header["deadlocks"].astype(np.uint64), int(header["order_inversions"]))

    @staticmethod
    def _add_process_counts(live: Aggregate, states: list[ProcessState], headers: np.ndarray, now: float) -> None:
        """What each process counts outside its locks (forks, deadlocks, ...),
        what it runs and its heartbeat's age, per workload, all processes at
        once (``headers``: theirs, in order)."""
        assert live.heartbeat_age is not None and live.locks_unrecorded is not None and live.workload_info is not None
        names = [state.workload for state in states]
        workloads, index = _groups(names, len(names))
        forks, fork_wait_buckets, fork_wait_sum_ns, deadlocks, order_inversions, threads_in_deadlock, locks_unrecorded = (
            _sum_by(index, len(workloads), headers[column])
            for column in ("forks", "fork_wait_buckets", "fork_wait_sum_ns", "deadlocks", "order_inversions",
                           "threads_in_deadlock", "locks_unrecorded"))
        # A process without a watchdog does not beat: its heartbeat has no age.
        ages = np.where(headers["watchdog_running"] != 0, np.maximum(0.0, now - headers["heartbeat_unix"]), 0.0)
        heartbeat_age = np.zeros(len(workloads))
        np.maximum.at(heartbeat_age, index, ages)
        for workload, i in workloads.items():
            live.forks[workload] = ForkTotals(int(forks[i]), fork_wait_buckets[i], int(fork_wait_sum_ns[i]), deadlocks[i],
                                              int(order_inversions[i]))
            live.threads_in_deadlock[workload] = int(threads_in_deadlock[i])
            live.heartbeat_age[workload] = float(heartbeat_age[i])
            live.locks_unrecorded[workload] = int(locks_unrecorded[i])
        # By the raw bytes first: most processes of a workload run the same.
        running = set(zip(names, *(headers[name].tolist() for name in _INFO_VERSIONS)))
        live.workload_info.update((workload, *(text_from_file(raw) for raw in versions)) for workload, *versions in running)

    def _aggregate(self, processes: list[Scanned], now: float) -> Aggregate:
        """The live processes' sums per (workload, lock), in one pass over all
        their records at once; each process's oldest hold or wait age on the way."""
        states = [process.state for process in processes]
        live = Aggregate(heartbeat_age={}, locks_unrecorded={}, workload_info=set())
        if not states:
            return live
        headers = concat_headers([state.header for state in states])
        self._add_process_counts(live, states, headers, now)
        self._add_operations(live.operations, states)
        records = concat_records([state.records for state in states])
        owner = np.repeat(np.arange(len(states)), [len(state.records) for state in states])
        workloads = [state.workload for state in states]
        keys, index = _groups(((workloads[p], n.decode("utf-8", "replace")) for p, n in
                               zip(owner.tolist(), records["name"].tolist())), len(records))
        sums = {column: _sum_by(index, len(keys), records[column]) for column in (
            "acquisitions", "contentions", "reentries", "wait_buckets", "wait_sum_ns", "hold_buckets", "hold_sum_ns",
            "timeouts", "orphans", "held", "n_waiters")}
        held_since = records["held_since_unix"]
        seen_at = holds_seen_at(headers, now)[owner]
        hold_age = np.where((records["held"] != 0) & (held_since > 0), seen_at - held_since, 0.0).clip(0)
        oldest = records["oldest_wait_since_unix"]
        wait_age = np.where((records["n_waiters"] > 0) & (oldest > 0), now - oldest, 0.0).clip(0)
        max_hold = np.zeros(len(keys))
        np.maximum.at(max_hold, index, hold_age)
        max_wait = np.zeros(len(keys))
        np.maximum.at(max_wait, index, wait_age)
        for key, i in keys.items():
            live.locks[key] = LockTotals(
                acquisitions=int(sums["acquisitions"][i]), contentions=int(sums["contentions"][i]),
                reentries=int(sums["reentries"][i]), wait_buckets=sums["wait_buckets"][i],
                wait_sum_ns=int(sums["wait_sum_ns"][i]), hold_buckets=sums["hold_buckets"][i],
                hold_sum_ns=int(sums["hold_sum_ns"][i]), timeouts=sums["timeouts"][i], orphans=sums["orphans"][i],
            )
            live.gauges[key] = LockGauges(int(sums["held"][i]), float(max_hold[i]), int(sums["n_waiters"][i]), float(max_wait[i]))
        oldest_age = np.zeros(len(states))
        np.maximum.at(oldest_age, owner, np.maximum(hold_age, wait_age))
        for process, age in zip(processes, oldest_age.tolist()):
            process.oldest_age_seconds = age
        return live

    def _combine(self, live: Aggregate) -> Aggregate:
        """Live processes plus the folded totals of dead ones: a new object each scan."""
        combined = Aggregate(processes=live.processes, heartbeat_age=live.heartbeat_age, gauges=live.gauges,
                             locks_unrecorded=live.locks_unrecorded, workload_info=live.workload_info,
                             threads_in_deadlock=live.threads_in_deadlock)
        for key, lock_totals in list(self._totals.locks.items()) + list(live.locks.items()):
            into = combined.locks.get(key)
            if into is None:
                into = combined.locks[key] = LockTotals()
            into.add(lock_totals)
            combined.gauges.setdefault(key, LockGauges())
        for workload, fork_totals in list(self._totals.forks.items()) + list(live.forks.items()):
            into_fork = combined.forks.get(workload)
            if into_fork is None:
                into_fork = combined.forks[workload] = ForkTotals()
            into_fork.add(fork_totals)
        for operation_key, operation_totals in list(self._totals.operations.items()) + list(live.operations.items()):
            into_operation = combined.operations.get(operation_key)
            if into_operation is None:
                into_operation = combined.operations[operation_key] = OperationTotals()
            into_operation.add(operation_totals)
        # Every counter series exists from the start at 0, so that the first
        # kill or skipped file is an increase Prometheus can see.
        workloads = {workload for workload, _ in combined.locks} | set(combined.forks)
        with self._kills_lock:
            combined.kills = {(w, r): 0 for w in workloads for r in KILL_REASONS}
            combined.kills.update(self._totals.kills)
            # Its series exist from the start with --dry-run, as the kills' do.
            combined.would_kills = {(w, r): 0 for w in workloads for r in KILL_REASONS} if self.dry_run else {}
            combined.would_kills.update(self._totals.would_kills)
        combined.state_file_errors = dict.fromkeys(STATE_FILE_ERRORS, 0)
        combined.state_file_errors.update(self._errors)
        return combined

    def _fold(self, state: ProcessState, key: str) -> None:
        """Add a dead process's final counters to the totals, once (``key``:
        uid/name); its files are removed once the totals are saved."""
        if key not in self._totals.folded:
            workload = state.workload
            for record in state.records:
                lock_key = (workload, bytes(record["name"]).decode("utf-8", "replace"))
                self._totals.locks.setdefault(lock_key, LockTotals()).add(self._record_totals(record))
            self._totals.forks.setdefault(workload, ForkTotals()).add(self._fork_totals_of(state))
            self._add_operations(self._totals.operations, [state])
            self._totals.folded.add(key)
            self._unsaved = True

    def _remove_files(self, directory: OpenDir, state: ProcessState) -> None:
        for path in (state.path, state.stacks_path):
            try:
                os.unlink(os.path.basename(path), dir_fd=directory.fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._error(path, "unremovable", f"cannot remove: {exc.strerror}")

    def _remove_junk(self, directory: OpenDir, names: list[str], now: float) -> None:
        """Remove what no process will use, once unchanged for JUNK_GRACE_SECONDS:
        only regular files of the directory's owner, never through a link."""
        for name in names[:MAX_JUNK_PER_SCAN]:
            if name in (TOTALS_FILE, claim.LOCK_FILE) and (directory.dev, directory.ino) == (self._own_dir.dev, self._own_dir.ino):
                continue
            try:
                info = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode) or info.st_uid != directory.uid:
                    continue
                if now - info.st_mtime < JUNK_GRACE_SECONDS:
                    continue
                os.unlink(name, dir_fd=directory.fd)
            except OSError:
                continue
            _log.info("daemon.junk_removed", path=os.path.join(directory.path, name))

    def _forget_missing(self, present: set[str]) -> None:
        """Bounded memory: forget files that are gone (``present``: uid/name keys)."""
        if self._totals.folded - present:
            self._totals.folded &= present
            self._unsaved = True
        names = {key.rpartition("/")[2] for key in present}
        for path in [p for p in self._logged_errors if os.path.basename(p) not in names and p != self.state_dir]:
            del self._logged_errors[path]
        alive = {(int(n.split("-")[0]), int(n.split("-")[1][: -len(STATE_SUFFIX)])) for n in names if _well_named(n)}
        for key in [k for k in self._handled if k not in alive]:
            del self._handled[key]

    def _error(self, path: str, reason: str, message: str) -> None:
        if self._logged_errors.get(path) == reason:
            return
        self._logged_errors[path] = reason
        self._errors[reason] = self._errors.get(reason, 0) + 1
        _log.error("daemon.state_file_skipped", path=path, reason=reason, error=message)

    # -- totals that survive restarts ------------------------------------------

    def _load_totals(self) -> None:
        try:
            self._totals = totals.read(self._own_dir) or Totals()
        except (totals.TotalsError, OSError, ValueError, KeyError, TypeError) as exc:
            # Start from zero; Prometheus reads the drop as a counter reset.
            _log.error("daemon.totals_unreadable", path=self._totals_path, error=str(exc))
            self._totals = Totals()

    def _save_totals(self) -> bool:
        """Persist the totals; False (logged once until a save succeeds) when it fails."""
        with self._kills_lock:
            saving = replace(self._totals, kills=dict(self._totals.kills), would_kills=dict(self._totals.would_kills))
            self._kills_unsaved = False
        try:
            totals.write(self._own_dir, saving)
        except OSError as exc:
            self._unsaved = True
            self._save_failures += 1
            if not self._unsaved_logged:
                self._unsaved_logged = True
                _log.error("daemon.totals_unsaved", path=self._totals_path, error=str(exc),
                           action="dead processes' files kept; retried every scan")
            return False
        self._unsaved = self._unsaved_logged = False
        self._last_seen_saved_unix = time.time()
        return True

    # -- stuck workers ---------------------------------------------------------

    def _handle_stuck(self, state: ProcessState, finding: Finding) -> None:
        key = (state.pid, state.start_ticks)
        if key in self._handled:
            return
        self._kill_threads = [t for t in self._kill_threads if t.is_alive()]
        if len(self._kill_threads) >= MAX_CONCURRENT_KILLS:
            return
        self._handled[key] = time.time()
        thread = threading.Thread(target=self._kill, args=(state, finding), name=f"h5watch-kill-{state.pid}", daemon=True)
        self._kill_threads.append(thread)
        thread.start()

    def _kill(self, state: ProcessState, finding: Finding) -> None:
        reason = finding.reason

        def count() -> None:
            with self._kills_lock:
                kills = self._totals.would_kills if self.dry_run else self._totals.kills
                kills[state.workload, reason] = kills.get((state.workload, reason), 0) + 1
                self._kills_unsaved = True  # saved by the next scan

        reaper.kill_worker(state, reason, finding.culprit, kill_after=self.thresholds.kill_after, grace=self.grace, dry_run=self.dry_run,
                           count_kill=count, incidents=self.incidents)


@dataclass
class Scanned:
    """One process's state file, as this scan read it; for a live process,
    its oldest hold or wait (from :meth:`Daemon._aggregate`) and its verdict."""

    directory: OpenDir
    name: str
    state: ProcessState
    oldest_age_seconds: float = 0.0
    verdict: Verdict = OK
    # Its /proc/<pid>/stat state as the scan listed it (None: not read then).
    state_letter: str | None = None

    @property
    def key(self) -> str:
        """``uid/name``: how the totals remember a folded file."""
        return f"{self.directory.uid}/{self.name}"


@dataclass
class Sweep:
    """What one scan found: the directories it opened (closed at the end of
    the reading), the processes live (exiting ones included) and dead."""

    dirs: list[OpenDir]
    success: bool = True
    live: list[Scanned] = field(default_factory=list)
    dead: list[Scanned] = field(default_factory=list)
    # Per directory, the names to remove once unchanged for JUNK_GRACE_SECONDS.
    junk: list[tuple[OpenDir, list[str]]] = field(default_factory=list)
    # uid/name of every state file listed, read or not.
    present: set[str] = field(default_factory=set)
    # Each state file's good read (or the last one that stands for it), by path.
    read: dict[str, ProcessState] = field(default_factory=dict)

    def close(self) -> None:
        for directory in self.dirs:
            os.close(directory.fd)


def _groups(keys: Iterable[K], count: int) -> tuple[dict[K, int], np.ndarray]:
    """Each distinct key's group number (in order of first appearance), and
    the group of each of the ``count`` keys."""
    groups: dict[K, int] = {}
    index = np.fromiter((groups.setdefault(key, len(groups)) for key in keys), dtype=np.intp, count=count)
    return groups, index


def _sum_by(index: np.ndarray, n_groups: int, values: np.ndarray) -> np.ndarray:
    """``values`` (one row per entry, of any shape) summed per group, as uint64."""
    out = np.zeros((n_groups,) + values.shape[1:], dtype=np.uint64)
    np.add.at(out, index, values.astype(np.uint64))
    return out


def _sort_names(names: list[str], uid: int) -> tuple[list[str], list[str], list[str], dict[str, str]]:
    """Split a directory's names, by name alone (no open, no stat): state
    files whose process is alive now (same pid, start time and uid), other
    state files, and everything else that is no live process's stacks file;
    and each live one's state letter (``/proc/<pid>/stat``), read on the way."""
    live: list[str] = []
    dead: list[str] = []
    other: list[str] = []
    letters: dict[str, str] = {}
    for name in names:
        if name.endswith(STATE_SUFFIX) and _well_named(name):
            pid, _, ticks = name[: -len(STATE_SUFFIX)].partition("-")
            identity = process_identity(int(pid)) if int(pid) > 0 else None
            alive = identity is not None and identity[0] == int(ticks) and identity[1] == uid
            (live if alive else dead).append(name)
            if alive and identity is not None:
                letters[name] = identity[2]
        else:
            other.append(name)
    stems = {name[: -len(STATE_SUFFIX)] for name in live + dead}
    junk = [name for name in other if not (name.endswith(STACKS_SUFFIX) and name[: -len(STACKS_SUFFIX)] in stems)]
    return live, dead, junk, letters


def _well_named(name: str) -> bool:
    stem = name[: -len(STATE_SUFFIX)]
    pid, sep, ticks = stem.partition("-")
    return bool(sep) and pid.isdigit() and ticks.isdigit()


