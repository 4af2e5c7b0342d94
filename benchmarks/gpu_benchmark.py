"""Reference fp32 vs fast back-ends on one GPU, same process, same checkpoint, same images.

    python3 benchmarks/gpu_benchmark.py --checkpoint /tmp/sd15.pth --make-checkpoint --out results/

Per back-end: initialize() time (load + warm-up on the graded call), end-to-end process() latency
per image (median, p90) after that warm-up, a per-stage breakdown for the fast path, peak GPU
memory, and fidelity against the reference images (PSNR, max abs pixel difference, final-latent
relative L2, NaN/Inf). Writes benchmark.md and results.json to --out as it goes, so a run that
is cut short still leaves its finished rows.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import skimage.data
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from canny2image_TRT import hackathon  # noqa: E402
import kernel_profile  # noqa: E402
from sdcanny.metrics import psnr  # noqa: E402
from sdcanny.paths import DEFAULT_ENGINE_DIR, default_checkpoint  # noqa: E402
from sdcanny.pipeline import GRADED_ARGS, GRADED_CALL  # noqa: E402

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "camera", "coins", "hubble_deep_field",
          "immunohistochemistry", "retina", "page", "moon", "clock", "brick", "grass", "gravel", "text")


def graded_photos(count: int) -> dict[str, np.ndarray]:
    """Real photographs bundled with scikit-image, as BGR, center-cropped to 2:3 and sized 256x384,
    as the graded pictures are (resize_image then keeps their size). Runs before 2026-11-26's fifth
    session fed 384x576, which the front end shrank first (what that cost: docs/benchmarks.md)."""
    out = {}
    for name in PHOTOS[:count]:
        img = getattr(skimage.data, name)()
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR if img.ndim == 2 else cv2.COLOR_RGB2BGR)
        h, w = img.shape[:2]
        ch, cw = (h, h * 3 // 2) if w * 2 >= h * 3 else (w * 2 // 3, w)
        y, x = (h - ch) // 2, (w - cw) // 2
        out[name] = cv2.resize(img[y:y + ch, x:x + cw], (384, 256), interpolation=cv2.INTER_AREA)
    return out


# fast back-end options per variant: "compiled" runs the programs prepared in engines/ where they
# are current, "jit" compiles in this process (an engine directory without programs); "islands"
# has the strongly typed TensorRT graphs' numerics (fp16 with fp32 normalisations and time embedding);
# "unstacked" is "jit" with one timestep projection per ResBlock (what stack_time_projections saves),
# "per-step-kv" "jit" with the text's cross-attention keys and values made at every step,
# "text-every-call" "jit" with the text encoded at every call (what reuse_text saves),
# "no-pdl" "jit" without programmatic dependent launch (what overlap_launches saves),
# "unfolded-upsampling" "jit" with each doubling and its convolution as written (what fold_upsampling saves),
# "inductor-group-norm" "jit" with TorchInductor's GroupNorms (what fused_group_norm saves),
# "unfolded-attention" "jit" with the cross-attentions' query and output products (what
# fold_cross_attention saves), "unfolded-outputs" "jit" with each transformer's output projection
# as its own product (what fold_transformer_outputs saves), "unfolded" both, "sdpa-attention" "jit"
# with SDPA for every attention that is not folded (what attention_kernel saves), "cudnn-convs" "jit"
# with every 3x3 convolution through cuDNN, "patches-48" with only the 4x6 ones as patch products,
# "patches-768" with the 16x24 ones too and "patches-3072" with every ResBlock's, Downsample's and
# Upsample's (what patch_product_rows saves, and at which bound), "gathered-patches" "jit" with the patches
# gathered from the GroupNorm's output by a kernel of their own (what norm_patches saves),
# "serial-kernels" "jit" with our Triton kernels launched without programmatic dependent launch (what
# overlap_kernels saves), "attention-1536" "jit" with the 1536-key self-attentions through our kernel
# too (attention_kernel_keys), "any-convs" "jit" with every cuDNN convolution algorithm,
# deterministic or not (what deterministic_convolutions saves), "inductor-vae-norm" "jit" with
# TorchInductor's GroupNorms in the VAE decoder (what vae_group_norm saves), "unpadded-outputs" "jit"
# with the last convolutions' 4 and 3 filters as they are (what pad_output_channels saves), "fp16-patches"
# "jit" with the ResBlocks' patch products in fp16 (what fp8_patch_products saves), "inductor-geglu" "jit"
# with the folded feed-forward input from cuBLAS's product and TorchInductor's GEGLU (what fused_geglu saves),
# "inductor-softmax" "jit" with the folded cross-attentions' weights from cuBLAS's product and TorchInductor's
# softmax (what scores_kernel saves), "step-replays" "jit" and "compiled-step-replays" "compiled" with the
# graded loop as 20 replays of the step's graph (what capture_loop saves), "vae-bias-apart" "jit" with each VAE
# ResBlock's first convolution adding its own bias (what vae_conv_bias_in_norm saves), "branch-rows" "jit" with
# [x, x] from the networks' first layer (what share_first_layers saves), "host-canny" "compiled" with the canny
# map made on the host (what canny_on_gpu saves; the programs do not depend on it)
VARIANTS = {"eager": {"compile": None}, "compiled": {"compile": "default"}, "jit": {"compile": "default"},
            "autotuned": {"compile": "max-autotune"}, "islands": {"compile": "default", "fp32_islands": True},
            "unstacked": {"compile": "default", "stack_time_projections": False},
            "per-step-kv": {"compile": "default", "precompute_cross_attention": False},
            "text-every-call": {"compile": "default", "reuse_text": False},
            "no-pdl": {"compile": "default", "overlap_launches": False},
            "unfolded-upsampling": {"compile": "default", "fold_upsampling": False},
            "inductor-group-norm": {"compile": "default", "fused_group_norm": False},
            "unfolded-attention": {"compile": "default", "fold_cross_attention": False},
            "unfolded-outputs": {"compile": "default", "fold_transformer_outputs": False},
            "unfolded": {"compile": "default", "fold_cross_attention": False, "fold_transformer_outputs": False},
            "sdpa-attention": {"compile": "default", "attention_kernel": False},
            "cudnn-convs": {"compile": "default", "patch_product_rows": 0},
            "patches-48": {"compile": "default", "patch_product_rows": 48},
            "patches-768": {"compile": "default", "patch_product_rows": 768},
            "patches-3072": {"compile": "default", "patch_product_rows": 3072},
            "gathered-patches": {"compile": "default", "norm_patches": False},
            "serial-kernels": {"compile": "default", "overlap_kernels": False},
            "attention-1536": {"compile": "default", "attention_kernel_keys": 1536},
            "any-convs": {"compile": "default", "deterministic_convolutions": False},
            "inductor-vae-norm": {"compile": "default", "vae_group_norm": False},
            "unpadded-outputs": {"compile": "default", "pad_output_channels": False},
            "fp16-patches": {"compile": "default", "fp8_patch_products": False},
            "inductor-geglu": {"compile": "default", "fused_geglu": False},
            "inductor-softmax": {"compile": "default", "scores_kernel": False},
            "step-replays": {"compile": "default", "capture_loop": False},
            "compiled-step-replays": {"compile": "default", "capture_loop": False},
            "vae-bias-apart": {"compile": "default", "vae_conv_bias_in_norm": False},
            "cudnn-resblocks": {"compile": "default", "conv_kernel": False},
            "skip-apart": {"compile": "default", "conv_adds_skip": False},
            "branch-rows": {"compile": "default", "share_first_layers": False},
            "host-canny": {"compile": "default", "canny_on_gpu": False}}
COMPILED_IN_PROCESS = ("jit", "unstacked", "per-step-kv", "text-every-call", "no-pdl", "unfolded-upsampling",
                       "inductor-group-norm", "unfolded-attention", "unfolded-outputs", "unfolded",
                       "sdpa-attention", "cudnn-convs", "patches-48", "patches-768", "patches-3072",
                       "gathered-patches", "serial-kernels",
                       "attention-1536", "any-convs", "inductor-vae-norm",
                       "unpadded-outputs", "fp16-patches", "inductor-geglu",
                       "inductor-softmax", "step-replays",
                       "vae-bias-apart", "cudnn-resblocks", "skip-apart", "branch-rows")  # run with an engine directory that holds no programs
NO_PROGRAMS_DIR = Path("/tmp/sdcanny_engines_without_programs")


def profile_call(h, img, label: str, out: Path) -> dict:
    """One process() call under the profiler: its kernels by kind (kernel_profile.summarize), every
    kernel by name in profile_<label>.md, and the call's timeline (every kernel with its stream,
    start and duration) as a Chrome trace in trace_<label>.json.gz (chrome://tracing, Perfetto;
    benchmarks/trace_gaps.py reads its gaps)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        h.process(img, *GRADED_ARGS)
        torch.cuda.synchronize()
    kernels = kernel_profile.cuda_kernels(prof)
    prof.export_chrome_trace(str(out / f"trace_{label}.json.gz"))  # gzipped by the profiler for ".gz"
    (out / f"profile_{label}.md").write_text(kernel_profile.name_table(kernels, steps=GRADED_CALL["ddim_steps"]))
    return kernel_profile.summarize(kernels)


