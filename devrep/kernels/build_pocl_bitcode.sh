#!/bin/sh
# Prebuild devrep.cl as LLVM bitcode for PoCL's CPU device (pocl/devrep-<variant>.bc beside this script).
#
# Why: the PoCL 3.0 wheel (pocl-binary-distribution, LLVM 14) asks LLVM for the host CPU's name and passes it
# to its OpenCL C front end; on CPUs newer than LLVM 14 (e.g. AMD family 1Ah, our CI machines) the answer is
# "generic", which the front end rejects ("unknown target CPU 'generic'", pocl/pocl#1049), so no source
# program builds. PoCL does accept LLVM bitcode and compiles it with the back end, which knows "generic".
# devrep.backends._opencl uses these files only when building from source fails that way.
#
# Needs clang-14 and llvm-link-14 (same LLVM as the wheel; Debian: apt-get install clang-14 llvm-14) and the
# pinned pocl-binary-distribution (for PoCL's headers and kernel library, which is linked in).
# pocl/STAMP records what the bitcode was built from: devrep.cl, this script (it holds every flag) and the PoCL
# version; the backend refuses bitcode whose stamp does not match, and tests/test_kernels_build.py rebuilds it
# byte for byte where clang-14 is installed. Rerun after editing devrep.cl or this script, and commit pocl/.
#
# Usage: build_pocl_bitcode.sh [OUTDIR]   (default: pocl/ beside this script)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/pocl"}
python=${PYTHON:-"$here/../../.venv/bin/python"}
share=$("$python" -c 'import os, pocl_binary_distribution as p; print(os.path.join(os.path.dirname(p.__file__), ".libs", "share", "pocl"))')
pocl=$("$python" -c 'import importlib.metadata as m; print(m.version("pocl-binary-distribution"))')
mkdir -p "$out"
out=$(cd "$out" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The bitcode records the source file name and the PoCL include paths it was compiled with: compile from
# copies at fixed relative paths so the output does not depend on where the checkout or the venv lives.
mkdir -p "$tmp/src/pocl"
cp "$here/devrep.cl" "$tmp/src/devrep.cl"
cp -r "$share/include" "$tmp/src/pocl/include"
cd "$tmp/src"
# variant (PoCL's kernel library name) : LLVM cpu with the same instruction set
for pair in sse2:x86-64 avx2:x86-64-v3 avx512:x86-64-v4; do
    variant=${pair%%:*}
    cpu=${pair##*:}
    clang-14 -cc1 -emit-llvm-bc -triple x86_64-unknown-linux-gnu -target-cpu "$cpu" -O2 -cl-std=CL1.2 \
        -cl-kernel-arg-info -fno-builtin -ffake-address-space-map -Wno-psabi -I pocl/include \
        -include pocl/include/_kernel.h -D__USE_CLANG_OPENCL_C_H -Dcl_khr_int64 -DPOCL_DEVICE_ADDRESS_BITS=64 \
        -D__ENDIAN_LITTLE__=1 -DPAGE_WORDS=512 -DDEVREP_BITCODE -x cl devrep.cl -o devrep.bc
    cp "$share/kernel-x86_64-unknown-linux-gnu-$variant.bc" "kernel-$variant.bc"
    llvm-link-14 --only-needed devrep.bc "kernel-$variant.bc" -o "$out/devrep-$variant.bc"
done
# The same three lines devrep.backends._kernels.bitcode_stamp() computes.
{
    echo "devrep.cl $(sha256sum "$here/devrep.cl" | cut -d' ' -f1)"
    echo "build_pocl_bitcode.sh $(sha256sum "$here/build_pocl_bitcode.sh" | cut -d' ' -f1)"
    echo "pocl-binary-distribution $pocl"
} > "$out/STAMP"
ls -l "$out"
