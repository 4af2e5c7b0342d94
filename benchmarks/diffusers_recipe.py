"""The field's standard recipe for the graded workload, timed beside ours (issue 11): diffusers'
StableDiffusionControlNetPipeline in fp16, channels-last, with
torch.compile(mode="reduce-overhead", fullgraph=True) on the UNet, the ControlNet and the VAE
decoder.

The networks are built from SD1.5's configs with random weights (nothing can be downloaded here;
speed does not depend on the values), the tokenizer from the Hugging Face cache. Its images are
not compared with ours. diffusers is not a dependency of the project: on the GPU machine it
travels as a wheel (docs/benchmarks.md says how).

    python3 benchmarks/diffusers_recipe.py --config tiny --device cpu --no-compile   # wiring check
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdcanny.image import hwc3, work_image_and_edges  # noqa: E402

# SD1.5's UNet, VAE and CLIP text encoder (models/cldm_v15.yaml), and a miniature for CPU checks
CONFIGS = {
    "sd15": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
        clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)),
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=4),
        vae=dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        clip=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)),
}


def build_pipeline(config: str = "sd15", device: str = "cuda", dtype: torch.dtype = torch.float16,
                   compile: bool = True):
    from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = CONFIGS[config]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **cfg["unet"])
    controlnet = ControlNetModel.from_unet(unet)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, **cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                                **cfg["clip"]))
    tokenizer = CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14", local_files_only=True, model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionControlNetPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             controlnet=controlnet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if device != "cpu":
        for net in (pipe.unet, pipe.controlnet, pipe.vae):
            net.to(memory_format=torch.channels_last)
    if compile:
        options = dict(mode="reduce-overhead", fullgraph=True)
        pipe.unet = torch.compile(pipe.unet, **options)
        pipe.controlnet = torch.compile(pipe.controlnet, **options)
        pipe.vae.decode = torch.compile(pipe.vae.decode, **options)
    return pipe


def canny_map(image: np.ndarray, resolution: int = 256, low: int = 100, high: int = 200) -> np.ndarray:
    """What the original's process() feeds the ControlNet: the resized image's Canny edges, HWC3."""
    return hwc3(work_image_and_edges(image, resolution, low, high)[1])


def recipe_call(pipe, image: np.ndarray, prompt: str, negative: str, steps: int, scale: float, seed: int,
                resolution: int = 256) -> np.ndarray:
    """One graded-workload call: Canny on the CPU, then the pipeline; images as float HWC in [0, 1]."""
    control = canny_map(image, resolution)
    h, w = control.shape[:2]
    generator = torch.Generator(pipe.device).manual_seed(seed)
    return pipe(prompt, image=control.astype(np.float32)[None] / 255.0, negative_prompt=negative,
                num_inference_steps=steps, guidance_scale=scale, eta=0.0, generator=generator, height=h, width=w,
                output_type="np").images


def time_calls(pipe, images: list[np.ndarray], warm_up: int = 2, **call) -> tuple[float, list[float]]:
    """Seconds of the `warm_up` calls (compilation and CUDA-graph recording happen there), and
    seconds per image after them."""
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(warm_up):
        recipe_call(pipe, images[0], **call)
    sync()
    warm_up_s = time.perf_counter() - start
    seconds = []
    for image in images:
        sync()
        start = time.perf_counter()
        recipe_call(pipe, image, **call)
        sync()
        seconds.append(time.perf_counter() - start)
    return warm_up_s, seconds


def main() -> None:
    from sdcanny.image import stand_in_photo
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--resolution", type=int, default=256)
    args = ap.parse_args()
    dtype = torch.float16 if args.device != "cpu" else torch.float32
    pipe = build_pipeline(args.config, args.device, dtype, compile=not args.no_compile)
    images = [stand_in_photo((256, 384, 3), variant) for variant in range(3)]
    _, seconds = time_calls(pipe, images, prompt="a bird, best quality, extremely detailed",
                         negative="longbody, lowres, bad anatomy, bad hands, missing fingers", steps=20, scale=9.0,
                         seed=2946901, resolution=args.resolution)
    print(f"diffusers recipe ({args.config}, {args.device}): median {np.median(seconds) * 1000:.1f} ms per image "
          f"over {len(seconds)} images")


if __name__ == "__main__":
    main()
