"""The fast back-end computes what the reference computes; on the CPU in fp32 with graphs and
compilation off, on the GPU in fp16 with CUDA graphs (those tests skip without CUDA)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import photos
from sdcanny import compat
from sdcanny.checkpoint import load_networks
from sdcanny.config import TINY
from sdcanny.fast import FastTorchBackend, copy_into, cudnn_settings, step_table
from sdcanny.networks import fp32_islands
from sdcanny.pipeline import Canny2Image
from sdcanny.reference import ReferenceBackend
from sdcanny.stages import Stages, step_inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (runs on the device machine: H100, H200)")


def photo():
    return cv2.resize(photos.photo("coffee", stand_in_shape=(400, 600, 3)), (128, 64))


def cpu_pipe(tiny_checkpoint) -> Canny2Image:
    """The fast back-end on the CPU in fp32, eager: a fresh one for each call of this."""
    return Canny2Image(FastTorchBackend(load_networks(tiny_checkpoint, TINY), "cpu", dtype=torch.float32,
                                        compile=None), TINY)


def generate_both(tiny_checkpoint, fast_device="cpu", ref_device="cpu", backend_kw=None, **kw):
    args = dict(prompt="a cup", a_prompt="best quality", n_prompt="lowres", num_samples=1, image_resolution=64,
                ddim_steps=5, guess_mode=False, strength=1.0, scale=9.0, seed=11, eta=0.0,
                low_threshold=100, high_threshold=200)
    args.update(kw)
    ref = Canny2Image(ReferenceBackend(load_networks(tiny_checkpoint, TINY), ref_device), TINY)
    fast_kw = dict(dtype=torch.float32, compile=None) if fast_device == "cpu" else dict(compile=None)
    fast_kw.update(backend_kw or {})
    fast = Canny2Image(FastTorchBackend(load_networks(tiny_checkpoint, TINY), fast_device, **fast_kw), TINY)
    out_ref = ref.process(photo(), **args)
    out_fast = fast.process(photo(), **args)
    return ref.backend.last_latents, fast.backend.last_latents, out_ref, out_fast


@pytest.mark.parametrize("kw", [{}, dict(guess_mode=True, strength=0.7), dict(eta=0.6, num_samples=2)])
def test_fast_pipeline_equals_reference_in_fp32(tiny_checkpoint, kw):
    lat_ref, lat_fast, img_ref, img_fast = generate_both(tiny_checkpoint, **kw)
    torch.testing.assert_close(lat_fast, lat_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(img_ref, img_fast):
        assert np.abs(a.astype(int) - b).max() <= 1


@pytest.mark.parametrize("shared", [True, False])
def test_batched_guidance_step_equals_two_unbatched_calls(tiny_checkpoint, shared):
    """The step's stages on both branches at once, the first layers run once for both (`shared`) or
    per branch, against each branch through the plain networks; the branches' control scales differ
    (as in guess mode), so a residual of the shared layers must be scaled per branch."""
    nets = load_networks(tiny_checkpoint, TINY)
    stages = Stages.of(nets.clip, nets.controlnet, nets.unet, nets.vae, channels_last=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, TINY.clip.width, generator=g)
    feats = nets.controlnet.embed_hint(torch.rand(1, 3, 64, 64, generator=g))
    scales = torch.tensor([[0.8] * 13, [0.3] * 13])
    from sdcanny.config import ScheduleConfig
    from sdcanny.ddim import ddim_step, make_schedule
    sched = make_schedule(ScheduleConfig(), 20, 0.0)
    i = 13
    with torch.no_grad():
        step = step_table(sched)[i]
        latents = step_inputs(x, torch.float32, shared)
        assert latents.shape[0] == (1 if shared else 2)
        control_time, unet_time = stages.split_time_row(stages.time_rows(step_table(sched)[:, 0])[i:i + 1])
        controls = stages.control(latents, control_time, ctx, feats)
        h, skips = stages.unet_encode(latents, unet_time, ctx)
        got = stages.unet_decode(h, skips, unet_time, ctx, controls, scales, x, step, torch.tensor(7.5),
                                 torch.zeros_like(x))
        t = sched.timesteps[i:i + 1]
        e_c = nets.unet(x, t, ctx[:1], [c * 0.8 for c in nets.controlnet(x, t, ctx[:1], feats)])
        e_u = nets.unet(x, t, ctx[1:], [c * 0.3 for c in nets.controlnet(x, t, ctx[1:], feats)])
        want = ddim_step(x, e_u + 7.5 * (e_c - e_u), sched.alphas[i], sched.alphas_prev[i], sched.sigmas[i],
                         sched.sqrt_one_minus_alphas[i], None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_gpu_graph_replay_equals_eager_at_each_size(tiny_checkpoint):
    """One back-end meets several sizes in turn (and comes back to the first, whose graphs were
    released). A size's first call runs text, hint, the first step and decode uncaptured and replays
    the step's graph from the second step on; its second call (the same prompts) captures hint and
    decode and keeps the text encoding; a third with other prompts captures text: all equal the
    never-captured back-end's results bit for bit."""
    request_args = dict(prompt="a cup", a_prompt="", n_prompt="", num_samples=1, image_resolution=64,
                        ddim_steps=6, guess_mode=False, strength=1.0, scale=9.0, seed=5, eta=0.3,
                        low_threshold=100, high_threshold=200)
    sizes = [dict(), dict(num_samples=2), dict(image_resolution=128), dict(num_samples=3, eta=0.0), dict()]
    pipes = [Canny2Image(FastTorchBackend(load_networks(tiny_checkpoint, TINY), "cuda", compile=None,
                                          cuda_graphs=graphs, max_captured_sizes=2), TINY) for graphs in (False, True)]
    graphs_after = {"first": {"step"}, "second": {"hint", "step", "decode"}, "other prompts": set(STAGE_PARTS)}
    for index, size in enumerate(sizes):
        for call, want in graphs_after.items():
            args = {**request_args, **size, **({"prompt": "a jug"} if call == "other prompts" else {})}
            (eager, _), (captured, latents) = [(pipe.process(photo(), **args), pipe.backend.last_latents.clone())
                                               for pipe in pipes]
            run = next(reversed(pipes[1].backend.runs.values()))
            # the first size's whole loop, from its second call on, once per process (capture_loop)
            want = want | ({"loop"} if index == 0 and call != "first" else set())
            assert set(run.graphs) == want and run.warmed == set(STAGE_PARTS), (size, call)
            torch.testing.assert_close(latents, pipes[0].backend.last_latents, rtol=0, atol=0)
            assert all(np.array_equal(a, b) for a, b in zip(eager, captured)), (size, call)
    assert len(pipes[1].backend.runs) == 2 and all(run.graphs for run in pipes[1].backend.runs.values())
    graphs = dict(next(reversed(pipes[1].backend.runs.values())).graphs)
    (eager, captured) = [pipe.process(photo(), **{**request_args, "ddim_steps": 4}) for pipe in pipes]
    assert next(reversed(pipes[1].backend.runs.values())).graphs == graphs  # another step count: same graphs
    assert all(np.array_equal(a, b) for a, b in zip(eager, captured))


