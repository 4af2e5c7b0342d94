"""The fast PyTorch back-end: fp16 union model, batched guidance, CUDA-graph-captured sampling.

Per image the GPU work is three captured graphs, replayed back to back:

    encode  CLIP on [cond, uncond] tokens (batch 2N) and the ControlNet hint block (once per image)
    loop    every DDIM step: the union model (ControlNet + UNet) on [x, x] with per-sample control
            scales, guidance e = e_u + s * (e_c - e_u), and the DDIM update in fp32; within a step
            the ControlNet runs on a second stream beside the UNet's encoder half
    decode  VAE decoder and the uint8 HWC conversion

The networks are the checkpoint's, in fp16 and channels-last, with each transformer block's q/k/v
(self-attention) and k/v (cross-attention) projections stacked into one matrix product.
docs/benchmarks.md records what each of these bought on the H100.

Graphs are captured on first use for each shape (num_samples, height, width, steps, eta > 0) and
reused; the step inputs that vary per call (tokens, hint, noise, schedule coefficients, guidance
and control scales) live in static buffers that are refilled before each replay. The networks can
be compiled with TorchInductor first; its cache lives in engines/ so a warm start skips codegen.

    python3 -m sdcanny.fast --prepare     # fill the compile cache at the graded shape (preprocess.sh)
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import compat
from .checkpoint import Networks
from .ddim import ddim_step
from .networks import BasicTransformerBlock, ControlNet, UNet, UnionModel, scale_controls, to_mixed_precision
from .paths import DEFAULT_ENGINE_DIR, default_checkpoint
from .pipeline import GenerationRequest, draw_noise
from .reference import to_uint8_hwc

DEFAULT_CACHE_DIR = DEFAULT_ENGINE_DIR / "torch_inductor_cache"


# Per-step values packed in one fp32 row, so that every step passes the compiled function a
# 32-byte-aligned view of the same shape (no recompilation, no re-capture per step).
STEP_ROW = 8


@functools.lru_cache(maxsize=16)  # schedules are cached too: one table per (steps, eta)
def step_table(schedule) -> torch.Tensor:
    """(S, 8) fp32: timestep (exact in fp32), alpha, alpha_prev, sigma, sqrt(1 - alpha), padding."""
    table = np.zeros((len(schedule), STEP_ROW), np.float32)
    for j, values in enumerate((schedule.timesteps, schedule.alphas, schedule.alphas_prev, schedule.sigmas,
                                schedule.sqrt_one_minus_alphas)):
        table[:, j] = values.numpy()
    return torch.from_numpy(table)


# One sampler step in three parts. The ControlNet and the UNet's encoder half both read only x,
# t and the context, so on a GPU they run on two streams at once (each alone leaves most of the
# chip idle at these small latents); the UNet's decoder half then adds the residuals, and the
# guidance and the DDIM update follow in fp32. Rows [:N] are the conditional branch, [N:] the
# unconditional one; `step` is a row of `step_table`.

def control_residuals(controlnet: ControlNet, x2: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      hint_features: torch.Tensor, control_scales: torch.Tensor) -> list[torch.Tensor]:
    return scale_controls(controlnet(x2, t, context, hint_features), control_scales)


def unet_encode(unet: UNet, x2: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
    return unet.encode(x2, t, context)


def unet_decode_and_step(unet: UNet, h, skips, emb, context, controls, x: torch.Tensor, step: torch.Tensor,
                         guidance: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    eps = unet.decode(h, skips, emb, context, controls).to(x.dtype)
    e_cond, e_uncond = eps.chunk(2)
    e_t = e_uncond + guidance * (e_cond - e_uncond)
    return ddim_step(x, e_t, step[1], step[2], step[3], step[4], noise)


def step_inputs(x: torch.Tensor, step: torch.Tensor, dtype: torch.dtype):
    """[x, x] in the network dtype and the timestep for both branches."""
    x2 = torch.cat([x, x]).to(dtype)
    return x2, step[0].expand(x2.shape[0])


def guided_ddim_step(union: UnionModel, x: torch.Tensor, step: torch.Tensor, context: torch.Tensor,
                     hint_features: torch.Tensor, control_scales: torch.Tensor, guidance: torch.Tensor,
                     noise: torch.Tensor | None) -> torch.Tensor:
    """The three parts in sequence (what the streams compute, on one stream)."""
    x2, t = step_inputs(x, step, next(union.parameters()).dtype)
    controls = control_residuals(union.controlnet, x2, t, context, hint_features, control_scales)
    h, skips, emb = unet_encode(union.unet, x2, t, context)
    return unet_decode_and_step(union.unet, h, skips, emb, context, controls, x, step, guidance, noise)


@dataclass
class Buffers:
    """Static inputs and outputs of the captured graphs for one shape."""
    tokens: torch.Tensor  # int64 (2N, 77)
    hint: torch.Tensor  # fp32 (N, 3, H, W)
    control_scales: torch.Tensor  # fp32 (2N, 13)
    guidance: torch.Tensor  # fp32 scalar
    steps: torch.Tensor  # fp32 (S, 8): step_table, in ascending timestep order
    x_init: torch.Tensor  # fp32 (N, 4, h, w)
    step_noise: torch.Tensor | None  # fp32 (S, N, 4, h, w) when eta > 0
    context: torch.Tensor | None = None  # written by encode
    hint_features: torch.Tensor | None = None
    latents: torch.Tensor | None = None  # written by loop
    images: torch.Tensor | None = None  # uint8 (N, H, W, 3), written by decode


class FastTorchBackend:
    name = "torch"

    # TorchInductor options per compile mode. 1x1 convolutions (zero convs, attention projections,
    # skip connections) run as plain matrix products; CUDA graphs are captured here, not by inductor.
    COMPILE_MODES = {"default": {"conv_1x1_as_mm": True},
                     "max-autotune": {"conv_1x1_as_mm": True, "max_autotune": True, "triton.cudagraphs": False}}

    def __init__(self, networks: Networks, device: str = "cuda", dtype: torch.dtype = torch.float16,
                 compile: str | None = "default", cuda_graphs: bool = True,
                 cache_dir: Path | None = DEFAULT_CACHE_DIR, fp32_islands: bool = False):
        """`compile`: None (eager), "default" or "max-autotune" (TorchInductor modes).
        `fp32_islands`: normalisations and the time embedding in fp32 (networks.fp32_islands), the
        numerics of the strongly typed TensorRT graphs; off by default (docs/benchmarks.md)."""
        if compile not in (None, *self.COMPILE_MODES):
            raise ValueError(f"compile must be None or one of {', '.join(self.COMPILE_MODES)}, got {compile!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        nets = networks.to(self.device, dtype)
        if fp32_islands:
            for net in (nets.clip, nets.controlnet, nets.unet, nets.vae):
                to_mixed_precision(net, dtype)
        self.clip = nets.clip
        self.union = UnionModel(nets.controlnet, nets.unet)
        for module in self.union.modules():
            if isinstance(module, BasicTransformerBlock):
                module.fuse_projections()
        self.vae = nets.vae
        if self.device.type == "cuda":  # cuDNN's fp16 convolutions are fastest in NHWC
            self.union.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # shapes are static: time the algorithms once
        self.parts = (control_residuals, unet_encode, unet_decode_and_step)
        self.decode_fn = self._decode
        self.side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.notes: list[str] = []  # one line each, printed by initialize()
        unavailable = compat.compile_unavailable_reason(self.device.type) if compile is not None else None
        if unavailable is not None:
            self.notes.append(f"torch back-end runs eager with CUDA graphs, not compiled: {unavailable}")
            compile = None
        if compile is not None:
            if cache_dir is not None:
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir).resolve()))
            inductor, dropped = compat.inductor_options(self.COMPILE_MODES[compile])
            if dropped:
                self.notes.append(f"TorchInductor options this torch lacks, not used: {', '.join(dropped)}")
            options = dict(fullgraph=True, dynamic=False, options=inductor)
            self.parts = tuple(torch.compile(fn, **options) for fn in self.parts)
            self.decode_fn = torch.compile(self._decode, **options)
        self.compiled = compile
        self.runs: dict[tuple, tuple[Buffers, list]] = {}
        self.time_stages = False  # benchmarks set this: CUDA events between the stages' replays
        self.step_callback = None  # optional f(i, x) after step i (0 = noisiest); runs the loop uncaptured
        self.last_stage_ms: dict[str, float] = {}
        self.last_latents: torch.Tensor | None = None

    # -- the three stages, written against the static buffers --------------------------------

    def _encode(self, b: Buffers) -> None:
        b.context = self.clip(b.tokens)
        features = self.union.controlnet.embed_hint(b.hint.to(self.dtype))
        b.hint_features = torch.cat([features, features])

    def _loop(self, b: Buffers) -> None:
        x = b.x_init
        for n, i in enumerate(reversed(range(len(b.steps)))):
            x = self._step(b, x, b.steps[i], b.step_noise[i] if b.step_noise is not None else None)
            if self.step_callback is not None:
                self.step_callback(n, x)
        b.latents = x

    def _step(self, b: Buffers, x: torch.Tensor, step: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """guided_ddim_step, with the ControlNet forked onto the side stream (on a GPU) while the UNet
        encoder runs here; the two join before the decoder half."""
        control_fn, encode_fn, decode_fn = self.parts
        x2, t = step_inputs(x, step, self.dtype)
        fork = self.side_stream is not None
        if fork:
            main = torch.cuda.current_stream(self.device)
            self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream) if fork else contextlib.nullcontext():
            controls = control_fn(self.union.controlnet, x2, t, b.context, b.hint_features, b.control_scales)
        h, skips, emb = encode_fn(self.union.unet, x2, t, b.context)
        if fork:
            main.wait_stream(self.side_stream)
        return decode_fn(self.union.unet, h, skips, emb, b.context, controls, x, step, b.guidance, noise)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae(latents.to(self.dtype).contiguous(memory_format=torch.channels_last)
                          if self.device.type == "cuda" else latents.to(self.dtype))
        return to_uint8_hwc(images.float())

    def _decode_stage(self, b: Buffers) -> None:
        b.images = self.decode_fn(b.latents)

    STAGES = ("encode", "loop", "decode")

    # -- buffers, capture, replay -------------------------------------------------------------

    def _new_buffers(self, request: GenerationRequest) -> Buffers:
        n, (_, _, h, w), steps = request.num_samples, request.hint.shape, len(request.schedule)
        dev, f32 = self.device, torch.float32
        return Buffers(
            tokens=torch.zeros(2 * n, request.cond_tokens.shape[1], dtype=torch.long, device=dev),
            hint=torch.zeros(n, 3, h, w, dtype=f32, device=dev),
            control_scales=torch.zeros(2 * n, len(request.control_scales), dtype=f32, device=dev),
            guidance=torch.zeros((), dtype=f32, device=dev),
            steps=torch.zeros(steps, STEP_ROW, dtype=f32, device=dev),
            x_init=torch.zeros(request.latent_shape, dtype=f32, device=dev),
            step_noise=torch.zeros((steps, *request.latent_shape), dtype=f32, device=dev) if request.has_step_noise else None)

    def _draw_noise(self, b: Buffers, request: GenerationRequest) -> None:
        x, step_noise = draw_noise(request, self.device)
        b.x_init.copy_(x)
        if step_noise is not None:
            b.step_noise.copy_(step_noise)

    def _copy_inputs(self, b: Buffers, request: GenerationRequest) -> None:
        """Host-side work in numpy (torch's CPU kernels wake every intra-op thread: ~1 ms per tiny op
        on a 16-core host); each buffer then takes one host-to-device copy, with no dtype change."""
        b.tokens.copy_(torch.from_numpy(np.concatenate([request.cond_tokens.numpy(), request.uncond_tokens.numpy()])))
        b.hint.copy_(request.hint)
        rows = request.control_scale_rows()  # [cond, uncond] -> N cond rows, then N uncond rows
        b.control_scales.copy_(torch.from_numpy(np.repeat(rows, request.num_samples, axis=0)))
        b.guidance.fill_(request.guidance_scale)
        b.steps.copy_(step_table(request.schedule))

    def _stage_fns(self, b: Buffers):
        return [lambda: self._encode(b), lambda: self._loop(b), lambda: self._decode_stage(b)]

    def _capture(self, b: Buffers) -> list:
        """Warm up on a side stream (compiles and autotunes), then capture one graph per stage."""
        fns = self._stage_fns(b)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                for fn in fns:
                    fn()
        torch.cuda.current_stream().wait_stream(side)
        pool, graphs = None, []
        for fn in fns:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                fn()
            pool = graph.pool()
            graphs.append(graph)
        return graphs

    def _runner(self, request: GenerationRequest) -> tuple[Buffers, list | None]:
        key = (request.num_samples, *request.hint.shape[2:], len(request.schedule),
               request.has_step_noise, request.cond_tokens.shape[1])
        if key not in self.runs:
            b = self._new_buffers(request)
            self._copy_inputs(b, request)  # warm-up and capture run on real inputs, zero noise
            self.runs[key] = (b, self._capture(b) if self.cuda_graphs else None)
        return self.runs[key]

    def generate(self, request: GenerationRequest) -> np.ndarray:
        b, graphs = self._runner(request)
        self._draw_noise(b, request)
        self._copy_inputs(b, request)
        captured = graphs is not None and self.step_callback is None
        stages = [g.replay for g in graphs] if captured else self._stage_fns(b)
        if self.time_stages and self.device.type == "cuda":
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(stages) + 1)]
            events[0].record()
            for stage, event in zip(stages, events[1:]):
                stage()
                event.record()
            torch.cuda.synchronize()
            self.last_stage_ms = {name: events[i].elapsed_time(events[i + 1]) for i, name in enumerate(self.STAGES)}
        else:
            for stage in stages:
                stage()
        self.last_latents = b.latents
        return b.images.cpu().numpy()


def prepare(checkpoint: Path, config: str = "sd15") -> None:
    """Compile and capture the graded shape once, so later starts load from the cache in engines/."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from canny2image_TRT import hackathon

    h = hackathon(backend="torch", checkpoint=checkpoint, config=config)
    h.initialize()  # warms up on the graded call
    print(f"torch back-end prepared in {h.initialize_seconds:.0f} s (compile cache: {DEFAULT_CACHE_DIR})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Prepare the fast PyTorch back-end (compile cache).")
    ap.add_argument("--prepare", action="store_true", required=True)
    ap.add_argument("--checkpoint", type=Path, default=default_checkpoint())
    ap.add_argument("--config", default="sd15")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the torch back-end needs a CUDA GPU; nothing to prepare here")
    prepare(args.checkpoint, args.config)


if __name__ == "__main__":
    main()
