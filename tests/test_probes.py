"""Memory probes: byte-exact accounting, tracked == fake, MemTracker as an oracle, CUDA on a GPU.

Every expected number here is computed from shapes by hand (or by an independent tool),
never read back from the probe under test.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from multiopt.errors import UsageError
from multiopt.instrument.probes import (
    EAGER_UNDER_PROBE,
    CudaProbe,
    FakeProbe,
    Probe,
    TrackedProbe,
    Watch,
    make_probe,
    round_alloc,
)

from .support import mlp, needs_cuda

F32 = 4
SCALAR = 512  # a 0-dim float32 tensor: 4 bytes requested, one 512-byte block allocated


def ra(numel: int, itemsize: int = F32) -> int:
    """Allocated bytes of one storage of `numel` elements, computed independently."""
    nbytes = numel * itemsize
    return -(-nbytes // 512) * 512


# --------------------------------------------------------------------------- rounding


def test_round_alloc() -> None:
    assert [round_alloc(n) for n in (0, 1, 4, 511, 512, 513, 516, 1024, 1025)] == \
        [0, 512, 512, 512, 512, 1024, 1024, 1024, 1536]


@pytest.mark.parametrize("kind", ["tracked", "fake"])
def test_single_element_and_129_elements(kind: str) -> None:
    with make_probe(kind) as p:
        a = torch.zeros(1)
        assert (p.allocated(), p.requested()) == (512, 4)
        b = torch.ones(129)
        assert (p.allocated(), p.requested()) == (512 + 1024, 4 + 516)
        e = torch.empty(0)
        assert (p.allocated(), p.requested()) == (1536, 520), "a 0-byte storage counts 0"
        del a, b, e
        assert (p.allocated(), p.requested()) == (0, 0)


@pytest.mark.parametrize("kind", ["tracked", "fake"])
def test_views_and_inplace_share_storage(kind: str) -> None:
    with make_probe(kind) as p:
        t = torch.zeros(1000)
        base = p.allocated()
        assert base == 4096  # 4000 bytes -> 8 blocks
        views = [t.view(10, 100), t[3:], t.t() if t.dim() == 2 else t.unsqueeze(0), t.detach(),
                 t.reshape(100, 10), t.as_strided((10,), (2,)), *t.split(100)]
        t.add_(1).mul_(2)
        torch.relu_(t)
        assert p.allocated() == base, "views / in-place ops allocate nothing"
        del t
        assert p.allocated() == base, "a view keeps its storage alive"
        views.clear()
        assert p.allocated() == 0


def test_reshape_of_noncontiguous_copies_once() -> None:
    with make_probe("tracked") as p:
        t = torch.zeros(30, 40).t()  # transposed: reshape must copy (clone + _unsafe_view)
        before = p.allocated()
        r = t.reshape(-1)
        assert p.allocated() - before == ra(1200)
        assert r.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_free_subtracts_and_peak_resets() -> None:
    with make_probe("tracked") as p:
        a = torch.zeros(1024)  # 4096
        b = torch.zeros(2048)  # 8192
        assert p.peak() == 12288
        del b
        assert p.allocated() == 4096 and p.peak() == 12288
        p.reset_peak()
        assert p.peak() == 4096
        c = torch.zeros(100)  # 400 -> 512
        del c
        assert p.peak() == 4608 and p.allocated() == 4096
        assert p.peak_requested() == 4096 + 400
        del a


def test_out_and_resize_grow_a_counted_storage() -> None:
    with make_probe("tracked") as p:
        a, b = torch.ones(300), torch.ones(300)
        out = torch.empty(0)
        base = p.allocated()
        torch.add(a, b, out=out)
        assert p.allocated() - base == ra(300)
        out.resize_(1000)
        assert p.allocated() - base == ra(1000)
        assert torch.equal(out[:300], torch.full((300,), 2.0))


def test_foreach_ops_returning_lists_are_counted() -> None:
    with make_probe("tracked") as p:
        xs = [torch.ones(100), torch.ones(200)]
        base = p.allocated()
        ys = torch._foreach_mul(xs, 2.0)
        assert p.allocated() - base == ra(100) + ra(200)
        torch._foreach_add_(ys, 1.0)
        assert p.allocated() - base == ra(100) + ra(200)
        del ys
        assert p.allocated() == base


def test_torch_tensor_and_sparse_are_counted() -> None:
    with make_probe("tracked") as p:
        s = torch.tensor(0.0)  # reaches the mode through aten.lift_fresh
        assert (p.allocated(), p.requested()) == (512, 4)
        i = torch.tensor([[0, 1], [1, 0]])
        v = torch.tensor([1.0, 2.0])
        before = p.allocated()
        sp = torch.sparse_coo_tensor(i, v, (2, 2))
        dense = sp.to_dense()
        assert p.allocated() - before >= ra(4), "the dense copy is counted"
        del s, i, v, sp, dense


def test_backward_tensors_are_seen() -> None:
    with make_probe("tracked") as p:
        w = torch.randn(64, 64, requires_grad=True)
        x = torch.randn(32, 64)
        base = p.allocated()
        (x @ w).sum().backward()
        # the grad of w (64*64) and the loss scalar stay; everything else was temporary
        assert p.allocated() - base == ra(64 * 64)  # loss was not kept: only the grad
        assert p.peak() > p.allocated()


# --------------------------------------------------------------------------- hand-computed training step


def test_training_step_matches_hand_computation() -> None:
    """Every byte after each phase, computed from the shapes alone."""
    IN, H, OUT, B = 10, 65, 3, 7
    p = make_probe("tracked")
    with p:
        model = p.build_model(lambda: nn.Sequential(nn.Linear(IN, H), nn.ReLU(), nn.Linear(H, OUT)))
        params = ra(H * IN) + ra(H) + ra(OUT * H) + ra(OUT)
        assert p.allocated() == params
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
        x, y = torch.randn(B, IN), torch.randn(B, OUT)
        base = params + ra(B * IN) + ra(B * OUT)
        assert p.allocated() == base

        loss = nn.functional.mse_loss(model(x), y)
        # alive: relu output (saved by ReLU and by the 2nd addmm), model output (saved by
        # mse_loss), the loss. The first addmm's output died once ReLU consumed it.
        fwd = ra(B * H) + ra(B * OUT) + SCALAR
        assert p.allocated() == base + fwd
        # the peak: the first addmm's output and the relu output both alive (2 x 2048 bytes)
        assert base + 2 * ra(B * H) > base + fwd
        assert p.peak() == base + 2 * ra(B * H)

        loss.backward()
        grads = params  # one grad per parameter, same shapes
        assert p.allocated() == base + SCALAR + grads, "graph freed; loss + grads remain"

        opt.step()
        # Adam: exp_avg and exp_avg_sq like each parameter, plus a 0-dim float32 `step` each
        state = 2 * params + 4 * SCALAR
        assert p.allocated() == base + SCALAR + grads + state

        opt.zero_grad(set_to_none=True)
        assert p.allocated() == base + SCALAR + state
        del loss
        assert p.allocated() == base + state
        exact_state = 2 * 4 * (H * IN + H + OUT * H + OUT) + 4 * 4
        assert p.requested() == 4 * (H * IN + H + OUT * H + OUT) + 4 * B * (IN + OUT) + exact_state


# --------------------------------------------------------------------------- tracked vs fake


def _phases(probe: Probe, width: int, depth: int, batch: int, opt_name: str, impl: str,
            steps: int = 2) -> list[tuple[str, int, int, int]]:
    """The measurement protocol's per-phase numbers for `steps` steps."""
    out: list[tuple[str, int, int, int]] = []
    with probe:
        model = probe.build_model(lambda: mlp(width, depth))
        kw = {"foreach": {"foreach": True}, "forloop": {"foreach": False}, "fused": {"fused": True}}[impl]
        if opt_name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **kw)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, **kw)
        x = torch.randn(batch, width, device=probe.device)
        y = torch.randn(batch, width, device=probe.device)
        out.append(("built", probe.allocated(), probe.peak(), probe.requested()))
        for _ in range(steps):
            loss = None
            for name in ("zero_grad", "forward", "backward", "step"):
                probe.reset_peak()
                if name == "zero_grad":
                    opt.zero_grad(set_to_none=True)
                elif name == "forward":
                    loss = nn.functional.mse_loss(model(x), y)
                elif name == "backward":
                    assert loss is not None
                    loss.backward()
                else:
                    opt.step()
                out.append((name, probe.allocated(), probe.peak(), probe.requested()))
            del loss
    return out


