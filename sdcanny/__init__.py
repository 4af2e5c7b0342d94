"""sdcanny: Stable Diffusion 1.5 + ControlNet 1.0 (canny) in plain PyTorch, with fast back-ends.

The package name avoids the names the competition repository already uses
(cldm/, ldm/, annotator/, models/, share.py, config.py).
"""
