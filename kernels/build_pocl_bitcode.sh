#!/bin/sh
# Prebuild devrep.cl as LLVM bitcode for PoCL's CPU device (kernels/pocl/devrep-<variant>.bc).
#
# Why: the PoCL 3.0 wheel (pocl-binary-distribution, LLVM 14) asks LLVM for the host CPU's name and passes it
# to its OpenCL C front end; on CPUs newer than LLVM 14 (e.g. AMD family 1Ah, our CI machines) the answer is
# "generic", which the front end rejects ("unknown target CPU 'generic'", pocl/pocl#1049), so no source
# program builds. PoCL does accept LLVM bitcode and compiles it with the back end, which knows "generic".
# devrep.backends._opencl uses these files only when building from source fails that way.
#
# Needs clang-14 and llvm-link-14 (same LLVM as the wheel; Debian: apt-get install clang-14 llvm-14) and the
# pocl-binary-distribution package (for PoCL's headers and kernel library). Rerun after editing devrep.cl;
# tests/test_kernels_build.py fails while the bitcode is older than the source.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-"$here/../.venv/bin/python"}
share=$("$python" -c 'import os, pocl_binary_distribution as p; print(os.path.join(os.path.dirname(p.__file__), ".libs", "share", "pocl"))')
mkdir -p "$here/pocl"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# variant (PoCL's kernel library name) : LLVM cpu with the same instruction set
for pair in sse2:x86-64 avx2:x86-64-v3 avx512:x86-64-v4; do
    variant=${pair%%:*}
    cpu=${pair##*:}
    clang-14 -cc1 -emit-llvm-bc -triple x86_64-unknown-linux-gnu -target-cpu "$cpu" -O2 -cl-std=CL1.2 \
        -cl-kernel-arg-info -fno-builtin -ffake-address-space-map -Wno-psabi -I "$share/include" \
        -include "$share/include/_kernel.h" -D__USE_CLANG_OPENCL_C_H -Dcl_khr_int64 -DPOCL_DEVICE_ADDRESS_BITS=64 \
        -D__ENDIAN_LITTLE__=1 -DPAGE_WORDS=512 -DDEVREP_BITCODE -x cl "$here/devrep.cl" -o "$tmp/devrep.bc"
    llvm-link-14 --only-needed "$tmp/devrep.bc" "$share/kernel-x86_64-unknown-linux-gnu-$variant.bc" \
        -o "$here/pocl/devrep-$variant.bc"
done
sha256sum "$here/devrep.cl" | cut -d' ' -f1 > "$here/pocl/SOURCE_SHA256"
ls -l "$here/pocl"
