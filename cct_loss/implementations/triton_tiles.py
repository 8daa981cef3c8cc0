"""Tile sizes of ``impl="triton"`` on a GPU, per ``D`` bucket and dtype, written by
``python3 benchmarks/tune_triton.py --write`` on a CUDA machine (no autotuning at run time).

Each entry: ``(BLOCK_Q, BLOCK_K, BLOCK_D, BLOCK_DOUT, num_warps, num_stages)``. ``"half"`` is
float16 and bfloat16, ``"float32"`` float32 with TF32."""

from __future__ import annotations

#: The run that measured this table: ``None`` while it holds the untuned defaults: up to
#: D = 256 the launch of the first kernel (64 x 64 blocks, one feature tile, Triton's default 4
#: warps and 3 stages); above, 128-wide feature tiles and 256 output columns per program.
MEASURED: dict[str, str] | None = None

TILES: dict[tuple[int, str], tuple[int, int, int, int, int, int]] = {
    (64, "half"): (64, 64, 64, 64, 4, 3),
    (128, "half"): (64, 64, 128, 128, 4, 3),
    (256, "half"): (64, 64, 256, 256, 4, 3),
    (512, "half"): (64, 64, 128, 256, 8, 2),
    (1024, "half"): (64, 64, 128, 256, 8, 2),
    (64, "float32"): (64, 64, 64, 64, 4, 3),
    (128, "float32"): (64, 64, 128, 128, 4, 3),
    (256, "float32"): (64, 64, 256, 256, 4, 3),
    (512, "float32"): (64, 32, 128, 256, 8, 2),
    (1024, "float32"): (64, 32, 128, 256, 8, 2),
}
