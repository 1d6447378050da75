"""multiopt.profile(): the protocol's instruments around a hand-written loop.

The acceptance check: on the transformer with `*emb*=adamw; @matrix=muon; rest=adamw`, the
profiled loop's per-optimizer state equals the registry's expectation to the byte, and its
per-phase numbers equal `measure()`'s record for the same model, rules, batch and probe.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import multiopt
from multiopt.train import models
from multiopt.errors import UsageError
from multiopt.instrument.protocol import Config, Protocol, measure
from multiopt.train.multi import MultiOptimizer
from multiopt.instrument.probes import TrackedProbe, round_alloc
from multiopt.instrument.profile import Profile

from .support import mlp, needs_cuda

RULES = "*emb*=adamw(lr=3e-4); @matrix=muon(lr=0.02); rest=adamw(lr=3e-4)"
WIDTH, DEPTH, BATCH, SEED = 64, 2, 4, 0
WARMUP = 3

# Every number both sides have, compared to the byte.
MEMORY = ("mem_step_start", "mem_after_forward", "peak_forward", "mem_after_backward", "peak_backward",
          "mem_after_step", "peak_step", "mem_after_zero_grad", "peak_zero_grad", "peak_total", "grad_bytes",
          "step_temp_bytes", "opt_state_bytes")


@pytest.fixture(scope="module")
def record():
    config = Config(model="transformer", width=WIDTH, depth=DEPTH, batch=BATCH, combo="muon+adamw-emb",
                    rules=RULES, seed=SEED)
    rec = measure(config, Protocol(probe="tracked", warmup=WARMUP, steps=1))
    assert rec.status == "ok", rec.error
    return rec


def _profiled_loop(*, keep_loss: bool) -> Profile:
    """The user's loop, written by hand: what measure() runs through the Trainer."""
    spec = models.resolve("transformer")
    torch.manual_seed(SEED)
    model = spec.build(WIDTH, DEPTH)  # made before the block: profile() tracks it
    optimizer = MultiOptimizer.from_spec(model, RULES)
    with multiopt.profile(model, optimizer, probe="tracked") as prof:
        gen = torch.Generator().manual_seed(SEED)
        tokens, targets = spec.make_batch(model, BATCH, generator=gen)
        for _ in range(WARMUP + 1):
            loss = models.lm_loss(model(tokens), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if not keep_loss:
                # measure()'s loss dies with its step function; a loop variable outlives
                # the iteration (see test_a_kept_loss_costs_one_block).
                del loss
    return prof


@pytest.fixture(scope="module")
def prof():
    return _profiled_loop(keep_loss=False)


def test_profile_is_exported():
    assert multiopt.profile is not None and callable(multiopt.profile)
    assert multiopt.Profile is Profile


def test_state_bytes_equal_the_registry_expectation_to_the_byte(prof, record):
    state = prof.state()
    assert list(state) == ["*emb*=adamw", "@matrix=muon", "rest=adamw"]
    for key, s in state.items():
        assert s["expected"] is not None
        assert s["measured"] == s["expected"], key  # elem, scalar, alloc and n_tensors alike
    frame = prof.optimizer_frame()
    assert frame["matches"].all()
    by_name = {o["name"]: o for o in record.by_optimizer()}
    for _, row in frame.iterrows():
        assert row["state_bytes"] == by_name[row["name"]]["state_bytes"] == by_name[row["name"]]["expected"]
    # Muon keeps one momentum buffer per matrix element; AdamW two moments + a float32 step.
    model_params = dict(models.build("transformer", WIDTH, DEPTH).named_parameters())
    muon_elems = sum(p.numel() for n, p in model_params.items() if p.ndim == 2 and "emb" not in n)
    assert state["@matrix=muon"]["measured"].total == 4 * muon_elems
    emb = model_params["emb.weight"].numel() + model_params["pos_emb"].numel()
    assert state["*emb*=adamw"]["measured"].total == 2 * 4 * emb + 2 * 4


def test_per_phase_numbers_equal_the_sweep_record(prof, record):
    df = prof.to_frame()
    assert len(df) == WARMUP + 1 and df["stepped"].all()
    row = df.iloc[WARMUP]  # the step measure() instruments: the one after its warm-up
    rec = record.to_dict()
    assert {k: int(row[k]) for k in MEMORY} == {k: rec[k] for k in MEMORY}
    for o in record.by_optimizer():
        assert row[f"step_temp_bytes:{o['name']}"] == o["step_temp_bytes"]
        assert row[f"opt_state_bytes:{o['name']}"] == o["state_bytes"]
    # The loss is part of the forward phase, as in the Trainer: the model's output alone is
    # smaller than the forward phase's end by the loss (4 bytes) and the NLL total weight
    # (4 bytes), one 512-byte block each; the log-softmax replaced the logits, same size.
    assert row["mem_after_forward"] - row["mem_after_model"] == 2 * round_alloc(4)
    assert row["peak_forward"] > row["mem_after_model"]


def test_a_kept_loss_costs_one_block(record):
    """Difference explained exactly: a loop that keeps `loss` into the next iteration holds
    the previous step's 0-dim loss (4 bytes -> one 512-byte block) from the row's start until
    the new loss replaces it, i.e. through the start and the forward peak; nothing else."""
    row = _profiled_loop(keep_loss=True).to_frame().iloc[WARMUP]
    rec = record.to_dict()
    diff = {k: int(row[k]) - rec[k] for k in MEMORY if int(row[k]) != rec[k]}
    assert diff == {"mem_step_start": round_alloc(4), "peak_forward": round_alloc(4)}


def test_first_step_creates_the_state(prof):
    df = prof.to_frame()
    # AdamW and Muon create state lazily in the first step: it shows as step temporaries.
    assert df["step_temp_bytes"].iloc[0] > df["step_temp_bytes"].iloc[1]
    assert (df["opt_state_bytes"] == df["opt_state_bytes"].iloc[0]).all()
    assert df["mem_step_start"].iloc[0] < df["mem_step_start"].iloc[1]  # no state yet at step 1


def test_summary_and_frame(prof):
    text = prof.summary()
    for word in ("*emb*=adamw", "@matrix=muon", "rest=adamw", "instrumented", "peak fwd", "tracked probe"):
        assert word in text
    assert "NO" not in text.split()
    df = prof.to_frame()
    assert isinstance(df, pd.DataFrame)
    assert list(df["step"]) == [1, 2, 3, 4]
    assert (df[["forward_ms", "backward_ms", "step_ms", "iter_ms"]] > 0).all().all()
    assert df.attrs["time"] == "instrumented"


# --- hooks in, hooks out ---------------------------------------------------------------


def test_everything_is_restored_on_exit_even_after_an_error():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    backward = torch.autograd.backward
    with pytest.raises(RuntimeError, match="boom"):
        with multiopt.profile(model, opt, probe="tracked"):
            model(torch.randn(2, 16)).sum().backward()
            raise RuntimeError("boom")
    assert torch.autograd.backward is backward
    assert "zero_grad" not in vars(opt) and "zero_grad" not in vars(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    multiopt.profile(model, opt, probe="tracked").__enter__().__exit__(None, None, None)  # usable again


def test_one_torch_optimizer_zero_grad_first_and_model_zero_grad():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = models.make_batch(model, 8)
    with multiopt.profile(model, opt, probe="tracked", track=[x, y]) as prof:
        for _ in range(3):
            model.zero_grad()  # zero_grad at the top of the loop, on the model
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    df = prof.to_frame()
    assert list(prof.optimizers) == ["adam"]
    assert len(df) == 3
    # A zero_grad before the first forward belongs to step 1; after a step, to that step.
    assert df["mem_after_zero_grad"].notna().tolist() == [True, True, False]
    param = sum(round_alloc(p.numel() * 4) for p in model.parameters())
    batch = round_alloc(x.numel() * 4) + round_alloc(y.numel() * 4)
    assert prof.mem_enter == param + batch  # made before the block, counted through track()
    s = prof.state()["adam"]
    assert s["measured"] == s["expected"]


def test_list_of_optimizers_each_stepped_by_hand():
    model = mlp()
    sgd = torch.optim.SGD(model.layer1.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model.layer2.parameters(), lr=1e-3)
    with multiopt.profile(model, [sgd, adam], probe="tracked") as prof:
        x, y = models.make_batch(model, 8)
        for _ in range(2):
            torch.nn.functional.mse_loss(model(x), y).backward()
            sgd.step()
            adam.step()  # two optimizers, one step row
            sgd.zero_grad()
            adam.zero_grad()
    df = prof.to_frame()
    assert len(df) == 2
    assert set(prof.optimizers) == {"sgd", "adam"}
    assert df[["step_temp_bytes:sgd", "step_temp_bytes:adam"]].notna().all().all()
    for s in prof.state().values():
        assert s["measured"] == s["expected"]


def test_gradient_accumulation_is_one_row():
    model = mlp()
    opt = MultiOptimizer.from_spec(model, "layer1=sgd(lr=0.1); rest=adam")
    with multiopt.profile(model, opt, probe="tracked") as prof:
        x, y = models.make_batch(model, 8)
        for _ in range(2):
            for _ in range(3):
                torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    df = prof.to_frame()
    assert df["n_forward"].tolist() == [3, 3] and df["n_backward"].tolist() == [3, 3]


def test_an_active_probe_is_left_active():
    probe = TrackedProbe()
    with probe:
        model = probe.build_model(mlp)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with multiopt.profile(model, opt, probe=probe) as prof:
            model(torch.randn(2, 16)).sum().backward()
            opt.step()
        assert probe.active
    assert prof.rows[0]["stepped"]


def test_bad_uses_are_usage_errors():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="do not nest"):
        with multiopt.profile(model, opt, probe="tracked"):
            with multiopt.profile(model, opt, probe="tracked"):
                pass
    with pytest.raises(UsageError, match="real tensors"):
        with multiopt.profile(model, opt, probe="fake"):
            pass
    with pytest.raises(UsageError, match="MultiOptimizer, a torch optimizer"):
        multiopt.profile(model, "adam")
    with pytest.raises(UsageError, match="nn.Module"):
        multiopt.profile(opt, model)
    shared = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="exactly one optimizer"):
        multiopt.profile(model, [opt, shared])
    assert torch.autograd.backward.__module__ == "torch.autograd"


