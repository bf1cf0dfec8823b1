/* A libc-level child handler for forks that skip Python's at-fork hooks.
 *
 * A C extension calling fork() while other threads run leaves the child's
 * interpreter as it was in the parent: the GIL's condition variable may count
 * waiters that no longer exist, and a pending "drop the GIL" request makes the
 * very first Python bytecode release the GIL and hang. Python code cannot run
 * safely until CPython's own repair, PyOS_AfterFork_Child(), has run; so it
 * must be called from C, here, from a pthread_atfork child handler.
 *
 * h5watch's Python before-fork hook sets python_fork_in_progress, so forks
 * made by os.fork() (which repairs the child itself) are left alone.
 */
#include <Python.h>
#include <pthread.h>

static volatile int armed = 0;
static volatile int python_fork_in_progress = 0;
static int registered = 0;
static volatile long repairs = 0;

static PyObject *
ignore_unraisable(PyObject *self, PyObject *unraisable)
{
    Py_RETURN_NONE;
}

static PyMethodDef ignore_def = {"ignore_unraisable", ignore_unraisable, METH_O, NULL};

static void
child_handler(void)
{
    if (armed && !python_fork_in_progress && PyGILState_Check()) {
        /* Other libraries' hooks may fail here (h5py's releases a phil its
         * before-hook never took); their reports would be written through
         * sys.stderr, whose lock a dead thread may hold. */
        PyObject *saved = PySys_GetObject("unraisablehook");
        PyObject *ignore = PyCFunction_New(&ignore_def, NULL);
        Py_XINCREF(saved);
        if (ignore != NULL)
            PySys_SetObject("unraisablehook", ignore);
        repairs++;
        PyOS_AfterFork_Child();
        if (saved != NULL)
            PySys_SetObject("unraisablehook", saved);
        Py_XDECREF(saved);
        Py_XDECREF(ignore);
        PyErr_Clear();
    }
    python_fork_in_progress = 0;
}

static PyObject *
arm(PyObject *self, PyObject *flag)
{
    int value = PyObject_IsTrue(flag);
    if (value < 0)
        return NULL;
    if (!registered) {
        if (pthread_atfork(NULL, NULL, child_handler) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return NULL;
        }
        registered = 1;
    }
    armed = value;
    Py_RETURN_NONE;
}

static PyObject *
set_python_fork(PyObject *self, PyObject *flag)
{
    int value = PyObject_IsTrue(flag);
    if (value < 0)
        return NULL;
    python_fork_in_progress = value;
    Py_RETURN_NONE;
}

static PyObject *
repair_count(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(repairs);
}

static PyMethodDef methods[] = {
    {"arm", arm, METH_O, "Register (once) and arm or disarm the child handler."},
    {"set_python_fork", set_python_fork, METH_O, "Mark a fork made through os.fork()'s hooks."},
    {"repair_count", repair_count, METH_NOARGS, "Repairs made in this process (0 or 1 after a fork)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "h5watch._forkrepair", NULL, -1, methods,
};

PyMODINIT_FUNC
PyInit__forkrepair(void)
{
    return PyModule_Create(&module);
}
