"""Step time on a named GPU, predicted from a step's work (work.py) on a CPU.

Two parts, kept apart so each can be checked:

- `GPUS`: a spec table, each figure with its source (NVIDIA's datasheets and whitepapers):
  dense (not sparse) FLOP/s per dtype, memory bandwidth, SM count.
- `TimeModel`: eager PyTorch replayed op by op on two clocks. The host clock pays each op's
  dispatch (the Python and C++ above the kernel, and each launch); the device clock runs each
  kernel once the host has launched it and the previous kernel is done: its time is a fixed
  floor plus the roofline, max(FLOPs / (efficiency x peak), bytes / (efficiency x bandwidth)).
  An op that reads a device value on the host (`.item()`) waits for the device. The step ends
  when both clocks are done (the protocol reads the loss with `.item()` after every step, so
  timed steps never overlap). At the suite's sizes the host clock wins almost everywhere:
  eager PyTorch is host-bound, as the H200 records show (0.97 ms for a 3-layer MLP of width
  64 whose kernels take microseconds).

The host constants are fitted (bench/gpu_time_model.py) on the H200 quick preset ONLY
(reports/gpu-h200/quick, 52 configs) and checked on the 40 default-preset H200 configs
(reports/gpu-h200/default), never used in the fit; `CHECKED` says how far off it was there,
and every prediction carries that line. The device constants are not fitted (the quick preset
is host-bound, so it cannot tell them): the floor, and 75% of peak FLOP/s (torch's
RuntimeEstimator roofline convention), 80% of peak bandwidth. The host constants describe the
H200 machine's host CPU (an Intel Xeon, torch 2.11): a different host shifts them, so a
prediction for another GPU assumes a comparable host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ..errors import UsageError
from ..kinds import Probe, Target
from .work import OpWork, Work

__all__ = ["CALIBRATED_ON", "CHECKED", "check_text", "GPUS", "GpuSpec", "MODEL", "Prediction", "TimeModel", "check_gpu", "gpu_spec", "predict"]


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's figures: dense FLOP/s per dtype (matmuls: tensor cores for 16-bit types; CUDA
    cores for float32, since torch does not use TF32 for float32 matmuls by default), memory
    bandwidth in bytes/s, SMs, and where each figure comes from."""

    name: str
    label: str
    flops: dict[str, float]  # dtype -> FLOP/s, dense
    bandwidth: float  # bytes/s
    sms: int
    sources: tuple[str, ...] = ()

    def peak(self, dtype: str) -> float:
        return self.flops.get(dtype, self.flops["float32"])


_T = 1e12
_H100_SRC = "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column), " \
            "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec(
        "h100", "NVIDIA H100 SXM5 80GB",
        {"float32": 67 * _T, "bfloat16": 989.4 * _T, "float16": 989.4 * _T, "float64": 34 * _T},
        3.35e12, 132,
        (_H100_SRC + ": FP32 67 TFLOPS, BF16/FP16 Tensor Core 1,979 TFLOPS with sparsity (989.4 dense), FP64 "
         "34 TFLOPS, GPU memory bandwidth 3.35 TB/s",
         "NVIDIA H100 Tensor Core GPU Architecture whitepaper: H100 SXM5 has 132 SMs")),
    "h200": GpuSpec(
        "h200", "NVIDIA H200 SXM 141GB",
        {"float32": 67 * _T, "bfloat16": 989.4 * _T, "float16": 989.4 * _T, "float64": 34 * _T},
        4.8e12, 132,
        ("NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column), https://www.nvidia.com/en-us/data-center/h200/: "
         "FP32 67 TFLOPS, BF16/FP16 Tensor Core 1,979 TFLOPS with sparsity (989.4 dense), FP64 34 TFLOPS, "
         "GPU memory bandwidth 4.8 TB/s",
         "132 SMs: cudaDeviceProp.multiProcessorCount on the H200 that measured reports/gpu-h200 "
         "(probes/reduce.py GpuProps; the NVIDIA H100 architecture whitepaper's GH100 in SXM5 form)")),
    "a100": GpuSpec(
        "a100", "NVIDIA A100 SXM4 80GB",
        {"float32": 19.5 * _T, "bfloat16": 312 * _T, "float16": 312 * _T, "float64": 9.7 * _T},
        2.039e12, 108,
        ("NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM column), https://www.nvidia.com/content/dam/en-zz/"
         "Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf: FP32 19.5 TFLOPS, "
         "BF16/FP16 Tensor Core 312 TFLOPS (624 with sparsity), FP64 9.7 TFLOPS, GPU memory bandwidth 2,039 GB/s",
         "NVIDIA A100 Tensor Core GPU Architecture whitepaper: A100 has 108 SMs")),
    "l4": GpuSpec(
        "l4", "NVIDIA L4 24GB",
        {"float32": 30.3 * _T, "bfloat16": 121 * _T, "float16": 121 * _T, "float64": 30.3 * _T / 64},
        300e9, 58,
        ("NVIDIA L4 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/l4/: FP32 30.3 TFLOPS, "
         "BF16/FP16 Tensor Core 242 TFLOPS with sparsity (121 dense), GPU memory bandwidth 300 GB/s",
         "NVIDIA Ada GPU Architecture whitepaper: AD104 in L4 has 58 SMs; FP64 at 1/64 of the FP32 rate")),
    "rtx4090": GpuSpec(
        "rtx4090", "NVIDIA GeForce RTX 4090 24GB",
        {"float32": 82.6 * _T, "bfloat16": 165.2 * _T, "float16": 165.2 * _T, "float64": 82.6 * _T / 64},
        1008e9, 128,
        ("NVIDIA Ada GPU Architecture whitepaper, Appendix A (GeForce RTX 4090), https://images.nvidia.com/"
         "aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf: 128 SMs, FP32 82.6 TFLOPS, "
         "FP16/BF16 Tensor with FP32 accumulate 165.2 TFLOPS dense (torch accumulates in FP32), memory "
         "bandwidth 1,008 GB/s, FP64 at 1/64 of the FP32 rate",)),
}


