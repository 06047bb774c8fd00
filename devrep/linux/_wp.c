/* devrep.linux._wp: the sync-mode rearm loop in C.
 *
 * protect_runs(fd, base, runs, page_shift, npages) write-protects (UFFDIO_WRITEPROTECT, mode WP, no wake) each
 * [first_page, count] pair of `runs`, a C-contiguous buffer of native int64 (an array.array("q") straight from a
 * helper message, or a numpy int64 array), at base + (first << page_shift). Every run must lie in [0, npages)
 * (ValueError before any ioctl otherwise). It runs with the GIL released and retries EINTR, as
 * devrep.linux._libc.ioctl does; on any other error it raises OSError naming the run.
 *
 * Why C: a rearm issues one ioctl per run (thousands per sync: 1 % random pages of 1 GiB is ~2,600 runs) and the
 * kernel's part is ~0.8 us each here, while the tightest Python/ctypes loop adds ~0.65 us per run (bench P3s).
 * The sync-mode helper process must stay small and quick to start, so numba is not an option there.
 * devrep.linux.uffd.Userfaultfd.protect_page_runs falls back to its Python loop when this module was not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>

static PyObject *protect_runs(PyObject *self, PyObject *args) {
    int fd, page_shift;
    unsigned long long base;
    long long npages;
    Py_buffer view;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKy*iL", &fd, &base, &view, &page_shift, &npages))
        return NULL;
    if (view.itemsize != 1 && view.itemsize != 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "runs must be a buffer of int64 [first, count] pairs");
        return NULL;
    }
    if (view.len % 16 != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "runs must be [first, count] pairs of int64");
        return NULL;
    }
    if (page_shift < 0 || page_shift > 30 || npages < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "page_shift or npages out of range");
        return NULL;
    }
    const char *words_base = (const char *)view.buf;
    Py_ssize_t pairs = view.len / 16, i;
    int err = 0, outside = 0;
    int64_t bad_first = 0, bad_count = 0;
    struct uffdio_writeprotect wp;
    Py_BEGIN_ALLOW_THREADS
    /* Every run is checked before the first ioctl: a bad message protects nothing. */
    for (i = 0; i < pairs; i++) {
        int64_t first, count; /* memcpy: a message body may sit one byte past an aligned address */
        memcpy(&first, words_base + 16 * i, sizeof first);
        memcpy(&count, words_base + 16 * i + 8, sizeof count);
        if (first < 0 || count <= 0 || first > npages || count > npages - first) {
            outside = 1;
            bad_first = first;
            bad_count = count;
            break;
        }
    }
    for (i = 0; i < pairs && !outside; i++) {
        int64_t first, count;
        memcpy(&first, words_base + 16 * i, sizeof first);
        memcpy(&count, words_base + 16 * i + 8, sizeof count);
        wp.range.start = base + ((uint64_t)first << page_shift);
        wp.range.len = (uint64_t)count << page_shift;
        wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
        while (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0) {
            if (errno != EINTR) {
                err = errno;
                bad_first = first;
                bad_count = count;
                break;
            }
        }
        if (err)
            break;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (outside) {
        PyErr_Format(PyExc_ValueError, "a rearm run [%lld, +%lld) lies outside the region's %lld pages",
                     (long long)bad_first, (long long)bad_count, npages);
        return NULL;
    }
    if (err) {
        PyObject *message = PyUnicode_FromFormat("UFFDIO_WRITEPROTECT of pages [%lld, +%lld): %s",
                                                 (long long)bad_first, (long long)bad_count, strerror(err));
        if (message != NULL) {
            PyObject *exc = PyObject_CallFunction(PyExc_OSError, "iO", err, message);
            Py_DECREF(message);
            if (exc != NULL) {
                PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
                Py_DECREF(exc);
            }
        }
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"protect_runs", protect_runs, METH_VARARGS,
     "protect_runs(fd, base, runs, page_shift, npages): write-protect int64 [first_page, count] runs (no wake)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wp", "The sync-mode rearm loop (UFFDIO_WRITEPROTECT per run) in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__wp(void) { return PyModule_Create(&module); }