@pytest.mark.parametrize("width,depth,batch,opt_name,impl", [
    (16, 2, 4, "sgd", "forloop"),
    (33, 3, 7, "adam", "forloop"),
    (64, 2, 32, "adam", "foreach"),
    (48, 3, 5, "adam", "fused"),
    (100, 2, 9, "sgd", "foreach"),
    (40, 2, 3, "sgd", "fused"),
])
def test_tracked_and_fake_agree_to_the_byte(width: int, depth: int, batch: int, opt_name: str, impl: str) -> None:
    real = _phases(TrackedProbe(), width, depth, batch, opt_name, impl)
    fake = _phases(FakeProbe(), width, depth, batch, opt_name, impl)
    assert fake == real
    # and the numbers move the way training does: state appears at the first step
    assert real[4][1] > real[3][1]


def test_fake_estimates_a_huge_model() -> None:
    """(How fast: bench/probe_overhead.py, target 2 s; a test asserts no wall time.)"""
    W, D, B = 16384, 8, 512
    p = FakeProbe()
    with p:
        model = p.build_model(lambda: mlp(W, D))
        opt = torch.optim.Adam(model.parameters())
        x, y = torch.randn(B, W), torch.randn(B, W)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        after_step = p.allocated()
    n_params = D * (W * W + W)
    # params + grads + exp_avg + exp_avg_sq (all multiples of 512) + step scalars + x, y,
    # and the loss, whose 0-dim tensor keeps mse_loss's whole B x W buffer (see below)
    expected = 4 * 4 * n_params + 2 * D * SCALAR + 2 * ra(B * W) + ra(B * W)
    assert after_step == expected
    assert not p.computes


