"""Maps a CUDA replica's export in another process (tests/gpu/test_cuda.py).

``python cuda_map.py KIND PAYLOAD NBYTES GRANULARITY GPU_UUID {read|write}``: KIND ``cuda_fd`` maps the fd PAYLOAD
read-only through the VMM driver calls on the GPU with that UUID; ``cuda_ipc`` opens the hex IPC handle PAYLOAD.
``read`` writes the NBYTES as hex to stdout; ``write`` stores to the mapping (a read-only one must fault, killing
the CUDA context: this process then fails) and writes ``wrote``.
"""

from __future__ import annotations

import sys

import cupy

from devrep.linux import cuda_vmm as v


def main(argv: list[str]) -> None:
    kind, payload, nbytes_arg, gran_arg, uuid, write = argv[:6]
    nbytes, gran = int(nbytes_arg), int(gran_arg)
    if kind == "cuda_fd":
        drv = v.CudaBindingsDriver()
        index = v.ordinal_for_uuid(drv, uuid)
        cupy.cuda.Device(index).use()
        m = v.map_readonly(drv, int(payload), nbytes, gran, index)
        ptr = m.ptr
    else:
        index = 0
        ptr = cupy.cuda.runtime.ipcOpenMemHandle(bytes.fromhex(payload))
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, None, device_id=index)
    arr = cupy.ndarray((nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))
    if write == "write":
        arr[:8] = 1  # a read-only mapping must fault (the context dies: this child reports it)
        cupy.cuda.runtime.deviceSynchronize()
        sys.stdout.write("wrote")
    else:
        sys.stdout.write(arr.get().tobytes().hex())


if __name__ == "__main__":
    main(sys.argv[1:])
