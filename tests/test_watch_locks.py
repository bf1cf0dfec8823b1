"""The watch_locks option: a service's own locks watched with no code change.

Every scenario runs in a fresh interpreter, on real modules written to
tmp_path, with real threads, forks and the standard library's logging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import run_python

import h5watch
from h5watch.options import OptionError, resolve

pytestmark = pytest.mark.timeout(90)

CACHE_MODULE = """
import threading

_lock = threading.Lock()
_rlock = threading.RLock()


class Pool:
    lock = threading.Lock()


class Registry:
    def __init__(self):
        self.lock = threading.RLock()


registry = Registry()
semaphore = threading.Semaphore(2)


def take():
    _lock.acquire()
    _rlock.acquire()


def give():
    _rlock.release()
    _lock.release()


def use(times):
    for _ in range(times):
        with _lock:
            pass
"""

PRELUDE = """
import json, os, sys, threading
sys.path.insert(0, {modules!r})
import h5watch
"""


def scenario(tmp_path: Path, code: str, *, env: dict[str, str] | None = None, python: str | None = None,
             ) -> subprocess.CompletedProcess:
    """Write the cache module (and a package holding it), run ``code`` after PRELUDE."""
    modules = tmp_path / "modules"
    (modules / "myapp").mkdir(parents=True, exist_ok=True)
    (modules / "cache.py").write_text(CACHE_MODULE)
    (modules / "myapp" / "__init__.py").write_text("")
    (modules / "myapp" / "cache.py").write_text(CACHE_MODULE)
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    full_env = {"H5WATCH_STATE_DIR": str(state), **(env or {})}
    source = PRELUDE.format(modules=str(modules)) + textwrap.dedent(code)
    return run_python(source, env=full_env, python=python, timeout=60, cwd=tmp_path)


def skip_unless_built(implementation: str) -> None:
    from h5watch.process.lock import CompiledWatchedLock

    if implementation == "compiled" and CompiledWatchedLock is None:
        pytest.skip("no compiled core in this build")


def last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result
    return json.loads(result.stdout.strip().splitlines()[-1])


def events(result: subprocess.CompletedProcess, name: str) -> list[dict]:
    found = []
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event["event"] == name:
                found.append(event)
    return found


# -- replacing, counting, putting back ---------------------------------------------------------


def test_a_module_imported_before_install_has_its_locks_replaced_counted_and_put_back(tmp_path):
    result = scenario(tmp_path, """
        import cache
        originals = [cache._lock, cache._rlock, cache.Pool.lock, cache.registry.lock]
        paths = ["cache:_lock", "cache:_rlock", "cache:Pool.lock", "cache:registry.lock"]
        h5watch.install(watch_locks=paths)
        replaced = [type(cache._lock).__name__, type(cache._rlock).__name__, type(cache.Pool.lock).__name__,
                    type(cache.registry.lock).__name__]
        threads = [threading.Thread(target=cache.use, args=(250,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with cache._rlock:
            with cache._rlock:
                pass
        locks = h5watch.snapshot()["locks"]
        h5watch.uninstall()
        restored = [cache._lock, cache._rlock, cache.Pool.lock, cache.registry.lock]
        print(json.dumps({
            "replaced": replaced,
            "names": sorted(name for name in locks if name.startswith("cache:")),
            "acquisitions": locks["cache:_lock"]["stats"]["acquisitions"],
            "rlock_acquisitions": locks["cache:_rlock"]["stats"]["acquisitions"],
            "inner": [locks[path]["inner"] for path in paths],
            "restored": all(a is b for a, b in zip(originals, restored)),
        }))
    """)
    out = last_json(result)
    assert out["replaced"] == ["WatchedPlainLock", "WatchedRLock", "WatchedPlainLock", "WatchedRLock"]
    assert out["names"] == ["cache:Pool.lock", "cache:_lock", "cache:_rlock", "cache:registry.lock"]
    assert out["acquisitions"] == 1000
    assert out["rlock_acquisitions"] == 1  # the re-entry is no acquisition
    assert out["inner"] == ["lock", "rlock", "lock", "rlock"]
    assert out["restored"]


def test_a_module_imported_after_install_is_replaced_once_its_body_has_run(tmp_path):
    result = scenario(tmp_path, """
        import importlib, importlib.machinery
        h5watch.install(watch_locks=["myapp.cache:_lock", "myapp.cache:Pool.lock"])
        finders_before = [type(f).__name__ for f in sys.meta_path]
        import myapp.cache as cache
        replaced = type(cache._lock).__name__, type(cache.Pool.lock).__name__
        cache.use(10)
        counted = h5watch.snapshot()["locks"]["myapp.cache:_lock"]["stats"]["acquisitions"]
        loaders = (type(cache.__loader__).__name__, type(cache.__spec__.loader).__name__)
        finders_after = [type(f).__name__ for f in sys.meta_path]
        # A reload runs the body again: a new, unwatched lock, until install() watches it.
        importlib.reload(cache)
        after_reload = type(cache._lock).__name__
        h5watch.install(watch_locks=["myapp.cache:_lock", "myapp.cache:Pool.lock"])
        watched_again = type(cache._lock).__name__
        wrapper = cache._lock
        h5watch.install(watch_locks=["myapp.cache:_lock", "myapp.cache:Pool.lock"])
        print(json.dumps({
            "replaced": replaced, "counted": counted, "loaders": loaders,
            "finder_while_pending": "_PendingImportFinder" in finders_before,
            "finder_after": "_PendingImportFinder" in finders_after,
            "after_reload": after_reload, "watched_again": watched_again,
            "wrapped_once": cache._lock is wrapper and type(cache._lock._inner).__name__ == "lock",
        }))
    """)
    out = last_json(result)
    assert out["replaced"] == ["WatchedPlainLock", "WatchedPlainLock"]
    assert out["counted"] == 10
    assert out["loaders"] == ["SourceFileLoader", "SourceFileLoader"]  # the module keeps its real loader
    assert out["finder_while_pending"] and not out["finder_after"]
    assert out["after_reload"] == "lock" and out["watched_again"] == "WatchedPlainLock"
    assert out["wrapped_once"]
    assert events(result, "lock.watch_failed") == []  # install() again is no attempt to wrap a wrapper


def test_a_module_body_that_keeps_its_lock_over_a_reload_is_not_wrapped_twice(tmp_path):
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "keeper.py").write_text(
        "import threading\n_lock = globals().get('_lock') or threading.RLock()\n")
    result = scenario(tmp_path, """
        import importlib
        h5watch.install(watch_locks=["keeper:_lock"])
        import keeper
        first = keeper._lock
        importlib.reload(keeper)
        h5watch.install(watch_locks=["keeper:_lock"])
        h5watch.uninstall()
        print(json.dumps({"same": keeper._lock is not first, "inner": type(keeper._lock).__name__}))
    """)
    out = last_json(result)
    assert out == {"same": True, "inner": "RLock"}  # put back: the original RLock, never a wrapper of a wrapper


def test_the_state_file_names_a_watched_lock_by_its_path_with_its_counts(tmp_path):
    from h5watch.statefile import read_state_file

    result = scenario(tmp_path, """
        h5watch.install(watch_locks=["myapp.cache:_lock"], service="watcher")
        import myapp.cache
        myapp.cache.use(25)
        print(json.dumps({"pid": os.getpid()}))
    """)
    pid = last_json(result)["pid"]
    [path] = (tmp_path / "state" / str(os.geteuid())).glob(f"{pid}-*.h5w")
    records = {entry["lock"]: entry for entry in read_state_file(str(path)).locks()}
    assert records["myapp.cache:_lock"]["acquisitions"] == 25


@pytest.mark.parametrize("implementation", ["compiled", "python"])
def test_a_lock_taken_before_its_replacement_is_given_back_after_it(tmp_path, implementation):
    """As logging's _acquireLock() then _releaseLock() on a thread, with install() between them."""
    skip_unless_built(implementation)
    result = scenario(tmp_path, """
        import cache
        taken, replaced = threading.Event(), threading.Event()
        errors = []
        def holder():
            cache.take()  # the originals
            taken.set()
            replaced.wait(10)
            try:
                cache.give()  # through the wrappers
            except Exception as exc:
                errors.append(repr(exc))
        thread = threading.Thread(target=holder)
        thread.start()
        taken.wait(10)
        h5watch.install(watch_locks=["cache:_lock", "cache:_rlock"])
        replaced.set()
        thread.join(10)
        cache.use(3)
        with cache._rlock:
            pass
        locks = h5watch.snapshot()["locks"]
        print(json.dumps({
            "errors": errors, "free": [not cache._lock.locked(), cache._rlock._inner.acquire(False)],
            "counted": [locks["cache:_lock"]["stats"]["acquisitions"], locks["cache:_rlock"]["stats"]["acquisitions"]],
        }))
    """, env={"H5WATCH_IMPLEMENTATION": implementation})
    assert last_json(result) == {"errors": [], "free": [True, True], "counted": [3, 1]}


def test_uninstall_forgets_paths_whose_module_is_not_imported_yet(tmp_path):
    result = scenario(tmp_path, """
        h5watch.install(watch_locks=["cache:_lock"])
        h5watch.uninstall()
        import cache
        print(json.dumps({"inner": type(cache._lock).__name__,
                          "finder": any(type(f).__name__ == "_PendingImportFinder" for f in sys.meta_path)}))
    """)
    assert last_json(result) == {"inner": "lock", "finder": False}


def test_a_path_left_out_of_a_later_install_is_put_back(tmp_path):
    result = scenario(tmp_path, """
        import cache
        original = cache._lock
        h5watch.install(watch_locks=["cache:_lock", "cache:_rlock"])
        h5watch.install(watch_locks=["cache:_rlock"])
        print(json.dumps({"lock": cache._lock is original, "rlock": type(cache._rlock).__name__}))
    """)
    assert last_json(result) == {"lock": True, "rlock": "WatchedRLock"}


# -- the wrapper keeps what it wraps -------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["compiled", "python"])
def test_a_watched_lock_stays_non_reentrant_and_its_holder_waiting_again_is_visible(tmp_path, implementation):
    skip_unless_built(implementation)
    result = scenario(tmp_path, """
        import time
        import cache
        h5watch.install(watch_locks=["cache:_lock", "cache:_rlock"])
        lock = cache._lock
        assert lock.acquire()
        again_now = lock.acquire(False)
        start = time.monotonic()
        again_timed = lock.acquire(timeout=0.2)
        waited = time.monotonic() - start
        try:
            lock.acquire(False, 1)
            bad_args = None
        except ValueError as exc:
            bad_args = str(exc)
        lock.release()
        # The holder waits for itself, as on a threading.Lock; another thread
        # may release it (threading.Lock allows it), which lets the wait end.
        holder_got_it_again = []
        def holder():
            lock.acquire()
            holder_got_it_again.append(lock.acquire())
        thread = threading.Thread(target=holder, name="self-waiter")
        thread.start()
        while not h5watch.snapshot()["locks"]["cache:_lock"]["waiters"]:
            time.sleep(0.01)
        entry = h5watch.snapshot()["locks"]["cache:_lock"]
        lock.release()  # from the main thread
        thread.join(10)
        released_by_other = holder_got_it_again == [True]
        lock.release()  # from the main thread again: the holder's second hold
        with cache._rlock:
            rlock_reenters = cache._rlock.acquire(False)
            cache._rlock.release()
        print(json.dumps({
            "again_now": again_now, "again_timed": again_timed, "waited": waited, "bad_args": bad_args,
            "holder": entry["holder"]["thread_name"], "waiter": entry["waiters"][0]["thread_name"],
            "released_by_other": released_by_other, "free": not lock.locked(), "rlock_reenters": rlock_reenters,
        }))
    """, env={"H5WATCH_IMPLEMENTATION": implementation})
    out = last_json(result)
    assert out["again_now"] is False and out["again_timed"] is False and out["waited"] >= 0.19
    assert out["bad_args"] == "can't specify a timeout for a non-blocking call"
    assert out["holder"] == out["waiter"] == "self-waiter"
    assert out["released_by_other"] and out["free"]
    assert out["rlock_reenters"] is True


def test_a_self_deadlock_on_a_watched_lock_is_reported_not_silent(tmp_path):
    result = scenario(tmp_path, """
        import time
        import cache
        h5watch.install(watch_locks=["cache:_lock"], wait_timeout=0.2, tick_interval=0.05)
        def stuck():
            with cache._lock:
                with cache._lock:  # a threading.Lock: this waits forever, with or without h5watch
                    pass
        threading.Thread(target=stuck, name="stuck-worker", daemon=True).start()
        time.sleep(1.5)
        print(json.dumps({"main": "still running"}), flush=True)
        os._exit(0)
    """)
    assert last_json(result) == {"main": "still running"}
    timeouts = [event for event in events(result, "lock.wait_timeout") if event["lock"] == "cache:_lock"]
    assert timeouts, result.stderr
    assert timeouts[0]["holder"]["thread_name"] == "stuck-worker"
    assert [waiter["thread_name"] for waiter in timeouts[0]["waiters"]] == ["stuck-worker"]


@pytest.mark.parametrize("implementation", ["compiled", "python"])
def test_a_condition_on_a_watched_rlock_waits_and_notifies(tmp_path, implementation):
    skip_unless_built(implementation)
    result = scenario(tmp_path, """
        import cache
        h5watch.install(watch_locks=["cache:_rlock", "cache:_lock"])
        results = []
        for lock in (cache._rlock, cache._lock):
            condition = threading.Condition(lock)
            items = []
            def consumer():
                with condition:
                    if lock is cache._rlock:
                        lock.acquire()  # nested: the wait gives back every level
                    got = condition.wait_for(lambda: items, timeout=20)
                    if lock is cache._rlock:
                        lock.release()
                    results.append(got and items.pop())
            thread = threading.Thread(target=consumer)
            thread.start()
            while not condition._waiters:
                threading.Event().wait(0.01)
            with condition:  # the consumer's wait released the lock, nesting and all
                items.append(type(lock).__name__)
                condition.notify()
            thread.join(20)
        print(json.dumps({"results": results, "free": [not l.locked() for l in (cache._rlock, cache._lock)]}))
    """, env={"H5WATCH_IMPLEMENTATION": implementation})
    assert last_json(result) == {"results": ["WatchedRLock", "WatchedPlainLock"], "free": [True, True]}


LOGGING_FIRST = """
import logging, logging.config
h5watch.install(watch_locks=["logging:_lock"])
"""

# h5watch's at-fork hooks registered before logging's: they run in the other order.
LOGGING_LAST = """
assert "logging" not in sys.modules
h5watch.install(watch_locks=["logging:_lock"])
other = h5watch.WatchedLock("app.other")
import logging, logging.config
"""

LOGGING_WORKLOAD = """
assert type(logging._lock).__name__ == "WatchedRLock", type(logging._lock)
stream_handler = logging.StreamHandler(sys.stdout)
def worker(index):
    for round in range(50):
        log = logging.getLogger(f"svc.worker{{index}}.r{{round % 5}}")  # Manager.getLogger takes _lock
        handler = logging.NullHandler()
        log.addHandler(handler)  # Handler.__init__ registers for fork, under _lock
        log.setLevel(logging.INFO)  # clears the level caches, under _lock
        log.info("round %d", round)
        log.removeHandler(handler)
threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
for thread in threads:
    thread.start()
# A fork in the middle: logging's own at-fork hooks take and re-initialise _lock.
pid = os.fork()
if pid == 0:
    def child_thread():
        logging.getLogger("child.thread").warning("from a thread of the child")
    thread = threading.Thread(target=child_thread)
    thread.start()
    thread.join(10)
    os._exit(0 if not thread.is_alive() and not logging._lock.locked() else 3)
for thread in threads:
    thread.join()
_, status = os.waitpid(pid, 0)
logging.config.dictConfig({{"version": 1, "incremental": True}})
entry = h5watch.snapshot()["locks"]["logging:_lock"]
print(json.dumps({{"child": os.waitstatus_to_exitcode(status), "acquisitions": entry["stats"]["acquisitions"],
                  "free": not logging._lock.locked(), "holder": entry["holder"]}}))
"""


@pytest.mark.parametrize("implementation", ["compiled", "python"])
@pytest.mark.parametrize("logging_imported", ["before_install", "after_h5watch_started"])
def test_logging_module_lock_with_real_logging_from_threads_and_a_fork(tmp_path, implementation, logging_imported):
    skip_unless_built(implementation)
    start = LOGGING_FIRST if logging_imported == "before_install" else LOGGING_LAST
    result = scenario(tmp_path, start + LOGGING_WORKLOAD.format(), env={"H5WATCH_IMPLEMENTATION": implementation})
    out = last_json(result)
    assert out["child"] == 0, result.stderr
    assert out["acquisitions"] >= 6 * 50 * 3
    assert out["free"] and out["holder"] is None


# -- what cannot be watched ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["nocolon", "cache:", ":_lock", "cache:_lock.", "my..app:_lock", "cache:a b",
                                  "cache:" + "x" * 60])
def test_a_bad_path_is_an_option_error_naming_it(path):
    from h5watch.process import runtime

    options_before = runtime.current_options()
    with pytest.raises(OptionError) as error:
        h5watch.install(watch_locks=["cache:_lock", path])
    assert str(error.value).startswith("watch_locks:") and repr(path) in str(error.value)
    assert "\n" not in str(error.value)
    assert runtime.current_options() is options_before  # raised before changing anything
    with pytest.raises(OptionError):
        resolve({}, {"H5WATCH_WATCH_LOCKS": f"cache:_lock,{path}"})


def test_a_bad_path_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "h5watch", "run", "--watch-locks", "logging:_lock,nocolon", "--", sys.executable, "-c",
         "print('ran')"], check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "H5WATCH_STATE_DIR": str(tmp_path)})
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr == ("h5watch run: error: watch_locks: expected module:attribute such as myapp.cache:_lock,"
                             " got 'nocolon'\n")


