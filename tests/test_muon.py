"""Single-process Muon and Newton-Schulz: against a from-scratch float64 reimplementation of
docs/MODEL.md §12.2 written here (not imported from the library).

Tolerances: float64 paths are compared at rtol 1e-10 -- the library and the reference evaluate the same
polynomials in a different association order (baddbmm vs explicit products), which in float64 differs
by ~1e-15 per operation, amplified at most ~1e3x over 10 NS iterations (measured: < 1e-13).
"""

from __future__ import annotations

import math

import pytest
import torch

from ops import dispatch
from ops.newton_schulz import V4_NS_STEPS, newton_schulz, newton_schulz_gram
from parallel.muon import Muon
from parallel.optimizer_groups import OPTIMIZER_ROUTES, Route, build_optimizers, split_params

SCHEDULE = [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2


def ref_ns(M: torch.Tensor) -> torch.Tensor:
    """Hybrid NS exactly as written in the spec, float64, one matrix."""
    M = M.double()
    tall = M.shape[0] > M.shape[1]
    X = M.T if tall else M
    X = X / torch.linalg.matrix_norm(X)
    for a, b, c in SCHEDULE:
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ A @ X)
    return X.T if tall else X


def ref_step(W, M, G, lr, mu, wd, gamma, nesterov):
    M = mu * M + G
    U = mu * M + G if nesterov else M
    O = ref_ns(U) * math.sqrt(max(W.shape)) * gamma
    return W * (1 - lr * wd) - lr * O, M


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SHAPES = [(24, 24), (16, 40), (40, 16), (8, 64), (33, 17)]


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_reference_float64(nesterov):
    gen = torch.Generator().manual_seed(1)
    W0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(3)]
    params = [torch.nn.Parameter(w.clone()) for w in W0]
    opt = Muon(
        params, lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=0.1, update_rms=0.18, fp32_newton_schulz=True
    )
    ref_w = [w.clone() for w in W0]
    ref_m = [torch.zeros_like(w) for w in W0]
    for step in range(3):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
        for i in range(len(SHAPES)):
            ref_w[i], ref_m[i] = ref_step(ref_w[i], ref_m[i], grads[step][i], 0.02, 0.9, 0.1, 0.18, nesterov)
    for p, r in zip(params, ref_w):
        assert rel(p.detach(), r) < 1e-10
    # the update moved every parameter by about lr * gamma * sqrt(max) per step (RMS 0.18 * lr)
    for p, w in zip(params, W0):
        assert (p.detach() - w).abs().max() > 1e-3


def test_muon_update_rms_is_gamma():
    """The scaled NS output has RMS ~= gamma (singular values ~1, s of them, times sqrt(max)/sqrt(n m))."""
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(64, 256, generator=gen))
    w0 = p.detach().clone()
    opt = Muon([p], lr=1.0, weight_decay=0.0, fp32_newton_schulz=True)
    p.grad = torch.randn(64, 256, generator=gen)
    opt.step()
    rms = (w0 - p.detach()).pow(2).mean().sqrt().item()
    assert abs(rms - 0.18) < 0.18 * 2e-3  # NS singular values are 1 +- 6e-4 (measured), so RMS within 0.2%


def test_ns_variants_agree_and_approximate_polar():
    gen = torch.Generator().manual_seed(3)
    for shape in [(32, 32), (24, 80), (80, 24), (3, 20, 48)]:
        G = torch.randn(shape, generator=gen, dtype=torch.float64)
        plain, gram = newton_schulz(G, V4_NS_STEPS, True), newton_schulz_gram(G, V4_NS_STEPS, True)
        ref = torch.stack([ref_ns(g) for g in G]) if G.dim() == 3 else ref_ns(G)
        assert rel(plain, ref) < 1e-10  # see module doc
        assert rel(gram, ref) < 1e-10  # same polynomial, different association
        # float32: plain and Gram-with-restarts vs float64 (measured <= 1.3e-6 and <= 6e-6 at these sizes)
        assert rel(newton_schulz(G.float(), V4_NS_STEPS, True), ref) < 1e-5
        assert rel(newton_schulz_gram(G.float(), V4_NS_STEPS, True), ref) < 3e-5
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        # 10 hybrid steps leave singular values in [1, 1.0006] for Gaussian inputs (measured): polar error < 1e-3
        assert rel(plain, U @ Vh) < 1e-3
    assert dispatch.get("newton_schulz") is newton_schulz
    assert dispatch.get("newton_schulz_gram") is newton_schulz_gram


def test_ns_batched_equals_loop_and_bf16_close():
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(5, 16, 48, generator=gen)
    batched = newton_schulz(G, V4_NS_STEPS, True)
    loop = torch.stack([newton_schulz(g, V4_NS_STEPS, True) for g in G])
    assert rel(batched, loop) < 1e-6  # fp32, bmm vs per-matrix mm: summation order only
    bf = newton_schulz(G, V4_NS_STEPS, False)
    assert bf.dtype == G.dtype
    assert rel(bf, batched) < 5e-2  # bf16 matmuls (8-bit mantissa, 2^-8 = 4e-3 per op, 10 iterations)