@pytest.mark.parametrize("loss_fn", [nn.functional.mse_loss, nn.functional.smooth_l1_loss,
                                     nn.functional.soft_margin_loss, nn.functional.l1_loss,
                                     nn.functional.huber_loss])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_storage_real_vs_fake(loss_fn, reduction: str) -> None:
    """Some ATen losses reduce into their elementwise buffer, so a 0-dim loss keeps a
    B x W storage alive. The fake probe must predict that, or it undercounts every step."""
    sizes = []
    for probe in (TrackedProbe(), FakeProbe()):
        with probe:
            x, y = torch.randn(30, 50), torch.rand(30, 50)
            base = (probe.allocated(), probe.requested())
            loss = loss_fn(x, y, reduction=reduction)
            sizes.append((probe.allocated() - base[0], probe.requested() - base[1]))
            del loss
    assert sizes[0] == sizes[1]
    if loss_fn in (nn.functional.mse_loss, nn.functional.smooth_l1_loss, nn.functional.soft_margin_loss):
        assert sizes[0] == (ra(1500), 6000), "the reduced loss holds the unreduced buffer"


def test_fake_model_tensors_are_fake_and_counted() -> None:
    from torch._subclasses.fake_tensor import FakeTensor

    p = FakeProbe()
    with p:
        tied = p.build_model(lambda: _TiedModel())
        assert all(isinstance(t, FakeTensor) for t in tied.parameters())
        assert all(isinstance(t, FakeTensor) for t in tied.buffers())
        assert tied.dec.weight is tied.enc.weight, "tied weights stay tied"
        assert isinstance(tied.dec.weight, nn.Parameter)
        assert p.allocated() == ra(50 * 20) + ra(50) + ra(7)
    with pytest.raises(UsageError, match="fake probe cannot be paused"):
        with p.paused():
            pass


