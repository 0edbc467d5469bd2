#pragma once
// Python bindings of the kernels' typed arguments: the Params of every kernel and the Specs and
// configs they run with (kernels/intranode.hpp, internode.hpp, config.cuh, workspace.cuh,
// rdma_workspace.cuh), each bound field by field from its one X-macro field list
// (common/fields.hpp). Python builds them by keyword, naming every field:
//
//   params = ext.IntranodeCombineParams(x=..., element_kind=1, ...)   # unknown or missing names: TypeError
//   runtime.run(spec, params, timeout_s)                                # the kernel is chosen by type
//
// Pointer fields take an int (a tensor's data_ptr()) or None (null); enums take their int value;
// nested structs are values (assign a whole struct, not one of its fields).

#include <pybind11/operators.h>
#include <pybind11/pybind11.h>

#include <concepts>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "../kernels/internode.hpp"
#include "../kernels/low_latency.hpp"
#include "../kernels/intranode.hpp"

namespace epcomm::bindings {

namespace py = pybind11;

// Binds struct T field by field; finish() adds the keyword constructor, FIELDS, __repr__ and __eq__.
template <class T>
class __attribute__((visibility("hidden"))) StructBinding {  // hidden, like pybind11's own types
 public:
  // module_local: epcomm._C and epcomm._C_cuda each bind these types; a process may import both.
  StructBinding(py::module_& module, char const* name, char const* doc)
      : cls_(module, name, doc, py::module_local()), name_(name) {}

  template <class M>
  StructBinding& field(char const* name, M T::*member, char const* doc) {
    names_.push_back(name);
    if constexpr (std::is_pointer_v<M>) {
      cls_.def_property(
          name, [member](T const& self) { return reinterpret_cast<uintptr_t>(self.*member); },
          [member](T& self, py::object value) { self.*member = reinterpret_cast<M>(pointer_value(value)); }, doc);
      setters_[name] = [member](T& self, py::handle value) {
        self.*member = reinterpret_cast<M>(pointer_value(py::reinterpret_borrow<py::object>(value)));
      };
    } else if constexpr (std::is_enum_v<M>) {
      using Int = std::underlying_type_t<M>;
      cls_.def_property(
          name, [member](T const& self) { return Int(self.*member); },
          [member](T& self, Int value) { self.*member = M(value); }, doc);
      setters_[name] = [member](T& self, py::handle value) { self.*member = M(value.cast<Int>()); };
    } else {
      cls_.def_readwrite(name, member, doc);
      setters_[name] = [member](T& self, py::handle value) { self.*member = value.cast<M>(); };
    }
    return *this;
  }

  void finish() {
    auto const names = names_;
    auto const setters = setters_;
    std::string const type_name = name_;
    cls_.def(py::init([names, setters, type_name](py::kwargs const& kwargs) {
               T value{};
               std::vector<std::string> missing = names;
               for (auto const& [key, item] : kwargs) {
                 std::string const field = py::str(key);
                 auto const setter = setters.find(field);
                 if (setter == setters.end())
                   throw py::type_error(type_name + " has no field '" + field + "'; its fields: " + join(names));
                 setter->second(value, item);
                 std::erase(missing, field);
               }
               if (!missing.empty())
                 throw py::type_error(type_name + " needs every field by name; missing: " + join(missing));
               return value;
             }),
             ("Every field by keyword: " + join(names)).c_str());
    cls_.attr("FIELDS") = py::tuple(py::cast(names));
    if constexpr (requires { T::kName; }) cls_.attr("KERNEL") = T::kName;  // a kernel's Params: the kernel's name
    cls_.def("__repr__", [names, type_name](py::object self) {
      std::string text = type_name + "(";
      for (size_t i = 0; i < names.size(); ++i)
        text += (i ? ", " : "") + names[i] + "=" + std::string(py::repr(self.attr(names[i].c_str())));
      return text + ")";
    });
    if constexpr (std::equality_comparable<T>) cls_.def(py::self == py::self);
  }

 private:
  static uintptr_t pointer_value(py::object const& value) {
    if (value.is_none()) return 0;
    return value.cast<uintptr_t>();
  }
  static std::string join(std::vector<std::string> const& names) {
    std::string text;
    for (std::string const& n : names) text += (text.empty() ? "" : ", ") + n;
    return text;
  }