def test_ns_gram_restart_needed_for_square_fp32():
    """Without restarts float32 Gram-form NS loses the small singular directions of square matrices
    (documented in ops.newton_schulz); the default restarts fix it. Guards the default."""
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(128, 128, generator=gen, dtype=torch.float64)
    ref = ref_ns(G)
    no_restart = rel(newton_schulz_gram(G.float(), V4_NS_STEPS, True, restarts=()), ref)
    default = rel(newton_schulz_gram(G.float(), V4_NS_STEPS, True), ref)
    assert default < 3e-5 and no_restart > 10 * default


def test_v4_blocks_orthogonalised_separately():
    gen = torch.Generator().manual_seed(6)
    I, d = 12, 20
    W0 = torch.randn(2 * I, d, generator=gen, dtype=torch.float64)
    G = torch.randn(2 * I, d, generator=gen, dtype=torch.float64)
    fused = torch.nn.Parameter(W0.clone())
    fused.v4_blocks = [I, I]
    merged = torch.nn.Parameter(W0.clone())
    opt = Muon([fused, merged], lr=0.05, fp32_newton_schulz=True)
    fused.grad, merged.grad = G.clone(), G.clone()
    opt.step()
    zero = torch.zeros(I, d, dtype=torch.float64)
    top, _ = ref_step(W0[:I], zero, G[:I], 0.05, 0.95, 0.1, 0.18, True)
    bot, _ = ref_step(W0[I:], zero, G[I:], 0.05, 0.95, 0.1, 0.18, True)
    whole, _ = ref_step(W0, torch.zeros_like(W0), G, 0.05, 0.95, 0.1, 0.18, True)
    assert rel(fused.detach(), torch.cat([top, bot])) < 1e-10
    assert rel(merged.detach(), whole) < 1e-10
    # merging the blocks is a different update: this test would fail if v4_blocks were ignored
    assert rel(torch.cat([top, bot]), whole) > 1e-3


def test_expert_stack_is_per_expert_and_blocks_apply_per_expert():
    gen = torch.Generator().manual_seed(7)
    E, out, inp = 4, 16, 10
    W0 = torch.randn(E, out, inp, generator=gen, dtype=torch.float64)
    grads = [torch.randn(E, out, inp, generator=gen, dtype=torch.float64) for _ in range(3)]
    p = torch.nn.Parameter(W0.clone())
    p.v4_expert = True
    p.v4_blocks = [8, 8]
    opt = Muon([p], lr=0.03, fp32_newton_schulz=True)
    ref = [[W0[e, :8].clone(), W0[e, 8:].clone()] for e in range(E)]
    mom = [[torch.zeros(8, inp, dtype=torch.float64) for _ in range(2)] for _ in range(E)]
    for g in grads:
        p.grad = g.clone()
        opt.step()
        for e in range(E):
            for j in range(2):
                ref[e][j], mom[e][j] = ref_step(
                    ref[e][j], mom[e][j], g[e, 8 * j : 8 * j + 8], 0.03, 0.95, 0.1, 0.18, True
                )
    want = torch.stack([torch.cat(r) for r in ref])
    assert rel(p.detach(), want) < 1e-10
    assert opt.plans["expert"].summary()["units"] == E * 2


def test_state_dict_round_trip_and_lr_change():
    gen = torch.Generator().manual_seed(8)
    shapes = [(12, 20), (20, 12)]
    W0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]

    def make(ws):
        ps = [torch.nn.Parameter(w.clone()) for w in ws]
        return ps, Muon(list(zip(["a.weight", "b.weight"], ps)), lr=0.01, fp32_newton_schulz=True)

    ps, opt = make(W0)
    for k in range(3):
        if k == 2:
            opt.param_groups[0]["lr"] = 0.005  # what an LR scheduler does
        for p, g in zip(ps, grads[k]):
            p.grad = g.clone()
        opt.step()
    ps2, opt2 = make(W0)
    for p, g in zip(ps2, grads[0]):
        p.grad = g.clone()
    opt2.step()
    for p, g in zip(ps2, grads[1]):
        p.grad = g.clone()
    opt2.step()
    sd = opt2.state_dict()
    assert set(sd["state"]) == {"a.weight", "b.weight"}
    ps3 = [torch.nn.Parameter(p.detach().clone()) for p in ps2]
    opt3 = Muon(list(zip(["a.weight", "b.weight"], ps3)), lr=0.01, fp32_newton_schulz=True)
    opt3.load_state_dict(sd)
    opt3.param_groups[0]["lr"] = 0.005
    for p, g in zip(ps3, grads[2]):
        p.grad = g.clone()
    opt3.step()
    for a, b in zip(ps, ps3):
        assert torch.equal(a.detach(), b.detach())  # same ops on the same values: bit-identical


def test_param_without_grad_is_untouched():
    gen = torch.Generator().manual_seed(9)
    a = torch.nn.Parameter(torch.randn(8, 12, generator=gen))
    b = torch.nn.Parameter(torch.randn(8, 12, generator=gen))
    b0 = b.detach().clone()
    opt = Muon([a, b], lr=0.1)
    a.grad = torch.randn(8, 12, generator=gen)
    opt.step()
    assert torch.equal(b.detach(), b0)


