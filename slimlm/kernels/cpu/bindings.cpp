// Python bindings for ops.cpp as raw METH_FASTCALL functions: a call costs a few hundred nanoseconds
// (argument unpacking through torch's own Tensor caster), and this file compiles in a few seconds, unlike
// pybind11's m.def machinery or <torch/extension.h>.

#include <torch/csrc/utils/pybind.h>

#include <cstring>
#include <exception>
#include <tuple>

namespace slim {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps);
void apply_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_sin);
void rope_and_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                    const at::Tensor& cos_sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& slot_mapping);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale, int64_t sliding_window);
at::Tensor silu_and_mul(const at::Tensor& x);
}  // namespace slim

namespace {

using TensorCaster = pybind11::detail::type_caster<at::Tensor>;
constexpr int kMaxArgs = 8;

// Positional and keyword arguments, in the order of `names`; the first `required` must be given.
bool parse(const char* fn, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, const char* const* names,
           int count, int required, PyObject** out) {
  if (nargs > count) {
    PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fn, count, nargs);
    return false;
  }
  for (int i = 0; i < count; ++i) out[i] = i < nargs ? args[i] : nullptr;
  if (kwnames != nullptr) {
    const Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t j = 0; j < nkw; ++j) {
      const char* key = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, j));
      if (key == nullptr) return false;
      int slot = -1;
      for (int i = 0; i < count; ++i) {
        if (std::strcmp(key, names[i]) == 0) slot = i;
      }
      if (slot < 0 || out[slot] != nullptr) {
        PyErr_Format(PyExc_TypeError, "%s() got an unexpected or repeated argument '%s'", fn, key);
        return false;
      }
      out[slot] = args[nargs + j];
    }
  }
  for (int i = 0; i < required; ++i) {
    if (out[i] == nullptr) {
      PyErr_Format(PyExc_TypeError, "%s() missing argument '%s'", fn, names[i]);
      return false;
    }
  }
  return true;
}

bool tensor_arg(const char* fn, const char* name, PyObject* obj, at::Tensor& out) {
  TensorCaster caster;
  if (!caster.load(pybind11::handle(obj), false)) {
    PyErr_Format(PyExc_TypeError, "%s(): '%s' must be a torch.Tensor, not %s", fn, name, Py_TYPE(obj)->tp_name);
    return false;
  }
  out = std::move(static_cast<at::Tensor&>(caster));
  return true;
}

bool double_arg(PyObject* obj, double& out) {
  out = PyFloat_AsDouble(obj);
  return !(out == -1.0 && PyErr_Occurred());
}

bool int_arg(PyObject* obj, int64_t& out) {
  out = PyLong_AsLongLong(obj);
  return !(out == -1 && PyErr_Occurred());
}

PyObject* wrap(const at::Tensor& t) {
  return TensorCaster::cast(t, pybind11::return_value_policy::move, pybind11::handle()).ptr();
}

PyObject* set_error(const std::exception& e) {
  if (auto* c10e = dynamic_cast<const c10::Error*>(&e)) {
    PyErr_SetString(PyExc_RuntimeError, c10e->what_without_backtrace());
  } else {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// Unpack `count` leading tensor arguments.
bool tensors(const char* fn, const char* const* names, PyObject** objs, int count, at::Tensor* out) {
  for (int i = 0; i < count; ++i) {
    if (!tensor_arg(fn, names[i], objs[i], out[i])) return false;
  }
  return true;
}

PyObject* py_rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* names[] = {"x", "weight", "eps"};
  PyObject* o[kMaxArgs];
  at::Tensor t[2];
  double eps;
  if (!parse("rms_norm", args, nargs, kwnames, names, 3, 3, o) || !tensors("rms_norm", names, o, 2, t) ||
      !double_arg(o[2], eps))
    return nullptr;
  try {
    return wrap(slim::rms_norm(t[0], t[1], eps));
  } catch (const std::exception& e) {
    return set_error(e);
  }
}

PyObject* py_fused_add_rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* names[] = {"x", "residual", "weight", "eps"};
  PyObject* o[kMaxArgs];
  at::Tensor t[3];
  double eps;
  if (!parse("fused_add_rms_norm", args, nargs, kwnames, names, 4, 4, o) ||
      !tensors("fused_add_rms_norm", names, o, 3, t) || !double_arg(o[3], eps))
    return nullptr;
  try {
    slim::fused_add_rms_norm(t[0], t[1], t[2], eps);
  } catch (const std::exception& e) {
    return set_error(e);
  }
  // In place: hand back the caller's own tensor objects.
  return PyTuple_Pack(2, o[0], o[1]);
}

