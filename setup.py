from setuptools import Extension, setup

setup(
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    # The receive path's decoder builds Python objects, which cffi cannot:
    # the one module written against the CPython API (see its header comment).
    ext_modules=[
        Extension(
            "shmbus._decode",
            sources=["csrc/shmbus_pydecode.c"],
            include_dirs=["csrc"],
            depends=["csrc/shmbus_frame.h"],
            extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
        )
    ],
)
