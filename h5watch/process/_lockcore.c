/* The compiled hot path of h5watch.WatchedLock, and of h5py's with_phil.
 *
 * LockCore is the base type of the compiled WatchedLock: it keeps the holder
 * fields and the hot counters in C, and does the uncontended acquire, the
 * re-entry and the release without calling back into Python. Everything
 * else (waiting, timeouts, orphans, fork support, snapshots) stays in
 * h5watch/lock.py: when the inner lock is not free, acquire calls the
 * Python method self._acquire_slow(me, timeout).
 *
 * An inner h5py FastRLock whose layout was validated (enable_fastrlock) is
 * taken and released through its fields, exactly as FastRLock's own inline
 * fast path does it under the GIL (lock_lock/unlock_lock in h5py/_locks.pxi):
 * free with no pending requests -> owner = me, count = 1; release -> count-1,
 * and at zero owner = -1 and the real lock released if a waiter had taken it.
 * Any other state goes to the Python slow path, which uses FastRLock's methods.
 *
 * Everything here runs with the GIL held; the GIL is what makes these field
 * updates atomic for other threads, as for FastRLock itself.
 *
 * PhilCall is what h5watch's with_phil returns: a callable that acquires the
 * lock naming the operation, calls the function, releases, and binds as a
 * method like a Python function does. It reads what functools.update_wrapper
 * would copy (name, doc, ...) through to the function when asked, instead of
 * a copy per wrapper: h5py decorates about 400 functions as it imports.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <pythread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#define N_BOUNDS 24
#define N_BUCKETS (N_BOUNDS + 1)

/* One lock's counters: 64 words, the layout of h5watch/stats.py (C_*),
 * checked there at import through COUNTER_LAYOUT. */
#define C_ACQUISITIONS 0
#define C_CONTENTIONS 1
#define C_REENTRIES 2
#define C_WAIT_BUCKETS 3
#define C_WAIT_SUM (C_WAIT_BUCKETS + N_BUCKETS)
#define C_WAIT_MAX (C_WAIT_SUM + 1)
#define C_HOLD_BUCKETS (C_WAIT_MAX + 1)
#define C_HOLD_SUM (C_HOLD_BUCKETS + N_BUCKETS)
#define C_HOLD_MAX (C_HOLD_SUM + 1)
#define C_TIMEOUTS (C_HOLD_MAX + 1)
#define C_ORPHANS (C_TIMEOUTS + 3)
#define N_COUNTERS (C_ORPHANS + 4)

/* Contention by operation: one row of N_OP_WORDS words per operation, the
 * layout of h5watch/schema.py (O_*), checked there through OPERATION_LAYOUT.
 * Row 0 counts the operations that found no row of their own. */
#define OP_SLOTS 65
#define O_HOLDS 0
#define O_HOLD_SUM 1
#define O_HOLD_MAX 2
#define O_CAUSED_WAIT_SUM 3
#define O_WAITS 4
#define O_WAIT_SUM 5
#define N_OP_WORDS 6
/* Row 1 is the unnamed operation's (None: the lock's own name). In the
 * state file (h5watch/schema.py OPERATION_NAME_LAYOUT), the rows' words lie
 * next to the lock's counters, and each row from row 2 has a name entry in
 * the file's names: a sequence word (2 once written, never rewritten), its
 * kind, and the text (UTF-8, cut at OP_NAME_TEXT bytes). */
#define OP_UNNAMED_ROW 1
#define OP_WORDS_BYTES (OP_SLOTS * N_OP_WORDS * 8)
#define OP_NAME_ENTRY 144
#define OP_NAME_TEXT 128
#define OP_NAMED 1
#define OP_NAMES_BYTES (OP_SLOTS * OP_NAME_ENTRY)

static const int64_t BOUNDS_NS[N_BOUNDS] = {
    1000LL, 2500LL, 5000LL,
    10000LL, 25000LL, 50000LL,
    100000LL, 250000LL, 500000LL,
    1000000LL, 2500000LL, 5000000LL,
    10000000LL, 25000000LL, 50000000LL,
    100000000LL, 250000000LL, 500000000LL,
    1000000000LL, 2500000000LL, 5000000000LL,
    10000000000LL, 30000000000LL, 60000000000LL,
};

/* h5py's FastRLock instance layout (h5py/_locks.pxi), checked before use. */
typedef struct {
    PyObject_HEAD
    PyThread_type_lock real_lock;
    unsigned long owner;
    int count;
    int pending_requests;
    int is_locked;
} FastRLockLayout;

static PyTypeObject *fastrlock_type = NULL;  /* set once validated */
static long current_pid = 0;
static double timeout_max = 0;  /* threading.TIMEOUT_MAX, set by lock.py */
/* The flight recorder (lock.py's connect): a hold at least this long is
 * told to hold_recorder(lock, held_ns, operation) once the lock is free. */
static int64_t hold_record_after_ns = INT64_MAX;
static PyObject *hold_recorder = NULL;

enum { OWNER_NONE = 0, OWNER_LIVE = 1, OWNER_DEAD = 2 };
/* What `_owner` reads as for OWNER_DEAD: no thread ident is -2 (idents are
 * addresses). Exported as DEAD_OWNER, checked against h5watch/schema.py. */
#define DEAD_OWNER_IDENT -2

typedef struct {
    PyObject_HEAD
    unsigned long owner;
    int owner_state;
    long count;
    long owner_pid;
    int64_t since_ns;
    PyObject *operation;
    /* The current hold was not counted as an acquisition here (a fork's own
     * acquisition, or a hold this process inherited from its parent): its
     * release records no hold either. */
    int hold_uncounted;
    PyObject *inner;
    PyObject *inner_acquire;
    PyObject *inner_release;
    int inner_direct; /* inner is a validated FastRLock */
    int gated;        /* a fork's before-hook is taking the locks */
    int inner_plain;  /* inner is a _thread.lock: any thread may release it */
    /* A forking thread waiting for this lock to be handed to it on release
     * (see LockCore_fork_wait_handoff); written with the GIL held only. */
    int handoff_waiting;
    unsigned long handoff_to;
    PyThread_type_lock handoff_signal;
    /* The counters: own_counters until the state file is made, then 64
     * words of its shared mapping (held through `counters_view`), so that
     * what the process counted is in the file whenever it dies. Every write
     * to them is made here, with the GIL held: a move between two places is
     * atomic for every thread. */
    uint64_t *counters;
    Py_buffer counters_view;
    int has_counters_view;
    unsigned int counters_generation; /* fork_generation when the view was attached */
    uint64_t own_counters[N_COUNTERS];
    /* Lock-order checking (h5watch/process/lock_order.py): this lock's class
     * (0: not checked), and whether the current hold is on its holder's
     * held-lock stack (written by the holder only); and the last class
     * found to have an edge to this one (edges are never forgotten: a
     * one-entry cache that spares the lookup of the usual nesting). */
    long order_class;
    int order_tracked;
    long order_seen_from;
    /* Threads waiting in the slow path: {thread ident: monotonic ns the wait
     * began} (lock.py's _waiters). Changed only by _wait_begin, _wait_end
     * and _clear_waiters (under the GIL), which keep with it how many wait,
     * the sum of their start times, and how many waits ended. Each commit
     * notes the three, so that its release charges the waits of its hold in
     * constant time while no wait ended during it (see waited_during_hold). */
    PyObject *waiters;
    Py_ssize_t wait_n;
    int64_t wait_sum;
    uint64_t wait_ends;
    Py_ssize_t commit_wait_n;
    int64_t commit_wait_sum;
    uint64_t commit_wait_ends;
    /* Contention by operation (h5watch/process/stats.py OperationTable):
     * the rows, its {operation: row} dict and its list of operations by
     * row; NULL until _set_operations. The rows are own_ops (a buffer the
     * table owns) until the state file is made, then the lock's rows in
     * the file (held through `table_view`, with its names through
     * `names_view`; moved with the counters and dropped with them in a
     * forked child), where a new row's name is written before anything is
     * counted in it. The holder's row, and the
     * blocked wait that ended in its acquisition, are written by the thread
     * holding the inner lock only. */
    uint64_t *ops;
    uint64_t *own_ops;
    Py_buffer ops_view;
    unsigned char *op_name_area;  /* NULL while the rows are own_ops */
    Py_buffer table_view;
    Py_buffer names_view;
    int has_table_view;
    PyObject *op_index;
    PyObject *op_names;
    PyObject *last_op;         /* a one-entry cache of the last lookup */
    Py_ssize_t last_op_row;
    Py_ssize_t op_row;         /* the current hold's row */
    int64_t pending_wait_ns;   /* -1: none */
} LockCore;

/* Bumped in every child of a fork, by a libc handler that does nothing
 * else (no Python code, no CPython call: safe in any child, subprocess's
 * pre-exec child included). A lock that counts in its parent's shared
 * mapping notices it at its next counter write and counts privately from
 * there on, from zero, as a child's statistics start: the child of a fork
 * that skipped Python's hooks never writes into its parent's state file. */
static volatile sig_atomic_t fork_generation = 0;

static void count_fork_in_child(void) { fork_generation++; }

static void release_counters_view(LockCore *self);
static void release_table_view(LockCore *self);
static void restart_counters(LockCore *self);

/* The counters start again from zero, private (a forked child); so do the
 * operation rows (the file's table is the parent's: never cleared here). A
 * hold open now was counted where it began, in the parent: its release is
 * not counted here. */
static void restart_counters(LockCore *self) {
    release_counters_view(self);
    release_table_view(self);
    memset(self->own_counters, 0, sizeof(self->own_counters));
    if (self->own_ops != NULL) memset(self->own_ops, 0, sizeof(uint64_t) * OP_SLOTS * N_OP_WORDS);
    self->counters = self->own_counters;
    if (self->owner_state != OWNER_NONE) self->hold_uncounted = 1;
}