def test_the_variable_is_a_comma_separated_list():
    options = resolve({}, {"H5WATCH_WATCH_LOCKS": " logging:_lock, myapp.cache:Pool.lock,,logging:_lock "})
    assert options.watch_locks == ("logging:_lock", "myapp.cache:Pool.lock")
    assert resolve({}, {"H5WATCH_WATCH_LOCKS": ""}).watch_locks == ()
    assert resolve({"watch_locks": ["a:b"]}, {"H5WATCH_WATCH_LOCKS": "c:d"}).watch_locks == ("a:b",)
    assert resolve({"watch_locks": "a:b, c:d"}, {}).watch_locks == ("a:b", "c:d")
    for bad in ([1], {"a:b": 1}, 3):
        with pytest.raises(OptionError, match=r"^watch_locks: expected module:attribute paths \(a list"):
            resolve({"watch_locks": bad}, {})


def test_what_names_no_lock_is_a_warning_and_the_service_runs(tmp_path):
    (tmp_path / "modules" / "spacey").mkdir(parents=True)  # a namespace package
    result = scenario(tmp_path, """
        import cache
        paths = ["cache:missing", "cache:Pool.missing", "cache:use", "cache:semaphore", "cache:registry",
                 "spacey:_lock", "cache:_lock"]
        h5watch.install(watch_locks=paths + ["myapp.cache:missing"])
        import spacey
        import myapp.cache
        cache.use(3)
        print(json.dumps({"lock": type(cache._lock).__name__, "ran": True}))
    """)
    out = last_json(result)
    assert out == {"lock": "WatchedPlainLock", "ran": True}
    failed = {event["lock"]: event["reason"] for event in events(result, "lock.watch_failed")}
    assert failed == {
        "cache:missing": "module 'cache' has no attribute 'missing'",
        "cache:Pool.missing": "module 'cache' has no attribute 'Pool.missing'",
        "cache:use": "it is not a lock (a function, with no acquire and release)",
        "cache:semaphore": "it is a Semaphore, not a threading.Lock or threading.RLock",
        "cache:registry": "it is not a lock (a Registry, with no acquire and release)",
        "spacey:_lock": "module 'spacey' is a namespace package: it has no attributes of its own to replace",
        # imported after install(): looked up once its body has run
        "myapp.cache:missing": "module 'myapp.cache' has no attribute 'missing'",
    }
    assert all(len(line) < 400 for line in result.stderr.splitlines())


