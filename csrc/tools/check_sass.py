#!/usr/bin/env python3
"""Checks the SASS (sm_90, sm_100) of the communication kernels: the memory-ordering helpers lower as intended.

PTX states what was asked for; ptxas decides what runs. This reads the machine code of an object built
with `nvcc -arch=sm_90 -lineinfo` or sm_100 (cuobjdump extracts the cubin, `nvdisasm -gi` prints it with line info)
and attributes every instruction to the helper of common/ptx.cuh it came from (the innermost line-info
frame in that header; each helper is one macro invocation or one function there). It then requires:

  acquire   every load emitted by ld_acquire_sys_global is `LD[G].E[.64].STRONG.SYS` and the next
            global/generic access after it is preceded by `CCTL.IVALL`. That pair is how ptxas lowers
            ld.acquire.sys on sm_90: a strong system-scope load (served by the coherence point, never
            a stale L1 line), then an invalidation of the SM's non-coherent L1 so that later plain
            loads cannot hit lines older than the flag. ld.relaxed.sys and ld.volatile lower to the
            same load WITHOUT the CCTL.IVALL, a weak ld.global to a plain LDG.E: both fail here.
  release   every write emitted by st_release_sys_global / atomic_add_release_sys_global is a
            `ST[G]|ATOM[G]|RED[G] ... .STRONG.SYS`, and the last fence before it is `MEMBAR.ALL.SYS`
            (or `.SC.SYS`) with no global/generic write in between. st.release.sys is a system-scope
            fence plus a strong store: ptxas emits MEMBAR.ALL.SYS; ERRBAR; CGAERRBAR; STG.E.STRONG.SYS
            (a relaxed st.relaxed.sys is the bare STG.E.STRONG.SYS and fails). A MEMBAR that
            fence_acq_rel_sys emits must be .SYS (no kernel uses that helper today).
  coherent  no `.CONSTANT` load at all (ld.global.nc / __ldg: the non-coherent read-only path, which may
            return stale ring data). SASS cannot tell ring memory from other memory, and these kernels
            need no such load today. LDC/ULDC read constant banks (kernel parameters), never the ring.
  no spills no LDL/STL (local memory) instruction: no spills and no stack, seen in the machine code itself.

Measured lowering of every helper (nvcc 13.0, sm_90; tests/ptx_check.cu): acquire.sys = LDG.E.STRONG.SYS +
CCTL.IVALL, acquire.gpu = LDG.E.STRONG.GPU + CCTL.IVALL, relaxed.sys and volatile = LDG.E.STRONG.SYS,
ld.global.nc = LDG.E.CONSTANT, release.sys = MEMBAR.ALL.SYS + ERRBAR + CGAERRBAR + STG.E.STRONG.SYS,
atom.release.sys.add = the same fence + ATOMG/REDG.E.ADD.STRONG.SYS, fence.acq_rel.sys = MEMBAR.ALL.SYS +
ERRBAR + CGAERRBAR + CCTL.IVALL. sm_100 (nvcc 13.0) lowers the kernels' acquires and releases the same way:
the same checks pass on its cubins unchanged.

It also counts, per kernel, 128-bit global/generic loads and stores (`LD[G].E.128`, `ST[G].E.128`) and
prints them; --wide names kernels whose row copies must use them (kernels/channel.cuh warp_copy_words:
16-byte vectors when both ends are aligned). The internode kernels copy 4-byte words (their 1024-thread
blocks cap registers at 64, and the vector path spills there), so they are not named.

Usage: check_sass.py OBJECT --header common/ptx.cuh [--require HELPER...] [--expect KERNEL_FRAGMENT...]
                     [--wide KERNEL_FRAGMENT...]
  --require: helpers that must appear in the object at least once (so the check cannot pass vacuously).
  --wide: kernels that must have at least one 128-bit load and one 128-bit store.
Exits 1 on any failure. Tools: cuobjdump and nvdisasm from the nvidia-cuda-cuobjdump /
nvidia-cuda-nvdisasm wheels (site-packages/nvidia/*/bin), else from PATH.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

HELPER_MACRO = re.compile(r"^EPCOMM_PTX_(?:LOAD|STORE|FENCE)\((\w+),")
HELPER_FUNCTION = re.compile(r"^(?:\[\[\w+\]\] )?EPCOMM_DEVICE .*?\b(\w+)\(")
KERNEL = re.compile(r"^\s*\.section\s+\.text\.(\S+?),")
LINE_INFO = re.compile(r'//## File "([^"]+)", line (\d+)')
INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")

ACQUIRE_HELPERS = {"ld_acquire_sys_global"}
RELEASE_HELPERS = {"st_release_sys_global", "atomic_add_release_sys_global"}
FENCE_HELPERS = {"fence_acq_rel_sys"}
SYSTEM_FENCE = re.compile(r"^MEMBAR\.(ALL|SC)\.SYS$")


def is_global_access(op):
    """A load, store or atomic on global or generic memory (not shared, local or constant)."""
    return re.match(r"^(LDG|STG|LD|ST|ATOMG|ATOM|REDG|RED)\.", op) is not None


def is_load(op):
    return op.startswith(("LDG.", "LD."))


def is_write(op):
    return is_global_access(op) and not is_load(op)


def find_tool(name):
    """The wheel's binary (site-packages/nvidia/<pkg>/bin/NAME) of the running Python, else PATH."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
        for root in nvidia.__path__:
            for path in sorted(glob.glob(os.path.join(root, "*", "bin", name))):
                if os.access(path, os.X_OK):
                    return path
    except ImportError:
        pass
    path = shutil.which(name)
    if not path:
        sys.exit(f"[FAIL] {name} not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm "
                 f"(requirements-dev.txt) into the Python running {sys.argv[0]} ({sys.executable})")
    return path


