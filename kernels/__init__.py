"""Triton kernels, installed as ``fastddim.kernels``. Import a kernel module only when it is used:
the TRITON_INTERPRET setting is read when its @triton.jit decorators run."""