@pytest.mark.cuda
@needs_cuda
def test_cuda_probe_around_the_transformer():
    """probe="auto" picks cuda for a model on the GPU. Not compared to measure() to the byte:
    library workspaces (cuBLAS) made by an earlier config in this process are in
    memory_allocated for one side only; the structure and the state must hold."""
    spec = models.resolve("transformer")
    torch.manual_seed(SEED)
    model = spec.build(WIDTH, DEPTH).cuda()
    optimizer = MultiOptimizer.from_spec(model, RULES)
    with multiopt.profile(model, optimizer) as prof:
        tokens, targets = spec.make_batch(model, BATCH, device="cuda")
        for _ in range(3):
            models.lm_loss(model(tokens), targets).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert prof.probe.name == "cuda"
    df = prof.to_frame()
    assert len(df) == 3 and df["stepped"].all()
    last = df.iloc[-1]
    assert last["peak_backward"] >= last["mem_after_forward"] >= last["mem_step_start"]
    assert last["peak_total"] == max(last[f"peak_{p}"] for p in ("forward", "backward", "step", "zero_grad"))
    for s in prof.state().values():
        assert s["measured"] == s["expected"]


def test_step_temporaries_are_those_of_the_steps_after_the_first(prof, record):
    """The first step creates the state lazily; the summary's figure is the later steps',
    which is what measure() reports after its warm-up."""
    df, frame = prof.to_frame(), prof.optimizer_frame().set_index("name")
    for o in record.by_optimizer():
        col = df[f"step_temp_bytes:{o['name']}"]
        assert frame.loc[o["name"], "step_temp_bytes"] == col.iloc[1:].max() == o["step_temp_bytes"]
        assert col.iloc[0] > col.iloc[1:].max()
    assert "step temporaries (steps 2+)" in prof.summary()


def test_one_step_has_no_step_temporaries_yet():
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    with multiopt.profile(model, opt, probe="tracked") as prof:
        model(torch.randn(2, 16)).sum().backward()
        opt.step()
    assert prof.to_frame()["step_temp_bytes"].notna().all()
    assert prof.optimizer_frame()["step_temp_bytes"].isna().all()


def test_target_cuda_profile_says_what_it_does_not_model():
    """Attention in the user's loop under target cuda: the summary names it as not modelled."""
    spec = models.resolve("transformer")
    model = spec.build(WIDTH, DEPTH)
    optimizer = MultiOptimizer.from_spec(model, RULES, target="cuda")
    tokens, targets = spec.make_batch(model, BATCH, generator=torch.Generator().manual_seed(SEED))
    for target, flagged in (("cuda", True), ("cpu", False)):
        with multiopt.profile(model, optimizer, probe="tracked", target=target) as p:
            models.lm_loss(model(tokens), targets).backward()
            optimizer.step()
            optimizer.zero_grad()
        assert ("not modelled: attention (SDPA kernels)" in p.summary()) is flagged, target
