"""cffi build script: compiles csrc/ into the private extension shmbus._native.

setuptools runs it through ``cffi_modules`` in setup.py; the declarations
cffi needs live in the C-syntax file shmbus_cdef.h, not in Python strings.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
# setuptools wants source paths relative to the project root.
CSRC = HERE.relative_to(Path.cwd()) if HERE.is_relative_to(Path.cwd()) else HERE

UNITS = [
    "shmbus_seg",
    "shmbus_ring",
    "shmbus_frame",
    "shmbus_table",
    "shmbus_stats",
    "shmbus_send",
    "shmbus_bridge",
    "shmbus_waiter",
]

ffibuilder = FFI()
ffibuilder.cdef((HERE / "shmbus_cdef.h").read_text())
ffibuilder.set_source(
    "shmbus._native",
    "".join(f'#include "{unit}.h"\n' for unit in UNITS),
    sources=[str(CSRC / f"{unit}.c") for unit in UNITS],
    include_dirs=[str(CSRC)],
    depends=[str(CSRC / f"{unit}.h") for unit in UNITS],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
    libraries=["rt", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
