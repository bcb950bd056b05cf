/* fastdl._C: an empty extension module. Importing it makes Python dlopen this library, and the
 * C++ static initialisers in csrc/ops register every fastdl operator with the PyTorch
 * dispatcher (torch.ops.fastdl.*). Only the limited C API is used, so one build serves every
 * CPython 3.10+ and nothing here depends on libtorch_python. */
#include <Python.h>

static struct PyModuleDef fastdl_c_module = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastdl_c_module); }
