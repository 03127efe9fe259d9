// Makes the shared library importable as the Python module spin_kernels._C. Importing it runs
// the static TORCH_LIBRARY registrations of the other files (torch.ops.spin_kernels_cpu.*);
// the module itself exposes nothing.
#include <Python.h>

static struct PyModuleDef spin_kernels_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "C++/OpenMP CPU kernels of spin_kernels; they register themselves as torch.ops.spin_kernels_cpu.*", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&spin_kernels_c_module); }