  py::class_<T> cls_;
  std::string name_;
  std::vector<std::string> names_;
  std::map<std::string, std::function<void(T&, py::handle)>> setters_;
};

#define EPCOMM_BIND_FIELD(type, name, init, doc) binding.field(#name, &Bound::name, doc);
#define EPCOMM_BIND_STRUCT(module, Struct, FIELDS, doc) \
  do {                                                  \
    using Bound = kernels::Struct;                      \
    StructBinding<Bound> binding(module, #Struct, doc); \
    FIELDS(EPCOMM_BIND_FIELD)                           \
    binding.finish();                                   \
  } while (0)

inline void bind_kernel_types(py::module_& m) {
  EPCOMM_BIND_STRUCT(m, KernelConfig, EPCOMM_KERNEL_CONFIG_FIELDS, "The NVLink kernels' config (kernels/config.cuh).");
  EPCOMM_BIND_STRUCT(m, InternodeConfig, EPCOMM_INTERNODE_CONFIG_FIELDS,
                     "The two-hop kernels' config (kernels/rdma_workspace.cuh).");
  EPCOMM_BIND_STRUCT(m, NvlWorkspaceShape, EPCOMM_NVL_WORKSPACE_SHAPE_FIELDS,
                     "Shape of the NVL workspace (kernels/workspace.cuh).");
  EPCOMM_BIND_STRUCT(m, RdmaWorkspaceShape, EPCOMM_RDMA_WORKSPACE_SHAPE_FIELDS,
                     "Shape of the RDMA workspace (kernels/rdma_workspace.cuh).");
  EPCOMM_BIND_STRUCT(m, IntranodeSpec, EPCOMM_INTRANODE_SPEC_FIELDS,
                     "What an intranode kernel runs with besides its Params (kernels/intranode.hpp).");
  EPCOMM_BIND_STRUCT(m, InternodeSpec, EPCOMM_INTERNODE_SPEC_FIELDS,
                     "What an internode kernel runs with besides its Params (kernels/internode.hpp).");
  EPCOMM_BIND_STRUCT(m, NotifyParams, EPCOMM_NOTIFY_FIELDS, "intranode_notify (kernels/intranode.hpp).");
  EPCOMM_BIND_STRUCT(m, IntranodeDispatchParams, EPCOMM_INTRANODE_DISPATCH_FIELDS, "intranode_dispatch (kernels/intranode.hpp).");
  EPCOMM_BIND_STRUCT(m, IntranodeCombineParams, EPCOMM_INTRANODE_COMBINE_FIELDS, "intranode_combine (kernels/intranode.hpp).");
  EPCOMM_BIND_STRUCT(m, InternodeNotifyParams, EPCOMM_INTERNODE_NOTIFY_FIELDS,
                     "internode_notify (kernels/internode.hpp).");
  EPCOMM_BIND_STRUCT(m, InternodeDispatchParams, EPCOMM_INTERNODE_DISPATCH_FIELDS,
                     "internode_dispatch (kernels/internode.hpp).");
  EPCOMM_BIND_STRUCT(m, InternodeCombineParams, EPCOMM_INTERNODE_COMBINE_FIELDS,
                     "internode_combine (kernels/internode.hpp).");
  EPCOMM_BIND_STRUCT(m, LowLatencySpec, EPCOMM_LOW_LATENCY_SPEC_FIELDS,
                     "What a low-latency kernel runs with besides its Params (kernels/low_latency.hpp).");
  EPCOMM_BIND_STRUCT(m, LowLatencyDispatchSendParams, EPCOMM_LL_DISPATCH_SEND_FIELDS,
                     "low_latency_dispatch_send (kernels/low_latency.hpp).");
  EPCOMM_BIND_STRUCT(m, LowLatencyDispatchRecvParams, EPCOMM_LL_DISPATCH_RECV_FIELDS,
                     "low_latency_dispatch_recv (kernels/low_latency.hpp).");
  EPCOMM_BIND_STRUCT(m, LowLatencyCombineSendParams, EPCOMM_LL_COMBINE_SEND_FIELDS,
                     "low_latency_combine_send (kernels/low_latency.hpp).");
  EPCOMM_BIND_STRUCT(m, LowLatencyCombineRecvParams, EPCOMM_LL_COMBINE_RECV_FIELDS,
                     "low_latency_combine_recv (kernels/low_latency.hpp).");
  EPCOMM_BIND_STRUCT(m, LowLatencyResetSignalsParams, EPCOMM_LL_RESET_SIGNALS_FIELDS,
                     "low_latency_reset_signals (kernels/low_latency.hpp).");
}

#undef EPCOMM_BIND_STRUCT
#undef EPCOMM_BIND_FIELD

}  // namespace epcomm::bindings
