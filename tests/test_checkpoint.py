from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import pytest
import torch

from sdcanny.checkpoint import (PARTS, CheckpointError, all_finite, build_networks, dropped_reason, load_networks,
                                read_state_dict)
from sdcanny.config import SD15, TINY
from sdcanny.synthetic import checkpoint_shapes, write_checkpoint

# Every key of the original control_sd15_canny.pth with its shape (copied from the project brief).
ORIGINAL_KEYS = json.loads((Path(__file__).parent / "data" / "cldm_v15_keys.json").read_text())


def test_full_size_networks_match_original_keys_minus_dropped():
    with torch.device("meta"):
        nets = build_networks(SD15)
    ours = {PARTS[n] + k: list(v.shape) for n, m in nets.items() for k, v in m.state_dict().items()}
    used = {k: v for k, v in ORIGINAL_KEYS.items() if dropped_reason(k) is None}
    assert ours == used
    dropped = set(ORIGINAL_KEYS) - set(used)
    # 12 schedule buffers, logvar, quant_conv weight and bias, the VAE encoder
    assert len(dropped) == 12 + 1 + 2 + sum(k.startswith("first_stage_model.encoder.") for k in ORIGINAL_KEYS)


def test_synthetic_full_size_key_set_is_the_original():
    assert {k: list(v) for k, v in checkpoint_shapes(SD15).items()} == ORIGINAL_KEYS


HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None


@pytest.mark.parametrize("layout", [".pth", "legacy .pth", pytest.param(".safetensors", marks=pytest.mark.skipif(
    not HAS_SAFETENSORS, reason="safetensors (optional) is not installed"))])
def test_round_trip(tiny_state, tmp_path, layout):
    """torch.save's zip format (memory-mapped where torch can), its pre-1.6 legacy format (read
    whole), and safetensors all load to the same tensors."""
    path = tmp_path / f"tiny{layout.split()[-1]}"
    if layout == "legacy .pth":
        torch.save({"state_dict": tiny_state}, path, _use_new_zipfile_serialization=False)
        assert not zipfile.is_zipfile(path)
    else:
        write_checkpoint(tiny_state, path)
    nets = load_networks(path, TINY)
    for name, prefix in PARTS.items():
        for key, value in getattr(nets, name).state_dict().items():
            assert torch.equal(value, tiny_state[prefix + key]), prefix + key
    assert set(nets.dropped) == {k for k in tiny_state if dropped_reason(k)}


