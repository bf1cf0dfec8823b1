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
 * method like a Python function does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <pythread.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#define N_BOUNDS 24
#define N_BUCKETS (N_BOUNDS + 1)

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

enum { OWNER_NONE = 0, OWNER_LIVE = 1, OWNER_DEAD = 2 };

typedef struct {
    PyObject_HEAD
    unsigned long owner;
    int owner_state;
    long count;
    long owner_pid;
    int64_t since_ns;
    PyObject *operation;
    PyObject *inner;
    PyObject *inner_acquire;
    PyObject *inner_release;
    int inner_direct; /* inner is a validated FastRLock */
    uint64_t acquisitions;
    uint64_t reentries;
    uint64_t hold_buckets[N_BUCKETS];
    uint64_t hold_sum_ns;
    uint64_t hold_max_ns;
} LockCore;

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

/* 1: acquired, 0: not acquired (non-blocking or timed out), -1: error */
static int core_acquire(LockCore *self, int blocking, double timeout, PyObject *operation) {
    unsigned long me = PyThread_get_thread_ident();
    if (self->owner_state == OWNER_LIVE && self->owner == me) {
        self->count += 1;
        self->reentries += 1;
        return 1;
    }
    int taken = inner_try_acquire(self);
    if (taken < 0) return -1;
    if (!taken) {
        if (!blocking) return 0;
        PyObject *result = PyObject_CallMethod((PyObject *)self, "_acquire_slow", "kd", me, timeout);
        if (result == NULL) return -1;
        taken = PyObject_IsTrue(result);
        Py_DECREF(result);
        if (taken <= 0) return taken;
    }
    self->since_ns = now_ns();
    self->owner_pid = current_pid;
    Py_XINCREF(operation);
    Py_XSETREF(self->operation, operation);
    self->count = 1;
    self->owner = me;
    self->owner_state = OWNER_LIVE;
    self->acquisitions += 1;
    return 1;
}

static int core_release(LockCore *self) {
    if (!(self->owner_state == OWNER_LIVE && self->owner == PyThread_get_thread_ident())) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return -1;
    }
    if (--self->count > 0) return 0;
    int64_t held = now_ns() - self->since_ns;
    if (held < 0) held = 0;
    self->hold_buckets[bucket_of(held)] += 1;
    self->hold_sum_ns += (uint64_t)held;
    if ((uint64_t)held > self->hold_max_ns) self->hold_max_ns = (uint64_t)held;
    self->count = 0;
    self->owner_state = OWNER_NONE;
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
    Py_RETURN_NONE;
}