static inline uint64_t *counters_of(LockCore *self) {
    if (self->has_counters_view && self->counters_generation != (unsigned int)fork_generation) {
        restart_counters(self);
    }
    return self->counters;
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int bucket_of(int64_t ns) {
    /* bisect_left over BOUNDS_NS */
    int lo = 0, hi = N_BOUNDS;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (BOUNDS_NS[mid] < ns) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* 1: taken, 0: not free, -1: error */
static inline int inner_try_acquire(LockCore *self) {
    if (self->inner_direct) {
        FastRLockLayout *fl = (FastRLockLayout *)self->inner;
        if (fl->count != 0) return 0;  /* held by another thread (ours would be a re-entry) */
        if (fl->pending_requests == 0) {
            fl->owner = PyThread_get_thread_ident();
            fl->count = 1;
            return 1;
        }
        /* Free, but waiters are queued on the real lock: take the real lock
         * if it is free right now, as FastRLock's acquire(False) does. */
        fl->pending_requests += 1;
        int locked = PyThread_acquire_lock(fl->real_lock, NOWAIT_LOCK);
        fl->pending_requests -= 1;
        if (!locked) return 0;
        fl->is_locked = 1;
        fl->owner = PyThread_get_thread_ident();
        fl->count = 1;
        return 1;
    }
    PyObject *result = PyObject_CallOneArg(self->inner_acquire, Py_False);
    if (result == NULL) return -1;
    int taken = PyObject_IsTrue(result);
    Py_DECREF(result);
    return taken;
}

static inline int inner_release(LockCore *self) {
    if (self->inner_direct) {
        FastRLockLayout *fl = (FastRLockLayout *)self->inner;
        fl->count -= 1;
        if (fl->count == 0) {
            fl->owner = (unsigned long)-1;
            if (fl->is_locked) {
                PyThread_release_lock(fl->real_lock);
                fl->is_locked = 0;
            }
        }
        return 0;
    }
    PyObject *result = PyObject_CallNoArgs(self->inner_release);
    if (result == NULL) return -1;
    Py_DECREF(result);
    return 0;
}

/* -- a child of a fork that skipped Python's hooks, on_orphan=kill ---------
 *
 * A fork made by C code copies the interpreter mid-flight: if other threads
 * were waiting for the GIL, the child's first hand-over of the GIL (any
 * blocking call, or the eval loop honouring a pending drop request) waits
 * forever on a condition variable whose waiters do not exist. Such a child
 * would hang there before h5watch's Python slow path could say anything. So
 * when the slow path is reached with a changed pid and a holder that is not
 * this thread (it did not survive the fork), the default policy is carried
 * out here, with no bytecode run and no lock taken: the evidence is written
 * with write(2) and the process ends with _exit(). Other policies, and
 * forks that ran Python's hooks, go through lock.py as usual. */

static int orphan_kill_exit_code = 0;  /* 0: let lock.py decide */
static PyObject *log_workload = NULL;  /* a str: the workload its events name */

typedef struct { char *p; size_t left; } Out;

static void out_raw(Out *o, const char *text) {
    size_t n = strlen(text);
    if (n >= o->left) n = o->left ? o->left - 1 : 0;
    memcpy(o->p, text, n);
    o->p += n;
    o->left -= n;
    *o->p = 0;
}

static void out_json_string(Out *o, const char *text) {
    out_raw(o, "\"");
    for (const unsigned char *c = (const unsigned char *)text; *c && o->left > 8; c++) {
        char esc[8];
        if (*c == '"' || *c == '\\') { esc[0] = '\\'; esc[1] = (char)*c; esc[2] = 0; }
        else if (*c < 0x20) snprintf(esc, sizeof esc, "\\u%04x", *c);
        else { esc[0] = (char)*c; esc[1] = 0; }
        out_raw(o, esc);
    }
    out_raw(o, "\"");
}

static void out_object_string(Out *o, PyObject *value) {
    const char *text = (value != NULL && PyUnicode_Check(value)) ? PyUnicode_AsUTF8(value) : NULL;
    if (text == NULL) { PyErr_Clear(); out_raw(o, "null"); return; }
    out_json_string(o, text);
}

/* The dead holder's name and native id from threading's table, which a fork
 * that skipped the hooks leaves as the parent had it (attribute reads of
 * plain instance attributes: no bytecode runs). */
static void thread_fields(unsigned long ident, PyObject **name, PyObject **native_id) {
    *name = NULL;
    *native_id = NULL;
    PyObject *module_name = PyUnicode_FromString("threading");
    PyObject *threading = module_name ? PyImport_GetModule(module_name) : NULL;
    Py_XDECREF(module_name);
    if (threading == NULL) { PyErr_Clear(); return; }
    PyObject *active = PyObject_GetAttrString(threading, "_active");
    PyObject *key = PyLong_FromUnsignedLong(ident);
    PyObject *thread = (active && key && PyDict_Check(active)) ? PyDict_GetItem(active, key) : NULL;
    if (thread != NULL) {
        *name = PyObject_GetAttrString(thread, "_name");
        *native_id = PyObject_GetAttrString(thread, "_native_id");
    }
    PyErr_Clear();
    Py_XDECREF(key);
    Py_XDECREF(active);
    Py_DECREF(threading);
}

/* This thread's Python stack as faulthandler prints it (C code, no
 * bytecode), read back through a pipe; "" if faulthandler is not loaded. */
static void current_stack(char *stack, size_t size) {
    stack[0] = 0;
    int fds[2];
    PyObject *name = PyUnicode_FromString("faulthandler");
    PyObject *faulthandler = name ? PyImport_GetModule(name) : NULL;
    Py_XDECREF(name);
    if (faulthandler == NULL || pipe(fds) != 0) { PyErr_Clear(); Py_XDECREF(faulthandler); return; }
    PyObject *done = PyObject_CallMethod(faulthandler, "dump_traceback", "iO", fds[1], Py_False);
    Py_XDECREF(done);
    PyErr_Clear();
    Py_DECREF(faulthandler);
    close(fds[1]);
    size_t used = 0;
    ssize_t n;
    while (used + 1 < size && (n = read(fds[0], stack + used, size - used - 1)) > 0) used += (size_t)n;
    stack[used] = 0;
    close(fds[0]);
}

static void kill_for_orphan(LockCore *self, unsigned long holder, long holder_pid, int64_t since_ns) {
    PyGC_Disable();  /* no finaliser may run Python code from here on */
    char buffer[12288], stamp[64], number[64], stack[4096];
    current_stack(stack, sizeof stack);
    struct timespec now;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(stamp + strlen(stamp), sizeof stamp - strlen(stamp), ".%06ldZ", now.tv_nsec / 1000);
    PyObject *lock_name = PyObject_GetAttrString((PyObject *)self, "name");
    PyErr_Clear();
    PyObject *thread_name, *native_id;
    thread_fields(holder, &thread_name, &native_id);
    const char *events[2] = {"lock.orphaned", "process.killed"};
    for (int i = 0; i < 2; i++) {
        Out o = {buffer, sizeof buffer};
        out_raw(&o, "{\"event\": ");
        out_json_string(&o, events[i]);
        out_raw(&o, ", \"level\": \"critical\", \"timestamp\": ");
        out_json_string(&o, stamp);
        out_raw(&o, ", \"workload\": ");
        out_object_string(&o, log_workload);
        snprintf(number, sizeof number, ", \"pid\": %ld, \"logger\": \"h5watch.fork\"", (long)getpid());
        out_raw(&o, number);
        if (i == 0) {
            out_raw(&o, ", \"action\": \"killed\", \"fork_hooks_ran\": false, \"seen_by\": \"compiled core\"");
            out_raw(&o, ", \"child_stack\": ");
            out_json_string(&o, stack);
        }
        else out_raw(&o, ", \"reason\": \"lock.orphaned\"");
        snprintf(number, sizeof number, ", \"exit_code\": %d, \"lock\": ", orphan_kill_exit_code);
        out_raw(&o, number);
        out_object_string(&o, lock_name);
        snprintf(number, sizeof number, ", \"holder\": {\"thread_ident\": %lu, \"pid\": %ld", holder, holder_pid);
        out_raw(&o, number);
        out_raw(&o, ", \"thread_name\": ");
        out_object_string(&o, thread_name);
        if (native_id != NULL && PyLong_Check(native_id)) {
            snprintf(number, sizeof number, ", \"native_id\": %ld", PyLong_AsLong(native_id));
            out_raw(&o, number);
        } else out_raw(&o, ", \"native_id\": null");
        out_raw(&o, ", \"operation\": ");
        out_object_string(&o, self->owner_state == OWNER_NONE ? NULL : self->operation);
        if (since_ns) {
            snprintf(number, sizeof number, ", \"hold_age_seconds\": %.6f", (double)(now_ns() - since_ns) / 1e9);
            out_raw(&o, number);
        }
        out_raw(&o, "}}\n");
        const char *p = buffer;
        size_t left = strlen(buffer);
        while (left > 0) {
            ssize_t n = write(2, p, left);
            if (n <= 0) break;
            p += n;
            left -= (size_t)n;
        }
    }
    _exit(orphan_kill_exit_code);
}

/* The slow path was reached in a child of a fork that skipped the hooks, and
 * the lock is held by a thread that did not survive it: kill (does not return). */
static void kill_if_orphaned_in_unhooked_child(LockCore *self, unsigned long me) {
    if (!orphan_kill_exit_code || (long)getpid() == current_pid) return;
    if (self->owner_state == OWNER_LIVE && self->owner != me) {
        kill_for_orphan(self, self->owner, self->owner_pid, self->since_ns);
    }
    if (self->owner_state == OWNER_NONE && self->inner_direct) {
        FastRLockLayout *fl = (FastRLockLayout *)self->inner;
        if (fl->count != 0 && fl->owner != me) kill_for_orphan(self, fl->owner, 0, 0);
    }
}

/* -- lock-order checking (lock_order.py is the Python side, and check()
 * there the mirror of check_order) ------------------------------------------
 *
 * Each thread's outermost holds, in a thread-local stack: a thread sees only
 * its own, a forked child keeps the forking thread's (the locks it still
 * holds) and a thread's stack ends with it. Entries name a lock by address
 * and are never dereferenced: a lock dropped while held leaves a harmless
 * entry. Holds beyond MAX_HELD are not tracked (not checked). */

#define MAX_HELD 32
typedef struct { uintptr_t lock; long order_class; } HeldEntry;
static _Thread_local int held_depth = 0;
static _Thread_local HeldEntry held_locks[MAX_HELD];
static int order_checking = 0;
static PyObject *order_edges = NULL;          /* lock_order.edges: a dict keyed by edge */
static PyObject *order_first_sighting = NULL; /* lock_order.first_sighting(held_class, lock) */

/* About to take self while holding held_locks: every edge not seen yet goes
 * to first_sighting. 0, or -1 with an exception (only what first_sighting
 * lets through: it catches every Exception). */
static int check_order(LockCore *self) {
    for (int i = 0; i < held_depth && i < MAX_HELD; i++) {
        long held_class = held_locks[i].order_class;
        if (held_class == self->order_seen_from || held_class == self->order_class || held_class == 0) continue;
        PyObject *key = PyLong_FromUnsignedLongLong(((unsigned long long)held_class << 32) | (unsigned long long)self->order_class);
        if (key == NULL) return -1;
        int seen = PyDict_Contains(order_edges, key);
        Py_DECREF(key);
        if (seen < 0) return -1;
        if (seen) {
            self->order_seen_from = held_class;
            continue;
        }
        /* first_sighting runs bytecode: in the child of a fork that skipped
         * the hooks, about to wait for an orphan, the kill comes first (see
         * kill_if_orphaned_in_unhooked_child). */
        kill_if_orphaned_in_unhooked_child(self, PyThread_get_thread_ident());
        PyObject *held_obj = PyLong_FromLong(held_class);
        if (held_obj == NULL) return -1;
        PyObject *result = PyObject_CallFunctionObjArgs(order_first_sighting, held_obj, (PyObject *)self, NULL);
        Py_DECREF(held_obj);
        if (result == NULL) return -1;
        Py_DECREF(result);
    }
    return 0;
}

static inline void order_push(LockCore *self) {
    if (order_checking && self->order_class && held_depth < MAX_HELD) {
        held_locks[held_depth].lock = (uintptr_t)self;
        held_locks[held_depth].order_class = self->order_class;
        held_depth++;
        self->order_tracked = 1;
    } else {
        self->order_tracked = 0;
    }
}

static inline void order_pop(LockCore *self) {
    self->order_tracked = 0;
    for (int i = held_depth - 1; i >= 0; i--) {
        if (held_locks[i].lock == (uintptr_t)self) {
            memmove(&held_locks[i], &held_locks[i + 1], (size_t)(held_depth - 1 - i) * sizeof(HeldEntry));
            held_depth--;
            return;
        }
    }
}

/* Write row `row`'s name entry into `area` (a table's names in the state
 * file), unless it was written already: once written it never changes, so
 * a reader never finds a row it has seen named being rewritten. Returns 0,
 * or -1 with an exception set (no memory). */
static int write_op_name(unsigned char *area, Py_ssize_t row, PyObject *operation) {
    unsigned char *entry = area + row * OP_NAME_ENTRY;
    if (!PyUnicode_Check(operation) || __atomic_load_n((uint64_t *)entry, __ATOMIC_ACQUIRE) != 0) return 0;
    Py_ssize_t size = 0;
    PyObject *encoded = NULL;
    uint32_t kind = OP_NAMED;
    const char *text = PyUnicode_AsUTF8AndSize(operation, &size);
    if (text == NULL) {  /* lone surrogates: as str.encode("utf-8", "replace") */
        PyErr_Clear();
        encoded = PyUnicode_AsEncodedString(operation, "utf-8", "replace");
        if (encoded == NULL) return -1;
        text = PyBytes_AS_STRING(encoded);
        size = PyBytes_GET_SIZE(encoded);
    }
    if (size > OP_NAME_TEXT) size = OP_NAME_TEXT;
    /* A seqlock write (recorder.store_guarded): odd, the body, even. */
    __atomic_store_n((uint64_t *)entry, 1, __ATOMIC_RELEASE);
    memcpy(entry + 8, &kind, sizeof(kind));
    memset(entry + 16, 0, OP_NAME_TEXT);
    memcpy(entry + 16, text, (size_t)size);
    __atomic_store_n((uint64_t *)entry, 2, __ATOMIC_RELEASE);
    /* Whole before the row's first count, on any CPU: the reader takes a
     * row's name only after it has seen the row count. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    Py_XDECREF(encoded);
    return 0;
}

/* The operation's row in the table (OperationTable.row in stats.py): None
 * has row 1 (the table's dict says so); a new operation (a str) takes the
 * next free row, or row 0 once every row is taken; anything else counts in
 * row 0. In the state file, the new row's name is written before it counts. */
static Py_ssize_t op_row_slow(LockCore *self, PyObject *operation) {
    Py_ssize_t row = 0;
    PyObject *found = NULL;
    if (operation == Py_None || PyUnicode_Check(operation)) {
        found = PyDict_GetItemWithError(self->op_index, operation);  /* borrowed */
    }
    if (found != NULL) {
        row = PyLong_AsSsize_t(found);
        if (row < 0 || row >= OP_SLOTS) row = 0;
    } else if (!PyErr_Occurred() && PyUnicode_Check(operation)) {
        Py_ssize_t n = PyList_GET_SIZE(self->op_names);
        if (n < OP_SLOTS) {
            PyObject *number = PyLong_FromSsize_t(n);
            if (number != NULL && PyDict_SetItem(self->op_index, operation, number) == 0) {
                if (PyList_Append(self->op_names, operation) == 0) row = n;
                else PyDict_DelItem(self->op_index, operation);
            }
            Py_XDECREF(number);
            /* No memory to encode the name: the file reads the row's counts as other's. */
            if (row == n && self->op_name_area != NULL) write_op_name(self->op_name_area, n, operation);
        }
    }
    if (PyErr_Occurred()) PyErr_Clear();  /* unhashable, or no memory: counted as other */
    Py_INCREF(operation);
    Py_XSETREF(self->last_op, operation);
    self->last_op_row = row;
    return row;
}

static inline Py_ssize_t op_row(LockCore *self, PyObject *operation) {
    if (operation == self->last_op) return self->last_op_row;
    return op_row_slow(self, operation);
}

/* The one step that makes a thread the holder, once it has the inner lock:
 * every path goes through it (acquire, acquire_for, with, with_phil, and
 * the before-fork acquisition with counted=0). An uncounted hold records
 * no hold time on release. */
static inline void core_commit(LockCore *self, unsigned long me, PyObject *operation, int counted) {
    self->since_ns = now_ns();
    self->owner_pid = current_pid;
    Py_XINCREF(operation);
    Py_XSETREF(self->operation, operation);
    self->count = 1;
    self->owner = me;
    self->owner_state = OWNER_LIVE;
    self->hold_uncounted = !counted;
    self->commit_wait_n = self->wait_n;
    self->commit_wait_sum = self->wait_sum;
    self->commit_wait_ends = self->wait_ends;
    if (counted) {
        counters_of(self)[C_ACQUISITIONS] += 1;
        if (self->ops != NULL) {
            Py_ssize_t row = op_row(self, operation ? operation : Py_None);
            self->op_row = row;
            if (self->pending_wait_ns >= 0) {
                uint64_t *o = self->ops + row * N_OP_WORDS;
                o[O_WAITS] += 1;
                o[O_WAIT_SUM] += (uint64_t)self->pending_wait_ns;
                self->pending_wait_ns = -1;
            }
        }
    }
}

/* What the threads waiting now spent waiting during the hold that ends at
 * now_ns: charged to the operation that held the lock (Go's mutex profile).
 * While no wait ended since the commit, the commit_wait_n threads waiting
 * then (each began at or before since_ns) waited all of the hold, and the
 * others began during it: constant time. Else (a wait timed out, was
 * interrupted, or the waiters were cleared) a pass over the waiters. */
static uint64_t waited_during_hold(LockCore *self, int64_t now_ns_) {
    if (self->wait_ends == self->commit_wait_ends) {
        int64_t joined = (int64_t)(self->wait_n - self->commit_wait_n);
        int64_t joined_since = self->wait_sum - self->commit_wait_sum;
        int64_t total = (int64_t)self->commit_wait_n * (now_ns_ - self->since_ns) + joined * now_ns_ - joined_since;
        return total > 0 ? (uint64_t)total : 0;
    }
    uint64_t waited = 0;
    Py_ssize_t pos = 0;
    PyObject *ident, *since;
    while (PyDict_Next(self->waiters, &pos, &ident, &since)) {
        long long began = PyLong_AsLongLong(since);
        if (began == -1 && PyErr_Occurred()) { PyErr_Clear(); continue; }
        int64_t from = began > self->since_ns ? began : self->since_ns;
        if (now_ns_ > from) waited += (uint64_t)(now_ns_ - from);
    }
    return waited;
}

/* 1: acquired, 0: not acquired (non-blocking or timed out), -1: error */
static int core_acquire(LockCore *self, int blocking, double timeout, PyObject *operation) {
    unsigned long me = PyThread_get_thread_ident();
    if (self->owner_state == OWNER_LIVE && self->owner == me) {
        self->count += 1;
        counters_of(self)[C_REENTRIES] += 1;
        return 1;
    }
    /* Checked before waiting, so that the inversion that is about to
     * deadlock is reported too; a non-blocking attempt cannot deadlock. */
    if (held_depth && order_checking && blocking && self->order_class) {
        if (check_order(self) < 0) return -1;
    }
    /* A fork gate is up (see ForkGate in lock.py): a blocking acquire waits
     * at the gate in the slow path instead of barging in. */
    int taken = 0;
    if (!(self->gated && blocking)) {
        taken = inner_try_acquire(self);
        if (taken < 0) return -1;
    }
    if (!taken) {
        if (!blocking) return 0;
        kill_if_orphaned_in_unhooked_child(self, me);
        PyObject *result = PyObject_CallMethod((PyObject *)self, "_acquire_slow", "kd", me, timeout);
        if (result == NULL) return -1;
        taken = PyObject_IsTrue(result);
        Py_DECREF(result);
        if (taken <= 0) return taken;
    }
    core_commit(self, me, operation, 1);
    order_push(self);
    return 1;
}

/* 1: the inner lock, still held, now belongs to the forking thread waiting
 * for it; 0: no hand-off possible, release as usual. The releasing thread
 * must hold the inner lock exactly once (FastRLock count 1). */
static int hand_off_to_fork(LockCore *self, unsigned long me) {
    if (!self->handoff_waiting) return 0;
    if (self->inner_direct) {
        FastRLockLayout *fl = (FastRLockLayout *)self->inner;
        if (fl->count != 1 || fl->owner != me) return 0;
        fl->owner = self->handoff_to;
    } else if (!self->inner_plain) {
        return 0;
    }
    self->handoff_waiting = 0;
    PyThread_release_lock(self->handoff_signal);
    return 1;
}

/* The rest of core_release for a hold at least hold_record_after_ns long:
 * the release, then the flight recorder's callback, which must not fail the
 * release (its error is dropped) and sees no error pending. */
static int release_long_hold(LockCore *self, unsigned long me, int64_t held) {
    PyObject *operation = Py_NewRef(self->operation ? self->operation : Py_None);
    self->hold_uncounted = 0;
    self->count = 0;
    self->owner_state = OWNER_NONE;
    int r = hand_off_to_fork(self, me) ? 0 : inner_release(self);
    PyObject *callback = hold_recorder;
    if (r == 0 && callback != NULL) {
        Py_INCREF(callback);
        PyObject *result = PyObject_CallFunction(callback, "OLO", (PyObject *)self, (long long)held, operation);
        if (result == NULL) PyErr_Clear();
        Py_XDECREF(result);
        Py_DECREF(callback);
    }
    Py_DECREF(operation);
    return r;
}

/* The one release step: every path (release, with, with_phil, the fork's
 * own release) goes through it. */
static int core_release(LockCore *self) {
    unsigned long me = PyThread_get_thread_ident();
    if (!(self->owner_state == OWNER_LIVE && self->owner == me)) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return -1;
    }
    if (--self->count > 0) return 0;
    if (self->order_tracked) order_pop(self);
    uint64_t *c = counters_of(self);  /* first: may mark this hold uncounted */
    int64_t held = 0;
    if (!self->hold_uncounted) {
        int64_t now = now_ns();
        held = now - self->since_ns;
        if (held < 0) held = 0;
        c[C_HOLD_BUCKETS + bucket_of(held)] += 1;
        c[C_HOLD_SUM] += (uint64_t)held;
        if ((uint64_t)held > c[C_HOLD_MAX]) c[C_HOLD_MAX] = (uint64_t)held;
        if (self->ops != NULL) {
            uint64_t *o = self->ops + self->op_row * N_OP_WORDS;
            o[O_HOLDS] += 1;
            o[O_HOLD_SUM] += (uint64_t)held;
            if ((uint64_t)held > o[O_HOLD_MAX]) o[O_HOLD_MAX] = (uint64_t)held;
            if (self->wait_n > 0) o[O_CAUSED_WAIT_SUM] += waited_during_hold(self, now);
        }
        if (held >= hold_record_after_ns) return release_long_hold(self, me, held);
    }
    self->hold_uncounted = 0;
    self->count = 0;
    self->owner_state = OWNER_NONE;
    if (hand_off_to_fork(self, me)) return 0;
    return inner_release(self);
}

/* -- LockCore methods ------------------------------------------------------ */

static int LockCore_init(LockCore *self, PyObject *args, PyObject *kwds) {
    /* Python subclasses call LockCore.__init__(self, inner) explicitly. */
    return 0;
}

static PyObject *LockCore_set_inner(LockCore *self, PyObject *inner) {
    PyObject *acquire = PyObject_GetAttrString(inner, "acquire");
    if (acquire == NULL) return NULL;
    PyObject *release = PyObject_GetAttrString(inner, "release");
    if (release == NULL) { Py_DECREF(acquire); return NULL; }
    Py_INCREF(inner);
    Py_XSETREF(self->inner, inner);
    Py_XSETREF(self->inner_acquire, acquire);
    Py_XSETREF(self->inner_release, release);
    self->inner_direct = fastrlock_type != NULL && Py_TYPE(inner) == fastrlock_type;
    self->inner_plain = strcmp(Py_TYPE(inner)->tp_name, "_thread.lock") == 0;
    Py_RETURN_NONE;
}

/* The forking thread's wait for a busy lock while the fork gate is up: the
 * next release through the wrapper hands the inner lock straight to it
 * (hand_off_to_fork), ahead of the threads already queued on it, so the
 * fork waits only for the current holder. Every millisecond it also checks
 * whether the lock came free another way (h5py's C code releases phil
 * without the wrapper). True once the inner lock is this thread's. */
static PyObject *LockCore_fork_wait_handoff(LockCore *self, PyObject *arg) {
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    if (self->handoff_waiting) Py_RETURN_FALSE;  /* another fork is waiting */
    PyThread_type_lock signal = PyThread_allocate_lock();
    if (signal == NULL) return PyErr_NoMemory();
    PyThread_acquire_lock(signal, NOWAIT_LOCK);
    self->handoff_signal = signal;
    self->handoff_to = PyThread_get_thread_ident();
    self->handoff_waiting = 1;
    int64_t deadline = now_ns() + (int64_t)(timeout * 1e9);
    int taken = 0;
    for (;;) {
        int64_t left = deadline - now_ns();
        PY_TIMEOUT_T slice = left <= 0 ? 0 : (left > 1000000 ? 1000 : (PY_TIMEOUT_T)(left / 1000));
        PyLockStatus status;
        Py_BEGIN_ALLOW_THREADS
        status = PyThread_acquire_lock_timed(signal, slice, 0);
        Py_END_ALLOW_THREADS
        if (status == PY_LOCK_ACQUIRED || !self->handoff_waiting) { taken = 1; break; }
        int free_now = inner_try_acquire(self);
        if (free_now < 0) { self->handoff_waiting = 0; PyThread_free_lock(signal); return NULL; }
        if (free_now) { taken = 1; break; }
        if (now_ns() >= deadline) break;
    }
    /* Handed off, taken directly, or timed out: either way no release may
     * hand off to this wait any more (all of this under the GIL). */
    self->handoff_waiting = 0;
    self->handoff_signal = NULL;
    PyThread_free_lock(signal);
    return PyBool_FromLong(taken);
}

/* The waiters: every change goes through these three (see LockCore). */
static PyObject *LockCore_wait_begin(LockCore *self, PyObject *ident) {
    int64_t start = now_ns();
    PyObject *earlier = PyDict_GetItemWithError(self->waiters, ident);  /* borrowed */
    long long earlier_start = 0;
    if (earlier != NULL) {
        earlier_start = PyLong_AsLongLong(earlier);
        if (earlier_start == -1 && PyErr_Occurred()) return NULL;
    } else if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *value = PyLong_FromLongLong(start);
    if (value == NULL) return NULL;
    if (PyDict_SetItem(self->waiters, ident, value) < 0) {
        Py_DECREF(value);
        return NULL;
    }
    if (earlier != NULL) {
        /* A nested wait of the same thread (a signal handler, a collection
         * inside its wait) replaces its entry: the earlier wait ended. */
        self->wait_sum -= earlier_start;
        self->wait_ends += 1;
    } else {
        self->wait_n += 1;
    }
    self->wait_sum += start;
    return value;
}

static PyObject *LockCore_wait_end(LockCore *self, PyObject *ident) {
    PyObject *entry = PyDict_GetItemWithError(self->waiters, ident);  /* borrowed */
    if (entry == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;  /* ended already (a nested wait, or cleared) */
    }
    long long start = PyLong_AsLongLong(entry);
    if (start == -1 && PyErr_Occurred()) return NULL;
    if (PyDict_DelItem(self->waiters, ident) < 0) return NULL;
    self->wait_n -= 1;
    self->wait_sum -= start;
    self->wait_ends += 1;
    Py_RETURN_NONE;
}

static PyObject *LockCore_clear_waiters(LockCore *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *fresh = PyDict_New();
    if (fresh == NULL) return NULL;
    Py_SETREF(self->waiters, fresh);
    self->wait_n = 0;
    self->wait_sum = 0;
    self->wait_ends += 1;
    Py_RETURN_NONE;
}

static PyObject *LockCore_acquire(LockCore *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"blocking", "timeout", NULL};
    PyObject *blocking_obj = NULL, *timeout_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OO:acquire", kwlist, &blocking_obj, &timeout_obj)) return NULL;
    /* Plainly valid: blocking a bool, timeout a float or int that is -1, or
     * (blocking) in [0, TIMEOUT_MAX]. Anything else is checked as
     * PythonWatchedLock.acquire checks it. */
    int blocking = 1, plain = 1;
    double timeout = -1;
    if (blocking_obj == Py_False) blocking = 0;
    else if (blocking_obj != NULL && blocking_obj != Py_True) plain = 0;
    if (plain && timeout_obj != NULL) {
        if (PyFloat_CheckExact(timeout_obj)) timeout = PyFloat_AS_DOUBLE(timeout_obj);
        else if (PyLong_CheckExact(timeout_obj)) {
            timeout = PyLong_AsDouble(timeout_obj);
            if (timeout == -1.0 && PyErr_Occurred()) { PyErr_Clear(); plain = 0; }
        }
        else plain = 0;
        if (timeout != -1 && (!blocking || !(timeout >= 0 && timeout <= timeout_max))) plain = 0;
    }
    if (!plain) {
        /* Raise what threading.RLock raises for these arguments (its messages
         * change between Python versions): lock.py's _check_acquire_args asks
         * a real one, and returns them as (bool, float) if it accepts them. */
        PyObject *timeout_arg = timeout_obj != NULL ? Py_NewRef(timeout_obj) : PyLong_FromLong(-1);
        if (timeout_arg == NULL) return NULL;
        PyObject *result = PyObject_CallMethod((PyObject *)self, "_check_acquire_args", "OO",
                                               blocking_obj != NULL ? blocking_obj : Py_True, timeout_arg);
        Py_DECREF(timeout_arg);
        if (result == NULL) return NULL;
        int parsed = PyArg_ParseTuple(result, "pd:_check_acquire_args", &blocking, &timeout);
        Py_DECREF(result);
        if (!parsed) return NULL;
    }
    int r = core_acquire(self, blocking, timeout, Py_None);
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

static PyObject *LockCore_acquire_for(LockCore *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *operation = nargs > 0 ? args[0] : Py_None;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "acquire_for() takes at most one argument");
        return NULL;
    }
    int r = core_acquire(self, 1, -1, operation);
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

/* The before-fork acquisition, once the inner lock is this thread's: the
 * holder is recorded, nothing is counted (see core_commit). */
static PyObject *LockCore_take_for_fork(LockCore *self, PyObject *operation) {
    core_commit(self, PyThread_get_thread_ident(), operation, 0);
    self->order_tracked = 0;  /* the fork's own holds take no part in lock order */
    Py_RETURN_NONE;
}

static PyObject *LockCore_enter(LockCore *self, PyObject *Py_UNUSED(ignored)) {
    int r = core_acquire(self, 1, -1, Py_None);
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

static PyObject *LockCore_release(LockCore *self, PyObject *Py_UNUSED(ignored)) {
    if (core_release(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *LockCore_exit(LockCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (core_release(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *LockCore_is_owned(LockCore *self, PyObject *Py_UNUSED(ignored)) {
    return PyBool_FromLong(self->owner_state == OWNER_LIVE && self->owner == PyThread_get_thread_ident());
}

/* threading.RLock._recursion_count: this thread's depth, 0 if it is not the holder. */
static PyObject *LockCore_recursion_count(LockCore *self, PyObject *Py_UNUSED(ignored)) {
    int mine = self->owner_state == OWNER_LIVE && self->owner == PyThread_get_thread_ident();
    return PyLong_FromLong(mine ? self->count : 0);
}

static PyObject *LockCore_counters(LockCore *self, PyObject *unused);
static PyObject *LockCore_record_wait(LockCore *self, PyObject *arg);
static PyObject *LockCore_bump(LockCore *self, PyObject *arg);
static PyObject *LockCore_move_counters(LockCore *self, PyObject *const *args, Py_ssize_t nargs);
static PyObject *LockCore_operation_words(LockCore *self, PyObject *unused);
static PyObject *LockCore_set_operations(LockCore *self, PyObject *const *args, Py_ssize_t nargs);

static PyMethodDef LockCore_methods[] = {
    {"_set_inner", (PyCFunction)LockCore_set_inner, METH_O, "Set the inner lock."},
    {"_counters", (PyCFunction)LockCore_counters, METH_NOARGS, "The 64 counter words, as a tuple."},
    {"_record_wait", (PyCFunction)LockCore_record_wait, METH_O, "Count a wait of this many nanoseconds that ended in an acquisition."},
    {"_bump", (PyCFunction)LockCore_bump, METH_O, "Add one to the timeout or orphan counter at this index."},
    {"_set_operations", (PyCFunction)(void (*)(void))LockCore_set_operations, METH_FASTCALL,
     "Count holds and waits per operation in these rows, with the table's {operation: row} dict and its list."},
    {"_move_counters", (PyCFunction)(void (*)(void))LockCore_move_counters, METH_FASTCALL,
     "_move_counters(counters, words=None, names=None): copy the counters (and the operation rows, with their names) "
     "into these writable buffers and count there from now on; None: private and zeroed."},
    {"_operation_words", (PyCFunction)LockCore_operation_words, METH_NOARGS,
     "The operation rows' words as they are now, as bytes."},
    {"acquire", (PyCFunction)(void (*)(void))LockCore_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool, as threading.RLock"},
    {"acquire_for", (PyCFunction)(void (*)(void))LockCore_acquire_for, METH_FASTCALL,
     "Blocking acquire that names the operation the holder performs."},
    {"_take_for_fork", (PyCFunction)LockCore_take_for_fork, METH_O,
     "Record this thread, which has the inner lock, as the holder without counting an acquisition."},
    {"__enter__", (PyCFunction)LockCore_enter, METH_NOARGS, NULL},
    {"release", (PyCFunction)LockCore_release, METH_NOARGS, "Release; RuntimeError if not the owner."},
    {"__exit__", (PyCFunction)(void (*)(void))LockCore_exit, METH_FASTCALL, NULL},
    {"_is_owned", (PyCFunction)LockCore_is_owned, METH_NOARGS, NULL},
    {"_recursion_count", (PyCFunction)LockCore_recursion_count, METH_NOARGS,
     "This thread's recursion depth, 0 if it does not hold the lock (as threading.RLock)."},
    {"_fork_wait_handoff", (PyCFunction)LockCore_fork_wait_handoff, METH_O,
     "Wait up to timeout seconds for the inner lock to be handed over on its next release."},
    {"_wait_begin", (PyCFunction)LockCore_wait_begin, METH_O,
     "This thread (its ident) starts to wait: added to _waiters; returns the monotonic ns the wait began."},
    {"_wait_end", (PyCFunction)LockCore_wait_end, METH_O, "This thread's wait ended: removed from _waiters."},
    {"_clear_waiters", (PyCFunction)LockCore_clear_waiters, METH_NOARGS, "Forget every waiter (their threads are gone)."},
    {NULL},
};

/* -- attributes the Python side reads and (for fork support) writes -------- */

static PyObject *get_owner(LockCore *self, void *c) {
    if (self->owner_state == OWNER_NONE) Py_RETURN_NONE;
    if (self->owner_state == OWNER_DEAD) return PyLong_FromLong(DEAD_OWNER_IDENT);
    return PyLong_FromUnsignedLong(self->owner);
}

static int set_owner(LockCore *self, PyObject *value, void *c) {
    if (value == NULL || value == Py_None) { self->owner_state = OWNER_NONE; return 0; }
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        unsigned long u = PyLong_AsUnsignedLong(value);
        if (u == (unsigned long)-1 && PyErr_Occurred()) return -1;
        self->owner = u;
        self->owner_state = OWNER_LIVE;
        return 0;
    }
    if (v == DEAD_OWNER_IDENT) { self->owner_state = OWNER_DEAD; return 0; }
    self->owner = (unsigned long)v;
    self->owner_state = OWNER_LIVE;
    return 0;
}

#define INT_GETSET(field, conv_to, conv_from, ctype)                                       \
    static PyObject *get_##field(LockCore *self, void *c) { return conv_to(self->field); } \
    static int set_##field(LockCore *self, PyObject *value, void *c) {                    \
        if (value == NULL) { PyErr_SetString(PyExc_AttributeError, "cannot delete"); return -1; } \
        ctype v = (ctype)conv_from(value);                                                 \
        if (PyErr_Occurred()) return -1;                                                   \
        self->field = v;                                                                   \
        return 0;                                                                          \
    }

INT_GETSET(count, PyLong_FromLong, PyLong_AsLong, long)
INT_GETSET(owner_pid, PyLong_FromLong, PyLong_AsLong, long)
INT_GETSET(since_ns, PyLong_FromLongLong, PyLong_AsLongLong, int64_t)
INT_GETSET(order_class, PyLong_FromLong, PyLong_AsLong, long)
INT_GETSET(order_seen_from, PyLong_FromLong, PyLong_AsLong, long)

static PyObject *get_operation(LockCore *self, void *c) {
    return Py_NewRef(self->operation ? self->operation : Py_None);
}

static int set_operation(LockCore *self, PyObject *value, void *c) {
    Py_XINCREF(value);
    Py_XSETREF(self->operation, value);
    return 0;
}

/* -- counters ---------------------------------------------------------- */

static PyObject *LockCore_counters(LockCore *self, PyObject *unused) {
    PyObject *out = PyTuple_New(N_COUNTERS);
    if (out == NULL) return NULL;
    for (int i = 0; i < N_COUNTERS; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(counters_of(self)[i]);
        if (v == NULL) { Py_DECREF(out); return NULL; }
        PyTuple_SET_ITEM(out, i, v);
    }
    return out;
}

static PyObject *LockCore_record_wait(LockCore *self, PyObject *arg) {
    long long ns = PyLong_AsLongLong(arg);
    if (ns == -1 && PyErr_Occurred()) return NULL;
    if (ns < 0) ns = 0;
    uint64_t *c = counters_of(self);
    self->pending_wait_ns = ns;  /* the acquisition that follows charges it to its operation */
    c[C_CONTENTIONS] += 1;
    c[C_WAIT_BUCKETS + bucket_of(ns)] += 1;
    c[C_WAIT_SUM] += (uint64_t)ns;
    if ((uint64_t)ns > c[C_WAIT_MAX]) c[C_WAIT_MAX] = (uint64_t)ns;
    Py_RETURN_NONE;
}

static PyObject *LockCore_bump(LockCore *self, PyObject *arg) {
    long index = PyLong_AsLong(arg);
    if (index == -1 && PyErr_Occurred()) return NULL;
    if (index < C_TIMEOUTS || index >= N_COUNTERS) {
        PyErr_SetString(PyExc_IndexError, "counter index out of range");
        return NULL;
    }
    counters_of(self)[index] += 1;
    Py_RETURN_NONE;
}

static void release_counters_view(LockCore *self) {
    if (self->has_counters_view) {
        self->has_counters_view = 0;
        PyBuffer_Release(&self->counters_view);
    }
}

static void release_table_view(LockCore *self) {
    if (self->has_table_view) {
        self->has_table_view = 0;
        self->op_name_area = NULL;
        self->ops = self->own_ops;
        PyBuffer_Release(&self->table_view);
        PyBuffer_Release(&self->names_view);
    }
}

/* Take a writable, 8-byte-aligned buffer of at least `size` bytes. */
static int get_place(PyObject *target, Py_buffer *view, Py_ssize_t size, const char *what) {
    if (PyObject_GetBuffer(target, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->len < size || ((uintptr_t)view->buf % 8) != 0) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "%s: expected a writable buffer of %zd aligned bytes", what, size);
        return -1;
    }
    return 0;
}

/* Copy the counters into `counters` (a writable buffer of at least 64
 * aligned words, such as a memoryview of the state file's mapping) and
 * count there from now on; None: back to private, zeroed counters (a forked
 * child). With `words` and `names` (the lock's rows and their names in the
 * mapping, zeroed or this lock's own), the operation rows move too: every
 * row's name first, then the words. */
static PyObject *LockCore_move_counters(LockCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_move_counters(counters, words=None, names=None)");
        return NULL;
    }
    PyObject *target = args[0];
    if (target == Py_None) {
        restart_counters(self);
        Py_RETURN_NONE;
    }
    Py_buffer view, words_view, names_view;
    if (get_place(target, &view, (Py_ssize_t)sizeof(self->own_counters), "counters") < 0) return NULL;
    int moves_rows = nargs == 3 && args[1] != Py_None && self->own_ops != NULL;
    if (moves_rows) {
        if (get_place(args[1], &words_view, OP_WORDS_BYTES, "words") < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
        if (get_place(args[2], &names_view, OP_NAMES_BYTES, "names") < 0) {
            PyBuffer_Release(&words_view);
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    uint64_t *current = counters_of(self);  /* first: a forked child's restart */
    if (view.buf != (void *)current) memcpy(view.buf, current, sizeof(self->own_counters));
    self->counters = (uint64_t *)view.buf;
    release_counters_view(self);
    self->counters_view = view;
    self->has_counters_view = 1;
    self->counters_generation = (unsigned int)fork_generation;
    if (moves_rows) {
        if (words_view.buf != (void *)self->ops) {
            unsigned char *area = (unsigned char *)names_view.buf;
            Py_ssize_t n = PyList_GET_SIZE(self->op_names);
            for (Py_ssize_t row = OP_UNNAMED_ROW + 1; row < n && row < OP_SLOTS; row++) {
                if (write_op_name(area, row, PyList_GET_ITEM(self->op_names, row)) < 0) PyErr_Clear();
            }
            memcpy(words_view.buf, self->ops, OP_WORDS_BYTES);
            release_table_view(self);
            self->ops = (uint64_t *)words_view.buf;
            self->op_name_area = area;
            self->table_view = words_view;
            self->names_view = names_view;
            self->has_table_view = 1;
        } else {
            PyBuffer_Release(&names_view);
            PyBuffer_Release(&words_view);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *LockCore_operation_words(LockCore *self, PyObject *unused) {
    counters_of(self);  /* a forked child's rows restart first */
    if (self->ops == NULL) return PyBytes_FromStringAndSize(NULL, 0);
    return PyBytes_FromStringAndSize((const char *)self->ops, sizeof(uint64_t) * OP_SLOTS * N_OP_WORDS);
}

static void release_ops(LockCore *self) {
    release_table_view(self);
    if (self->own_ops != NULL) {
        self->ops = self->own_ops = NULL;
        PyBuffer_Release(&self->ops_view);
    }
}

/* Count holds and waits per operation in `words` (a writable buffer of
 * OP_SLOTS x N_OP_WORDS aligned words), with the table's dict and list. */
static PyObject *LockCore_set_operations(LockCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyDict_CheckExact(args[1]) || !PyList_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "_set_operations(words, index: dict, names: list)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (view.len < (Py_ssize_t)(sizeof(uint64_t) * OP_SLOTS * N_OP_WORDS) || ((uintptr_t)view.buf % 8) != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "operations: expected a writable buffer of OP_SLOTS x N_OP_WORDS aligned words");
        return NULL;
    }
    release_ops(self);
    self->ops_view = view;
    self->ops = self->own_ops = (uint64_t *)view.buf;
    Py_INCREF(args[1]);
    Py_XSETREF(self->op_index, args[1]);
    Py_INCREF(args[2]);
    Py_XSETREF(self->op_names, args[2]);
    Py_CLEAR(self->last_op);
    self->op_row = 0;
    Py_RETURN_NONE;
}

static PyObject *get_inner_acquire(LockCore *self, void *c) { return Py_NewRef(self->inner_acquire ? self->inner_acquire : Py_None); }
static PyObject *get_inner_release(LockCore *self, void *c) { return Py_NewRef(self->inner_release ? self->inner_release : Py_None); }
static PyObject *get_inner_direct(LockCore *self, void *c) { return PyBool_FromLong(self->inner_direct); }
static PyObject *get_gated(LockCore *self, void *c) { return PyBool_FromLong(self->gated); }
static PyObject *get_hold_uncounted(LockCore *self, void *c) { return PyBool_FromLong(self->hold_uncounted); }
static PyObject *get_order_tracked(LockCore *self, void *c) { return PyBool_FromLong(self->order_tracked); }

static int set_gated(LockCore *self, PyObject *value, void *c) {
    int flag = value == NULL ? 0 : PyObject_IsTrue(value);
    if (flag < 0) return -1;
    self->gated = flag;
    return 0;
}

static PyGetSetDef LockCore_getset[] = {
    {"_owner", (getter)get_owner, (setter)set_owner, NULL, NULL},
    {"_count", (getter)get_count, (setter)set_count, NULL, NULL},
    {"_owner_pid", (getter)get_owner_pid, (setter)set_owner_pid, NULL, NULL},
    {"_since_ns", (getter)get_since_ns, (setter)set_since_ns, NULL, NULL},
    {"_operation", (getter)get_operation, (setter)set_operation, NULL, NULL},
    {"_inner_acquire", (getter)get_inner_acquire, NULL, NULL, NULL},
    {"_inner_release", (getter)get_inner_release, NULL, NULL, NULL},
    {"_inner_direct", (getter)get_inner_direct, NULL, NULL, NULL},
    {"_gated", (getter)get_gated, (setter)set_gated, NULL, NULL},
    {"_hold_uncounted", (getter)get_hold_uncounted, NULL, NULL, NULL},
    {"_order_class", (getter)get_order_class, (setter)set_order_class, NULL, NULL},
    {"_order_tracked", (getter)get_order_tracked, NULL, NULL, NULL},
    {"_order_seen_from", (getter)get_order_seen_from, (setter)set_order_seen_from, NULL, NULL},
    {NULL},
};

static PyMemberDef LockCore_members[] = {
    {"_waiters", T_OBJECT_EX, offsetof(LockCore, waiters), READONLY, NULL},
    {NULL},
};

static PyObject *LockCore_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    LockCore *self = (LockCore *)PyType_GenericNew(type, args, kwds);
    if (self != NULL) {
        self->counters = self->own_counters;
        self->pending_wait_ns = -1;
        self->waiters = PyDict_New();
        if (self->waiters == NULL) {
            Py_DECREF(self);
            return NULL;
        }
    }
    return (PyObject *)self;
}

static int LockCore_traverse(LockCore *self, visitproc visit, void *arg) {
    /* counters_view.obj (a view of the state file's mapping) refers to no
     * object that could refer back to this lock: not visited. */
    Py_VISIT(self->operation);
    Py_VISIT(self->waiters);
    Py_VISIT(self->op_index);
    Py_VISIT(self->op_names);
    Py_VISIT(self->last_op);
    Py_VISIT(self->inner);
    Py_VISIT(self->inner_acquire);
    Py_VISIT(self->inner_release);
    return 0;
}

static int LockCore_clear(LockCore *self) {
    if (self->has_counters_view) {
        memcpy(self->own_counters, self->counters, sizeof(self->own_counters));
        self->counters = self->own_counters;
        release_counters_view(self);
    }
    if (self->has_table_view) {
        memcpy(self->own_ops, self->ops, sizeof(uint64_t) * OP_SLOTS * N_OP_WORDS);
        release_table_view(self);
    }
    Py_CLEAR(self->operation);
    Py_CLEAR(self->waiters);
    release_ops(self);
    Py_CLEAR(self->op_index);
    Py_CLEAR(self->op_names);
    Py_CLEAR(self->last_op);
    Py_CLEAR(self->inner);
    Py_CLEAR(self->inner_acquire);
    Py_CLEAR(self->inner_release);
    return 0;
}

static void LockCore_dealloc(LockCore *self) {
    PyObject_GC_UnTrack(self);
    LockCore_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject LockCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "h5watch.process._lockcore.LockCore",
    .tp_basicsize = sizeof(LockCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Compiled hot path of WatchedLock (see h5watch/lock.py).",
    .tp_new = LockCore_new,
    .tp_init = (initproc)LockCore_init,
    .tp_dealloc = (destructor)LockCore_dealloc,
    .tp_traverse = (traverseproc)LockCore_traverse,
    .tp_clear = (inquiry)LockCore_clear,
    .tp_methods = LockCore_methods,
    .tp_getset = LockCore_getset,
    .tp_members = LockCore_members,
};

/* -- PhilCall: with_phil's wrapper ----------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *func;
    LockCore *lock;
    PyObject *operation;
    PyObject *dict;
    vectorcallfunc vectorcall;
} PhilCall;

/* Release after func raised, leaving exactly the exception h5py's own
 * wrapper (`with _phil: return func(...)`) would: func's exception,
 * unchanged; or, if the release fails (the lock is no longer this thread's:
 * something released it behind the wrapper's back), the release error with
 * func's exception as its __context__. Before 3.12 the exception is
 * normalised first and restored with the instance's own type: a raw
 * (OSError, args) pair must reach the caller as FileNotFoundError, as it
 * does through h5py's wrapper, or 3.10's `except FileNotFoundError` misses. */
static void philcall_release_after_error(PhilCall *self) {
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
    if (core_release(self->lock) < 0) {
        PyObject *release_exc = PyErr_GetRaisedException();
        PyException_SetContext(release_exc, exc);
        PyErr_SetRaisedException(release_exc);
        return;
    }
    PyErr_SetRaisedException(exc);
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL) PyException_SetTraceback(value, tb);
    Py_SETREF(type, Py_NewRef((PyObject *)Py_TYPE(value)));
    if (core_release(self->lock) < 0) {
        PyObject *rtype, *rvalue, *rtb;
        PyErr_Fetch(&rtype, &rvalue, &rtb);
        PyErr_NormalizeException(&rtype, &rvalue, &rtb);
        if (rtb != NULL) PyException_SetTraceback(rvalue, rtb);
        PyException_SetContext(rvalue, value);
        Py_DECREF(type);
        Py_XDECREF(tb);
        PyErr_Restore(rtype, rvalue, rtb);
        return;
    }
    PyErr_Restore(type, value, tb);
#endif
}

static PyObject *PhilCall_vectorcall(PhilCall *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    if (core_acquire(self->lock, 1, -1, self->operation) < 0) return NULL;
    PyObject *result = PyObject_Vectorcall(self->func, args, nargsf, kwnames);
    if (result == NULL) {
        philcall_release_after_error(self);
        return NULL;
    }
    if (core_release(self->lock) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

static PyObject *PhilCall_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *func, *lock, *operation;
    if (!PyArg_ParseTuple(args, "OO!O:PhilCall", &func, &LockCoreType, &lock, &operation)) {
        /* Subclasses of LockCore are accepted by O!; anything else is an error. */
        return NULL;
    }
    if (!PyCallable_Check(func)) {
        PyErr_SetString(PyExc_TypeError, "PhilCall: func must be callable");
        return NULL;
    }
    PhilCall *self = (PhilCall *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->func = Py_NewRef(func);
    self->lock = (LockCore *)Py_NewRef(lock);
    self->operation = Py_NewRef(operation);
    self->vectorcall = (vectorcallfunc)PhilCall_vectorcall;
    return (PyObject *)self;
}

/* What functools.update_wrapper copies (WRAPPER_ASSIGNMENTS, 3.10 to 3.13),
 * and __wrapped__: read from the wrapper's own __dict__ if set there, else
 * from the function, as if update_wrapper had copied them. */
static const char *const wrapper_assignments[] = {
    "__module__", "__name__", "__qualname__", "__doc__", "__annotations__", "__type_params__", NULL,
};

static int is_wrapper_assignment(PyObject *name) {
    for (const char *const *known = wrapper_assignments; *known != NULL; known++) {
        if (PyUnicode_CompareWithASCIIString(name, *known) == 0) return 1;
    }
    return 0;
}

static PyObject *PhilCall_getattro(PhilCall *self, PyObject *name) {
    if (!PyUnicode_Check(name)) return PyObject_GenericGetAttr((PyObject *)self, name);
    int wrapped = PyUnicode_CompareWithASCIIString(name, "__wrapped__") == 0;
    if (wrapped || is_wrapper_assignment(name)) {
        if (self->dict != NULL) {
            PyObject *own = PyDict_GetItemWithError(self->dict, name);
            if (own != NULL) return Py_NewRef(own);
            if (PyErr_Occurred()) return NULL;
        }
        if (wrapped) return Py_NewRef(self->func);
        PyObject *value = PyObject_GetAttr(self->func, name);
        if (value != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) return value;
        PyErr_Clear();  /* the function has none: update_wrapper would have copied nothing */
        return PyObject_GenericGetAttr((PyObject *)self, name);
    }
    PyObject *value = PyObject_GenericGetAttr((PyObject *)self, name);
    if (value != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) return value;
    /* update_wrapper also copies the function's __dict__. */
    PyObject *func_dict = PyObject_GenericGetDict(self->func, NULL);
    if (func_dict == NULL) {
        PyErr_Clear();
        return PyObject_GenericGetAttr((PyObject *)self, name);
    }
    PyObject *found = PyDict_GetItemWithError(func_dict, name);
    Py_XINCREF(found);
    Py_DECREF(func_dict);
    if (found != NULL || PyErr_Occurred()) return found;
    return PyObject_GenericGetAttr((PyObject *)self, name);
}

static PyObject *PhilCall_descr_get(PyObject *self, PyObject *obj, PyObject *type) {
    if (obj == NULL || obj == Py_None) return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static PyObject *PhilCall_repr(PhilCall *self) {
    return PyUnicode_FromFormat("<h5watch with_phil %U>", self->operation);
}

static int PhilCall_traverse(PhilCall *self, visitproc visit, void *arg) {
    Py_VISIT(self->func);
    Py_VISIT(self->lock);
    Py_VISIT(self->operation);
    Py_VISIT(self->dict);
    return 0;
}

static int PhilCall_clear(PhilCall *self) {
    Py_CLEAR(self->func);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->operation);
    Py_CLEAR(self->dict);
    return 0;
}

static void PhilCall_dealloc(PhilCall *self) {
    PyObject_GC_UnTrack(self);
    PhilCall_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef PhilCall_members[] = {
    {"__h5watch_operation__", T_OBJECT, offsetof(PhilCall, operation), READONLY, NULL},
    {NULL},
};

static PyGetSetDef PhilCall_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

static PyTypeObject PhilCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "h5watch.process._lockcore.PhilCall",
    .tp_basicsize = sizeof(PhilCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "with_phil's wrapper: holds the watched phil around a call, naming the operation.",
    .tp_new = PhilCall_new,
    .tp_dealloc = (destructor)PhilCall_dealloc,
    .tp_traverse = (traverseproc)PhilCall_traverse,
    .tp_clear = (inquiry)PhilCall_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(PhilCall, vectorcall),
    .tp_descr_get = PhilCall_descr_get,
    .tp_dictoffset = offsetof(PhilCall, dict),
    .tp_repr = (reprfunc)PhilCall_repr,
    .tp_getattro = (getattrofunc)PhilCall_getattro,
    .tp_members = PhilCall_members,
    .tp_getset = PhilCall_getset,
};

/* -- module ------------------------------------------------------------------ */

static PyObject *enable_fastrlock(PyObject *module, PyObject *type) {
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "enable_fastrlock: expected a type");
        return NULL;
    }
    if (((PyTypeObject *)type)->tp_basicsize != sizeof(FastRLockLayout)) {
        PyErr_Format(PyExc_ValueError, "FastRLock instance size %zd, expected %zd",
                     ((PyTypeObject *)type)->tp_basicsize, (Py_ssize_t)sizeof(FastRLockLayout));
        return NULL;
    }
    Py_INCREF(type);
    Py_XSETREF(fastrlock_type, (PyTypeObject *)type);
    Py_RETURN_NONE;
}

static PyObject *set_orphan_kill(PyObject *module, PyObject *code) {
    long v = PyLong_AsLong(code);
    if (v == -1 && PyErr_Occurred()) return NULL;
    orphan_kill_exit_code = (int)v;
    Py_RETURN_NONE;
}

static PyObject *set_log_workload(PyObject *module, PyObject *workload) {
    if (!PyUnicode_Check(workload)) {
        PyErr_SetString(PyExc_TypeError, "workload must be a str");
        return NULL;
    }
    Py_INCREF(workload);
    Py_XSETREF(log_workload, workload);
    Py_RETURN_NONE;
}

static PyObject *set_pid(PyObject *module, PyObject *pid) {
    long v = PyLong_AsLong(pid);
    if (v == -1 && PyErr_Occurred()) return NULL;
    current_pid = v;
    Py_RETURN_NONE;
}

static PyObject *set_hold_recorder(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || (args[1] != Py_None && !PyCallable_Check(args[1]))) {
        PyErr_SetString(PyExc_TypeError, "set_hold_recorder(threshold_ns, callback or None)");
        return NULL;
    }
    long long threshold = PyLong_AsLongLong(args[0]);
    if (threshold == -1 && PyErr_Occurred()) return NULL;
    if (args[1] == Py_None) {
        hold_record_after_ns = INT64_MAX;
        Py_CLEAR(hold_recorder);
    } else {
        Py_INCREF(args[1]);
        Py_XSETREF(hold_recorder, args[1]);
        hold_record_after_ns = threshold < 0 ? 0 : (int64_t)threshold;
    }
    Py_RETURN_NONE;
}

static PyObject *set_timeout_max(PyObject *module, PyObject *value) {
    double v = PyFloat_AsDouble(value);
    if (v == -1 && PyErr_Occurred()) return NULL;
    timeout_max = v;
    Py_RETURN_NONE;
}

/* FastRLock's blocking acquire (_acquire_lock in h5py/_locks.pxi), with a
 * deadline: count as a pending request and queue on the real lock with the
 * GIL released, like every other blocked thread, so the caller is served in
 * turn instead of polling and losing every race to threads that barge in.
 * Returns None when lock is not of the validated FastRLock type. */
static PyObject *fastrlock_acquire_timed(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "fastrlock_acquire_timed(lock, timeout)");
        return NULL;
    }
    if (fastrlock_type == NULL || Py_TYPE(args[0]) != fastrlock_type) Py_RETURN_NONE;
    double timeout = PyFloat_AsDouble(args[1]);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    FastRLockLayout *fl = (FastRLockLayout *)args[0];
    unsigned long me = PyThread_get_thread_ident();
    if (fl->count != 0 && fl->owner == me) {
        fl->count += 1;
        Py_RETURN_TRUE;
    }
    if (fl->count == 0 && fl->pending_requests == 0) {
        fl->owner = me;
        fl->count = 1;
        Py_RETURN_TRUE;
    }
    if (!fl->is_locked && fl->pending_requests == 0) {
        /* Held without the real lock: take it on the holder's behalf, which
         * tells the holder to release it when done (never blocks: free). */
        if (!PyThread_acquire_lock(fl->real_lock, NOWAIT_LOCK)) Py_RETURN_FALSE;
        fl->is_locked = 1;
    }
    PY_TIMEOUT_T microseconds = 0;
    if (timeout > 0) {
        double us = timeout * 1e6;
        microseconds = us >= (double)PY_TIMEOUT_MAX ? PY_TIMEOUT_MAX : (PY_TIMEOUT_T)us;
    }
    PyLockStatus status;
    fl->pending_requests += 1;
    Py_BEGIN_ALLOW_THREADS
    status = PyThread_acquire_lock_timed(fl->real_lock, microseconds, 0);
    Py_END_ALLOW_THREADS
    fl->pending_requests -= 1;
    if (status != PY_LOCK_ACQUIRED) Py_RETURN_FALSE;
    fl->is_locked = 1;
    fl->owner = me;
    fl->count = 1;
    Py_RETURN_TRUE;
}

static PyObject *set_lock_order(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyDict_Check(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_lock_order(edges: dict, first_sighting, on)");
        return NULL;
    }
    int on = PyObject_IsTrue(args[2]);
    if (on < 0) return NULL;
    Py_INCREF(args[0]);
    Py_XSETREF(order_edges, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(order_first_sighting, args[1]);
    order_checking = on;
    Py_RETURN_NONE;
}

static PyObject *held_order_classes(PyObject *module, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (int i = 0; i < held_depth; i++) {
        PyObject *entry = Py_BuildValue("(Kl)", (unsigned long long)held_locks[i].lock, held_locks[i].order_class);
        if (entry == NULL || PyList_Append(out, entry) < 0) { Py_XDECREF(entry); Py_DECREF(out); return NULL; }
        Py_DECREF(entry);
    }
    return out;
}

static PyMethodDef module_methods[] = {
    {"set_lock_order", (PyCFunction)(void (*)(void))set_lock_order, METH_FASTCALL,
     "set_lock_order(edges, first_sighting, on): lock-order checking's seen edges, its callback, and whether it is on."},
    {"held_locks", held_order_classes, METH_NOARGS,
     "This thread's held-lock stack, as (lock address, lock class) pairs, outermost first."},
    {"set_orphan_kill", set_orphan_kill, METH_O,
     "Exit code for an orphan found by the compiled slow path after a fork that skipped the hooks (0: off)."},
    {"set_log_workload", set_log_workload, METH_O,
     "The workload the compiled slow path's own events name."},
    {"fastrlock_acquire_timed", (PyCFunction)(void (*)(void))fastrlock_acquire_timed, METH_FASTCALL,
     "Queue for a validated FastRLock until it is ours or timeout seconds pass; None for other types."},
    {"enable_fastrlock", enable_fastrlock, METH_O,
     "Take and release inner locks of this (layout-validated) FastRLock type through its fields."},
    {"set_pid", set_pid, METH_O, "The pid recorded as the holder's."},
    {"set_hold_recorder", (PyCFunction)(void (*)(void))set_hold_recorder, METH_FASTCALL,
     "set_hold_recorder(threshold_ns, callback): a hold at least this long calls callback(lock, held_ns, operation)"
     " once released; None: none does."},
    {"set_timeout_max", set_timeout_max, METH_O,
     "threading.TIMEOUT_MAX: larger acquire timeouts are checked against threading.RLock."},
    {NULL},
};

static struct PyModuleDef lockcore_module = {
    PyModuleDef_HEAD_INIT, "h5watch.process._lockcore", "Compiled hot path of h5watch.WatchedLock and with_phil.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__lockcore(void) {
    if (PyType_Ready(&LockCoreType) < 0 || PyType_Ready(&PhilCallType) < 0) return NULL;
    PyObject *m = PyModule_Create(&lockcore_module);
    if (m == NULL) return NULL;
#ifdef Py_GIL_DISABLED
    /* The field updates in this file rely on the GIL for atomicity: a free-threaded
     * interpreter must keep (or re-enable) it while this module is loaded.
     * h5watch/lock.py does not load it there at all. */
    if (PyUnstable_Module_SetGIL(m, Py_MOD_GIL_USED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#endif
    if (PyModule_AddObjectRef(m, "LockCore", (PyObject *)&LockCoreType) < 0 ||
        PyModule_AddObjectRef(m, "PhilCall", (PyObject *)&PhilCallType) < 0 ||
        PyModule_AddIntConstant(m, "N_BUCKETS", N_BUCKETS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *layout = Py_BuildValue("(iiiiii)", N_BUCKETS, C_WAIT_BUCKETS, C_HOLD_BUCKETS, C_TIMEOUTS, C_ORPHANS, N_COUNTERS);
    if (layout == NULL || PyModule_AddObjectRef(m, "COUNTER_LAYOUT", layout) < 0) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(layout);
    PyObject *op_layout = Py_BuildValue("(iiiiiiii)", OP_SLOTS, N_OP_WORDS, O_HOLDS, O_HOLD_SUM, O_HOLD_MAX,
                                        O_CAUSED_WAIT_SUM, O_WAITS, O_WAIT_SUM);
    if (op_layout == NULL || PyModule_AddObjectRef(m, "OPERATION_LAYOUT", op_layout) < 0) {
        Py_XDECREF(op_layout);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(op_layout);
    PyObject *name_layout = Py_BuildValue("(iiii)", OP_UNNAMED_ROW, OP_NAME_ENTRY, OP_NAME_TEXT, OP_NAMED);
    if (name_layout == NULL || PyModule_AddObjectRef(m, "OPERATION_NAME_LAYOUT", name_layout) < 0) {
        Py_XDECREF(name_layout);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(name_layout);
    /* The other numbers this file shares with h5watch/schema.py and
     * h5watch/process/probe.py, for implementation.py to compare. */
    PyObject *bounds = PyTuple_New(N_BOUNDS);
    if (bounds == NULL) { Py_DECREF(m); return NULL; }
    for (int i = 0; i < N_BOUNDS; i++) {
        PyObject *bound = PyLong_FromLongLong(BOUNDS_NS[i]);
        if (bound == NULL) { Py_DECREF(bounds); Py_DECREF(m); return NULL; }
        PyTuple_SET_ITEM(bounds, i, bound);
    }
    PyObject *fastrlock = Py_BuildValue(
        "(nnnnnn)", (Py_ssize_t)sizeof(FastRLockLayout), (Py_ssize_t)offsetof(FastRLockLayout, real_lock),
        (Py_ssize_t)offsetof(FastRLockLayout, owner), (Py_ssize_t)offsetof(FastRLockLayout, count),
        (Py_ssize_t)offsetof(FastRLockLayout, pending_requests), (Py_ssize_t)offsetof(FastRLockLayout, is_locked));
    if (fastrlock == NULL || PyModule_AddObjectRef(m, "BOUNDS_NS", bounds) < 0 ||
        PyModule_AddObjectRef(m, "FASTRLOCK_LAYOUT", fastrlock) < 0 ||
        PyModule_AddIntConstant(m, "DEAD_OWNER", DEAD_OWNER_IDENT) < 0) {
        Py_DECREF(bounds);
        Py_XDECREF(fastrlock);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(bounds);
    Py_DECREF(fastrlock);
    current_pid = (long)getpid();
    static int fork_handler_registered = 0;
    if (!fork_handler_registered) {
        fork_handler_registered = 1;
        pthread_atfork(NULL, NULL, count_fork_in_child);
    }
    return m;
}
