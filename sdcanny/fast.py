"""The fast PyTorch back-end: fp16 stages, batched guidance, CUDA-graph-captured sampling.

Per image the GPU work is four captured graphs:

    text    CLIP on [cond, uncond] tokens (batch 2N) and the cross-attention keys and values; only
            when the prompts differ from the last call's at that size
    hint    the ControlNet hint block
    step    one DDIM step, replayed once per step: the ControlNet on a second stream beside the
            UNet's encoder half, then the decoder half, guidance and the DDIM update in fp32
            (sdcanny/stages.py)
    decode  VAE decoder and the uint8 HWC conversion, and whether the latents are all finite

Every step's time embedding is made once per schedule, ahead of the loop (Stages.time_rows).

The stages run in one of three forms, chosen per size (num_samples, height, width):

    compiled ahead   programs from `python3 -m sdcanny.fast --prepare` (preprocess.sh), saved by
                     torch.compile's aot_compile: every size in their range; a start loads them
                     in seconds instead of compiling (sdcanny/programs.py)
    compiled here    torch.compile in this process, for the first size it meets (initialize()'s
                     warm-up, the graded call); used where there are no current programs
    eager            every other size: the networks' own kernels, still CUDA-graph captured

Each of the four parts runs uncaptured the first time it runs at a size (its warm-up:
compilation in the in-process form, library handles, kernel tuning), is captured the next time,
and is replayed from then on. The step's next time is the next step, so a size's first call already
replays 19 of its 20 steps; text, hint and decode are captured at its second call. A size never seen
before costs about one step more than a prepared one, and never a compilation outside the
in-process form's one size. cuDNN times its convolution algorithms for the first size
(initialize()'s, the graded one); later sizes take its heuristic choice rather than timing every
candidate (seconds per size at large sizes), unless `tune_new_sizes`. Graphs are kept for the
`max_captured_sizes` most recently used sizes.

The first size (initialize()'s) also captures its whole sampling loop, every step with the copies
of its rows, as a fifth graph ("loop") at its second call, once per process (`capture_loop`): 20
replays of the step's graph, each launched after two copies, took about 1 ms more a graded call
than one graph of them all (H100). Capturing 20 steps takes about 20 times one step's capture, too
long for a request at a new size, so the other sizes replay the step's graph per step; so does the
first size at another step count (which releases its loop graph) or with step noise where it was
captured without (or the reverse).

A request's host work is ordered so that the GPU waits for it as little as possible: the work image
(or the canny map, where it is made on the host) goes up first and the hint (and text) part is
launched before the generators are seeded, the noise is drawn and the other inputs go up; no
host-to-device copy waits for the GPU; the images and the finiteness flag come back in one wait.
docs/benchmarks.md records what each choice costs and buys on the H100.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch

from . import compat, fp8, fused_attention, fused_conv, fused_norm, fused_scores, gpu_canny, programs
from . import fused_geglu as geglu_op  # not the name of the option that turns it on
from .checkpoint import Networks, check_checkpoint_path, load_networks
from .config import CONFIGS, ModelConfig
from .networks import (BasicTransformerBlock, fold_cross_attention, fold_transformer_outputs, fold_upsampling,
                       index_cross_attention, pad_output_channels, stack_time_projections, to_mixed_precision,
                       use_fp8_patch_products, use_patch_products)
from .paths import DEFAULT_ENGINE_DIR, default_checkpoint
from .pipeline import GenerationRequest, draw_noise
from .stages import STEP_ROW, Stages, step_inputs

DEFAULT_CACHE_DIR = DEFAULT_ENGINE_DIR / "torch_inductor_cache"
# 3x3 convolutions of at most this many output rows run as patches times weights: the graded call's
# 4x6 and 8x12 latents for its two guidance branches (48 and 192 rows), where the weights' reading
# bounds them (docs/benchmarks.md)
PATCH_PRODUCT_ROWS = 192


@functools.lru_cache(maxsize=16)  # schedules are cached too: one table per (steps, eta)
def step_table(schedule) -> torch.Tensor:
    """(S, 8) fp32: timestep (exact in fp32), alpha, alpha_prev, sigma, sqrt(1 - alpha), padding.
    Every step passes the stages a 32-byte-aligned row of the same shape."""
    table = np.zeros((len(schedule), STEP_ROW), np.float32)
    for j, values in enumerate((schedule.timesteps, schedule.alphas, schedule.alphas_prev, schedule.sigmas,
                                schedule.sqrt_one_minus_alphas)):
        table[:, j] = values.numpy()
    return torch.from_numpy(table)


@dataclass
class Buffers:
    """Static inputs and outputs of the captured graphs for one size."""
    tokens: torch.Tensor  # int64 (2N, 77)
    edges: torch.Tensor  # uint8 (N, 1, H, W): the canny map, one row per sample
    control_scales: torch.Tensor  # fp32 (2N, 13)
    guidance: torch.Tensor  # fp32 scalar
    x: torch.Tensor  # fp32 (N, 4, h, w): the initial noise, updated in place by each step
    step_row: torch.Tensor  # fp32 (8,): this step's row of `steps`, copied in before the step
    noise: torch.Tensor  # fp32 (N, 4, h, w): this step's row of `step_noise` (zeros when eta = 0)
    time_row: torch.Tensor | None = None  # (1, columns): this step's row of the schedule's time_rows
    # where the canny map is made on the GPU (FastTorchBackend.canny_on_gpu): the work image and the
    # canny thresholds, which the hint part reads to write `edges`
    image: torch.Tensor | None = None  # uint8 (H, W, 3)
    canny_thresholds: torch.Tensor | None = None  # int32 (2,): (low, high) as gpu_canny.thresholds
    # Written by text and hint (copied into, once they exist: a step captured before them reads them):
    control_context: torch.Tensor | list | None = None  # the context as each network takes it
    unet_context: torch.Tensor | list | None = None
    hint_features: torch.Tensor | None = None
    # Read between the step graph's replays, or by the loop graph: a new step count reallocates
    # them, and releases the loop graph (Run.loop_key):
    steps: torch.Tensor | None = None  # fp32 (S, 8): step_table, in ascending timestep order
    time_rows: torch.Tensor | None = None  # (S, columns): Stages.time_rows of `steps`' timesteps
    step_noise: torch.Tensor | None = None  # fp32 (S, N, 4, h, w); read only where eta > 0
    images: torch.Tensor | None = None  # uint8 (N, H, W, 3), written by decode
    finite: torch.Tensor | None = None  # bool scalar, written by decode: whether x is all finite
    host_images: torch.Tensor | None = None  # pinned copies of images and finite (on a GPU)
    host_finite: torch.Tensor | None = None
    host_image: torch.Tensor | None = None  # pinned staging of `image` (uint8 (H, W, 3)), where there is one


@dataclass
class Run:
    """One size's buffers, graphs, and how its stages were made."""
    buffers: Buffers
    fns: dict  # stage name -> callable
    form: str  # "compiled ahead", "compiled here" or "eager"
    tune_convs: bool  # cuDNN times its convolution algorithms for this size (else its heuristics choose)
    graphs: dict = field(default_factory=dict)  # part name ("text", "hint", "step", "decode", "loop") -> its CUDA graph
    loop_key: tuple | None = None  # (steps, step noise or not): what graphs["loop"] was captured for
    schedule: object | None = None  # the DDIM schedule whose rows buffers.steps and .time_rows hold
    warmed: set = field(default_factory=set)  # the parts that have run once uncaptured
    pool: tuple | None = None  # the memory pool the size's graphs share
    first_call_s: float | None = None  # host clock, device synchronised
    capture_s: float = 0.0  # seconds spent capturing, all parts together
    text_tokens: np.ndarray | None = None  # the tokens whose text encoding the buffers hold
    canny_thresholds: tuple | None = None  # the (low, high) that buffers.canny_thresholds holds
    step_inputs: tuple | None = None  # the (control scale rows' bytes, guidance) the buffers hold