static PyObject *LockCore_acquire(LockCore *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"blocking", "timeout", NULL};
    int blocking = 1;
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|pd:acquire", kwlist, &blocking, &timeout)) return NULL;
    if (timeout != -1) {
        if (!blocking) {
            PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
            return NULL;
        }
        if (timeout < 0) {
            PyErr_SetString(PyExc_ValueError, "timeout value must be positive");
            return NULL;
        }
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

static PyMethodDef LockCore_methods[] = {
    {"_set_inner", (PyCFunction)LockCore_set_inner, METH_O, "Set the inner lock."},
    {"acquire", (PyCFunction)(void (*)(void))LockCore_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool, as threading.RLock"},
    {"acquire_for", (PyCFunction)(void (*)(void))LockCore_acquire_for, METH_FASTCALL,
     "Blocking acquire that names the operation the holder performs."},
    {"__enter__", (PyCFunction)LockCore_enter, METH_NOARGS, NULL},
    {"release", (PyCFunction)LockCore_release, METH_NOARGS, "Release; RuntimeError if not the owner."},
    {"__exit__", (PyCFunction)(void (*)(void))LockCore_exit, METH_FASTCALL, NULL},
    {"_is_owned", (PyCFunction)LockCore_is_owned, METH_NOARGS, NULL},
    {NULL},
};

/* -- attributes the Python side reads and (for fork support) writes -------- */

static PyObject *get_owner(LockCore *self, void *c) {
    if (self->owner_state == OWNER_NONE) Py_RETURN_NONE;
    if (self->owner_state == OWNER_DEAD) return PyLong_FromLong(-2);
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
    if (v == -2) { self->owner_state = OWNER_DEAD; return 0; }
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
INT_GETSET(acquisitions, PyLong_FromUnsignedLongLong, PyLong_AsUnsignedLongLong, uint64_t)
INT_GETSET(reentries, PyLong_FromUnsignedLongLong, PyLong_AsUnsignedLongLong, uint64_t)
INT_GETSET(hold_sum_ns, PyLong_FromUnsignedLongLong, PyLong_AsUnsignedLongLong, uint64_t)
INT_GETSET(hold_max_ns, PyLong_FromUnsignedLongLong, PyLong_AsUnsignedLongLong, uint64_t)

static PyObject *get_operation(LockCore *self, void *c) {
    return Py_NewRef(self->operation ? self->operation : Py_None);
}

static int set_operation(LockCore *self, PyObject *value, void *c) {
    Py_XINCREF(value);
    Py_XSETREF(self->operation, value);
    return 0;
}

static PyObject *get_hold_buckets(LockCore *self, void *c) {
    PyObject *list = PyList_New(N_BUCKETS);
    if (list == NULL) return NULL;
    for (int i = 0; i < N_BUCKETS; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(self->hold_buckets[i]);
        if (v == NULL) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

static int set_hold_buckets(LockCore *self, PyObject *value, void *c) {
    PyObject *seq = value ? PySequence_Fast(value, "hold buckets: expected a sequence") : NULL;
    if (seq == NULL) return -1;
    if (PySequence_Fast_GET_SIZE(seq) != N_BUCKETS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "hold buckets: wrong length");
        return -1;
    }
    uint64_t buckets[N_BUCKETS];
    for (int i = 0; i < N_BUCKETS; i++) {
        buckets[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred()) { Py_DECREF(seq); return -1; }
    }
    Py_DECREF(seq);
    memcpy(self->hold_buckets, buckets, sizeof(buckets));
    return 0;
}

static PyObject *get_inner_acquire(LockCore *self, void *c) { return Py_NewRef(self->inner_acquire ? self->inner_acquire : Py_None); }
static PyObject *get_inner_release(LockCore *self, void *c) { return Py_NewRef(self->inner_release ? self->inner_release : Py_None); }
static PyObject *get_inner_direct(LockCore *self, void *c) { return PyBool_FromLong(self->inner_direct); }

static PyGetSetDef LockCore_getset[] = {
    {"_owner", (getter)get_owner, (setter)set_owner, NULL, NULL},
    {"_count", (getter)get_count, (setter)set_count, NULL, NULL},
    {"_owner_pid", (getter)get_owner_pid, (setter)set_owner_pid, NULL, NULL},
    {"_since_ns", (getter)get_since_ns, (setter)set_since_ns, NULL, NULL},
    {"_operation", (getter)get_operation, (setter)set_operation, NULL, NULL},
    {"_inner_acquire", (getter)get_inner_acquire, NULL, NULL, NULL},
    {"_inner_release", (getter)get_inner_release, NULL, NULL, NULL},
    {"_inner_direct", (getter)get_inner_direct, NULL, NULL, NULL},
    {"_core_acquisitions", (getter)get_acquisitions, (setter)set_acquisitions, NULL, NULL},
    {"_core_reentries", (getter)get_reentries, (setter)set_reentries, NULL, NULL},
    {"_core_hold_buckets", (getter)get_hold_buckets, (setter)set_hold_buckets, NULL, NULL},
    {"_core_hold_sum_ns", (getter)get_hold_sum_ns, (setter)set_hold_sum_ns, NULL, NULL},
    {"_core_hold_max_ns", (getter)get_hold_max_ns, (setter)set_hold_max_ns, NULL, NULL},
    {NULL},
};

static int LockCore_traverse(LockCore *self, visitproc visit, void *arg) {
    Py_VISIT(self->operation);
    Py_VISIT(self->inner);
    Py_VISIT(self->inner_acquire);
    Py_VISIT(self->inner_release);
    return 0;
}

static int LockCore_clear(LockCore *self) {
    Py_CLEAR(self->operation);
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
    .tp_name = "h5watch._lockcore.LockCore",
    .tp_basicsize = sizeof(LockCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Compiled hot path of WatchedLock (see h5watch/lock.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)LockCore_init,
    .tp_dealloc = (destructor)LockCore_dealloc,
    .tp_traverse = (traverseproc)LockCore_traverse,
    .tp_clear = (inquiry)LockCore_clear,
    .tp_methods = LockCore_methods,
    .tp_getset = LockCore_getset,
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

static PyObject *PhilCall_vectorcall(PhilCall *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    if (core_acquire(self->lock, 1, -1, self->operation) < 0) return NULL;
    PyObject *result = PyObject_Vectorcall(self->func, args, nargsf, kwnames);
    if (result == NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (core_release(self->lock) < 0) PyErr_Clear();
        PyErr_Restore(type, value, tb);
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
    .tp_name = "h5watch._lockcore.PhilCall",
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

static PyObject *set_pid(PyObject *module, PyObject *pid) {
    long v = PyLong_AsLong(pid);
    if (v == -1 && PyErr_Occurred()) return NULL;
    current_pid = v;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"enable_fastrlock", enable_fastrlock, METH_O,
     "Take and release inner locks of this (layout-validated) FastRLock type through its fields."},
    {"set_pid", set_pid, METH_O, "The pid recorded as the holder's."},
    {NULL},
};

static struct PyModuleDef lockcore_module = {
    PyModuleDef_HEAD_INIT, "h5watch._lockcore", "Compiled hot path of h5watch.WatchedLock and with_phil.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__lockcore(void) {
    if (PyType_Ready(&LockCoreType) < 0 || PyType_Ready(&PhilCallType) < 0) return NULL;
    PyObject *m = PyModule_Create(&lockcore_module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "LockCore", (PyObject *)&LockCoreType) < 0 ||
        PyModule_AddObjectRef(m, "PhilCall", (PyObject *)&PhilCallType) < 0 ||
        PyModule_AddIntConstant(m, "N_BUCKETS", N_BUCKETS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    current_pid = (long)getpid();
    return m;
}