def helper_lines(header):
    """{line number: helper name} for every line of common/ptx.cuh that belongs to a helper."""
    lines, current = {}, None
    with open(header) as source:
        for number, text in enumerate(source, 1):
            if match := HELPER_MACRO.match(text):
                lines[number] = match.group(1)
                continue
            if match := HELPER_FUNCTION.match(text):
                current = match.group(1)
            if current:
                lines[number] = current
            if text.startswith("}"):
                current = None
    return lines


def disassemble(obj):
    """(nvdisasm -gi text of every cubin in OBJ, their targets: "sm_90", ... from cuobjdump's file names)."""
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([find_tool("cuobjdump"), "-xelf", "all", os.path.abspath(obj)], cwd=scratch, check=True,
                       stdout=subprocess.DEVNULL)
        cubins = sorted(glob.glob(os.path.join(scratch, "*.cubin")))
        if not cubins:
            sys.exit(f"[FAIL] {obj}: no cubin inside")
        nvdisasm = find_tool("nvdisasm")
        targets = sorted({match.group(0) for cubin in cubins if (match := re.search(r"sm_\d+a?", cubin))})
        return "\n".join(subprocess.run([nvdisasm, "-c", "-gi", cubin], check=True, capture_output=True,
                                        text=True).stdout for cubin in cubins), targets


def parse(text, header, lines):
    """{kernel: [(opcode, helper or None), ...]} in program order."""
    header = os.path.realpath(header)
    kernels, current, helper, pending_frame = {}, None, None, True
    for line in text.splitlines():
        if match := KERNEL.match(line):
            current, helper, pending_frame = match.group(1), None, True
            kernels[current] = []
        elif match := LINE_INFO.search(line):
            # The first `//##` line of a group is the innermost frame; the rest are its callers.
            if pending_frame:
                same = os.path.realpath(os.path.normpath(match.group(1))) == header
                helper = lines.get(int(match.group(2))) if same else None
                pending_frame = False
        elif current and (match := INSTRUCTION.match(line)):
            kernels[current].append((match.group(1), helper))
            pending_frame = True
    return kernels


