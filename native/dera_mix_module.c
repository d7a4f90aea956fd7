/* CPython binding for the mixing and scoring kernels: takes raw addresses (as llama_get_logits_ith gives
 * them through ctypes) so that a step costs one C call and no copy. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

#include "dera_mix.h"
#include "dera_score.h"

static PyObject *mix_terms(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out;
    PyObject *row_list, *weight_list;
    Py_ssize_t n_vocab;
    if (!PyArg_ParseTuple(args, "KO!O!n", &out, &PyTuple_Type, &row_list, &PyTuple_Type,
                          &weight_list, &n_vocab)) {
        return NULL;
    }
    Py_ssize_t k = PyTuple_GET_SIZE(row_list);
    if (!out || n_vocab < 0 || k < 1 || k > DERA_MAX_TERMS ||
        PyTuple_GET_SIZE(weight_list) != k) {
        PyErr_SetString(PyExc_ValueError,
                        "mix_terms: null buffer, negative size, or 1..16 rows with one weight each");
        return NULL;
    }
    const float *rows[DERA_MAX_TERMS];
    float weights[DERA_MAX_TERMS];
    for (Py_ssize_t j = 0; j < k; j++) {
        unsigned long long address = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(row_list, j));
        double weight = PyFloat_AsDouble(PyTuple_GET_ITEM(weight_list, j));
        if (PyErr_Occurred()) return NULL;
        if (!address || !isfinite(weight)) {
            PyErr_SetString(PyExc_ValueError, "mix_terms: null row or non-finite weight");
            return NULL;
        }
        rows[j] = (const float *)(uintptr_t)address;
        weights[j] = (float)weight;
    }
    Py_BEGIN_ALLOW_THREADS
    dera_mix_terms((float *)(uintptr_t)out, rows, weights, (size_t)k, (size_t)n_vocab);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *score_rows(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long aligned, reference, targets, lams, out;
    Py_ssize_t n_rows, n_vocab, n_lams;
    if (!PyArg_ParseTuple(args, "KKnnKKnK", &aligned, &reference, &n_rows, &n_vocab, &targets,
                          &lams, &n_lams, &out)) {
        return NULL;
    }
    if (!aligned || !reference || !targets || !lams || !out || n_rows < 0 || n_vocab <= 0 ||
        n_lams < 0) {
        PyErr_SetString(PyExc_ValueError, "score_rows: null buffer or bad size");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    dera_score_rows((const float *)(uintptr_t)aligned, (const float *)(uintptr_t)reference,
                    (size_t)n_rows, (size_t)n_vocab, (const int32_t *)(uintptr_t)targets,
                    (const double *)(uintptr_t)lams, (size_t)n_lams, (double *)(uintptr_t)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"mix_terms", mix_terms, METH_VARARGS,
     "mix_terms(out, rows, weights, n_vocab): out = sum of weights[j] * rows[j] over float32 "
     "buffers given by address (tuples of up to 16); out may equal any row."},
    {"score_rows", score_rows, METH_VARARGS,
     "score_rows(aligned, reference, n_rows, n_vocab, targets, lams, n_lams, out): per lam "
     "and row, log p_lam(target), KL(p_lam||p_ref), KL(p_lam||p_aligned) into float64 out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dera_local._native", "Compiled DeRa logit mixing.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