def run_backend(name: str, checkpoint: Path, images: dict, reference: dict | None, profile_as: str | None = None,
                out: Path | None = None, **kw) -> dict:
    torch.cuda.reset_peak_memory_stats()
    h = hackathon(backend=name, checkpoint=checkpoint, **kw)
    h.initialize()
    backend = h.pipeline.backend
    h.process(next(iter(images.values())), *GRADED_ARGS)  # one more warm-up, same shape
    rows = {}
    for img_name, img in images.items():
        torch.cuda.synchronize()
        start = time.perf_counter()
        image = h.process(img, *GRADED_ARGS)[0]
        latency = time.perf_counter() - start
        latents = backend.last_latents.float().clone()
        row = {"ms": latency * 1000, "finite": bool(torch.isfinite(latents).all()), "image": image,
               "latents": latents, "preprocess_ms": h.pipeline.last_timings["preprocess"] * 1000}
        if reference is not None:
            ref = reference["rows"][img_name]
            row.update(psnr=psnr(ref["image"], image),
                       max_abs=int(np.abs(ref["image"].astype(int) - image).max()),
                       latent_rel_l2=float((latents - ref["latents"]).norm() / ref["latents"].norm()))
        rows[img_name] = row
    stages = None
    if hasattr(backend, "time_stages"):
        backend.time_stages = True
        samples = []
        for img in images.values():
            h.process(img, *GRADED_ARGS)
            samples.append(dict(backend.last_stage_ms, preprocess=h.pipeline.last_timings["preprocess"] * 1000,
                                total=h.pipeline.last_timings["total"] * 1000))
        stages = {k: float(np.median([s[k] for s in samples])) for k in samples[0]}
        backend.time_stages = False
    img = next(iter(images.values()))
    request_ms = {}
    for threads in (torch.get_num_threads(), 1):  # CPU-side front end, to see thread overhead
        torch.set_num_threads(threads)
        samples = []
        for _ in range(20):
            start = time.perf_counter()
            h.pipeline.request(img, *GRADED_ARGS)
            samples.append((time.perf_counter() - start) * 1000)
        request_ms[threads] = float(np.median(samples))
    torch.set_num_threads(max(request_ms))
    print(f"front end (request()) median ms by torch thread count: {request_ms}", flush=True)
    ms = np.array([r["ms"] for r in rows.values()])
    options = {k: str(v) for k, v in kw.items() if k != "engine_dir"}
    if getattr(backend, "last_form", None):
        options["form"] = backend.last_form
    result = {"backend": name, "options": options,
              "initialize_s": h.initialize_seconds, "median_ms": float(np.median(ms)),
              "p90_ms": float(np.percentile(ms, 90)), "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
              "stages_ms": stages, "request_ms_by_threads": request_ms, "rows": rows,
              "startup_s": dict(getattr(backend, "startup", {}))}
    if profile_as is not None:
        result["kernels"], result["profiled_as"] = profile_call(h, img, profile_as, out), profile_as
    del h, backend
    torch.cuda.empty_cache()
    return result


