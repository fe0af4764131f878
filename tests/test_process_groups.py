"""Process groups on CPU/gloo: megatron-core layouts, tensor-parallel layers, layout validation, CPU compat."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from parallel.process_groups import LayoutError, compute_layout
from tests.harness import run_ranks


def _pcfg(**kw):
    base = dict(tp=1, pp=1, vpp=1, ep=1, etp=1, sp=1, pp_layer_split=[], backend="gloo", timeout_minutes=5)
    base.update(kw)
    return SimpleNamespace(**base)


def _layouts_worker(rank, world):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from parallel.process_groups import init_distributed

    out = {}
    for name, kw in {"tp2pp2": dict(tp=2, pp=2), "ep2dp2": dict(ep=2), "tp2ep2": dict(tp=2, ep=2)}.items():
        layout = init_distributed(_pcfg(**kw))
        out[name] = dict(
            dp=layout.dp,
            tp=dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
            pp=dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
            dpg=dist.get_process_group_ranks(ps.get_data_parallel_group()),
            ep=dist.get_process_group_ranks(ps.get_expert_model_parallel_group()),
            edp=dist.get_process_group_ranks(ps.get_expert_data_parallel_group()),
        )
        # the group must actually communicate: sum of ranks over the TP group
        import torch

        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
        out[name]["tp_sum"] = t.item()
        ps.destroy_model_parallel()
    return out


@pytest.mark.slow
def test_megatron_layouts_on_four_ranks():
    res = run_ranks(_layouts_worker, 4, timeout=240)
    # megatron order tp-cp-ep-dp-pp: TP groups are consecutive ranks, PP groups strided
    r0, r3 = res[0], res[3]
    assert r0["tp2pp2"]["tp"] == [0, 1] and r3["tp2pp2"]["tp"] == [2, 3]
    assert r0["tp2pp2"]["pp"] == [0, 2] and r3["tp2pp2"]["pp"] == [1, 3]
    assert r0["tp2pp2"]["dp"] == 1 and r0["tp2pp2"]["tp_sum"] == 1.0
    assert r0["ep2dp2"]["dp"] == 4 and r0["ep2dp2"]["dpg"] == [0, 1, 2, 3]
    assert r0["ep2dp2"]["ep"] == [0, 1] and r3["ep2dp2"]["ep"] == [2, 3]
    assert r0["ep2dp2"]["edp"] == [0, 2]
    assert r0["tp2ep2"]["tp"] == [0, 1] and r0["tp2ep2"]["dp"] == 2
    assert r0["tp2ep2"]["ep"] == [0, 1] and r0["tp2ep2"]["edp"] == [0, 2]


def _tp_linear_worker(rank, world, seed):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from parallel.process_groups import init_distributed

    init_distributed(_pcfg(tp=2))
    g = torch.Generator().manual_seed(seed)
    d_in, d_hid, d_out, n = 12, 16, 10, 5
    w1 = torch.randn(d_hid, d_in, generator=g)
    w2 = torch.randn(d_out, d_hid, generator=g)
    x = torch.randn(n, d_in, generator=g)
    gy = torch.randn(n, d_out, generator=g)
    cfg = ModelParallelConfig(
        tensor_model_parallel_size=2,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )
    col = ColumnParallelLinear(
        d_in, d_hid, config=cfg, init_method=torch.nn.init.zeros_, bias=False, gather_output=False, skip_bias_add=True
    )
    row = RowParallelLinear(
        d_hid,
        d_out,
        config=cfg,
        init_method=torch.nn.init.zeros_,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=True,
    )
    tp_rank = ps.get_tensor_model_parallel_rank()
    h = d_hid // 2
    with torch.no_grad():
        col.weight.copy_(w1[tp_rank * h : (tp_rank + 1) * h])
        row.weight.copy_(w2[:, tp_rank * h : (tp_rank + 1) * h])
    xp = x.clone().requires_grad_(True)
    y = row(torch.nn.functional.gelu(col(xp)[0]))[0]
    (y * gy).sum().backward()
    return dict(y=y.detach(), dx=xp.grad, dw1=col.weight.grad, dw2=row.weight.grad, tp_rank=tp_rank)


@pytest.mark.slow
def test_column_row_parallel_linear_equal_nn_linear():
    import torch

    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs every run
    res = run_ranks(_tp_linear_worker, 2, seed, timeout=180)
    g = torch.Generator().manual_seed(seed)
    d_in, d_hid, d_out, n = 12, 16, 10, 5
    w1 = torch.randn(d_hid, d_in, generator=g).requires_grad_(True)
    w2 = torch.randn(d_out, d_hid, generator=g).requires_grad_(True)
    x = torch.randn(n, d_in, generator=g).requires_grad_(True)
    gy = torch.randn(n, d_out, generator=g)
    y = torch.nn.functional.gelu(x @ w1.T) @ w2.T
    (y * gy).sum().backward()
    # fp32; the TP path sums the two halves of the hidden dim in a different order (all-reduce):
    # differences are rounding-level, ~1e-6 relative on O(1)-O(10) values; 1e-5 leaves margin.
    h = d_hid // 2
    for r in res:
        k = r["tp_rank"]
        torch.testing.assert_close(r["y"], y.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["dx"], x.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["dw1"], w1.grad[k * h : (k + 1) * h], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["dw2"], w2.grad[:, k * h : (k + 1) * h], rtol=1e-5, atol=1e-5)


def test_layout_validation_messages():
    model = SimpleNamespace(num_heads=4, o_groups=2, n_routed_experts=8, vocab_size=4096, num_layers=4)
    assert compute_layout(8, tp=2, pp=2, model=model).dp == 2
    with pytest.raises(LayoutError, match=r"world size 6 is not divisible by tp\*pp\*sp = 2\*2\*1 = 4"):
        compute_layout(6, tp=2, pp=2)
    with pytest.raises(LayoutError, match=r"model.num_heads=4 is not divisible by parallel.tp=8"):
        compute_layout(8, tp=8, model=model)
    with pytest.raises(LayoutError, match=r"n_routed_experts=8 is not divisible by parallel.ep=3"):
        compute_layout(3, ep=3, model=model)
    with pytest.raises(LayoutError, match=r"num_layers=4 is not divisible by pp\*vpp = 3"):
        compute_layout(3, pp=3, model=model)
    with pytest.raises(LayoutError, match=r"pp_layer_split \[1, 2\] sums to 3"):
        compute_layout(2, pp=2, model=model, pp_layer_split=[1, 2])
    with pytest.raises(LayoutError, match=r"vocab_size=4095 is not divisible by parallel.tp=2"):
        compute_layout(2, tp=2, model=SimpleNamespace(**{**vars(model), "vocab_size": 4095}))
    with pytest.raises(LayoutError, match=r"vpp=2 needs pipeline parallelism"):
        compute_layout(2, vpp=2)


def test_cpu_compat_is_inert_when_cuda_present():
    code = textwrap.dedent("""
        import torch
        from unittest import mock
        orig = (torch.cuda.current_device, torch.Tensor.type, torch.Tensor.cuda, torch.cuda.Stream)
        with mock.patch.object(torch.cuda, "is_available", return_value=True):
            from parallel import cpu_compat
            applied = cpu_compat.apply()
        assert applied is False, applied
        assert (torch.cuda.current_device, torch.Tensor.type, torch.Tensor.cuda, torch.cuda.Stream) == orig
        assert set(cpu_compat.PATCHES) <= {"typing.override"}, cpu_compat.PATCHES
        print("INERT")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "INERT" in out.stdout, out.stderr


def test_cpu_compat_patches_megatron_sites():
    code = textwrap.dedent("""
        import torch
        from parallel import cpu_compat
        assert cpu_compat.apply() is True
        assert torch.cuda.current_device() == torch.device("cpu")
        t = torch.zeros(2, device="cuda")             # hard-coded cuda device in megatron schedules
        assert t.device.type == "cpu"
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"   # clip_grads / distrib optimizer asserts
        assert torch.ones(1).type(torch.float64).dtype == torch.float64
        s = torch.get_rng_state(); a = torch.cuda.get_rng_state(); torch.cuda.set_rng_state(a)
        from megatron.core.tensor_parallel import random as r
        tracker = r.get_cuda_rng_tracker()           # dropout/recompute need the CUDA RNG tracker
        tracker.add("compat-test", 123)
        with tracker.fork("compat-test"):
            torch.rand(1)
        print("PATCHED", len(cpu_compat.PATCHES))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert "PATCHED" in out.stdout, out.stderr[-3000:]
