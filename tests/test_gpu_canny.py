"""OpenCV's Canny from tensors (sdcanny/gpu_canny.py): the candidates and the hysteresis by dilation
against cv2.Canny bit for bit, the bit masks' layout, and a word-level model of the hysteresis
kernel's pass on any machine; NVRTC's compilation of the kernel where an NVRTC library is found;
the kernel against cv2.Canny, and in a CUDA graph, on a GPU."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from sdcanny import cuda_kernels, gpu_canny
from sdcanny.image import stand_in_photo
from tests.photos import photo


def noisy(shape, sigma: float, seed: int = 0) -> np.ndarray:
    """Blurred noise: edges everywhere, in every direction, many chains of weak pixels."""
    noise = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), sigma)


def gray_bgr(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)


IMAGES = {
    "shapes": lambda: stand_in_photo((256, 384, 3), 1),
    "shapes, other width": lambda: stand_in_photo((64, 77, 3), 3),
    "noise": lambda: noisy((96, 160, 3), 1.0),
    "noise, gray": lambda: gray_bgr(noisy((80, 96, 3), 0.8, seed=1)),
    "photograph": lambda: cv2.resize(photo("astronaut", (256, 384, 3)), (384, 256), interpolation=cv2.INTER_AREA),
}


def torch_canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    cand, strong = gpu_canny.candidates(torch.from_numpy(image), *gpu_canny.thresholds(low, high))
    return (gpu_canny.hysteresis_steps(cand, strong).to(torch.uint8) * 255).numpy()


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("low,high", [(100, 200), (200, 100), (50.7, 120.2), (60, 60)])
def test_tensor_canny_is_opencvs_bit_for_bit(name, low, high):
    image = IMAGES[name]()
    want = cv2.Canny(image, low, high)
    assert 0 < (want > 0).sum() < want.size  # edges to get right, and not everything
    np.testing.assert_array_equal(torch_canny(image, low, high), want)


def test_thresholds_are_ordered_and_floored_as_opencv_takes_them():
    assert gpu_canny.thresholds(100, 200) == (100, 200)
    assert gpu_canny.thresholds(200.9, 100.2) == (100, 200)
    assert gpu_canny.TG22 == 13573  # round(tan(22.5 degrees) * 2^15)


def test_the_hysteresis_needs_chains_followed_past_one_step():
    """The photographs' weak chains run long: one dilation step is not the answer (the test above
    would pass for a hysteresis that stopped early only if this failed)."""
    image = IMAGES["noise"]()
    cand, strong = gpu_canny.candidates(torch.from_numpy(image), 100, 200)
    one_step = cand & (torch.nn.functional.max_pool2d(strong[None, None].float(), 3, 1, 1)[0, 0] > 0)
    assert not torch.equal(one_step, gpu_canny.hysteresis_steps(cand, strong))


def test_rows_pack_into_words_column_by_bit():
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[0, 0] = mask[0, 33] = mask[1, 31] = mask[1, 69] = True
    words = gpu_canny.pack_rows(mask)
    assert words.dtype == torch.int32 and words.shape == (2, 3)
    assert words.tolist() == [[1, 2, 0], [-2 ** 31, 0, 1 << 5]]
    rng = torch.Generator().manual_seed(0)
    random = torch.rand(5, 77, generator=rng) > 0.5
    assert torch.equal(gpu_canny.unpack_rows(gpu_canny.pack_rows(random), 77), random)


def kernel_pass_model(cand: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """One pass of sdcanny/hysteresis.cu's word formula over uint32 masks (rows, words), from a copy
    (the kernel updates in place; both end at the same fixed point)."""
    rows, words = cand.shape
    padded = np.zeros((rows + 2, words + 2), dtype=np.uint32)
    padded[1:-1, 1:-1] = edges
    column = padded[:-2] | padded[1:-1] | padded[2:]  # (rows, words + 2): rows r - 1..r + 1
    mid, left, right = column[:, 1:-1], column[:, :-2], column[:, 2:]
    grown = mid | (mid << np.uint32(1)) | (left >> np.uint32(31)) | (mid >> np.uint32(1)) | (right << np.uint32(31))
    return cand & grown


def test_the_kernels_word_formula_reaches_the_dilation_steps_answer():
    image = IMAGES["shapes, other width"]()
    cand, strong = gpu_canny.candidates(torch.from_numpy(image), 100, 200)
    c = gpu_canny.pack_rows(cand).numpy().view(np.uint32)
    edges = gpu_canny.pack_rows(strong & cand).numpy().view(np.uint32)
    while True:
        grown = kernel_pass_model(c, edges)
        if np.array_equal(grown, edges):
            break
        edges = grown
    got = gpu_canny.unpack_rows(torch.from_numpy(edges.view(np.int32)), cand.shape[1])
    assert torch.equal(got, gpu_canny.hysteresis_steps(cand, strong))


def test_the_kernel_takes_images_whose_masks_fit_its_shared_memory():
    assert gpu_canny.kernel_fits(256, 384)  # the graded size: 3072 words, 24 KB
    assert gpu_canny.kernel_fits(384, 512)  # 6144 words: the 48 KB exactly
    assert not gpu_canny.kernel_fits(385, 512) and not gpu_canny.kernel_fits(512, 768)


def test_off_the_gpu_canny_is_the_dilation_steps_and_the_kernel_unavailable():
    image = IMAGES["shapes"]()
    got = gpu_canny.canny(torch.from_numpy(image), 100, 200)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), cv2.Canny(image, 100, 200))
    assert "needs a CUDA device" in gpu_canny.unavailable_reason(torch.device("cpu"))


@pytest.mark.parametrize("capability,since", [((7, 5), (10, 0)), ((8, 6), (11, 1)), ((9, 0), (11, 8))])
def test_the_kernel_source_compiles(capability, since):
    found = cuda_kernels.nvrtc_version()
    if found is None or found < since:
        pytest.skip(f"needs NVRTC {'.'.join(map(str, since))}+ for sm_{capability[0]}{capability[1]}, found {found}")
    source = (cuda_kernels.SOURCE_DIR / gpu_canny.SOURCE).read_text()
    options = cuda_kernels.compile_options({}, capability)
    assert cuda_kernels.compile_cubin(source, gpu_canny.SOURCE, options)[:4] == b"\x7fELF"


needs_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() or gpu_canny.unavailable_reason(torch.device("cuda")) is not None,
    reason="needs a CUDA GPU and NVRTC (runs on the H100)")


@needs_kernel
@pytest.mark.parametrize("name", IMAGES)
def test_gpu_canny_is_opencvs_bit_for_bit(name):
    image = IMAGES[name]()
    got = gpu_canny.canny(torch.from_numpy(image).cuda(), 100, 200).cpu().numpy()
    np.testing.assert_array_equal(got, cv2.Canny(image, 100, 200))


@needs_kernel
def test_gpu_canny_in_a_cuda_graph_follows_its_input():
    """Captured once, replayed on another image copied into the same buffer: the second image's
    edges (the kernel's passes are decided on the device, so a graph holds them)."""
    first, second = IMAGES["shapes"](), stand_in_photo((256, 384, 3), 2)
    buffer = torch.from_numpy(first).cuda()
    gpu_canny.canny(buffer, 100, 200)  # compiles and loads the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gpu_canny.canny(buffer, 100, 200)
    buffer.copy_(torch.from_numpy(second))
    graph.replay()
    np.testing.assert_array_equal(out.cpu().numpy(), cv2.Canny(second, 100, 200))


@needs_kernel
def test_gpu_kernel_refuses_masks_past_its_shared_memory():
    words = torch.zeros(1024, 48, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="shared memory"):
        gpu_canny.hysteresis_kernel(words, words)
