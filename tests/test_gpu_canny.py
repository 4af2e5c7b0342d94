"""OpenCV's Canny from tensors (sdcanny/gpu_canny.py): the candidates and the hysteresis by dilation
against cv2.Canny bit for bit, and a word-level model of the hysteresis kernel's pass on any
machine; NVRTC's compilation of the kernels where an NVRTC library is found; on a GPU the
candidates kernel against the tensor form's masks, the map against cv2.Canny, in a CUDA graph, into
several samples' planes, and the kernels' refusals."""
from __future__ import annotations

import ctypes

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


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """bool (H, W) -> int32 (H, ceil(W / 32)), the kernels' layout: bit i of word j is column
    32 j + i (columns past W 0)."""
    h, w = mask.shape
    words = gpu_canny.words_per_row(w)
    bits = torch.nn.functional.pad(mask.to(torch.int64), (0, 32 * words - w)).reshape(h, words, 32)
    values = (bits << torch.arange(32, device=mask.device)).sum(dim=-1)
    return torch.where(values >= 2 ** 31, values - 2 ** 32, values).to(torch.int32)


def unpack_rows(words: torch.Tensor, width: int) -> torch.Tensor:
    h = words.shape[0]
    bits = (words.to(torch.int64)[:, :, None] >> torch.arange(32, device=words.device)) & 1
    return bits.reshape(h, -1)[:, :width].bool()


def test_rows_pack_into_words_column_by_bit():
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[0, 0] = mask[0, 33] = mask[1, 31] = mask[1, 69] = True
    words = pack_rows(mask)
    assert words.dtype == torch.int32 and words.shape == (2, 3)
    assert words.tolist() == [[1, 2, 0], [-2 ** 31, 0, 1 << 5]]
    rng = torch.Generator().manual_seed(0)
    random = torch.rand(5, 77, generator=rng) > 0.5
    assert torch.equal(unpack_rows(pack_rows(random), 77), random)


def fill_runs_model(seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """canny.cu's fill_runs bit by bit: the bits of each mask word joined to its seeds through set
    bits (a plain walk along each word, both ways)."""
    out = seeds.copy()
    for index in np.ndindex(mask.shape):
        m, word = int(mask[index]), int(seeds[index])
        for step in (1, -1):
            bits = range(32) if step == 1 else range(31, -1, -1)
            on = False
            for b in bits:
                on = bool(m >> b & 1) and (on or bool(word >> b & 1))
                if on:
                    out[index] |= np.uint32(1 << b)
    return out


def kernel_pass_model(cand: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """One pass of canny.cu's hysteresis word formula over uint32 masks (rows, words), every word
    from a copy of the last pass (the kernel updates in place, band by band, in sweeps: any order
    of updates ends at the same fixed point, edges only growing within it)."""
    rows, words = cand.shape
    padded = np.zeros((rows + 2, words + 2), dtype=np.uint32)
    padded[1:-1, 1:-1] = edges
    column = padded[:-2] | padded[1:-1] | padded[2:]  # (rows, words + 2): rows r - 1..r + 1
    mid, left, right = column[:, 1:-1], column[:, :-2], column[:, 2:]
    grown = mid | (mid << np.uint32(1)) | (left >> np.uint32(31)) | (mid >> np.uint32(1)) | (right << np.uint32(31))
    return fill_runs_model(cand & grown, cand)


def test_the_run_fill_model_follows_runs_both_ways_and_stops_at_gaps():
    mask = np.array([0b0111_0111_1110], dtype=np.uint32)
    assert fill_runs_model(np.array([0b0000_0000_0100], dtype=np.uint32), mask)[0] == 0b0000_0111_1110
    assert fill_runs_model(np.array([0b0100_0000_0000], dtype=np.uint32), mask)[0] == 0b0111_0000_0000
    full = np.array([0xFFFFFFFF], dtype=np.uint32)
    assert fill_runs_model(np.array([1 << 31], dtype=np.uint32), full)[0] == 0xFFFFFFFF


def test_the_kernels_word_formula_reaches_the_dilation_steps_answer():
    image = IMAGES["noise"]()  # long weak chains, in every direction
    cand, strong = gpu_canny.candidates(torch.from_numpy(image), 100, 200)
    c = pack_rows(cand).numpy().view(np.uint32)
    edges = pack_rows(strong & cand).numpy().view(np.uint32)
    passes = 0
    while True:
        grown = kernel_pass_model(c, edges)
        passes += 1
        if np.array_equal(grown, edges):
            break
        edges = grown
    got = unpack_rows(torch.from_numpy(edges.view(np.int32)), cand.shape[1])
    assert torch.equal(got, gpu_canny.hysteresis_steps(cand, strong))
    assert passes > 2  # chains that take passes, not one


def test_the_kernel_takes_images_whose_masks_fit_its_shared_memory():
    assert gpu_canny.kernel_fits(256, 384)  # the graded size: 3072 words, 24 KB
    assert gpu_canny.kernel_fits(384, 512)  # 6144 words: the 48 KB exactly
    assert not gpu_canny.kernel_fits(385, 512) and not gpu_canny.kernel_fits(512, 768)


def test_off_the_gpu_canny_is_the_dilation_steps_and_the_kernel_unavailable():
    image = IMAGES["shapes"]()
    got = gpu_canny.canny(torch.from_numpy(image), 100, 200)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), cv2.Canny(image, 100, 200))
    assert "need a CUDA device" in gpu_canny.unavailable_reason(torch.device("cpu"))


