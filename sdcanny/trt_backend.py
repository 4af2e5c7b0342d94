"""The `trt` back-end: the sampler of sdcanny/reference.py with the networks run by TensorRT engines.

Per request, on one CUDA stream:
  1. every generator seeded with the request's seed, then x = torch.randn(latent_shape) on the GPU;
  2. the CLIP engine once per image on its [cond, uncond] tokens (a batch of 2);
  3. for each DDIM step, for each image: the union engine (ControlNet + UNet) on [x_i, x_i] with
     control scales [scales, zeros in guess mode else scales], guidance on the GPU; then one
     ddim_step for all images, with the step's torch.randn(x.shape) noise when eta > 0;
  4. the VAE engine per image, which returns HWC uint8 itself.

As in the torch back-end (sdcanny/fast.py), every random number is drawn up front in the
reference's order: the initial latents, then one (N, 4, h, w) tensor per step from the noisiest
step down. No other draw happens in between, so the numbers are the reference's, and the
captured loop holds no random number generation.

The engines have a static batch of 2 (one guidance pair), so num_samples > 1 runs the union engine
once per image inside each step; a step's DDIM update then covers all images at once.

The denoising loop (step 3, `LoopRunner`) runs eagerly the first time a (num_samples, size,
steps, eta > 0) combination is seen, and is then captured as one CUDA graph, replayed by later
requests of that combination: a 20-step loop becomes one launch instead of ~20 x (5 engine inputs,
1 enqueue, ~15 small kernels). Every tensor the graph touches lives in a `LoopState` with fixed
addresses; the per-request values (noise, contexts, hint, scales, schedule, guidance scale) are
copied into it before each replay.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import ModelConfig
from .ddim import ddim_step
from .engine_specs import DEFAULT_HEIGHT, DEFAULT_WIDTH, EngineSpec, built_spec, engine_spec, engine_stale_reason
from .paths import DEFAULT_ENGINE_DIR
from .pipeline import GenerationRequest, draw_noise


def rebuild_command(height: int, width: int) -> str:
    return (f"python3 export_onnx.py --height {height} --width {width} && "
            f"python3 build_engines.py --height {height} --width {width}")


def current_spec(name: str, cfg: ModelConfig, engine_dir: Path, device, height: int = DEFAULT_HEIGHT,
                 width: int = DEFAULT_WIDTH) -> tuple[EngineSpec | None, str | None]:
    """(the spec engine `name` was built with, None) if it is built and current for this TensorRT
    and GPU; else (None, why not, in one line). Reads the build record only (no hashing)."""
    import trt_utils  # needs TensorRT; the rest of sdcanny must import without it
    spec = built_spec(name, cfg, engine_dir, height, width)
    command = ("bash preprocess.sh" if (height, width) == (DEFAULT_HEIGHT, DEFAULT_WIDTH)
               else rebuild_command(height, width))
    if spec is None:
        plan = engine_spec(name, cfg, height, width).plan_path(engine_dir)
        return None, f"no engine {plan} with a readable build record: build it with `{command}`"
    stale = engine_stale_reason(spec, engine_dir, trt_utils.tensorrt_version(), trt_utils.gpu_name(device))
    if stale is not None:
        return None, f"engine {spec.plan_path(engine_dir)} is stale ({stale}): rebuild it with `{command}`"
    return spec, None


def engine_problem(name: str, cfg: ModelConfig, engine_dir: Path, device, height: int = DEFAULT_HEIGHT,
                   width: int = DEFAULT_WIDTH) -> str | None:
    """None if engine `name` is built and current, else why not (see current_spec)."""
    return current_spec(name, cfg, engine_dir, device, height, width)[1]


def load_engine(name: str, cfg: ModelConfig, engine_dir: Path, device, height: int = DEFAULT_HEIGHT,
                width: int = DEFAULT_WIDTH):
    """Engine `name` after checking that it is current, with its buffers allocated."""
    import trt_utils
    spec, problem = current_spec(name, cfg, engine_dir, device, height, width)
    if problem is not None:
        raise RuntimeError(problem)
    engine = trt_utils.Engine(spec.plan_path(engine_dir))
    expected = {t.name: (t.shape, getattr(torch, t.dtype), t in spec.inputs) for t in spec.tensors}
    if engine.signature() != expected:
        raise RuntimeError(f"{spec.plan_path(engine_dir)} has tensors {engine.signature()}, the spec says {expected}")
    engine.allocate(device=str(device))
    return engine


@dataclass
class LoopState:
    """Fixed-address tensors of one denoising loop: what a captured CUDA graph reads and writes."""
    x: torch.Tensor  # (N, 4, h, w) latents, updated in place step by step
    eps: torch.Tensor  # (N, 4, h, w) guided noise prediction of the current step
    contexts: torch.Tensor  # (N, 2, 77, 768) [cond, uncond] per image
    hints: torch.Tensor  # (N, 3, H, W)
    scales: torch.Tensor  # (2, 13) [cond row, uncond row]
    guidance: torch.Tensor  # () float32
    timesteps: torch.Tensor  # (S,) int32, indexed like the schedule
    coefficients: torch.Tensor  # (4, S) float32: alphas, alphas_prev, sigmas, sqrt_one_minus_alphas
    step_noise: torch.Tensor | None  # (S, N, 4, h, w), indexed like the schedule; None when eta = 0
    graph: torch.cuda.CUDAGraph | None = None

    @classmethod
    def allocate(cls, request: GenerationRequest, context_shape: tuple[int, ...], device) -> "LoopState":
        n, steps = request.num_samples, len(request.schedule)
        empty = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
        return cls(x=empty(*request.latent_shape), eps=empty(*request.latent_shape),
                   contexts=empty(n, *context_shape), hints=empty(*request.hint.shape),
                   scales=empty(2, len(request.control_scales)), guidance=empty(),
                   timesteps=empty(steps, dtype=torch.int32), coefficients=empty(4, steps),
                   step_noise=empty(steps, *request.latent_shape) if request.has_step_noise else None)

    def load(self, request: GenerationRequest, x: torch.Tensor, step_noise: torch.Tensor | None,
             contexts: torch.Tensor) -> None:
        s = request.schedule
        self.x.copy_(x)
        if self.step_noise is not None:
            self.step_noise.copy_(step_noise)
        self.contexts.copy_(contexts)
        self.hints.copy_(request.hint)
        self.scales.copy_(torch.from_numpy(request.control_scale_rows()))
        self.guidance.fill_(request.guidance_scale)
        self.timesteps.copy_(s.timesteps.to(torch.int32))
        self.coefficients.copy_(torch.stack([s.alphas, s.alphas_prev, s.sigmas, s.sqrt_one_minus_alphas]))


def _loop_key(request: GenerationRequest) -> tuple:
    """What fixes the work a captured loop does: batch, image size, step count, noise or not."""
    return tuple(request.hint.shape), len(request.schedule), request.has_step_noise


def encode_prompts(clip, request: GenerationRequest, stream: int) -> torch.Tensor:
    """(N, 2, 77, 768): the CLIP engine once per image on its [cond, uncond] tokens."""
    contexts = []
    for i in range(request.num_samples):
        tokens = torch.stack([request.cond_tokens[i], request.uncond_tokens[i]]).to(torch.int32)
        clip.tensors["tokens"].copy_(tokens)
        clip.execute(stream)
        contexts.append(clip.tensors["context"].clone())
    return torch.stack(contexts)


def denoise(state: LoopState, request: GenerationRequest, union, stream: int) -> None:
    """The DDIM loop on `state`, in place. Every operand is a LoopState tensor, a view of one or an
    engine buffer, so this exact sequence of operations can be captured and replayed."""
    io = union.tensors
    for index, _ in request.schedule.sampling_order():
        for i in range(request.num_samples):
            io["latent"].copy_(state.x[i].expand_as(io["latent"]))
            io["timestep"].copy_(state.timesteps[index].expand_as(io["timestep"]))
            io["context"].copy_(state.contexts[i])
            io["hint"].copy_(state.hints[i].expand_as(io["hint"]))
            io["control_scales"].copy_(state.scales)
            union.execute(stream)
            e_cond, e_uncond = io["eps"][0], io["eps"][1]
            state.eps[i].copy_(e_uncond + state.guidance * (e_cond - e_uncond))
        a_t, a_prev, sigma_t, sqrt_one_minus_at = state.coefficients[:, index]
        noise = state.step_noise[index] if state.step_noise is not None else None
        state.x.copy_(ddim_step(state.x, state.eps, a_t, a_prev, sigma_t, sqrt_one_minus_at, noise))


def decode(latents: torch.Tensor, vae, stream: int) -> torch.Tensor:
    """(N, H, W, 3) uint8: the VAE engine once per image."""
    images = []
    for i in range(latents.shape[0]):
        vae.tensors["latent"].copy_(latents[i:i + 1])
        vae.execute(stream)
        images.append(vae.tensors["image"][0].clone())
    return torch.stack(images)


class LoopRunner:
    """Runs `denoise` for each request: eagerly the first time a loop shape (`_loop_key`) is seen,
    which is that request's result and the warm-up TensorRT needs before a capture, then as one
    captured CUDA graph per loop shape. Call it inside `torch.cuda.stream(stream)`."""

    def __init__(self, stream, use_cuda_graph: bool = True):
        self.stream, self.use_cuda_graph = stream, use_cuda_graph
        self.loops: dict[tuple, LoopState] = {}

    def __call__(self, request: GenerationRequest, x: torch.Tensor, step_noise: torch.Tensor | None,
                 contexts: torch.Tensor, union) -> torch.Tensor:
        key = _loop_key(request)
        if key not in self.loops:
            self.loops[key] = LoopState.allocate(request, tuple(contexts.shape[1:]), x.device)
        state = self.loops[key]
        state.load(request, x, step_noise, contexts)
        if state.graph is not None:
            state.graph.replay()
            return state.x.clone()
        denoise(state, request, union, self.stream.cuda_stream if self.stream is not None else 0)
        result = state.x.clone()
        if self.use_cuda_graph:
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):  # records only: nothing runs, state is kept
                denoise(state, request, union, self.stream.cuda_stream)
            state.graph = graph
        return result


class TrtBackend:
    name = "trt"

    def __init__(self, cfg: ModelConfig, engine_dir: Path = DEFAULT_ENGINE_DIR, device: str | None = None,
                 use_cuda_graph: bool = True, load: Callable = load_engine):
        """`load(name, cfg, engine_dir, device, height, width)` returns an engine with `tensors` and
        `execute(stream)` (trt_utils.Engine by default; tests pass onnxruntime stand-ins, which
        also run on the CPU)."""
        self.device = torch.device(device or "cuda")
        self.cuda = self.device.type == "cuda"
        self.cfg, self.engine_dir, self.load = cfg, Path(engine_dir), load
        with self._on_device():
            # TensorRT's enqueue on the legacy default stream synchronises; a stream of our own does not
            self.stream = torch.cuda.Stream() if self.cuda else None
            self.clip = load("clip", cfg, self.engine_dir, self.device)
        self.engines_by_size: dict = {}
        self.run_loop = LoopRunner(self.stream, use_cuda_graph and self.cuda)

    def _on_device(self):
        return torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream if self.stream is not None else 0

    def engines_for(self, height: int, width: int):
        """The (union, vae) engines for one image size, loaded on first use."""
        if (height, width) not in self.engines_by_size:
            self.engines_by_size[height, width] = tuple(
                self.load(n, self.cfg, self.engine_dir, self.device, height, width) for n in ("union", "vae"))
        return self.engines_by_size[height, width]

    def generate(self, request: GenerationRequest) -> np.ndarray:
        height, width = request.hint.shape[2:]
        with self._on_device(), torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            x, step_noise = draw_noise(request, self.device)  # seeds, then draws: before any other draw
            union, vae = self.engines_for(height, width)
            contexts = encode_prompts(self.clip, request, self.stream_handle)
            self.last_latents = self.run_loop(request, x, step_noise, contexts, union)
            images = decode(self.last_latents, vae, self.stream_handle).cpu()
        return images.numpy()