def test_a_module_whose_loader_has_no_exec_module_imports_as_before_with_a_warning(tmp_path):
    result = scenario(tmp_path, """
        import threading, types, warnings
        from importlib.machinery import ModuleSpec
        warnings.simplefilter("ignore", ImportWarning)  # load_module() is deprecated
        class LegacyLoader:
            def load_module(self, fullname):
                module = sys.modules[fullname] = types.ModuleType(fullname)
                module._lock = threading.Lock()
                return module
        class LegacyFinder:
            def find_spec(self, fullname, path, target=None):
                return ModuleSpec(fullname, LegacyLoader()) if fullname == "legacy" else None
        sys.meta_path.append(LegacyFinder())
        h5watch.install(watch_locks=["legacy:_lock"])
        import legacy
        print(json.dumps({"lock": type(legacy._lock).__name__,
                          "finder": any(type(f).__name__ == "_PendingImportFinder" for f in sys.meta_path)}))
    """)
    assert last_json(result) == {"lock": "lock", "finder": False}
    (failed,) = events(result, "lock.watch_failed")
    assert failed["lock"] == "legacy:_lock"
    assert failed["reason"] == "the loader of module 'legacy' (LegacyLoader) has no exec_module to replace after"


def test_h5watch_run_watches_the_commands_locks(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    code = ("import logging, json, h5watch; logging.getLogger('x').warning('hello');"
            " entry = h5watch.snapshot()['locks']['logging:_lock'];"
            " print(json.dumps([type(logging._lock).__name__, entry['stats']['acquisitions'] > 0]))")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-m", "h5watch", "run", "--watch-locks", "logging:_lock", "--", sys.executable, "-c", code],
        check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**env, "H5WATCH_STATE_DIR": str(state)})
    assert result.returncode == 0, result
    assert json.loads(result.stdout.splitlines()[-1]) == ["WatchedRLock", True]