STAGE_PARTS = ("text", "hint", "step", "decode")


@needs_cuda
def test_gpu_canny_map_gives_the_host_maps_images(tiny_checkpoint):
    """The canny map made in the hint part (canny_on_gpu) against the host's cv2.Canny: the same
    latents and images bit for bit, uncaptured, captured, and captured with other thresholds (read
    from their buffer by the graph); the host never makes the map on that path."""
    args = dict(prompt="a cup", a_prompt="", n_prompt="", num_samples=2, image_resolution=64, ddim_steps=4,
                guess_mode=False, strength=1.0, scale=9.0, seed=5, eta=0.0, low_threshold=100, high_threshold=200)
    pipes = [Canny2Image(FastTorchBackend(load_networks(tiny_checkpoint, TINY), "cuda", compile=None,
                                          canny_on_gpu=on_gpu), TINY) for on_gpu in (True, False)]
    if not pipes[0].backend.canny_on_gpu:
        pytest.skip(f"the canny map's kernel is not available here: {pipes[0].backend.notes}")
    for thresholds in ((100, 200), (100, 200), (60.5, 150)):
        call = {**args, "low_threshold": thresholds[0], "high_threshold": thresholds[1]}
        with torch.no_grad():  # as process() runs it
            request = pipes[0].request(photo(), *call.values())
            on_gpu = pipes[0].backend.generate(request)
        assert "edges" not in request.__dict__  # not made on the host
        on_host = pipes[1].process(photo(), **call)
        torch.testing.assert_close(pipes[0].backend.last_latents, pipes[1].backend.last_latents, rtol=0, atol=0)
        assert all(np.array_equal(a, b) for a, b in zip(on_gpu, on_host)), thresholds
    assert "hint" in next(iter(pipes[0].backend.runs.values())).graphs