def gpu_spec(name: str) -> GpuSpec:
    key = name.strip().lower()
    if key not in GPUS:
        raise UsageError(f"unknown gpu {name!r}; choose one of {', '.join(GPUS)}")
    return GPUS[key]


def check_gpu(name: str, target: str, probe: str) -> None:
    """Refuse a prediction the counters cannot make, naming what to change."""
    gpu_spec(name)
    if probe == Probe.CUDA:
        raise UsageError("--gpu predicts from the work counters of the tracked or fake probe; on a GPU, the cuda "
                         "probe measures the step time itself: drop --gpu or use --probe fake")
    if target != Target.CUDA:
        raise UsageError("--gpu predicts what CUDA would run: add --target cuda (its optimizer defaults, fused "
                         "and foreach kernels)")


@dataclass(frozen=True)
class TimeModel:
    """The constants of the two-clock replay (module doc), in microseconds."""

    # host: fitted on the H200 quick preset (bench/gpu_time_model.py)
    step_us: float = 161.7  # per step: the Trainer, phase hooks, the loss read back with .item()
    op_us: float = 13.7  # per kernel op issued from Python (forward, optimizer steps, zero_grad)
    engine_op_us: float = 37.2  # per kernel op issued by autograd's engine (backward)
    meta_us: float = 5.3  # per op that launches nothing (views, allocations, host scalars)
    launch_us: float = 19.4  # per launch past an op's first (foreach chunks, slow paths)
    optimizer_us: float = 178.4  # per optimizer step() call: its Python (grouping, hooks, guards)
    # device: not fitted (module doc)
    floor_us: float = 2.0  # a kernel's fixed cost on the device (launch to retire, tail)
    flops_eff: float = 0.75
    bytes_eff: float = 0.80

    def kernel_us(self, flops: float, nbytes: float, dtype: str, gpu: GpuSpec) -> float:
        compute = flops / (self.flops_eff * gpu.peak(dtype)) if flops else 0.0
        memory = nbytes / (self.bytes_eff * gpu.bandwidth) if nbytes else 0.0
        return self.floor_us + 1e6 * max(compute, memory)

    def host_us(self, op: OpWork) -> float:
        if op.kernels == 0:
            return self.meta_us
        per = self.engine_op_us if op.phase == "backward" else self.op_us
        return per + self.launch_us * (op.kernels - 1)


#: The model the tool predicts with: the defaults above, whose host constants are
#: bench/gpu_time_model.py's fit on the H200 quick preset, pasted.
MODEL = TimeModel()

#: The GPU whose records fitted and checked MODEL.
CALIBRATED_ON = "h200"
#: What MODEL was checked against, and how far off it was (bench/gpu_time_model.py).
CHECKED = ("H200 default preset, 40 configs held out of the fit: median |error| 10%, p90 15% "
           "(bench/gpu_time_model.py, reports/gpu-h200/time-model.md)")


@dataclass(frozen=True)
class Prediction:
    gpu: str
    step_ms: float
    device_ms: float  # the kernels' own time, summed (what the step takes if the host kept up)
    phase_ms: dict[str, float] = field(default_factory=dict)
    checked: str = CHECKED


def predict(work: Work, gpu: str | GpuSpec, model: TimeModel = MODEL, checked: str | None = None) -> Prediction:
    """The step's time on `gpu`, phase by phase (module doc). `work` must follow CUDA's choices
    (target cuda): its kernels are CUDA's launches."""
    spec = gpu if isinstance(gpu, GpuSpec) else gpu_spec(gpu)
    if work.target != Target.CUDA:
        raise UsageError("a GPU prediction needs work counted under target cuda (--target cuda)")
    host = model.step_us
    device = 0.0
    busy = 0.0
    phase_end: dict[str, float] = {}
    owner: str | None = None
    for op in work.ops:
        if op.owner is not None and op.owner != owner:
            host += model.optimizer_us
        owner = op.owner
        host += model.host_us(op)
        if op.sync:
            host = max(host, device)
        if op.kernels:
            each = model.kernel_us(op.flops / op.kernels, op.bytes / op.kernels, op.dtype, spec)
            for _ in range(op.kernels):
                device = max(device, host) + each
                busy += each
        phase_end[op.phase] = max(host, device)
    end = max(host, device)
    phase_ms: dict[str, float] = {}
    before = 0.0
    for phase, at in sorted(phase_end.items(), key=lambda kv: kv[1]):
        phase_ms[phase] = (at - before) / 1e3
        before = at
    if phase_ms:  # the step's fixed cost and its final wait go to the last phase
        last = max(phase_end, key=phase_end.get)  # type: ignore[arg-type]
        phase_ms[last] += (end - before) / 1e3
    return Prediction(spec.name, end / 1e3, busy / 1e3, phase_ms, check_text(spec.name) if checked is None else checked)


def check_text(gpu: str) -> str:
    """What a prediction for `gpu` was checked against: the H200's held-out error where it is
    the H200, else a plain statement that no record of that GPU checked it."""
    if gpu_spec(gpu).name == CALIBRATED_ON:
        return CHECKED
    return f"not checked on {gpu_spec(gpu).name} (no records of one); on the {CHECKED}"