def run_diffusers(images: dict) -> dict:
    """The diffusers recipe (benchmarks/diffusers_recipe.py) on the same images; random weights, so
    no fidelity columns."""
    from diffusers_recipe import build_pipeline, time_calls
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe = build_pipeline("sd15", "cuda")
    built = time.perf_counter() - start
    g = GRADED_CALL
    warm_up_s, seconds = time_calls(pipe, list(images.values()), warm_up=3, prompt=f"{g['prompt']}, {g['a_prompt']}",
                                    negative=g["n_prompt"], steps=g["ddim_steps"], scale=g["scale"], seed=g["seed"],
                                    resolution=g["image_resolution"])
    ms = np.array(seconds) * 1000
    result = {"backend": "diffusers", "options": {"recipe": "fp16, channels-last, compile reduce-overhead fullgraph"},
              "initialize_s": built + warm_up_s, "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
              "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "stages_ms": None,
              "rows": {name: {"ms": t} for name, t in zip(images, ms)}}
    del pipe
    torch.cuda.empty_cache()
    return result


def summary(results: list[dict], meta: dict) -> str:
    ref = results[0]
    lines = [f"device: {meta['device']}; torch {meta['torch']}; date {meta['date']}; commit {meta['commit']}",
             f"command: `{meta['command']}`", f"images: {meta['images']} ({len(ref['rows'])}, 256x384), "
             "graded call (20 DDIM steps, guidance 9, eta 0)", "",
             "| back-end | options | initialize (s) | median ms | p90 ms | speed-up | peak GPU GiB | min PSNR dB "
             "| mean PSNR dB | max abs px | max latent rel L2 | all finite |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows = r["rows"].values()
        compared = r is not ref and "psnr" in next(iter(rows))
        fid = ("-", "-", "-", "-") if not compared else (
            f"{min(x['psnr'] for x in rows):.1f}", f"{np.mean([min(x['psnr'], 99) for x in rows]):.1f}",
            f"{max(x['max_abs'] for x in rows)}", f"{max(x['latent_rel_l2'] for x in rows):.2e}")
        opts = " ".join(r["options"].get(k, "") for k in ("backend_options", "form", "recipe")).strip() or "-"
        lines.append(f"| {r['backend']} | {opts} | {r['initialize_s']:.1f} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} "
                     f"| {ref['median_ms'] / r['median_ms']:.1f}x | {r['peak_gpu_gib']:.1f} | {fid[0]} | {fid[1]} "
                     f"| {fid[2]} | {fid[3]} | {all(x['finite'] for x in rows) if 'finite' in next(iter(rows)) else '-'} |")
    staged = [r for r in results if r["stages_ms"]]
    if staged:
        keys = list(staged[0]["stages_ms"])
        lines += ["", "Per-stage medians (ms; GPU stages from CUDA events between graph replays):", "",
                  "| back-end | options | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for r in staged:
            opts = " ".join(r["options"].get(k, "") for k in ("backend_options", "form")).strip() or "-"
            lines.append(f"| {r['backend']} | {opts} | " + " | ".join(f"{r['stages_ms'][k]:.2f}" for k in keys) + " |")
    profiled = {r["profiled_as"]: r["kernels"] for r in results if r.get("kernels")}
    if profiled:
        lines += ["", "GPU time of one graded process() by kernel kind (torch.profiler; --profile):", "",
                  kernel_profile.table(profiled, steps=GRADED_CALL["ddim_steps"])]
    return "\n".join(lines) + "\n"


def save(results: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(summary(results, meta))
    plain = [{**r, "rows": {k: {f: v for f, v in row.items() if f not in ("image", "latents")}
                            for k, row in r["rows"].items()}} for r in results]
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": plain}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=default_checkpoint())
    ap.add_argument("--make-checkpoint", action="store_true", help="write a synthetic sd15 one if missing")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--variants", default="eager,compiled", help=f"fast back-end variants: {', '.join(VARIANTS)}; "
                    "a variant named twice shows the warm-cache initialize() the second time")
    ap.add_argument("--profile", action="store_true", help="GPU time of one process() by kernel kind, per variant "
                    "(and each one's kernels by name in profile_<variant>.md)")
    ap.add_argument("--diffusers", action="store_true", help="also time the diffusers recipe (benchmarks/diffusers_recipe.py)")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", type=Path, default=Path("outputs/benchmark"))
    args = ap.parse_args()

    if not args.checkpoint.is_file() and args.make_checkpoint:
        from sdcanny.config import SD15
        from sdcanny.synthetic import HINT_GAIN, synthetic_state_dict, write_checkpoint
        start = time.perf_counter()
        write_checkpoint(synthetic_state_dict(SD15, seed=0, control_gain=HINT_GAIN), args.checkpoint)
        print(f"synthetic sd15 checkpoint written in {time.perf_counter() - start:.0f} s")
    # The reference is fp32: no TF32 in matmuls or cuDNN convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    images = graded_photos(args.images)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "commit": args.commit, "images": ", ".join(images),
            "command": " ".join(sys.argv)}
    results = [run_backend("reference", args.checkpoint, images, None)]
    save(results, meta, args.out)
    print(summary(results, meta), flush=True)
    for variant in args.variants.split(","):
        engine_dir = NO_PROGRAMS_DIR if variant in COMPILED_IN_PROCESS else DEFAULT_ENGINE_DIR
        results.append(run_backend("torch", args.checkpoint, images, results[0], engine_dir=engine_dir,
                                   backend_options=VARIANTS[variant], profile_as=variant if args.profile else None,
                                   out=args.out))
        save(results, meta, args.out)
        print(summary(results, meta), flush=True)
    if args.diffusers:
        results.append(run_diffusers(images))
        save(results, meta, args.out)
        print(summary(results, meta), flush=True)


if __name__ == "__main__":
    main()