@needs_cuda
def test_gpu_the_first_size_replays_its_whole_loop_until_its_step_count_changes(tiny_checkpoint):
    """The first size captures its whole loop at its second call and replays it at the third; a call
    with step noise (captured without) runs step by step beside it; another step count releases it,
    and the first count again does not capture it again (once per process). Every result equals the
    never-captured back-end's bit for bit."""
    args = dict(prompt="a cup", a_prompt="", n_prompt="", num_samples=1, image_resolution=64, ddim_steps=5,
                guess_mode=False, strength=1.0, scale=9.0, seed=5, eta=0.0, low_threshold=100, high_threshold=200)
    pipes = [Canny2Image(FastTorchBackend(load_networks(tiny_checkpoint, TINY), "cuda", compile=None,
                                          cuda_graphs=graphs), TINY) for graphs in (False, True)]
    replays = []
    calls = [({}, None), ({}, (5, False)), ({}, (5, False)), ({"eta": 0.4}, (5, False)), ({"ddim_steps": 4}, None),
             ({}, None)]  # (a change to args, the loop graph's (steps, step noise) after the call)
    for number, (change, loop_key) in enumerate(calls, 1):
        (eager, _), (captured, latents) = [(pipe.process(photo(), **{**args, **change}),
                                            pipe.backend.last_latents.clone()) for pipe in pipes]
        run = next(iter(pipes[1].backend.runs.values()))
        assert run.loop_key == loop_key and ("loop" in run.graphs) == (loop_key is not None), number
        if number == 2:  # count the replays from here on
            graph = run.graphs["loop"]
            replay = graph.replay
            graph.replay = lambda: replays.append(number) or replay()
        torch.testing.assert_close(latents, pipes[0].backend.last_latents, rtol=0, atol=0)
        assert all(np.array_equal(a, b) for a, b in zip(eager, captured)), number
    assert replays == [3]  # the call with step noise and the later ones ran step by step


def test_a_repeated_prompt_pair_keeps_its_text_encoding(tiny_checkpoint):
    """Prompts A, A, B, A at one size: the text stage runs for the first A, B and the last A only,
    and every result equals a fresh back-end's for the same prompts."""
    args = dict(a_prompt="", n_prompt="low", num_samples=1, image_resolution=64, ddim_steps=4, guess_mode=False,
                strength=1.0, scale=9.0, seed=5, eta=0.0, low_threshold=100, high_threshold=200)

    kept = cpu_pipe(tiny_checkpoint)
    kept.process(photo(), prompt="a cup", **args)
    run = next(iter(kept.backend.runs.values()))
    text_calls = []
    text = run.fns["text"]
    run.fns["text"] = lambda tokens: text_calls.append(tokens.clone()) or text(tokens)
    for prompt in ("a cup", "a jug", "a cup"):
        got = kept.process(photo(), prompt=prompt, **args)
        want = cpu_pipe(tiny_checkpoint).process(photo(), prompt=prompt, **args)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), prompt
    assert len(text_calls) == 2 and not torch.equal(text_calls[0], text_calls[1])


