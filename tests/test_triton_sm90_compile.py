"""Compile-only check of every Triton kernel for an sm_90 (H100/H200) target, on a machine without a GPU.

The CPU interpreter accepts code the compiler rejects (the first H200 run failed to compile the mHC
backward: a runtime ``if`` whose branches gave differently shaped values) and knows nothing of shared memory
(the D = 512 attention kernels needed 288 KB of the 227 KB). ``ops.triton.sm90check`` runs the real
launchers on CPU tensors and compiles each launch for sm_90 down to a cubin with Triton's bundled ptxas,
checking compile errors, shared memory ≤ 232448 bytes, grid limits and the attention smem estimate.
Runs in a subprocess (``TRITON_INTERPRET`` must be unset when the kernels are defined). Compiling is slow on
a small CPU (minutes on first run; Triton's cache makes reruns fast), so the full set is opt-in:
``V4_SM90_CHECK=full``; by default the V4-critical kernels (mHC, attention D = 512 bf16) are compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_ptxas() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _has_ptxas(), reason="triton without the bundled ptxas")
def test_kernels_compile_for_sm90():
    full = os.environ.get("V4_SM90_CHECK", "") == "full"
    names = [] if full else ["mhc torch.bfloat16", "attention D=512 torch.bfloat16"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, "-m", "ops.triton.sm90check", *names],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    print(p.stdout[-20000:])
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert "0 failing" in p.stdout
