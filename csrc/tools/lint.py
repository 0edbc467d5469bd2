#!/usr/bin/env python3
"""Source rules for epcomm's CUDA/C++ code (csrc/), so kernels keep running on both targets.

  asm           only in common/ptx.cuh (kernel PTX) and simt/context_switch.hpp (the host fiber switch)
  __CUDACC__    only in common/compat.cuh, the one target switch
  <<<           only in .cu launcher files; the CPU path launches through epcomm::simt::launch
  volatile      not in .cuh kernel headers except common/ptx.cuh: poll through a ptx.cuh helper
                (a raw volatile spin loop hangs its own block on the CPU target)
  cuda_runtime.h  not included by .cuh kernel headers except common/compat.cuh

Comments and string literals are ignored. Usage: lint.py [CSRC_DIR] | lint.py --self-test
"""
import os
import re
import sys
import tempfile

SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".hpp", ".cpp", ".cc")

RULES = [
    # (name, pattern, may this file contain it?)
    ("asm", re.compile(r"\b(asm|__asm__|__asm)\b"),
     lambda path: path in ("common/ptx.cuh", "simt/context_switch.hpp")),
    ("__CUDACC__", re.compile(r"__CUDACC__"), lambda path: path == "common/compat.cuh"),
    ("<<<", re.compile(r"<<<"), lambda path: path.endswith(".cu")),
    ("volatile", re.compile(r"\bvolatile\b"),
     lambda path: not path.endswith(".cuh") or path == "common/ptx.cuh"),
    ("cuda_runtime.h", re.compile(r"#\s*include\s*[<\"]cuda_runtime\.h"),
     lambda path: not path.endswith(".cuh") or path == "common/compat.cuh"),
]

COMMENT_OR_STRING = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', re.S)


def strip_comments_and_strings(text):
    # Keep newlines so line numbers stay right; the #include rule needs the
    # quoted header name, so strings in #include lines are kept.
    def blank(match):
        token = match.group(0)
        if token.startswith('"'):
            return token if _in_include_line(text, match.start()) else '""'
        return "\n" * token.count("\n")
    return COMMENT_OR_STRING.sub(blank, text)


def _in_include_line(text, position):
    line_start = text.rfind("\n", 0, position) + 1
    return re.match(r"\s*#\s*include", text[line_start:position]) is not None


def lint(root):
    problems = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in ("build", ".git")]
        for name in sorted(files):
            if not name.endswith(SOURCE_SUFFIXES):
                continue
            full_path = os.path.join(directory, name)
            relative = os.path.relpath(full_path, root).replace(os.sep, "/")
            with open(full_path, encoding="utf-8", errors="replace") as source:
                code = strip_comments_and_strings(source.read())
            for rule, pattern, allowed in RULES:
                if allowed(relative):
                    continue
                for match in pattern.finditer(code):
                    line = code.count("\n", 0, match.start()) + 1
                    problems.append(f"{relative}:{line}: '{rule}' is not allowed here ({rule_reason(rule)})")
    return problems


def rule_reason(rule):
    return {
        "asm": "inline assembly lives in common/ptx.cuh only",
        "__CUDACC__": "common/compat.cuh is the only target switch",
        "<<<": "kernel launches with <<<>>> belong in .cu launcher files",
        "volatile": "poll through a common/ptx.cuh helper instead",
        "cuda_runtime.h": "kernel headers include common/compat.cuh instead",
    }[rule]


def self_test():
    cases = {
        "kernels/bad_asm.cuh": ("asm volatile(\"trap;\");\n", "asm"),
        "kernels/bad_switch.cuh": ("#if defined(__CUDACC__)\n#endif\n", "__CUDACC__"),
        "kernels/bad_launch.cpp": ("void f() { k<<<1, 32>>>(); }\n", "<<<"),
        "kernels/bad_spin.cuh": ("void f(int volatile* p) { while (!*p) {} }\n", "volatile"),
        "kernels/bad_include.cuh": ("#include <cuda_runtime.h>\n", "cuda_runtime.h"),
    }
    clean = {
        "common/ptx.cuh": "asm volatile(\"bar.sync 0;\");\n",
        "common/compat.cuh": "#if defined(__CUDACC__)\n#include <cuda_runtime.h>\n#endif\n",
        "launchers/ok.cu": "void f() { k<<<1, 32>>>(); }\n",
        "kernels/ok.cuh": "// a comment may say asm, <<<, volatile and __CUDACC__\nchar const* s = \"<<< asm\";\n",
    }
    with tempfile.TemporaryDirectory() as root:
        for relative, content in list(clean.items()) + [(p, c) for p, (c, _) in cases.items()]:
            path = os.path.join(root, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as out:
                out.write(content)
        problems = lint(root)
    failures = []
    for relative, (_, rule) in cases.items():
        if not any(p.startswith(relative + ":") and f"'{rule}'" in p for p in problems):
            failures.append(f"self-test: {relative} should break rule '{rule}'")
    for relative in clean:
        failures += [f"self-test: false positive: {p}" for p in problems if p.startswith(relative + ":")]
    for failure in failures:
        print(failure)
    print("lint self-test:", "FAILED" if failures else f"ok ({len(cases)} planted violations caught)")
    return 1 if failures else 0


def main(argv):
    if len(argv) > 1 and argv[1] == "--self-test":
        return self_test()
    root = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    problems = lint(os.path.abspath(root))
    for problem in problems:
        print(problem)
    print("lint:", f"{len(problems)} problem(s)" if problems else "ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