@pytest.mark.parametrize("capability,since", [((7, 5), (10, 0)), ((8, 6), (11, 1)), ((9, 0), (11, 8))])
def test_the_kernels_source_compiles(capability, since):
    found = cuda_kernels.nvrtc_version()
    if found is None or found < since:
        pytest.skip(f"needs NVRTC {'.'.join(map(str, since))}+ for sm_{capability[0]}{capability[1]}, found {found}")
    source = (cuda_kernels.SOURCE_DIR / gpu_canny.SOURCE).read_text()
    options = cuda_kernels.compile_options({}, capability)
    assert cuda_kernels.compile_cubin(source, gpu_canny.SOURCE, options)[:4] == b"\x7fELF"


def test_compiling_leaves_the_threads_text_encoding_alone():
    """NVRTC 11 leaves the calling thread in a locale of its own (Python's default encoding then
    ASCII): compile_cubin puts the thread's locale back."""
    if cuda_kernels.nvrtc_version() is None:
        pytest.skip("needs an NVRTC library (NVRTC 11.7 in the docker leg's torch 2.0.1)")
    import locale
    before = locale.getpreferredencoding()
    source = (cuda_kernels.SOURCE_DIR / gpu_canny.SOURCE).read_text()
    cuda_kernels.compile_cubin(source, gpu_canny.SOURCE, cuda_kernels.compile_options({}, (7, 5)))
    assert locale.getpreferredencoding() == before


needs_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() or gpu_canny.unavailable_reason(torch.device("cuda")) is not None,
    reason="needs a CUDA GPU and NVRTC (runs on the device machine: H100, H200)")


def gpu_thresholds(low, high) -> torch.Tensor:
    return torch.tensor(gpu_canny.thresholds(low, high), dtype=torch.int32, device="cuda")


@needs_kernel
@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("low,high", [(100, 200), (50.7, 120.2)])
def test_gpu_candidates_kernel_gives_the_tensor_forms_masks(name, low, high):
    image = torch.from_numpy(IMAGES[name]()).cuda()
    want = gpu_canny.candidates(image, *gpu_canny.thresholds(low, high))
    got = gpu_canny.candidate_words(image, gpu_thresholds(low, high))
    for g, w in zip(got, want):
        assert torch.equal(g, pack_rows(w))


@needs_kernel
@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("low,high", [(100, 200), (200, 100), (50.7, 120.2)])
def test_gpu_canny_is_opencvs_bit_for_bit(name, low, high):
    image = IMAGES[name]()
    got = gpu_canny.canny(torch.from_numpy(image).cuda(), low, high).cpu().numpy()
    np.testing.assert_array_equal(got, cv2.Canny(image, low, high))


@needs_kernel
def test_gpu_canny_in_a_cuda_graph_follows_its_inputs():
    """Captured once, replayed on another image and other thresholds copied into the same buffers:
    their map (the kernels read both on the device and decide their passes there)."""
    first, second = IMAGES["shapes"](), stand_in_photo((256, 384, 3), 2)
    image, thresholds = torch.from_numpy(first).cuda(), gpu_thresholds(100, 200)
    out = torch.empty(1, 1, 256, 384, dtype=torch.uint8, device="cuda")
    gpu_canny.canny_into(out, image, thresholds)  # loads the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gpu_canny.canny_into(out, image, thresholds)
    image.copy_(torch.from_numpy(second))
    thresholds.copy_(gpu_thresholds(60, 150))
    graph.replay()
    np.testing.assert_array_equal(out[0, 0].cpu().numpy(), cv2.Canny(second, 60, 150))


@needs_kernel
def test_gpu_canny_writes_every_samples_plane():
    image = IMAGES["noise"]()
    out = torch.zeros(3, 1, *image.shape[:2], dtype=torch.uint8, device="cuda")
    gpu_canny.canny_into(out, torch.from_numpy(image).cuda(), gpu_thresholds(100, 200))
    want = cv2.Canny(image, 100, 200)
    for plane in out.cpu().numpy():
        np.testing.assert_array_equal(plane[0], want)


@needs_kernel
def test_gpu_kernels_refuse_what_they_cannot_take():
    words = torch.zeros(1024, 48, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="shared memory"):
        gpu_canny.hysteresis_into(torch.empty(1024, 1536, dtype=torch.uint8, device="cuda"), words, words)
    words = torch.zeros(8, 2, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="out must be"):
        gpu_canny.hysteresis_into(torch.empty(8, 80, dtype=torch.uint8, device="cuda"), words, words)
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\)"):
        gpu_canny.candidate_words(torch.zeros(8, 8, 1, dtype=torch.uint8, device="cuda"), gpu_thresholds(1, 2))


@needs_kernel
def test_gpu_kernels_of_one_file_share_one_module():
    """canny.cu's two entry points come from one compile, loaded once (the driver's own answer)."""
    modules = []
    for kernel in gpu_canny._kernels(torch.cuda.get_device_capability()):
        module = ctypes.c_void_p()
        assert cuda_kernels.driver().cuFuncGetModule(ctypes.byref(module), ctypes.c_void_p(kernel.function)) == 0
        modules.append(module.value)
    assert modules[0] is not None and modules[0] == modules[1]