def test_the_step_inputs_follow_the_scales_from_call_to_call(tiny_checkpoint):
    """The control and guidance scales go up only where the buffers hold others: at one size, calls
    with other strengths, guess mode and guidance, and back, each equal a fresh back-end's result."""
    args = dict(prompt="a cup", a_prompt="", n_prompt="", num_samples=1, image_resolution=64, ddim_steps=4,
                seed=5, eta=0.0, low_threshold=100, high_threshold=200)

    kept = cpu_pipe(tiny_checkpoint)
    calls = [dict(guess_mode=False, strength=1.0, scale=9.0), dict(guess_mode=False, strength=0.5, scale=9.0),
             dict(guess_mode=True, strength=0.5, scale=9.0), dict(guess_mode=True, strength=0.5, scale=4.0),
             dict(guess_mode=False, strength=1.0, scale=9.0)]
    for call in calls:
        got = kept.process(photo(), **args, **call)
        want = cpu_pipe(tiny_checkpoint).process(photo(), **args, **call)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), call
    assert len(kept.backend.runs) == 1


def test_a_new_step_count_at_a_known_size_reuses_its_run(tiny_checkpoint):
    """The step count sizes only buffers read outside the graphs: 6 steps then 4 at one size keep
    one run, and the 4-step result equals a fresh back-end's."""
    args = dict(prompt="a cup", a_prompt="", n_prompt="", num_samples=1, image_resolution=64, ddim_steps=6,
                guess_mode=False, strength=1.0, scale=9.0, seed=5, eta=0.3, low_threshold=100, high_threshold=200)
    pipes = [cpu_pipe(tiny_checkpoint) for _ in range(2)]
    pipes[0].process(photo(), **args)
    reused, fresh = [pipe.process(photo(), **{**args, "ddim_steps": 4}) for pipe in pipes]
    assert len(pipes[0].backend.runs) == 1 and len(pipes[0].backend.runs[next(iter(pipes[0].backend.runs))].buffers.steps) == 4
    assert all(np.array_equal(a, b) for a, b in zip(reused, fresh))


def test_copy_into_fills_nested_tensors_in_place_and_refuses_another_structure():
    places = [torch.zeros(2), (torch.zeros(1, 3), torch.zeros(3))]
    kept = [places[0], *places[1]]
    copy_into(places, [torch.ones(2), (torch.full((1, 3), 2.0), torch.arange(3.0))])
    assert [t.tolist() for t in kept] == [[1.0, 1.0], [[2.0, 2.0, 2.0]], [0.0, 1.0, 2.0]]
    assert places[0] is kept[0] and places[1][1] is kept[2]
    with pytest.raises(ValueError, match="1 tensors for 2 places"):
        copy_into(places[1], [torch.zeros(1, 3)])


def test_the_decode_stage_says_whether_the_latents_are_finite(tiny_checkpoint):
    """The fast back-end's own finiteness check (the decode stage's flag): true after a normal call,
    and an overflowing guidance scale is refused by the front end through it, as the reference's
    latents are checked."""
    pipe = cpu_pipe(tiny_checkpoint)
    args = dict(prompt="a cup", a_prompt="", n_prompt="", num_samples=1, image_resolution=64, ddim_steps=4,
                guess_mode=False, strength=1.0, scale=9.0, seed=5, eta=0.0, low_threshold=100, high_threshold=200)
    pipe.process(photo(), **args)
    assert pipe.backend.last_finite is True and bool(torch.isfinite(pipe.backend.last_latents).all())
    with pytest.raises(FloatingPointError, match=r"NaN or infinite latents \(strength=1.0, scale=1e\+38\)"):
        pipe.process(photo(), **{**args, "scale": 1e38})
    assert pipe.backend.last_finite is False and not bool(torch.isfinite(pipe.backend.last_latents).all())


def test_cudnn_settings_are_set_for_a_block_and_restored():
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
        with pytest.raises(KeyError):
            with cudnn_settings(False, True):
                assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
                raise KeyError("inside")
        assert torch.backends.cudnn.benchmark is True and torch.backends.cudnn.deterministic is False
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


