"""The tiny ControlNet and UNet with one of our ops switched in, against the same networks without
it: shared by the tests/*_interpreted.py scripts, which run under Triton's interpreter."""
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdcanny.checkpoint import load_state_networks  # noqa: E402
from sdcanny.config import TINY  # noqa: E402
from sdcanny.synthetic import synthetic_state_dict  # noqa: E402


def check_through_op(label: str, switch: Callable, prepare: Optional[Callable] = None, seed: int = 2,
                     channels_last: bool = False):
    """The tiny ControlNet's and UNet's outputs after `switch(net)` (which moves layers to the op and
    returns how many) against their outputs before it, `prepare(net)` applied first (the networks as
    the fast back-end has them); inputs from a generator seeded `seed`, channels-last where asked.
    Prints "network NAME SHAPE relative L2 E" per output, each within 1e-5, then "networks LABEL
    [counts]". Returns the networks and the generator, for checks that go on from them."""
    nets = load_state_networks(synthetic_state_dict(TINY, seed=0), TINY)
    g = torch.Generator().manual_seed(seed)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, 16, 24, generator=g).contiguous(memory_format=layout)
    t, ctx = torch.tensor([601, 601]), torch.randn(2, 77, TINY.clip.width, generator=g)
    feats = torch.randn(2, TINY.unet.model_channels, 16, 24, generator=g).contiguous(memory_format=layout)
    with torch.no_grad():
        for net in (nets.controlnet, nets.unet):
            if prepare is not None:
                prepare(net)
        want = nets.controlnet(x, t, ctx, feats), nets.unet(x, t, ctx)
        counts = [switch(net) for net in (nets.controlnet, nets.unet)]
        got = nets.controlnet(x, t, ctx, feats), nets.unet(x, t, ctx)
    for name, a, b in (*(("controlnet", p, q) for p, q in zip(got[0], want[0])), ("unet", got[1], want[1])):
        err = ((a - b).norm() / b.norm()).item()
        print("network", name, tuple(a.shape), f"relative L2 {err:.1e}")
        assert err < 1e-5, err
    print("networks", label, counts)
    return nets, g