def check_kernel(instructions):
    """(failures, counts) for one kernel's instruction list."""
    failures = []
    counts = dict(acquire=0, release=0, wide_loads=0, wide_stores=0)
    last_fence, write_since_fence = None, False
    for index, (op, helper) in enumerate(instructions):
        if helper in ACQUIRE_HELPERS and is_load(op):
            counts["acquire"] += 1
            if ".STRONG.SYS" not in op:
                failures.append(f"{helper}: {op} is not a strong system-scope load")
            following = next((next_op for next_op, _ in instructions[index + 1:]
                              if next_op == "CCTL.IVALL" or is_global_access(next_op)), None)
            if following != "CCTL.IVALL":
                failures.append(f"{helper}: {op} is not followed by CCTL.IVALL (next access: {following}): "
                                "a relaxed load, not an acquire")
        if helper in RELEASE_HELPERS and is_write(op):
            counts["release"] += 1
            if ".STRONG.SYS" not in op:
                failures.append(f"{helper}: {op} is not a strong system-scope write")
            if not (last_fence and SYSTEM_FENCE.match(last_fence)):
                failures.append(f"{helper}: {op} has no MEMBAR.ALL.SYS before it (last fence: {last_fence})")
            elif write_since_fence:
                failures.append(f"{helper}: {op} has a memory write between it and its MEMBAR.ALL.SYS")
        if helper in FENCE_HELPERS and op.startswith("MEMBAR.") and not SYSTEM_FENCE.match(op):
            failures.append(f"{helper}: {op} is not a system-scope fence")
        if op.startswith("MEMBAR."):
            last_fence, write_since_fence = op, False
        elif is_write(op):
            write_since_fence = True
        if is_global_access(op) and ".CONSTANT" in op:
            failures.append(f"non-coherent load {op} (from {helper or 'kernel code'})")
        if op.startswith(("LDL", "STL")):
            failures.append(f"local-memory access {op} (a spill or a stack frame)")
        if is_global_access(op) and ".128" in op:
            counts["wide_loads" if is_load(op) else "wide_stores"] += 1
    return failures, counts


def main(argv):
    parser = argparse.ArgumentParser(description="SASS check of the communication kernels (see the docstring).")
    parser.add_argument("object")
    parser.add_argument("--header", required=True, help="common/ptx.cuh, the helpers' source")
    parser.add_argument("--require", nargs="*", default=[], help="helpers that must appear at least once")
    parser.add_argument("--expect", nargs="*", default=[], help="kernel name fragments that must be present")
    parser.add_argument("--wide", nargs="*", default=[], help="kernels whose copies must use 128-bit loads/stores")
    args = parser.parse_args(argv[1:])
    obj, header = args.object, args.header
    lines = helper_lines(header)
    sass, targets = disassemble(obj)
    kernels = parse(sass, header, lines)
    failures, seen = [], set()
    if not any(helper for instructions in kernels.values() for _, helper in instructions):
        failures.append(f"{obj}: no instruction attributed to {header}: was it compiled with -lineinfo?")
    for name, instructions in kernels.items():
        seen.update(helper for _, helper in instructions if helper)
        kernel_failures, counts = check_kernel(instructions)
        short = re.sub(r"^_ZN6epcomm7kernels\d+", "", name)
        print(f"       {short[:56]:56s} {len(instructions):5d} instr, acquire {counts['acquire']:3d}, "
              f"release {counts['release']:3d}, 128-bit ld/st {counts['wide_loads']}/{counts['wide_stores']}")
        failures += [f"{short[:56]}: {failure}" + (f" ({times} times)" if times > 1 else "")
                     for failure, times in Counter(kernel_failures).items()]
        if any(fragment in name for fragment in args.wide) and not (counts["wide_loads"] and counts["wide_stores"]):
            failures.append(f"{short[:56]}: no 128-bit load or store: its row copies are not vectorized")
    for helper in args.require:
        if helper not in seen:
            failures.append(f"{obj}: no instruction from {helper} (expected at least one)")
    for fragment in args.expect:
        if not any(fragment in name for name in kernels):
            failures.append(f"kernel {fragment} missing from {obj}")
    for failure in failures:
        print("[FAIL]", failure)
    if not failures:
        print(f"[ OK ] SASS ({', '.join(targets)}) of {os.path.basename(obj)}: {len(kernels)} kernels; acquires are strong "
              "sys loads + CCTL.IVALL, releases MEMBAR.ALL.SYS + strong sys writes, no .CONSTANT loads, no spills")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