PyObject* py_apply_rope(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* names[] = {"q", "k", "positions", "cos_sin"};
  PyObject* o[kMaxArgs];
  at::Tensor t[4];
  if (!parse("apply_rope", args, nargs, kwnames, names, 4, 4, o) || !tensors("apply_rope", names, o, 4, t))
    return nullptr;
  try {
    slim::apply_rope(t[0], t[1], t[2], t[3]);
  } catch (const std::exception& e) {
    return set_error(e);
  }
  Py_RETURN_NONE;
}

PyObject* py_rope_and_cache(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* names[] = {"q", "k", "v", "positions", "cos_sin", "k_cache", "v_cache", "slot_mapping"};
  PyObject* o[kMaxArgs];
  at::Tensor t[8];
  if (!parse("rope_and_cache", args, nargs, kwnames, names, 8, 8, o) ||
      !tensors("rope_and_cache", names, o, 8, t))
    return nullptr;
  try {
    slim::rope_and_cache(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
  } catch (const std::exception& e) {
    return set_error(e);
  }
  Py_RETURN_NONE;
}

PyObject* py_paged_attention(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* names[] = {"q",        "k_cache",         "v_cache", "block_tables",
                                "seq_lens", "query_start_loc", "scale",   "sliding_window"};
  PyObject* o[kMaxArgs];
  at::Tensor t[6];
  double scale;
  int64_t window = 0;
  if (!parse("paged_attention", args, nargs, kwnames, names, 8, 7, o) ||
      !tensors("paged_attention", names, o, 6, t) || !double_arg(o[6], scale) ||
      (o[7] != nullptr && o[7] != Py_None && !int_arg(o[7], window)))
    return nullptr;
  at::Tensor out;
  const char* error = nullptr;
  std::string message;
  Py_BEGIN_ALLOW_THREADS;
  try {
    out = slim::paged_attention(t[0], t[1], t[2], t[3], t[4], t[5], scale, window);
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
    error = message.c_str();
  } catch (const std::exception& e) {
    message = e.what();
    error = message.c_str();
  }
  Py_END_ALLOW_THREADS;
  if (error != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, error);
    return nullptr;
  }
  return wrap(out);
}

PyObject* py_silu_and_mul(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* names[] = {"x"};
  PyObject* o[kMaxArgs];
  at::Tensor t[1];
  if (!parse("silu_and_mul", args, nargs, kwnames, names, 1, 1, o) || !tensors("silu_and_mul", names, o, 1, t))
    return nullptr;
  try {
    return wrap(slim::silu_and_mul(t[0]));
  } catch (const std::exception& e) {
    return set_error(e);
  }
}

#define SLIM_METHOD(NAME, DOC) \
  {#NAME, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_##NAME)), METH_FASTCALL | METH_KEYWORDS, DOC}

PyMethodDef methods[] = {
    SLIM_METHOD(rms_norm, "rms_norm(x, weight, eps) -> Tensor"),
    SLIM_METHOD(fused_add_rms_norm, "fused_add_rms_norm(x, residual, weight, eps) -> (x, residual), in place"),
    SLIM_METHOD(apply_rope, "apply_rope(q, k, positions, cos_sin) -> None, in place"),
    SLIM_METHOD(rope_and_cache,
                "rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping) -> None"),
    SLIM_METHOD(paged_attention,
                "paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, "
                "sliding_window=0) -> Tensor"),
    SLIM_METHOD(silu_and_mul, "silu_and_mul(x) -> Tensor"),
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "slimlm_cpu_ops", "slimlm fused CPU kernels (semantics: slimlm/kernels/reference.py)",
    -1, methods,
};

}  // namespace

#define SLIM_CONCAT2(a, b) a##b
#define SLIM_CONCAT(a, b) SLIM_CONCAT2(a, b)

PyMODINIT_FUNC SLIM_CONCAT(PyInit_, TORCH_EXTENSION_NAME)() { return PyModule_Create(&module_def); }
