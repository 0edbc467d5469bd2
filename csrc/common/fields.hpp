#pragma once
// Structs whose fields are listed once, as an X-macro, so that the kernels' C++ struct and its
// Python binding (csrc/bindings/kernel_types.hpp) cannot drift apart:
//
//   #define EPCOMM_FOO_FIELDS(F)
//     F(void const*, x, nullptr, "[N, hidden_bytes] row bytes")
//     F(int, hidden_bytes, 0, "bytes of an x row; multiple of 4")
//   (each line but the last ending in a backslash)
//   struct Foo { EPCOMM_FOO_FIELDS(EPCOMM_DECLARE_FIELD) };
//
// Each entry is F(type, name, default value, one-line contract). Python builds a Foo by keyword,
// naming every field (csrc/bindings/kernel_types.hpp rejects unknown and missing names), reads
// the contracts as the properties' docstrings, and gets Foo.FIELDS in this order.

#define EPCOMM_DECLARE_FIELD(type, name, init, doc) type name = init;