def test_plain_state_dict_and_nested_clip_spelling_load(tiny_state, tmp_path):
    """Older transformers nest CLIP under text_model. and store position_ids; both are accepted."""
    prefix, nested = PARTS["clip"], PARTS["clip"] + "text_model."
    state = {(nested + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tiny_state.items()}
    state[nested + "embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(state, tmp_path / "plain.pth")  # no {"state_dict": ...} wrapper
    nets = load_networks(tmp_path / "plain.pth", TINY)
    key = "embeddings.token_embedding.weight"
    assert torch.equal(nets.clip.state_dict()[key], tiny_state[prefix + key])
    assert nested + "embeddings.position_ids" in nets.dropped


def _save_modified(tiny_state, tmp_path, edit) -> Path:
    state = dict(tiny_state)
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save({"state_dict": state}, path)
    return path


def test_missing_key_is_named(tiny_state, tmp_path):
    key = "control_model.zero_convs.3.0.weight"
    path = _save_modified(tiny_state, tmp_path, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match="missing keys: " + key.replace(".", r"\.")):
        load_networks(path, TINY)


def test_unexpected_key_is_named(tiny_state, tmp_path):
    path = _save_modified(tiny_state, tmp_path, lambda s: s.update({"model.diffusion_model.extra.weight": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.diffusion_model\.extra\.weight"):
        load_networks(path, TINY)


def test_wrong_shape_is_named(tiny_state, tmp_path):
    key = "model.diffusion_model.out.2.bias"
    path = _save_modified(tiny_state, tmp_path, lambda s: s.update({key: torch.zeros(5)}))
    with pytest.raises(CheckpointError, match=r"wrong shapes.*out\.2\.bias \(5,\) != \(4,\)"):
        load_networks(path, TINY)


def test_full_size_checkpoint_is_rejected_by_tiny_config(tmp_path):
    """A checkpoint of one architecture loaded as another fails on shapes, not silently."""
    shapes = checkpoint_shapes(TINY)
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 4, 3, 3)
    from sdcanny.synthetic import schedule_buffers
    state.update(schedule_buffers(TINY))
    torch.save(state, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"input_blocks\.0\.0\.weight \(320, 4, 3, 3\)"):
        load_networks(tmp_path / "c.pth", TINY)


def test_different_noise_schedule_is_rejected(tiny_state, tmp_path):
    path = _save_modified(tiny_state, tmp_path, lambda s: s.update({"alphas_cumprod": s["alphas_cumprod"] * 0.99}))
    with pytest.raises(CheckpointError, match="alphas_cumprod"):
        load_networks(path, TINY)


def test_truncated_file_gives_clear_error(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        read_state_dict(tmp_path / "cut.pth")


@pytest.mark.parametrize("suffix", [".pth", pytest.param(".safetensors", marks=pytest.mark.skipif(
    not HAS_SAFETENSORS, reason="safetensors (optional) is not installed"))])
def test_garbage_file_gives_clear_error(tmp_path, suffix):
    (tmp_path / f"junk{suffix}").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        read_state_dict(tmp_path / f"junk{suffix}")


def test_safetensors_without_the_package_names_it(tmp_path, monkeypatch):
    import sdcanny.checkpoint as checkpoint
    monkeypatch.setattr(checkpoint, "installed", lambda module: module != "safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="needs the safetensors package"):
        read_state_dict(tmp_path / "model.safetensors")


def test_missing_file_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="python3 -m sdcanny.synthetic"):
        read_state_dict(tmp_path / "control_sd15_canny.pth")


# -- the formats and mistakes of real-world checkpoints ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_copies_load_and_compute_in_fp32(tiny_state, tmp_path, dtype):
    """The common community copies: every float tensor, schedule buffers included, in fp16 / bf16.
    The networks get those values (exactly representable in fp32), in fp32."""
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny_state.items()}
    torch.save({"state_dict": half}, tmp_path / "half.ckpt")
    nets = load_networks(tmp_path / "half.ckpt", TINY)
    key = "input_blocks.1.0.in_layers.2.weight"
    got = nets.unet.state_dict()[key]
    assert got.dtype == torch.float32 and torch.equal(got, half["model.diffusion_model." + key].float())


def test_a_rounded_schedule_is_still_refused_when_it_is_another_schedule(tiny_state, tmp_path):
    other = (tiny_state["alphas_cumprod"] * 0.99).to(torch.float16)
    path = _save_modified(tiny_state, tmp_path, lambda s: s.update({"alphas_cumprod": other}))
    with pytest.raises(CheckpointError, match="alphas_cumprod"):
        load_networks(path, TINY)


def test_non_finite_weights_are_refused_naming_the_tensors(tiny_state, tmp_path):
    def poison(state):
        state["model.diffusion_model.out.2.weight"] = torch.full_like(state["model.diffusion_model.out.2.weight"], float("nan"))
        state["control_model.zero_convs.3.0.bias"] = state["control_model.zero_convs.3.0.bias"].clone()
        state["control_model.zero_convs.3.0.bias"][0] = float("inf")
    with pytest.raises(CheckpointError, match=r"NaN or infinite.*model\.diffusion_model\.out\.2\.weight") as err:
        load_networks(_save_modified(tiny_state, tmp_path, poison), TINY)
    assert "control_model.zero_convs.3.0.bias" in str(err.value)


@pytest.mark.parametrize(("values", "dtype", "finite"), [
    ([3e38, 3e38], torch.float32, True),  # the sum overflows; the exact test says finite
    ([6e4] * 1000, torch.float16, True),  # overflows an fp16 sum, not an fp32 one
    ([1.0, float("nan")], torch.bfloat16, False),
    ([1.0, -float("inf")], torch.float32, False),
    ([1e308, 1e308], torch.float64, True),
    ([3, 4], torch.int64, True),
])
def test_all_finite_tells_nan_and_inf_from_large_values(values, dtype, finite):
    assert all_finite(torch.tensor(values, dtype=dtype)) is finite


def test_a_checkpoint_of_the_other_config_is_recognised(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="looks like the 'tiny' config: pass config='tiny'"):
        load_networks(tiny_checkpoint, SD15)


def test_ema_keys_are_dropped_with_one_line(tiny_state, tmp_path, capsys):
    def add_ema(state):
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000)
        state["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(3)
    nets = load_networks(_save_modified(tiny_state, tmp_path, add_ema), TINY)
    assert {k for k in nets.dropped if k.startswith("model_ema.")} == {
        "model_ema.decay", "model_ema.num_updates", "model_ema.diffusion_modelinput_blocks00weight"}
    assert capsys.readouterr().out.count("dropped 3 model_ema.* keys") == 1


def test_a_directory_gets_its_own_message(tmp_path):
    (tmp_path / "control_sd15_canny.pth").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a directory: pass the checkpoint file itself; it holds control_sd15"):
        read_state_dict(tmp_path)


def test_a_progress_bar_writing_to_a_log_refreshes_rarely(monkeypatch):
    """prepare's wait refreshes its bar every second; where stderr is a log file rather than a
    terminal, tqdm's bar may print at most every 30 s (the plain printer's interval is 5 s)."""
    import io
    import sys

    from sdcanny import optional
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = optional.progress(total=3, desc="compiling")
    interval = bar.mininterval if hasattr(bar, "mininterval") else bar.interval
    bar.close()
    assert interval >= (30 if optional.progress_class() is not optional._PlainProgress else 5)
    assert "compiling" in sys.stderr.getvalue()