def test_split_and_build_optimizers():
    class Cfg:
        muon_momentum, muon_nesterov, muon_update_rms = 0.95, True, 0.18
        muon_ns_steps = [[8, 3.4445, -4.7750, 2.0315], [2, 2.0, -1.5, 0.5]]
        muon_tp_mode, weight_decay, adam_beta1, adam_beta2, adam_eps = "auto", 0.1, 0.9, 0.95, 1e-20
        fp32_newton_schulz = True

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 8)
            self.proj = torch.nn.Linear(8, 8, bias=True)
            self.norm = torch.nn.RMSNorm(8)
            self.head = torch.nn.Linear(8, 10, bias=False)
            self.sink = torch.nn.Parameter(torch.randn(4))
            self.fn = torch.nn.Parameter(torch.randn(6, 8))  # routed by the custom table below
            self.experts = torch.nn.Parameter(torch.randn(3, 8, 8))

    m = M()
    routes = (Route(r"^fn$", "adamw", "a table row wins over the shape rule"), *OPTIMIZER_ROUTES)
    mu, ad = split_params(m, routes)
    assert {n for n, _ in mu} == {"proj.weight", "experts"}
    assert {n for n, _ in ad} == {"embed.weight", "proj.bias", "norm.weight", "head.weight", "sink", "fn"}
    assert {n for n, _ in split_params(m)[0]} == {"proj.weight", "experts", "fn"}  # default table: shape rule
    muon, adamw = build_optimizers(m, Cfg(), lr=1e-3, routes=routes)
    assert muon.param_groups[0]["momentum"] == 0.95 and muon.param_groups[0]["update_rms"] == 0.18
    assert adamw.param_groups[0]["eps"] == 1e-20 and adamw.param_groups[0]["betas"] == (0.9, 0.95)
    x = torch.randint(0, 10, (4,))
    m.head(m.norm(m.proj(m.embed(x)) + m.fn.sum() + m.experts.sum() + m.sink.sum())).sum().backward()
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    muon.step()
    adamw.step()
    assert all(not torch.equal(w0[n], p.detach()) for n, p in m.named_parameters())
    with pytest.raises(ValueError, match="sgd"):
        Route(r"^bad$", "sgd", "not an optimizer")


def _info(name, shape, pdim=None, blocks=None):
    from parallel.muon_sharding import ParamInfo

    return ParamInfo(name, tuple(shape), pdim is not None, pdim, tuple(blocks or (shape[-2],)))


def test_plan_modes_cost_model_and_owner_balance():
    """Planner on hand-written TP-rank metadata (no processes): gram only where the sharded dim is the
    long one; auto follows the cost model; LPT owners balance equal experts exactly."""
    from parallel.muon_sharding import CostModel, plan

    T = 2
    infos = [
        [
            _info("long_cols", (512, 16384 // T), pdim=1),  # aspect 32, long dim sharded
            _info("square", (2048, 2048 // T), pdim=1),
            _info("short_rows", (256 // T, 4096), pdim=0),  # short dim sharded: gram impossible
            _info("fused", (2 * 64, 32), pdim=0, blocks=[64, 64]),
        ]
        for _ in range(T)
    ]
    auto = {u.full_shape: u.mode for u in plan(infos, dp=1, tp_mode="auto", cost=CostModel()).units}
    # gather moves n*m, plain-NS gram moves 10 s^2: the crossover is near aspect 10
    assert auto[(512, 16384)] == "gram" and auto[(2048, 2048)] == "gather"
    assert auto[(256, 4096)] == "gather"
    forced = plan(infos, dp=1, tp_mode="gram").units
    assert [u.mode for u in forced] == ["gram", "gram", "gather", "gram", "gram"]
    assert {u.full_shape for u in forced if u.pidx == 3} == {(128, 32)}  # two full blocks of [64*T, 32]
    # 16 equal experts over dp 4 x tp 2 workers: 2 each, zero estimated imbalance
    experts = [[_info("e", (16, 64, 32))] for _ in range(T)]
    pl = plan(experts, dp=4, tp_mode="auto")
    owners = [(u.owner_dp, u.owner_tp) for u in pl.units]
    assert all(owners.count(o) == 2 for o in set(owners)) and len(set(owners)) == 8
    assert pl.imbalance() == 0.0
    with pytest.raises(ValueError):
        plan(infos, dp=1, tp_mode="blockwise")


def test_checkpoint_keys_without_the_unit_format_are_refused():
    """A load whose recorded state keys carry no ``format`` (momentum in the parameters' layout, never released)
    fails with an error naming the format this code reads."""
    from parallel.muon import CKPT_FORMAT

    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = Muon([("w", p)], lr=1e-3)
    assert opt.checkpoint_state_keys()["__own__"]["format"] == CKPT_FORMAT
    with pytest.raises(ValueError, match=CKPT_FORMAT):
        opt.sharded_state_dict({}, keys={"__own__": {"kind": "own", "dtype": ""}})
