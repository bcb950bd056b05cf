/* fastdl._C: importing it makes Python dlopen this library, and the C++ static initialisers in
 * csrc/ops register every fastdl operator with the PyTorch dispatcher (torch.ops.fastdl.*). Its
 * only functions read and set the CPU capability the kernels use (csrc/common/cpu_capability.h).
 * Only the limited C API is used, so one build serves every CPython 3.10+ and nothing here
 * depends on libtorch_python. */
#include <Python.h>

int fastdl_cpu_capability(const char** out, char* error, int size);
const char* fastdl_cpu_supported_capability(void);
int fastdl_set_cpu_capability(const char* requested, char* error, int size);

static PyObject* cpu_capability(PyObject* self, PyObject* unused) {
  const char* name = NULL;
  char error[512];
  if (fastdl_cpu_capability(&name, error, sizeof error) != 0) {
    PyErr_SetString(PyExc_ValueError, error);
    return NULL;
  }
  return PyUnicode_FromString(name);
}

static PyObject* supported_cpu_capability(PyObject* self, PyObject* unused) {
  return PyUnicode_FromString(fastdl_cpu_supported_capability());
}

static PyObject* set_cpu_capability(PyObject* self, PyObject* arg) {
  char error[512];
  const char* requested = PyUnicode_AsUTF8AndSize(arg, NULL);
  if (requested == NULL) return NULL;
  if (fastdl_set_cpu_capability(requested, error, sizeof error) != 0) {
    PyErr_SetString(PyExc_ValueError, error);
    return NULL;
  }
  Py_RETURN_NONE;
}

static PyMethodDef fastdl_c_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "The CPU capability the kernels use now."},
    {"supported_cpu_capability", supported_cpu_capability, METH_NOARGS,
     "The best CPU capability the running CPU supports."},
    {"set_cpu_capability", set_cpu_capability, METH_O,
     "Use the CPU capability 'default', 'avx2' or 'avx512' (at most the supported one)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastdl_c_module = {PyModuleDef_HEAD_INIT, "_C", NULL, -1,
                                             fastdl_c_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastdl_c_module); }