def tensor_sizes(request: GenerationRequest) -> tuple:
    """What the stages' tensor shapes, and so a size's graphs, depend on: (num_samples, height,
    width, tokens). Not the step count: the loop replays one step's graph per step."""
    return (request.num_samples, *request.work_image.shape[:2], request.cond_tokens.shape[1])


def copy_into(destination, source) -> None:
    """Copies tensors, or lists and tuples of them, into tensors of the same structure."""
    if isinstance(destination, torch.Tensor):
        destination.copy_(source)
        return
    if len(destination) != len(source):
        raise ValueError(f"{len(source)} tensors for {len(destination)} places")
    for d, s in zip(destination, source):
        copy_into(d, s)


NetworksSource = Union[Networks, Callable[[], Networks]]


@contextlib.contextmanager
def cudnn_settings(benchmark: bool, deterministic: bool):
    """torch.backends.cudnn.benchmark and .deterministic set for a block (torch 2.0's cudnn.flags()
    would also reset the other flags to its defaults)."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


class FastTorchBackend:
    name = "torch"

    # TorchInductor options per compile mode. 1x1 convolutions (zero convs, attention projections,
    # skip connections) run as plain matrix products; CUDA graphs are captured here, not by inductor.
    COMPILE_MODES = {"default": {"conv_1x1_as_mm": True},
                     "max-autotune": {"conv_1x1_as_mm": True, "max_autotune": True, "triton.cudagraphs": False}}
    # Programmatic dependent launch (Hopper and later; torch 2.9+ has the option): each Triton
    # kernel is launched while the kernel before it finishes and waits on the device for its
    # results, so the gap between two small kernels shrinks (docs/benchmarks.md)
    OVERLAP_OPTIONS = {"triton.enable_pdl": True}

    def __init__(self, networks: NetworksSource, device: str = "cuda", dtype: torch.dtype = torch.float16,
                 compile: str | None = "default", cuda_graphs: bool = True,
                 cache_dir: Path | None = DEFAULT_CACHE_DIR, fp32_islands: bool = False,
                 max_captured_sizes: int = 8, tune_new_sizes: bool = False, stack_time_projections: bool = True,
                 precompute_cross_attention: bool = True, reuse_text: bool = True, overlap_launches: bool = True,
                 fold_upsampling: bool = True, fused_group_norm: bool = True, fold_cross_attention: bool = True,
                 fold_transformer_outputs: bool = True, attention_kernel: bool = True,
                 attention_kernel_keys: int = fused_attention.KERNEL_KEYS, patch_product_rows: int = PATCH_PRODUCT_ROWS,
                 norm_patches: bool = True, overlap_kernels: bool = True, deterministic_convolutions: bool = True,
                 vae_group_norm: bool = True, pad_output_channels: bool = True, fp8_patch_products: bool = True,
                 fused_geglu: bool = True, scores_kernel: bool = True, capture_loop: bool = True,
                 vae_conv_bias_in_norm: bool = True, conv_kernel: bool = True, conv_adds_skip: bool = True,
                 share_first_layers: bool = True, canny_on_gpu: bool = True):
        """`networks`: the networks, or a function that loads them (called when the first size
        needs them, or before any programs load; prepared programs take the stage modules
        as inputs too).
        `compile`: None (eager), "default" or "max-autotune" (TorchInductor modes).
        `fp32_islands`: normalisations and the time embedding in fp32 (networks.fp32_islands), the
        numerics of the strongly typed TensorRT graphs; off by default (docs/benchmarks.md).
        `tune_new_sizes`: sizes after the first time cuDNN's convolution algorithms too (the first
        always does); off, they take cuDNN's heuristic choice and start seconds sooner.
        `stack_time_projections`: the ResBlocks' timestep projections as one matrix product per
        network and step (networks.stack_time_projections); off only to measure what it buys.
        `precompute_cross_attention`: the text's cross-attention keys and values made with the text
        encoding, not at every step (networks.index_cross_attention); off only to measure what it buys.
        `reuse_text`: a call whose prompts give the tokens of the last call at its size keeps that
        call's text encoding (CLIP, the keys and values) instead of making it again; off only to
        measure what it buys.
        `overlap_launches`: compiled Triton kernels launched with programmatic dependent launch
        (OVERLAP_OPTIONS) where torch and the GPU have it; off only to measure what it buys.
        `fold_upsampling`: each nearest-neighbour doubling and the 3x3 convolution after it (the
        UNet's three, the VAE decoder's three) as 2x2 convolutions of the undoubled image
        (networks.Upsample.fold_upsampling); off only to measure what it buys.
        `fused_group_norm`: the ControlNet's and UNet's GroupNorms, with their SiLU and addend, as
        one Triton kernel each (sdcanny/fused_norm.py) where torch (2.4+) and triton allow; off only
        to measure what it buys.
        `fold_cross_attention`: each cross-attention's query and output projections folded into
        rows made with the text's keys and values (networks.fold_cross_attention; needs
        `precompute_cross_attention`); off only to measure what it buys.
        `fold_transformer_outputs`: each SpatialTransformer's output projection and its feed-forward's
        last product as one product (networks.fold_transformer_outputs); off only to measure what
        it buys.
        `attention_kernel`: the ControlNet's and UNet's attentions that are not folded, up to 512 keys,
        through one Triton kernel each (sdcanny/fused_attention.py) where torch (2.4+), triton and
        the GPU (Hopper or later, where it was measured) allow; longer ones stay SDPA; off only to
        measure what it buys. `attention_kernel_keys` moves that bound.
        `patch_product_rows`: the ControlNet's and UNet's 3x3 convolutions with at most this many output
        rows (samples x latent pixels) as one matrix product of the input's patches and the weights
        (networks.conv3x3_as_product), in code compiled for its size (the graded programs, the first
        size in-process); the programs of symbolic sizes and sizes run eager go without
        (networks.takes_patch_product, programs.compile_variant). 0 runs every one through cuDNN.
        `norm_patches`: where a ResBlock's convolution is a patch product, the fused GroupNorm before
        it writes the patches itself (networks.norm_conv3x3); off only to measure what it buys.
        `overlap_kernels`: our Triton kernels (GroupNorm, attention) launched with programmatic
        dependent launch where the GPU and triton have it (compat.kernel_launches_overlap), as
        `overlap_launches` does for TorchInductor's; off only to measure what it buys.
        `deterministic_convolutions`: cuDNN chooses among its deterministic convolution algorithms
        only (torch.backends.cudnn.deterministic while a request runs). Its other algorithms, split-K
        ones, need a zeroed workspace: a memset before the convolution, 11-15 a step with a gap
        of 3-7 µs after each; without them the graded loop was 0.46 ms shorter
        (docs/benchmarks.md). Off only to measure what it buys.
        `vae_group_norm`: the VAE decoder's GroupNorms (and SiLUs) through the op as well, where
        `fused_group_norm` is on, its tiled kernels for their large groups
        (group_norm_kernel.tiled_group_norm_act); off only to measure what it buys.
        `pad_output_channels`: the UNet's and the VAE decoder's last convolutions (4 and 3 channels)
        run with their weights padded to 8 filters (networks.OutputConv), so that cuDNN pads
        nothing in kernels of its own; off only to measure what it buys.
        `fp8_patch_products`: where the fused GroupNorm writes a ResBlock convolution's patches, it
        writes them as two e4m3 terms and the product is fp8 x fp8 with e4m3 weights (sdcanny/fp8.py)
        where torch (2.5+), triton and the GPU (fp8 tensor cores) allow; off, those products are
        fp16 (docs/benchmarks.md has what it buys and what it costs in fidelity).
        `fused_geglu`: where a transformer's output projection is folded, the folded product's input
        (the feed-forward's GEGLU and the residual beside it) comes from one Triton kernel
        (sdcanny/fused_geglu.py) where torch (2.4+), triton and the GPU (Hopper or later) allow;
        off only to measure what it buys.
        `scores_kernel`: the folded cross-attentions' weights (the scores product and each head's
        softmax) from one Triton kernel each (sdcanny/fused_scores.py) where torch (2.4+), triton and
        the GPU (Hopper or later) allow; off only to measure what it buys.
        `capture_loop`: the first size's sampling loop captured whole at its second call (the
        module's docstring says when it is replayed); off only to measure what it buys.
        `vae_conv_bias_in_norm`: where `vae_group_norm` is on, each VAE ResBlock's first convolution
        runs without its bias and the op of the norm after it adds the bias
        (fused_norm.conv_biases_in_norms); off only to measure what it buys.
        `conv_kernel`: the 3x3 convolutions of the ControlNet's and UNet's 320-channel ResBlocks (the
        graded 32x48 latent's) through our CUDA kernel for Hopper (sdcanny/fused_conv.py) where the
        GPU (compute capability 9.0) and NVRTC allow and the shape makes one or two waves of blocks;
        off only to measure what it buys. `conv_adds_skip`: there, the second convolution's epilogue
        adds the ResBlock's skip; off only to measure what it buys.
        `share_first_layers`: the ControlNet and the UNet take the step's latents once (N rows), and
        their layers before the first cross-attention run once for both guidance branches, which
        they compute alike (networks.both_branches); off, they take [x, x] (2N rows) from the first
        layer on; off only to measure what it buys.
        `canny_on_gpu`: the canny map made in the hint part from the work image, bit for bit as
        cv2.Canny makes it (sdcanny/gpu_canny.py), where the GPU and NVRTC take its kernels
        and the image fits it; else on the host, before the call reaches the GPU."""
        if compile not in (None, *self.COMPILE_MODES):
            raise ValueError(f"compile must be None or one of {', '.join(self.COMPILE_MODES)}, got {compile!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.fp32_islands = fp32_islands
        self.max_captured_sizes = max_captured_sizes
        self.tune_new_sizes = tune_new_sizes
        self.stack_time_projections = stack_time_projections
        self.precompute_cross_attention = precompute_cross_attention
        self.reuse_text = reuse_text
        self.overlap_launches = overlap_launches
        self.fold_upsampling = fold_upsampling
        self.fold_cross_attention = fold_cross_attention and precompute_cross_attention
        self.fold_transformer_outputs = fold_transformer_outputs
        if patch_product_rows < 0:
            raise ValueError(f"patch_product_rows must be 0 or more, got {patch_product_rows}")
        self.patch_product_rows = patch_product_rows
        if attention_kernel_keys < 1:
            raise ValueError(f"attention_kernel_keys must be 1 or more, got {attention_kernel_keys}")
        self.attention_kernel_keys = attention_kernel_keys
        self.norm_patches = norm_patches
        self.overlap_kernels = overlap_kernels
        self.deterministic_convolutions = deterministic_convolutions
        self.capture_loop = capture_loop
        self._loop_captured = False  # once per process: see the module's docstring
        self.side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.notes: list[str] = []  # one line each, printed by initialize()
        self.fused_group_norm = self._kernel_usable(fused_group_norm, fused_norm.unavailable_reason)
        self.vae_group_norm = vae_group_norm and self.fused_group_norm
        self.vae_conv_bias_in_norm = vae_conv_bias_in_norm and self.vae_group_norm
        self.pad_output_channels = pad_output_channels
        self.attention_kernel = self._kernel_usable(attention_kernel, fused_attention.unavailable_reason)
        self.conv_kernel = self._kernel_usable(conv_kernel, fused_conv.unavailable_reason)
        self.conv_adds_skip = conv_adds_skip and self.conv_kernel
        self.share_first_layers = share_first_layers
        self.canny_on_gpu = self._kernel_usable(canny_on_gpu, gpu_canny.unavailable_reason)
        self.fp8_patch_products = self._kernel_usable(
            fp8_patch_products and self.fused_group_norm and norm_patches and patch_product_rows > 0,
            fp8.unavailable_reason)
        self.fused_geglu = self._kernel_usable(fused_geglu and fold_transformer_outputs, geglu_op.unavailable_reason)
        self.scores_kernel = self._kernel_usable(scores_kernel and self.fold_cross_attention,
                                                 fused_scores.unavailable_reason)
        unavailable = compat.compile_unavailable_reason(self.device.type) if compile is not None else None
        if unavailable is not None:
            self.notes.append(f"torch back-end runs eager with CUDA graphs, not compiled: {unavailable}")
            compile = None
        self.compiled = compile
        self.inductor_options: dict = {}
        if compile is not None:
            if cache_dir is not None:
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir).resolve()))
            wanted = {**self.COMPILE_MODES[compile], **(self.OVERLAP_OPTIONS if overlap_launches else {})}
            self.inductor_options, dropped = compat.inductor_options(wanted)
            if dropped:
                self.notes.append(f"TorchInductor options this torch lacks, not used: {', '.join(dropped)}")
        self._networks_source = networks
        self._stages: Stages | None = None
        self._compiled_here: dict | None = None  # torch.compile'd stages, serving `_compiled_size` only
        self._compiled_size: tuple | None = None
        self.programs: dict | None = None  # variant -> stage -> compiled program, serving `program_range`
        self.program_dir: Path | None = None  # where the programs of the kinds not loaded yet are
        self.program_range: programs.ShapeRange | None = None
        self.program_variants: tuple[str, ...] = ()
        self.startup: dict[str, float] = {}  # seconds per start-up stage, in order
        self.runs: OrderedDict[tuple, Run] = OrderedDict()
        self._first_size: tuple | None = None  # the size cuDNN tunes for without tune_new_sizes
        self.time_stages = False  # benchmarks set this: CUDA events between the stages' replays
        self.step_callback = None  # optional f(i, x) after step i (0 = noisiest); runs the loop uncaptured
        self.last_stage_ms: dict[str, float] = {}
        self.last_latents: torch.Tensor | None = None
        self.last_finite: bool | None = None  # whether last_latents are all finite (the decode stage's check)
        self.last_form: str | None = None
        self._schedule_rows: OrderedDict = OrderedDict()  # schedule -> (step_table, Stages.time_rows) on the device

    def _kernel_usable(self, wanted: bool, unavailable_reason: Callable) -> bool:
        """Whether a kernel option that is `wanted` can be on here; on a GPU that cannot take it,
        a note says why (off a GPU the torch path is expected and said nowhere)."""
        unavailable = unavailable_reason(self.device) if wanted else None
        if unavailable is not None and self.device.type == "cuda":
            self.notes.append(unavailable)
        return wanted and unavailable is None

    @classmethod
    def create(cls, checkpoint: Path, cfg: ModelConfig, device: str = "cuda",
               program_dir: Path = programs.DEFAULT_PROGRAM_DIR, **options) -> "FastTorchBackend":
        """The back-end for `checkpoint`, on the programs in `program_dir` where they are current."""
        start = time.perf_counter()
        check_checkpoint_path(Path(checkpoint))  # a clear error now, not at the first size
        backend = cls(lambda: load_networks(checkpoint, cfg), device, **options)
        backend.startup["set-up (CUDA, compiler)"] = time.perf_counter() - start
        if backend.compiled is not None:
            backend.attach_programs(program_dir, backend.identity(cfg))
        return backend

    def identity(self, cfg: ModelConfig) -> dict:
        """What prepared programs must have been built from to serve this back-end."""
        numerics = {"compile": self.compiled, "fp32_islands": self.fp32_islands,
                    "stack_time_projections": self.stack_time_projections,
                    "precompute_cross_attention": self.precompute_cross_attention,
                    "overlap_launches": self.overlap_launches, "fold_upsampling": self.fold_upsampling,
                    "fused_group_norm": self.fused_group_norm, "fold_cross_attention": self.fold_cross_attention,
                    "fold_transformer_outputs": self.fold_transformer_outputs, "attention_kernel": self.attention_kernel,
                    "attention_kernel_keys": self.attention_kernel_keys, "patch_product_rows": self.patch_product_rows,
                    "norm_patches": self.norm_patches, "overlap_kernels": self.overlap_kernels,
                    "vae_group_norm": self.vae_group_norm, "pad_output_channels": self.pad_output_channels,
                    "fp8_patch_products": self.fp8_patch_products, "fused_geglu": self.fused_geglu,
                    "scores_kernel": self.scores_kernel, "vae_conv_bias_in_norm": self.vae_conv_bias_in_norm,
                    "conv_kernel": self.conv_kernel, "conv_adds_skip": self.conv_adds_skip,
                    "share_first_layers": self.share_first_layers}
        return programs.build_identity(cfg, self.device, self.dtype, numerics)

    def attach_programs(self, program_dir: Path, identity: dict) -> None:
        reason = programs.stale_reason(program_dir, identity)
        if reason is not None:
            self.notes.append(f"not using ahead-of-time programs: {reason}. `python3 -m sdcanny.fast --prepare` "
                              "(run by preprocess.sh) compiles every size ahead for a start in seconds; until then "
                              "the first size is compiled in this process and other sizes run eager")
            return
        self.program_dir = Path(program_dir)
        self.program_range, self.program_variants = programs.record_range(program_dir)
        self.programs = {}
        if "graded" in self.program_variants:  # the size initialize() runs
            self._load_programs("graded")

    def _load_programs(self, variant: str) -> dict:
        """One kind of size's programs, loaded when a size first needs them: loading every kind
        took 17-20 s on the H100 machine, most of a start, for kinds a session may never use.
        The networks are read first: read after a kind's load, the same read took 3.4-4.1 s instead
        of 0.2 s on the H100 machine (docs/benchmarks.md)."""
        self.read_networks()
        start = time.perf_counter()
        self.programs[variant] = programs.load(self.program_dir, (variant,))[variant]
        seconds = time.perf_counter() - start
        if not self.runs:
            self.startup[f"programs loaded ({variant})"] = seconds
        else:
            self.notes.append(f"the programs for {variant} loaded in {seconds:.1f} s, at the first size of that kind")
        return self.programs[variant]

    # -- the networks, when a size needs them -------------------------------------------------

    def read_networks(self) -> Stages:
        """The stages, the checkpoint read and the networks moved to the device now where that
        has not happened yet (else the first size that needs them does it)."""
        return self.stages

    @property
    def stages(self) -> Stages:
        if self._stages is None:
            source = self._networks_source
            start = time.perf_counter()
            nets = source() if callable(source) else source
            read = time.perf_counter()
            self._stages = self._stages_of(nets)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if callable(source):
                self.startup["checkpoint read"] = read - start
            self.startup["networks to device"] = time.perf_counter() - read
        return self._stages

    def _stages_of(self, networks: Networks) -> Stages:
        nets = networks.to(self.device, self.dtype)
        if self.fp32_islands:
            for net in (nets.clip, nets.controlnet, nets.unet, nets.vae):
                to_mixed_precision(net, self.dtype)
        for net in (nets.controlnet, nets.unet):
            for module in net.modules():
                if isinstance(module, BasicTransformerBlock):
                    module.fuse_projections()
            if self.stack_time_projections:
                stack_time_projections(net)
            if self.precompute_cross_attention:
                index_cross_attention(net)
            if self.fold_cross_attention:
                fold_cross_attention(net, nets.clip.max_length)
            if self.scores_kernel:
                fused_scores.use_fused_scores(net, self.overlap_kernels)
            if self.fold_transformer_outputs:
                fold_transformer_outputs(net)
            if self.fused_geglu:
                geglu_op.use_fused_geglu(net, self.overlap_kernels)
            use_patch_products(net, self.patch_product_rows)
        if self.fold_upsampling:
            for net in (nets.unet, nets.vae):
                fold_upsampling(net)
        if self.pad_output_channels:
            for net in (nets.unet, nets.vae):
                pad_output_channels(net)
        if self.fused_group_norm:
            for net in (nets.controlnet, nets.unet):
                fused_norm.use_fused_group_norm(net, self.norm_patches, self.overlap_kernels)
                if self.fp8_patch_products:
                    use_fp8_patch_products(net, self.patch_product_rows)
            if self.vae_group_norm:
                fused_norm.use_fused_group_norm(nets.vae, overlap=self.overlap_kernels, tiles=True)
                if self.vae_conv_bias_in_norm:
                    fused_norm.conv_biases_in_norms(nets.vae)
        if self.attention_kernel:
            for net in (nets.controlnet, nets.unet):
                fused_attention.use_fused_attention(net, self.attention_kernel_keys, self.overlap_kernels)
        if self.conv_kernel:
            for net in (nets.controlnet, nets.unet):
                fused_conv.use_conv_kernel(net, adds_skip=self.conv_adds_skip)
        channels_last = self.device.type == "cuda"  # cuDNN's fp16 convolutions are fastest in NHWC
        if channels_last:
            for net in (nets.controlnet, nets.unet, nets.vae):
                net.to(memory_format=torch.channels_last)
        return Stages.of(nets.clip, nets.controlnet, nets.unet, nets.vae, channels_last)

    def _stage_fns_for(self, sizes: tuple) -> tuple[dict, str]:
        """The stage callables that serve these tensor sizes, and which form they are."""
        num_samples, height, width, tokens = sizes
        if self.programs is not None:
            variant, problem = self.program_range.variant_for(num_samples, height // 8, width // 8, tokens,
                                                              self.program_variants)
            if variant is not None:
                loaded = self.programs.get(variant) or self._load_programs(variant)
                return {name: programs.PreparedStage(name, loaded[name], stage, variant)
                        for name, stage in self.stages.items()}, "compiled ahead"
            self._note_once(f"{problem}: that size runs eager")
        if self.compiled is not None and self.programs is None and self._compiled_size in (None, sizes):
            if self._compiled_here is None:
                options = dict(fullgraph=True, dynamic=False, options=self.inductor_options)
                self._compiled_here = {name: torch.compile(stage, **options) for name, stage in self.stages.items()}
                self._compiled_size = sizes
            return self._compiled_here, "compiled here"
        return dict(self.stages.items()), "eager"

    # -- the graph stages, written against the static buffers ----------------------------------
    # Encode, one sampler step and decode are captured each; the loop replays the step's graph once
    # per step after copying that step's row in. A capture then costs one step's launches, not
    # twenty steps' (about a second at every size on the H100, docs/benchmarks.md).

    def _text(self, fns: dict, b: Buffers) -> None:
        outputs = fns["text"](b.tokens)
        if b.control_context is None:
            b.control_context, b.unet_context = outputs
        else:  # the step's graph reads these very tensors
            copy_into((b.control_context, b.unet_context), outputs)

    def _hint(self, fns: dict, b: Buffers) -> None:
        if b.image is not None:  # the canny map made here (canny_on_gpu), into every sample's row
            gpu_canny.canny_into(b.edges, b.image, b.canny_thresholds)
        features = fns["hint"](b.edges)
        if b.hint_features is None:
            b.hint_features = features
        else:
            b.hint_features.copy_(features)

    def _loop(self, b: Buffers, step: Callable[[], None], step_noise: bool) -> None:
        for n, i in enumerate(reversed(range(len(b.steps)))):
            b.step_row.copy_(b.steps[i])
            b.time_row.copy_(b.time_rows[i:i + 1])
            if step_noise:  # else b.noise holds zeros (_draw_noise)
                b.noise.copy_(b.step_noise[i])
            step()
            if self.step_callback is not None:
                self.step_callback(n, b.x.clone())

    def encoder_halves(self, fns: dict, b: Buffers, latents: torch.Tensor, control_time: torch.Tensor,
                       unet_time: torch.Tensor) -> tuple:
        """(the ControlNet's residuals, the UNet encoder half's (h, skips)) for the step's latents
        (as step_inputs gives them) at the step whose time rows (Stages.split_time_row) are given:
        the ControlNet forked onto the side stream (on a GPU) while the encoder half runs here, the
        two joined before this returns."""
        fork = self.side_stream is not None
        if fork:
            main = torch.cuda.current_stream(self.device)
            self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream) if fork else contextlib.nullcontext():
            controls = fns["control"](latents, control_time, b.control_context, b.hint_features)
        encoded = fns["unet_encode"](latents, unet_time, b.unet_context)
        if fork:
            main.wait_stream(self.side_stream)
        return controls, encoded

    def _step(self, fns: dict, b: Buffers) -> None:
        """One sampler step on b.x: the encoder halves, then the decoder half."""
        latents = step_inputs(b.x, self.dtype, self.share_first_layers)
        control_time, unet_time = self.stages.split_time_row(b.time_row)
        controls, (h, skips) = self.encoder_halves(fns, b, latents, control_time, unet_time)
        b.x.copy_(fns["unet_decode"](h, skips, unet_time, b.unet_context, controls, b.control_scales, b.x,
                                     b.step_row, b.guidance, b.noise))

    def _decode(self, fns: dict, b: Buffers) -> None:
        b.images, b.finite = fns["decode"](b.x)

    STAGES = ("encode", "loop", "decode")  # as time_stages reports them: encode is text and hint

    def _parts(self, fns: dict, b: Buffers) -> dict:
        """The parts that are captured, each as one graph."""
        return {"text": lambda: self._text(fns, b), "hint": lambda: self._hint(fns, b),
                "step": lambda: self._step(fns, b), "decode": lambda: self._decode(fns, b)}

    def _stage_calls(self, run: Run, request: GenerationRequest) -> list:
        """The three stages to run; each part uncaptured, captured or replayed as its run stands.
        The text part runs only where the request's tokens are not what the buffers already hold."""
        parts = self._parts(run.fns, run.buffers)
        if self.cuda_graphs and self.step_callback is None:
            parts = {name: functools.partial(self._run_part, run, name, part) for name, part in parts.items()}
        tokens = self._new_tokens(run, request)

        def encode():
            if tokens is not None:
                run.text_tokens = None  # until the text part has run on them
                run.buffers.tokens.copy_(torch.from_numpy(tokens))
                parts["text"]()
                run.text_tokens = tokens
            parts["hint"]()

        def loop():
            # the loop's own inputs, made while the GPU runs the hint (and text) part
            self._draw_noise(run.buffers, request)
            self._copy_step_inputs(run, request)
            self._run_loop(run, parts["step"], request.has_step_noise)

        return [encode, loop, parts["decode"]]

    def _run_loop(self, run: Run, step: Callable[[], None], step_noise: bool) -> None:
        """The sampling loop: the loop graph replayed where it serves these steps, captured where
        this is the first size's second call (_captures_loop), else the step part once per step.
        (The loop graph's launch takes the host about 0.8 ms on the H100 machine; running the first
        step through the step part ahead of a loop graph of the others was 0.18 ms slower a call.)"""
        b = run.buffers
        key = (len(b.steps), step_noise) if self.step_callback is None else None  # a callback sees every step
        if key is not None and run.loop_key != key and self._captures_loop(run):
            self._capture(run, "loop", lambda: self._loop(b, functools.partial(self._step, run.fns, b), step_noise))
            run.loop_key, self._loop_captured = key, True
        if key is not None and run.loop_key == key:
            run.graphs["loop"].replay()
        else:
            self._loop(b, step, step_noise)

    def _captures_loop(self, run: Run) -> bool:
        """Whether to capture this run's loop now: its step's graph exists (so this is at least the
        size's second call), it is the first size, and no loop has been captured in this process."""
        return (self.capture_loop and self.cuda_graphs and not self._loop_captured and "step" in run.graphs
                and self.runs.get(self._first_size) is run)

    def _new_tokens(self, run: Run, request: GenerationRequest) -> np.ndarray | None:
        """The request's tokens, [cond, uncond], or None where the run's buffers hold their text
        encoding already (and reuse_text holds)."""
        tokens = np.concatenate([request.cond_tokens.numpy(), request.uncond_tokens.numpy()])
        if self.reuse_text and run.text_tokens is not None and np.array_equal(tokens, run.text_tokens):
            return None
        return tokens

    def _run_part(self, run: Run, name: str, part: Callable[[], None]) -> None:
        """The first run of a part at a size is uncaptured (its warm-up); the next captures it, then
        replays the graph, as does every run after."""
        if name not in run.warmed:
            part()
            run.warmed.add(name)
            return
        if name not in run.graphs:
            self._capture(run, name, part)
        run.graphs[name].replay()

    # -- buffers, capture, replay -------------------------------------------------------------

    def _new_buffers(self, request: GenerationRequest) -> Buffers:
        n, (h, w) = request.num_samples, request.work_image.shape[:2]
        dev, f32 = self.device, torch.float32
        canny_here = self.canny_on_gpu and gpu_canny.kernel_fits(h, w)
        return Buffers(
            image=torch.zeros(h, w, 3, dtype=torch.uint8, device=dev) if canny_here else None,
            canny_thresholds=torch.zeros(2, dtype=torch.int32, device=dev) if canny_here else None,
            tokens=torch.zeros(2 * n, request.cond_tokens.shape[1], dtype=torch.long, device=dev),
            edges=torch.zeros(n, 1, h, w, dtype=torch.uint8, device=dev),
            control_scales=torch.zeros(2 * n, len(request.control_scales), dtype=f32, device=dev),
            guidance=torch.zeros((), dtype=f32, device=dev),
            x=torch.zeros(request.latent_shape, dtype=f32, device=dev),
            step_row=torch.zeros(STEP_ROW, dtype=f32, device=dev),
            noise=torch.zeros(request.latent_shape, dtype=f32, device=dev))

    def _fit_step_buffers(self, run: Run, request: GenerationRequest) -> None:
        """The step buffers sized for the request's step count (a new count releases the loop graph,
        which reads the old ones) and this schedule's rows copied in, device to device, where they
        hold another's (make_schedule gives a repeated schedule as the same object)."""
        b, steps = run.buffers, len(request.schedule)
        if run.schedule is request.schedule:
            return
        table, time_rows = self._rows_of(request.schedule)
        if b.steps is None or len(b.steps) != steps:
            b.steps = torch.zeros(steps, STEP_ROW, dtype=torch.float32, device=self.device)
            b.step_noise = torch.zeros((steps, *request.latent_shape), dtype=torch.float32, device=self.device)
            b.time_rows = torch.empty_like(time_rows)
            run.graphs.pop("loop", None)
            run.loop_key = None
        b.steps.copy_(table)
        b.time_rows.copy_(time_rows)
        run.schedule = request.schedule
        if b.time_row is None:
            b.time_row = torch.zeros_like(time_rows[:1])

    def _rows_of(self, schedule) -> tuple[torch.Tensor, torch.Tensor]:
        """The schedule's step_table and Stages.time_rows of its timesteps on the device, made at its
        first call (eager: a copy and a few small kernels) and kept for the last 16 schedules."""
        rows = self._schedule_rows.pop(schedule, None)
        if rows is None:
            table = step_table(schedule).to(self.device)
            with torch.no_grad():
                rows = table, self.stages.time_rows(table[:, 0])
        self._schedule_rows[schedule] = rows
        while len(self._schedule_rows) > 16:
            self._schedule_rows.popitem(last=False)
        return rows

    def _draw_noise(self, b: Buffers, request: GenerationRequest) -> None:
        _, step_noise = draw_noise(request, self.device, out=b.x)
        if step_noise is not None:
            b.step_noise.copy_(step_noise)
        else:  # sigma is 0 then, so any finite noise would do; zeros say so, and no step copies them
            b.noise.zero_()

    # Host-side work in numpy (torch's CPU kernels wake every intra-op thread: ~1 ms per tiny op on a
    # 16-core host); each buffer then takes one host-to-device copy, with no dtype change. They are
    # non_blocking: from pageable memory the driver stages the bytes before the call returns, and the
    # copy does not wait for the work queued ahead of it (the hint part, for the step inputs).

    def _copy_canny_input(self, run: Run, request: GenerationRequest) -> None:
        """What the hint part reads, so it goes up first: where the canny map is made on the GPU
        (b.image), the work image through the size's pinned buffer (the call before has waited for
        its copy) and the thresholds where the buffer holds others; else the map, made here, one
        row per sample."""
        b = run.buffers
        if b.image is None:
            edges = np.repeat(request.edges[None, None], request.num_samples, axis=0)
            b.edges.copy_(torch.from_numpy(edges), non_blocking=True)
            return
        if b.host_image is None:
            b.host_image = torch.empty(b.image.shape, dtype=torch.uint8, pin_memory=True)
        np.copyto(b.host_image.numpy(), request.work_image)
        b.image.copy_(b.host_image, non_blocking=True)
        thresholds = gpu_canny.thresholds(*request.canny_thresholds)
        if run.canny_thresholds != thresholds:
            b.canny_thresholds.copy_(torch.from_numpy(np.array(thresholds, dtype=np.int32)), non_blocking=True)
            run.canny_thresholds = thresholds

    def _copy_step_inputs(self, run: Run, request: GenerationRequest) -> None:
        """The control scales and the guidance scale, which only the steps read, where the buffers
        hold others."""
        rows = request.control_scale_rows()  # [cond, uncond] -> N cond rows, then N uncond rows
        held = (rows.tobytes(), request.guidance_scale)
        if run.step_inputs == held:
            return
        b = run.buffers
        b.control_scales.copy_(torch.from_numpy(np.repeat(rows, request.num_samples, axis=0)), non_blocking=True)
        b.guidance.fill_(request.guidance_scale)
        run.step_inputs = held

    def _outputs_to_host(self, b: Buffers) -> tuple[np.ndarray, bool]:
        """The images (a copy the caller owns) and whether the latents are all finite, after one wait
        for the GPU: on a GPU both go into the size's pinned buffers, where each had been a wait of
        its own (0.08 ms for the flag on the H100 host)."""
        if self.device.type != "cuda":
            return b.images.numpy(), bool(b.finite)
        if b.host_images is None:
            b.host_images = torch.empty(b.images.shape, dtype=b.images.dtype, pin_memory=True)
            b.host_finite = torch.empty((), dtype=torch.bool, pin_memory=True)
        b.host_images.copy_(b.images, non_blocking=True)
        b.host_finite.copy_(b.finite, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return b.host_images.numpy().copy(), bool(b.host_finite)

    def _conv_algorithms(self, run: Run):
        """cuDNN times its convolution algorithms for the run's size (once, then cached for the
        process) where the run says so; else its heuristics choose. Deterministic ones only where
        `deterministic_convolutions` says so."""
        return cudnn_settings(self.device.type == "cuda" and run.tune_convs, self.deterministic_convolutions)

    def _capture(self, run: Run, name: str, part: Callable[[], None]) -> None:
        """Records the part into a graph (nothing runs). The size's graphs share one memory pool: they
        replay one after another on one stream, and what one graph leaves for another is copied into
        the size's buffers, which the pool never hands out again."""
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=run.pool):
            part()
        run.pool = graph.pool()
        run.graphs[name] = graph
        run.capture_s += time.perf_counter() - start
        if len(self.runs) == 1:  # the step's graph at the first size's first call, the others' at its second
            self.startup["first size capture"] = run.capture_s

    def _run_for(self, request: GenerationRequest) -> Run:
        """This size's run: the one made at its first call, or a new one (the least recently used
        size's released when there are max_captured_sizes)."""
        key = tensor_sizes(request)
        if key in self.runs:
            self.runs.move_to_end(key)
            return self.runs[key]
        while len(self.runs) >= self.max_captured_sizes:
            self.runs.popitem(last=False)  # the least recently used size's graphs and memory go
        fns, form = self._stage_fns_for(key)
        if self._first_size is None:
            self._first_size = key
        tune = key == self._first_size or self.tune_new_sizes  # the first size again too, after its release
        run = self.runs[key] = Run(self._new_buffers(request), fns, form, tune)
        return run

    def generate(self, request: GenerationRequest) -> np.ndarray:
        run = self._run_for(request)
        b = run.buffers
        start = time.perf_counter()
        try:
            self._run_request(run, request)
        except programs.OutsidePreparedShapes as exc:  # raised by a first run: nothing is captured yet
            self._note_once(f"{exc}: that size runs eager")
            run.fns, run.form = dict(self.stages.items()), "eager"
            run.warmed.clear()
            self._run_request(run, request)
        if run.first_call_s is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            run.first_call_s = time.perf_counter() - start
            if len(self.runs) == 1 and "first size first call" not in self.startup:
                self.startup["first size first call"] = run.first_call_s
        self.last_latents = b.x
        self.last_form = run.form
        images, self.last_finite = self._outputs_to_host(b)
        return images

    def _run_request(self, run: Run, request: GenerationRequest) -> None:
        b = run.buffers
        self._fit_step_buffers(run, request)
        self._copy_canny_input(run, request)
        with self._conv_algorithms(run):  # for the parts that run uncaptured; graphs hold their choice
            self._run_stages(self._stage_calls(run, request))

    def _run_stages(self, stages: list) -> None:
        if not (self.time_stages and self.device.type == "cuda"):
            for stage in stages:
                stage()
            return
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(stages) + 1)]
        events[0].record()
        for stage, event in zip(stages, events[1:]):
            stage()
            event.record()
        torch.cuda.synchronize()
        self.last_stage_ms = {name: events[i].elapsed_time(events[i + 1]) for i, name in enumerate(self.STAGES)}

    def _note_once(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def startup_summary(self) -> str:
        """One line: seconds per start-up stage and the form the first size runs in."""
        parts = [f"{name} {seconds:.1f} s" for name, seconds in self.startup.items()]
        first = next(iter(self.runs.values()), None)
        form = f"; first size: {first.form}" if first is not None else ""
        return "torch back-end start-up: " + (", ".join(parts) or "nothing yet") + form


# The sizes `prepare` compiles for: its child processes compile to it and its record states it.
PREPARED_RANGE = programs.ShapeRange()
# The graded kind alone by default. The other two make the steady state at other sizes 25-30%
# faster than eager, but torch takes about 5 s to load a kind and its first size then tunes its
# Triton kernels: a first call of 7.4 s (768x1152, 1 sample) and 10.9 s (4 samples) on the H100,
# where the eager form's worst is 4.31 s and its steady state within 1.43x (docs/benchmarks.md).
DEFAULT_KINDS = ("graded",)


def prepare(checkpoint: Path, cfg: ModelConfig, program_dir: Path = programs.DEFAULT_PROGRAM_DIR,
            device: str = "cuda", force: bool = False, compile: str = "default", fp32_islands: bool = False,
            kinds: tuple[str, ...] = DEFAULT_KINDS) -> None:
    """Compile every stage ahead into program_dir (nothing to do where they are current), then
    check them against the eager stages at a size of each kind. `kinds`: the kinds of size
    (programs.VARIANTS) to prepare (DEFAULT_KINDS says why the graded one alone). Each kind is compiled by
    a process of its own, all at once: one kind took 2.5-4 minutes on the H100 machine, mostly in
    single-threaded Python, and one after another they overran a 10-minute device call."""
    options = dict(compile=compile, fp32_islands=fp32_islands)
    builder = FastTorchBackend(lambda: load_networks(checkpoint, cfg), device, **options)  # reads nothing yet
    identity = builder.identity(cfg)
    reason = programs.rebuild_reason(program_dir, identity, kinds)
    if reason is None and not force:
        print(f"prepare: the programs in {program_dir} are current; nothing to do (--force rebuilds them)")
        return
    print(f"prepare: compiling the six stages for {len(kinds)} kinds of size into {program_dir}, "
          f"a process each ({reason or 'forced'}); their logs are beside the programs")
    programs.start_programs(program_dir)
    commands = {variant: [sys.executable, "-m", "sdcanny.fast", "--prepare", "--variant", variant,
                          "--checkpoint", str(checkpoint), "--config", cfg.name, "--program-dir", str(program_dir),
                          "--compile", compile] + (["--fp32-islands"] if fp32_islands else [])
                for variant in kinds}
    try:
        seconds = programs.run_in_parallel(commands, Path(program_dir), desc="compiling programs")
    except RuntimeError as exc:
        raise SystemExit(f"prepare: compiling the kind {exc}") from exc
    try:
        programs.finish(program_dir, identity, builder.inductor_options, PREPARED_RANGE, seconds)
    except programs.UnusablePrograms as exc:
        print(f"prepare: the compiled programs cannot be used on this machine: {exc}. The torch back-end "
              "will compile in-process at its first size instead; filling that compile cache now")
        warm_compile_cache(checkpoint, cfg, device, **options)
        return
    size = sum(path.stat().st_size for path in Path(program_dir).glob("*.bin")) / 2 ** 20
    print(f"prepare: {size:.0f} MiB of programs, compiled in " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    for name, error in check_programs(checkpoint, cfg, program_dir, device, **options).items():
        print(f"prepare: {name}: final latents differ from the eager stages' by {error:.2e} (relative L2)")
        if not error < 1e-2:
            raise SystemExit(f"prepare: the compiled programs disagree with the eager stages at {name}")


def compile_one_variant(checkpoint: Path, cfg: ModelConfig, program_dir: Path, variant: str,
                        device: str = "cuda", **backend_options) -> None:
    """One kind of size's programs (prepare's child processes run this); no record."""
    builder = FastTorchBackend(lambda: load_networks(checkpoint, cfg), device, **backend_options)
    seconds = programs.compile_variant(builder.stages, cfg, program_dir, builder.device, builder.dtype,
                                       builder.inductor_options, PREPARED_RANGE, variant, builder.share_first_layers)
    print(f"prepare: {variant}: compiled in {seconds:.0f} s ({builder.startup_summary()})")


def warm_compile_cache(checkpoint: Path, cfg: ModelConfig, device: str = "cuda", **backend_options) -> None:
    """The in-process form's compile cache (engines/torch_inductor_cache) filled at the graded
    size, so that a later initialize() reads compiled code instead of generating it."""
    from .image import stand_in_photo
    from .pipeline import GRADED_ARGS, GRADED_IMAGE_SHAPE, Canny2Image

    start = time.perf_counter()
    backend = FastTorchBackend(lambda: load_networks(checkpoint, cfg), device, **backend_options)
    Canny2Image(backend, cfg).process(stand_in_photo(GRADED_IMAGE_SHAPE), *GRADED_ARGS)
    print(f"prepare: compile cache filled at the graded size in {time.perf_counter() - start:.0f} s "
          f"({backend.startup_summary()})")


def check_programs(checkpoint: Path, cfg: ModelConfig, program_dir: Path, device: str = "cuda",
                   **backend_options) -> dict[str, float]:
    """Relative L2 between the final latents of the programs and of the eager stages, at a size of
    each kind prepared: the graded call, one sample and two samples at image_resolution 320 (10
    steps)."""
    from .image import stand_in_photo
    from .pipeline import GRADED_CALL, Canny2Image

    aot = FastTorchBackend.create(checkpoint, cfg, device, program_dir, **backend_options)
    if aot.programs is None:
        raise RuntimeError("; ".join(aot.notes))
    eager = FastTorchBackend(lambda: load_networks(checkpoint, cfg), device, **{**backend_options, "compile": None})
    pipes = [Canny2Image(backend, cfg) for backend in (aot, eager)]
    image = stand_in_photo((256, 384, 3))
    other = {**GRADED_CALL, "image_resolution": 320, "ddim_steps": 10}
    calls = {"graded": ("the graded call", GRADED_CALL),
             "one sample": ("1 sample at image_resolution 320", other),
             "samples": ("2 samples at image_resolution 320", {**other, "num_samples": 2})}
    errors = {}
    for name, call in (calls[kind] for kind in aot.program_variants):
        latents = []
        for pipe in pipes:
            pipe.process(image, **call)
            latents.append(pipe.backend.last_latents.float().clone())
        if aot.last_form != "compiled ahead":
            raise RuntimeError(f"the programs did not serve {name}: {'; '.join(aot.notes)}")
        errors[name] = float((latents[0] - latents[1]).norm() / latents[1].norm())
    return errors


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Compile the fast PyTorch back-end's stages ahead of time.")
    ap.add_argument("--prepare", action="store_true", required=True)
    ap.add_argument("--checkpoint", type=Path, default=default_checkpoint())
    ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
    ap.add_argument("--program-dir", type=Path, default=programs.DEFAULT_PROGRAM_DIR)
    ap.add_argument("--compile", default="default", choices=sorted(FastTorchBackend.COMPILE_MODES))
    ap.add_argument("--fp32-islands", action="store_true")
    ap.add_argument("--force", action="store_true", help="rebuild even where the programs are current")
    ap.add_argument("--kinds", nargs="+", choices=list(programs.VARIANTS), default=list(DEFAULT_KINDS),
                    help="the kinds of size to prepare (default: graded; other sizes then run eager). 'one sample' "
                         "and 'samples' make those sizes 25-30%% faster once loaded, but their first call slower")
    ap.add_argument("--variant", choices=list(programs.VARIANTS),
                    help="compile only this kind of size and write no record (what --prepare's child processes do)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(f"the torch back-end needs a CUDA GPU; nothing to prepare here ({compat.cuda_unavailable_reason()})")
    reason = compat.aot_unavailable_reason()
    if reason is not None:
        print(f"prepare: no ahead-of-time programs with this torch: {reason}. Filling the in-process "
              "compile cache at the graded size instead")
        warm_compile_cache(args.checkpoint, CONFIGS[args.config], compile=args.compile, fp32_islands=args.fp32_islands)
        return
    if args.variant is not None:
        compile_one_variant(args.checkpoint, CONFIGS[args.config], args.program_dir, args.variant,
                            compile=args.compile, fp32_islands=args.fp32_islands)
        return
    prepare(args.checkpoint, CONFIGS[args.config], args.program_dir, force=args.force, compile=args.compile,
            fp32_islands=args.fp32_islands, kinds=tuple(args.kinds))


if __name__ == "__main__":
    main()
