"""Compile minipt's Triton kernels for an NVIDIA GPU on a machine without one, and report
what each compiled kernel uses: one JSON object per kernel and variant on stdout.

    python tests/compile_kernels.py ARCH < variants.json

ARCH is a compute capability written as an integer (80, 86, 89, 90); stdin holds a
JSON list of variants, each naming its op and shape (see ``run_variant``).
test_compile_gate.py runs this script in a subprocess: the test process interprets
the kernels (TRITON_INTERPRET=1), and Triton reads that when it decorates them.

The kernels are reached through the public ops on CPU tensors, so each launch gets
the arguments, constexprs and options its launcher computes, and Triton's own binder
specialises them as a launch on the GPU would (pointer types, 16-byte alignment,
integers divisible by 16 or equal to 1). Three stand-ins make that possible without
a GPU: an active Triton driver that names the target instead of asking a device;
``JITFunction.run`` compiling (Triton's warmup) where it would launch; and
``resolve_backend`` letting CPU tensors through to the Triton launchers, as it does
under the interpreter (the launchers themselves still see no interpreter).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

assert "TRITON_INTERPRET" not in os.environ, "run without TRITON_INTERPRET: interpreted kernels do not compile"

import torch
import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

import minipt.ops._backend as backend_module
from minipt.ops import attention, cross_entropy, linear_cross_entropy, mlm_mask
from minipt.ops.attention import triton as attention_triton

ARCH = int(sys.argv[1])
CUOBJDUMP = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")


class TargetDriver:
    """The part of Triton's active driver that compiling reads: the current device and its target."""

    def get_current_device(self):
        return ARCH  # one binder cache per target

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)


driver.set_active(TargetDriver())
backend_module.triton_interpreting = lambda: True
attention_triton._device_capability = lambda device_index: divmod(ARCH, 10)

_launch = JITFunction.run
compiled_in_variant: list = []


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    kernel = _launch(self, *args, grid=grid, warmup=True, **kwargs)
    names = [p.name for p in self.params]
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    constexprs = {p.name: str(bound[p.name]) for p in self.params if p.is_constexpr and p.name in bound}
    compiled_in_variant.append((self.fn.__name__, constexprs, kernel))
    return kernel


JITFunction.run = _compile_instead_of_launch

_resources: dict[int, dict] = {}


def resources(kernel) -> dict:
    """Registers, stack (spilled registers live there), shared memory and tensor-core instructions."""
    key = id(kernel)
    if key not in _resources:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            dump = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", dump))
        ptx = kernel.asm["ptx"]
        _resources[key] = {
            "registers": int(usage["REG"]),
            "stack": int(usage["STACK"]),
            "local": int(usage["LOCAL"]),
            "shared": kernel.metadata.shared,
            "num_warps": kernel.metadata.num_warps,
            "num_stages": kernel.metadata.num_stages,
            "wgmma": "wgmma.mma_async" in ptx,
            "mma": "mma.sync" in ptx,
        }
    return _resources[key]


def run_variant(v: dict) -> None:
    """Forward and backward of one op at one shape, on CPU tensors; every launch compiles instead."""
    dtype = getattr(torch, v.get("dtype", "float32"))
    if v["op"] == "attention":
        B, H, T, D = v["shape"]
        q, k, v_ = (torch.randn(B, H, T, D).to(dtype).requires_grad_() for _ in range(3))
        mask = torch.arange(T)[None, :] < torch.tensor([T, T // 2 + 1][:B])[:, None] if v["mask"] else None
        ids = torch.arange(T).div(100, rounding_mode="floor").expand(B, T) if v.get("docs") else None
        window = tuple(v["window"]) if v.get("window") else None
        out = attention(q, k, v_, is_causal=v["causal"], attention_mask=mask, document_ids=ids, window_size=window,
                        backend="triton")
        out.backward(torch.randn(out.shape, dtype=dtype))
    elif v["op"] in ("cross_entropy", "linear_cross_entropy"):
        N, V = v["shape"]
        target = torch.randint(0, V, (N,))
        options = {k: v[k] for k in ("softcap", "z_loss") if k in v}  # each sets its kernel flag
        if v["op"] == "cross_entropy":
            logits = torch.randn(N, V).to(dtype).requires_grad_()
            cross_entropy(logits, target, label_smoothing=0.1, backend="triton", **options).backward()
        else:
            hidden = torch.randn(N, 64).to(dtype).requires_grad_()
            weight = torch.randn(V, 64).to(dtype).requires_grad_()
            linear_cross_entropy(hidden, weight, target, backend="triton", **options).backward()
    elif v["op"] == "mlm_mask":
        ids = torch.randint(5, 1000, v["shape"], dtype=dtype)
        special = torch.rand(v["shape"]) < 0.1 if v["special"] else None
        mlm_mask(ids, mask_token_id=4, vocab_size=1000, special_tokens_mask=special, backend="triton")
    else:
        raise ValueError(f"unknown op in variant {v}")


def main() -> None:
    for variant in json.load(sys.stdin):
        compiled_in_variant.clear()
        run_variant(variant)
        for name, constexprs, kernel in compiled_in_variant:
            row = {"arch": ARCH, "triton": triton.__version__, "variant": variant, "kernel": name,
                   "constexprs": constexprs, **resources(kernel)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
