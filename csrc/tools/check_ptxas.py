#!/usr/bin/env python3
"""Fails unless every kernel in an `nvcc -Xptxas -v` log has no spill stores/loads and a 0-byte stack frame.

Prints registers per kernel. Usage: check_ptxas.py PTXAS_LOG [--expect NAME_FRAGMENT...]
"""
import re
import sys

ENTRY = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")
TARGET = re.compile(r"Compiling entry function '\S+' for '(sm_\d+a?)'")


def parse(text):
    kernels, current = {}, None
    for line in text.splitlines():
        if match := ENTRY.search(line):
            current = match.group(1)
            kernels[current] = {}
        elif current and (match := FRAME.search(line)):
            kernels[current].update(stack=int(match.group(1)), spill_stores=int(match.group(2)),
                                    spill_loads=int(match.group(3)))
        elif current and (match := REGISTERS.search(line)):
            kernels[current]["registers"] = int(match.group(1))
    return kernels


def main(argv):
    log = argv[1]
    expected = argv[argv.index("--expect") + 1:] if "--expect" in argv else []
    with open(log) as source:
        text = source.read()
    kernels = parse(text)
    targets = ", ".join(sorted(set(TARGET.findall(text)))) or "target not in the log"
    failures = []
    for name, info in kernels.items():
        short = re.sub(r"^_ZN6epcomm7kernels\d+", "", name)
        print(f"       {short[:60]:60s} {info.get('registers', '?'):>3} registers, stack {info.get('stack')}, "
              f"spills {info.get('spill_stores')}/{info.get('spill_loads')}")
        if info.get("stack") != 0 or info.get("spill_stores") != 0 or info.get("spill_loads") != 0:
            failures.append(f"{short}: stack frame or spills (see {log})")
    for fragment in expected:
        if not any(fragment in name for name in kernels):
            failures.append(f"kernel {fragment} missing from {log}")
    for failure in failures:
        print("[FAIL]", failure)
    if not failures:
        print(f"[ OK ] {len(kernels)} kernels ({targets}): no spills, no stack frame")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
