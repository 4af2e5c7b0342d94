"""The split-K kernels against cuDNN at the graded step's small convolutions, with the weights hot
(one copy, from L2) and cold (8 copies in rotation, 240-470 MB, more than L2 holds), read
K-innermost (a channels-last weight) and output-channels-innermost (a packed copy). Channels-last
input. Run as a scratch script on the H100 at the state of this commit.

    python3 benchmarks/split_k_layouts.py
"""
import sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import torch, torch.nn.functional as F
from step_shapes import graph_us
from sdcanny import split_k
from sdcanny.triton_conv import conv3x3_split_k
torch.backends.cudnn.benchmark = True
sms = split_k.sm_count(torch.device("cuda"))
print("| shape | cuDNN hot | cuDNN cold | K-inner hot | K-inner cold | N-inner hot | N-inner cold | split |")
for b, c, h, w, n, s in [(2, 1280, 4, 6, 1280, 1), (2, 2560, 4, 6, 1280, 1), (2, 1280, 8, 12, 1280, 2), (2, 1280, 8, 12, 1280, 1),
                         (2, 640, 8, 12, 1280, 1), (2, 2560, 8, 12, 1280, 1), (2, 640, 16, 24, 640, 2)]:
    x = torch.randn(b, c, h, w, device="cuda").half().contiguous(memory_format=torch.channels_last)
    ws = [(torch.randn(n, c, 3, 3, device="cuda") / (3 * c ** 0.5)).half().contiguous(memory_format=torch.channels_last) for _ in range(8)]
    bias = torch.randn(n, device="cuda").half()
    kin = [wt.permute(0, 2, 3, 1).reshape(n, -1) for wt in ws]
    nin = [m.t().contiguous().t() for m in kin]
    rows = b * ((h - 1) // s + 1) * ((w - 1) // s + 1)
    tiles = split_k.tiles_for(rows, c, n, sms)
    def rot(f, seq):
        state = {"i": 0}
        def g():
            f(seq[state["i"] % 8]); state["i"] += 1
        return g
    r = [graph_us(lambda: F.conv2d(x, ws[0], bias, s, 1)), graph_us(rot(lambda wt: F.conv2d(x, wt, bias, s, 1), ws), calls=16)]
    for mats in (kin, nin):
        r += [graph_us(lambda: conv3x3_split_k(x, mats[0], bias, s, tiles)), graph_us(rot(lambda m: conv3x3_split_k(x, m, bias, s, tiles), mats), calls=16)]
    print(f"| {b}x{c}x{h}x{w}->{n} s{s} | " + " | ".join(f"{v:.1f}" for v in r) + f" | {tiles.split} |", flush=True)