# -- CPython's own lock and condition tests, on the wrappers ------------------------------------------

try:
    from test import lock_tests
except ImportError:  # an interpreter without the standard library's test package
    lock_tests = None


def _wrapped(lock=None):
    from h5watch.process.watch_locks import WatchedPlainLock, WatchedRLock

    lock = threading.RLock() if lock is None else lock
    if isinstance(lock, type(threading.Lock())):
        return WatchedPlainLock("test.watch_locks:plain", lock)
    return WatchedRLock("test.watch_locks:rlock", lock)


def test_cpythons_lock_tests_are_available():
    if lock_tests is None:
        pytest.skip("this interpreter has no test.lock_tests (the standard library's test package)")


if lock_tests is not None:

    class TestAWatchedLockIsAThreadingLock(lock_tests.LockTests):
        """Non-reentrant, released by any thread, re-initialised at fork."""

        locktype = staticmethod(lambda: _wrapped(threading.Lock()))

    class TestAWatchedRLockIsAThreadingRLock(lock_tests.RLockTests):
        locktype = staticmethod(lambda: _wrapped(threading.RLock()))

    class TestAConditionOnAWatchedLockIsAThreadingCondition(lock_tests.ConditionTests):
        condtype = staticmethod(lambda lock=None: threading.Condition(_wrapped(lock)))
