import os

# Triton kernels run in the interpreter on CPU-only machines. It is chosen when a kernel is
# decorated, so it must be set before anything imports fastdl.kernels.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