@needs_cuda
@pytest.mark.parametrize("backend_kw", [{}, dict(fp32_islands=True)])
@pytest.mark.parametrize("kw", [{}, dict(guess_mode=True)])
def test_gpu_fp16_is_close_to_fp32_reference(tiny_checkpoint, kw, backend_kw):
    lat_ref, lat_fast, img_ref, img_fast = generate_both(tiny_checkpoint, "cuda", "cuda", backend_kw, **kw)
    assert torch.isfinite(lat_fast).all()
    rel = ((lat_fast.float() - lat_ref).norm() / lat_ref.norm()).item()
    assert rel < 0.01, rel
    mse = np.mean((img_ref[0].astype(np.float64) - img_fast[0]) ** 2)
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 35


def test_step_callbacks_see_the_same_trajectory(tiny_checkpoint):
    """--step-error's hook: both back-ends report every step's latents, which agree in fp32."""
    seen = {}
    for name, backend in (("reference", ReferenceBackend(load_networks(tiny_checkpoint, TINY))),
                          ("fast", FastTorchBackend(load_networks(tiny_checkpoint, TINY), "cpu", dtype=torch.float32,
                                                    compile=None))):
        steps = seen[name] = []
        backend.step_callback = lambda i, x, steps=steps: steps.append((i, x.clone()))
        Canny2Image(backend, TINY).process(photo(), "a cup", "", "", 1, 64, 4, False, 1.0, 9.0, 3, 0.0, 100, 200)
    assert [i for i, _ in seen["reference"]] == [i for i, _ in seen["fast"]] == [0, 1, 2, 3]
    for (_, a), (_, b) in zip(seen["reference"], seen["fast"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not compat.cpu_runs_fp16_convolutions(), reason=f"torch {torch.__version__} has no fp16 CPU kernels")
def test_fp32_islands_compute_in_fp32_inside_an_fp16_network(tiny_checkpoint):
    """With fp32_islands the normalisations and time MLPs hold fp32 weights while the rest is fp16,
    and the sampler's result stays within fp16's reach of the fp32 reference."""
    backend = FastTorchBackend(load_networks(tiny_checkpoint, TINY), "cpu", dtype=torch.float16, compile=None,
                               fp32_islands=True)
    union = torch.nn.ModuleList([backend.stages.control, backend.stages.unet_encode])
    islands = fp32_islands(union)
    assert islands and all(p.dtype == torch.float32 for m in islands for p in m.parameters())
    convs = [m for m in union.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.dtype == torch.float16 for m in convs)
    lat_ref, lat_fast, _, _ = generate_both(tiny_checkpoint, backend_kw=dict(dtype=torch.float16, fp32_islands=True))
    rel = ((lat_fast.float() - lat_ref).norm() / lat_ref.norm()).item()
    assert 0 < rel < 0.02, rel


def test_overlapped_launches_are_asked_of_inductor_where_it_has_them(tiny_checkpoint, monkeypatch):
    """overlap_launches adds TorchInductor's programmatic-dependent-launch option to the compile
    options and changes nothing else; a torch without that option leaves it out and says so."""
    from torch._inductor import config
    monkeypatch.setattr(compat, "compile_unavailable_reason", lambda device_type: None)
    nets = load_networks(tiny_checkpoint, TINY)
    on = FastTorchBackend(nets, "cpu", dtype=torch.float32, compile="default")
    off = FastTorchBackend(nets, "cpu", dtype=torch.float32, compile="default", overlap_launches=False)
    has_pdl = hasattr(config.triton, "enable_pdl")
    added = {k: v for k, v in on.inductor_options.items() if k not in off.inductor_options}
    assert added == ({"triton.enable_pdl": True} if has_pdl else {})
    assert all(on.inductor_options[k] == v for k, v in off.inductor_options.items())
    assert any("triton.enable_pdl" in note for note in on.notes) == (not has_pdl)
    assert not any("enable_pdl" in note for note in off.notes)


def test_an_uncompilable_torch_runs_eager_and_says_so(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(compat, "compile_unavailable_reason",
                        lambda device_type: "torch 2.0.1 supports torch.compile only up to Python 3.10")
    backend = FastTorchBackend(load_networks(tiny_checkpoint, TINY), "cpu", dtype=torch.float32, compile="default")
    assert backend.compiled is None
    assert backend.notes == ["torch back-end runs eager with CUDA graphs, not compiled: "
                             "torch 2.0.1 supports torch.compile only up to Python 3.10"]