class _TiedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(20, 50, bias=False)
        self.dec = nn.Linear(50, 20, bias=False)
        self.dec.weight = self.enc.weight  # type: ignore[assignment]
        self.bias = nn.Parameter(torch.zeros(50))
        self.register_buffer("counts", torch.zeros(7))


# --------------------------------------------------------------------------- oracle: torch's MemTracker


def test_peak_matches_memtracker() -> None:
    """MemTracker (torch.distributed._tools) counts exact bytes on CPU (it rounds to 512
    only for CUDA tensors), so its peak is compared to `peak_requested()`, exactly. Both
    modes are stacked on the same step, so they see the very same ops."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = mlp(96, 3)
    opt = torch.optim.Adam(model.parameters(), foreach=False)
    x, y = torch.randn(24, 96), torch.randn(24, 96)
    p = TrackedProbe()
    p.track(model, opt, x, y)
    mt = MemTracker()
    mt.track_external(model, opt, x, y)
    with p:
        p.reset_peak()
        with mt:
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
    mt_peak = sum(snap["Total"] for snap in mt.get_tracker_snapshot("peak").values())
    mt_now = sum(snap["Total"] for snap in mt.get_tracker_snapshot("current").values())
    assert p.peak_requested() == mt_peak
    assert p.requested() == mt_now
    # and the rounded peak is at most 511 bytes more per storage than the exact one
    assert p.peak_requested() <= p.peak() < p.peak_requested() + 512 * 64


# --------------------------------------------------------------------------- limits, errors, lifecycle


@pytest.mark.parametrize("kind", ["tracked", "fake"])
def test_limit_bytes_raises_oom_and_goes_on(kind: str) -> None:
    p = make_probe(kind, limit_bytes=10_000)
    with p:
        a = torch.zeros(1000)  # 4096
        with pytest.raises(torch.OutOfMemoryError, match=r"Tried to allocate 8.00 KiB \(8192 bytes\)"):
            torch.zeros(2048)
        assert p.allocated() == 4096, "the refused tensor is not counted"
        b = torch.zeros(1000)  # still fits: 8192 <= 10000
        assert p.allocated() == 8192
        with pytest.raises(torch.OutOfMemoryError):
            torch.cat([a, b])
        assert p.allocated() == 8192
        del a, b
    assert p.allocated() == 0


def test_limit_oom_in_a_training_step_is_recoverable() -> None:
    p = make_probe("tracked", limit_bytes=96 * 1024)
    with p:
        model = p.build_model(lambda: mlp(64, 2))  # 2 * (16384 + 256) = ~33 KiB
        with pytest.raises(torch.OutOfMemoryError):
            torch.randn(512, 64)  # 128 KiB: over the limit
    with p:
        with pytest.raises(torch.OutOfMemoryError):
            model(torch.randn(512, 64))
        gc.collect()
        assert p.allocated() == 2 * (ra(64 * 64) + ra(64))
        model(torch.randn(2, 64)).sum().backward()
        assert p.allocated() == 4 * (ra(64 * 64) + ra(64))  # params + grads


def test_make_probe_names() -> None:
    with pytest.raises(UsageError, match="'nope'.*auto, cuda, tracked, fake"):
        make_probe("nope")
    assert make_probe("tracked").name == "tracked"
    assert make_probe("fake").name == "fake" and not make_probe("fake").computes
    auto = make_probe("auto")
    assert auto.name == ("cuda" if torch.cuda.is_available() else "tracked")
    with pytest.raises(UsageError, match="CPU tensors.*'meta'"):
        make_probe("tracked", device="meta")
    with pytest.raises(UsageError, match="limit_bytes"):
        make_probe("tracked", limit_bytes=-1)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            make_probe("cuda")


def test_reentering_a_probe_is_an_error_but_distinct_probes_nest() -> None:
    outer, inner = TrackedProbe(), TrackedProbe()
    with outer:
        with pytest.raises(UsageError, match="already active"):
            outer.__enter__()
        a = torch.zeros(128)
        with inner:
            b = torch.zeros(256)
        assert (outer.allocated(), inner.allocated()) == (512 + 1024, 1024)
        del a, b
        assert (outer.allocated(), inner.allocated()) == (0, 0)


def test_paused_counts_nothing_new_but_still_sees_frees() -> None:
    p = TrackedProbe()
    with p:
        a = torch.zeros(128)
        with p.paused():
            b = torch.zeros(10_000)
            del a
        assert p.allocated() == 0 and p.peak() == 512
        p.track(b)
        assert p.allocated() == ra(10_000)
    with pytest.raises(UsageError, match="active"):
        with p.paused():
            pass


def test_track_walks_modules_optimizers_and_containers_once() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    params = ra(64) + ra(8) + ra(8) + ra(8)  # linear w, b; bn weight, bias
    buffers = ra(8) + ra(8) + ra(1, 8)  # running_mean, running_var, num_batches_tracked (int64)
    grads = params
    momentum = params
    p = TrackedProbe()
    p.track(model)
    assert p.allocated() == params + buffers + grads
    p.track(opt, [model, {"again": model}], (opt,), None)
    assert p.allocated() == params + buffers + grads + momentum
    with pytest.raises(UsageError, match="cannot find tensors in a builtins.str"):
        p.track("model")


def test_tracked_probe_measures_real_values() -> None:
    p = TrackedProbe()
    assert p.computes and p.device == torch.device("cpu") and p.extra() == {}
    with p:
        t = torch.arange(4.0) * 2
    assert t.tolist() == [0.0, 2.0, 4.0, 6.0]


# --------------------------------------------------------------------------- CUDA (run on a GPU)

@needs_cuda
def test_cuda_single_element_and_peak() -> None:
    p = make_probe("cuda")
    assert isinstance(p, CudaProbe) and p.device.type == "cuda"
    with p:
        torch.cuda.synchronize()
        a0, r0 = p.allocated(), p.requested()
        a = torch.zeros(1, device=p.device)
        assert (p.allocated() - a0, p.requested() - r0) == (512, 4)
        b = torch.zeros(129, device=p.device)
        assert (p.allocated() - a0, p.requested() - r0) == (512 + 1024, 4 + 516)
        del b
        assert p.peak() - a0 == 1536
        p.reset_peak()
        assert p.peak() == p.allocated() == a0 + 512
        v = a.view(1, 1)  # a view allocates nothing
        assert p.allocated() == a0 + 512
        ex = p.extra()
        assert ex["reserved"] >= p.allocated() and ex["peak_reserved"] >= ex["reserved"]
        del a, v
        assert p.allocated() == a0


@needs_cuda
def test_cuda_limit_bytes_raises_oom_and_restores() -> None:
    # the limit caps everything the allocator holds: start from an empty one (cuBLAS keeps
    # its workspaces allocated after an earlier test's matmuls)
    torch.cuda.synchronize()
    getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
    torch.cuda.empty_cache()
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)
    before = getter(0)
    p = make_probe("cuda", limit_bytes=64 * 2**20)
    with p:
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(128 * 2**20, dtype=torch.uint8, device="cuda")
        t = torch.empty(2**20, dtype=torch.uint8, device="cuda")
        del t
    assert getter(0) == before
    big = torch.empty(128 * 2**20, dtype=torch.uint8, device="cuda")  # fine again after exit
    del big


@needs_cuda
@pytest.mark.parametrize("opt_name,impl,cpu_scalars", [
    ("sgd", "foreach", False),
    ("adam", "fused", False),
    ("adam", "forloop", True),
    ("adam", "foreach", True),
])
def test_cuda_and_tracked_agree_on_a_step(opt_name: str, impl: str, cpu_scalars: bool) -> None:
    """Per-phase allocated deltas of a warm step: CPU tracking predicts CUDA to the byte,
    with one known, exact exception.

    Deltas, after a warm-up step, because CUDA also holds library workspaces (cuBLAS,
    ~32 MiB) that appear at the first matmul. Width 256 keeps every block in CUDA's small
    pool, where blocks are exactly 512-rounded (large-pool blocks may keep an unsplit tail
    of up to 1 MiB, depending on history). The exception: non-fused, non-capturable Adam
    keeps its `step` counters on the CPU even for CUDA parameters, so memory_allocated
    misses 512 bytes per parameter tensor that the tracked probe (all CPU) counts."""
    depth = 3
    n_param_tensors = 2 * depth

    def run(probe: Probe) -> list[int]:
        rows = _phases(probe, 256, depth, 64, opt_name, impl, steps=2)
        return [rows[i][1] - rows[0][1] for i in range(1, len(rows))]

    # cuBLAS allocates its workspaces at the first matmuls (forward and backward): do those first
    warm = nn.Linear(8, 8, device="cuda")
    warm(torch.randn(4, 8, device="cuda")).sum().backward()
    del warm
    cuda, tracked = run(make_probe("cuda")), run(TrackedProbe())
    gap = 512 * n_param_tensors if cpu_scalars else 0
    # rows: zero_grad, forward, backward, step, zero_grad, forward, backward, step
    expected = [t - (gap if i >= 3 else 0) for i, t in enumerate(tracked)]
    assert cuda == expected


@needs_cuda
@pytest.mark.parametrize("loss_fn", [nn.functional.mse_loss, nn.functional.smooth_l1_loss])
def test_cuda_loss_storage_is_what_fake_predicts(loss_fn) -> None:
    cuda = make_probe("cuda")
    with cuda:
        x = torch.randn(300, 50, device="cuda")
        y = torch.rand(300, 50, device="cuda")
        a0 = cuda.allocated()
        loss = loss_fn(x, y)
        on_cuda = cuda.allocated() - a0
        del loss
    fake = FakeProbe()
    with fake:
        x, y = torch.randn(300, 50), torch.rand(300, 50)
        a0 = fake.allocated()
        loss = loss_fn(x, y)
        on_fake = fake.allocated() - a0
    assert on_cuda == on_fake == ra(300 * 50)


@pytest.mark.parametrize("name", ["tracked", "fake"])
def test_compiled_code_runs_eagerly_and_is_counted(name: str) -> None:
    """Dynamo cannot trace through the ledger's dispatch mode: under a ledger probe a
    torch.compile'd function runs eagerly, every storage counted, and a Watch sees the call."""
    f = torch.compile(lambda x: x * 2 + 1, fullgraph=True)
    probe = make_probe(name)
    assert probe.compile_mode == EAGER_UNDER_PROBE
    with probe, probe.watching(Watch()) as watch:
        x = torch.ones(100)
        y = f(x)
        assert probe.allocated() == 2 * 512 and probe.peak() == 3 * 512  # x, y; x * 2 until + 1
        assert {"aten::mul.Tensor", "aten::add.Tensor"} <= watch.op_names()
        assert watch.compiled_calls == 1
        assert len(watch.alive(None)) == 2
    del x, y


def test_a_c_profiler_is_left_alone_and_compiled_calls_are_unknown() -> None:
    """Under cProfile (a profiler in C, which Python cannot chain) measurement works, the
    user's profiler keeps its hook, and whether the step ran compiled code is 'unknown'."""
    import cProfile
    import sys

    from multiopt.instrument.probes import COMPILED_UNKNOWN
    from multiopt.instrument.protocol import Config, Protocol, measure

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        with TrackedProbe() as probe, probe.watching(Watch()) as watch:
            assert sys.getprofile() is profiler
            x = torch.ones(100) * 2
        record = measure(Config(width=16, depth=1, batch=4, combo="adam", rules="rest=adam(lr=0.001)"),
                         Protocol(probe="tracked", steps=0))
    finally:
        profiler.disable()
    assert watch.compiled_calls is None and probe.allocated() == 512  # x, counted as ever
    assert record.status == "ok", record.error
    assert [o.compiled for o in record.optimizers] == [COMPILED_UNKNOWN]
    del x
