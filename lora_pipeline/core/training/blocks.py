"""kohya's block-wise ranks, alphas and learning rates of the U-Net (networks/lora.py's network_args `block_dims`,
`block_alphas`, `conv_block_dims`, `conv_block_alphas`, `down_lr_weight`, `mid_lr_weight`, `up_lr_weight`,
`block_lr_zero_threshold`), with kohya's semantics:

- The U-Net is cut into kohya's blocks: SD 1.x has 25 (IN00-IN11, MID, OUT00-OUT11; IN00 is conv_in, which has no
  LoRA), SDXL 23 (0 for the time/label embeddings, IN00-IN08 at 1-9, MID00-MID02 at 10-12, OUT00-OUT08 at 13-21,
  22 for the output layers; 0 and 22 have no LoRA): the family's `kohya_blocks`, and its `kohya_block_index` is
  kohya's `get_block_index` on kohya's module name (`lora_unet_down_blocks_1_attentions_0_…` for SD 1.x,
  `lora_unet_input_blocks_4_1_…` for SDXL). FLUX.1 has none, and refuses these fields.
- `block_dims` / `block_alphas` give the rank / alpha of every Linear and 1x1 Conv2d LoRA of a block (0: no LoRA
  there); `conv_block_dims` / `conv_block_alphas` those of the 3x3 convolutions (LoCon), which they turn on as
  kohya's do. Unset lists take network_dim / network_alpha (conv_dim / conv_alpha) for every block.
- `down_lr_weight` / `up_lr_weight` (12 values for SD 1.x, 9 for SDXL, shallow to deep for down and deep to shallow
  for up, or a preset `cosine`, `sine`, `linear`, `reverse_linear`, `zeros` with an optional `+<base>`) and
  `mid_lr_weight` (1 value for SD 1.x, 3 for SDXL) multiply each block's learning rate; short lists are filled
  with 1.0 as kohya's, weights at or below `block_lr_zero_threshold` become 0, and a block of weight 0 gets no
  LoRA at all (kohya's remove_block_dims_and_alphas).

Departures: the lists are YAML lists, not kohya's comma-separated text; a list longer than the family's blocks is
refused (kohya cuts it with a warning); `conv_block_dims` alone takes effect (kohya ignores it without block_dims
or an lr weight), with every other module at network_dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lora_pipeline.core.models.families.base import KohyaBlocks

BLOCK_LISTS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHTS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
BLOCK_FIELDS = (*BLOCK_LISTS, *LR_WEIGHTS, "block_lr_zero_threshold")  # refused by a family without kohya blocks
LR_PRESET_PATTERN = r"^(cosine|sine|linear|reverse_linear|zeros)(\+[0-9]*\.?[0-9]+)?$"


def _preset(text: str, count: int) -> list[float]:
    """kohya's get_list: a named curve over `count` blocks plus its `+<base>`."""
    name, _, base_text = text.partition("+")
    base = float(base_text) if base_text else 0.0
    ramp = [i / (count - 1) for i in range(count)]
    sine = [math.sin(math.pi * r / 2) for r in ramp]
    curves = {"cosine": sine[::-1], "sine": sine, "linear": ramp, "reverse_linear": ramp[::-1], "zeros": [0.0] * count}
    return [w + base for w in curves[name]]


def _weights(given: str | float | Sequence[float] | None, count: int, threshold: float) -> list[float]:
    if given is None:
        return [1.0] * count
    if isinstance(given, str):
        values = _preset(given, count)
    else:
        values = [float(given)] if isinstance(given, int | float) else [float(w) for w in given]
        values += [1.0] * (count - len(values))  # kohya fills short lists with 1.0
    return [w if w > threshold else 0.0 for w in values]


def block_lr_weights(layout: KohyaBlocks, down: str | Sequence[float] | None, mid: float | Sequence[float] | None,
                     up: str | Sequence[float] | None, threshold: float = 0.0) -> list[float] | None:
    """kohya's get_block_lr_weight: the learning-rate weight of every block; None when no weight is set."""
    if down is None and mid is None and up is None:
        return None
    weights = (_weights(down, layout.down, threshold) + _weights(mid, layout.mid, threshold)
               + _weights(up, layout.down, threshold))
    return [1.0, *weights, 1.0] if layout.edges else weights


@dataclass(frozen=True)
class BlockRanks:
    """Rank and alpha per block, of the Linear / 1x1 modules and (None: no LoCon) of the 3x3 convolutions."""

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None

    def of(self, index: int, is_3x3: bool) -> tuple[int, float]:
        """(rank, alpha) of a module of block `index`; rank 0: the module has no LoRA."""
        if is_3x3:
            if self.conv_dims is None or self.conv_alphas is None:
                return 0, 1.0
            return self.conv_dims[index], self.conv_alphas[index]
        return self.dims[index], self.alphas[index]


def block_ranks(layout: KohyaBlocks, network_dim: int, network_alpha: float, conv_dim: int | None, conv_alpha: float,
                lists: dict[str, Sequence[float] | None], lr_weights: list[float] | None) -> BlockRanks | None:
    """kohya's get_block_dims_and_alphas and remove_block_dims_and_alphas: None unless block_dims, conv_block_dims or
    a learning-rate weight is set (then every module's rank comes from its block)."""
    if lists.get("block_dims") is None and lists.get("conv_block_dims") is None and lr_weights is None:
        return None
    total = layout.total

    def given(name: str, default: float | None) -> list[float] | None:
        value = lists.get(name)
        return list(value) if value is not None else None if default is None else [default] * total

    dims = [int(d) for d in given("block_dims", network_dim) or []]
    alphas = given("block_alphas", network_alpha) or []
    conv_dims = given("conv_block_dims", conv_dim)
    conv_alphas = given("conv_block_alphas", conv_alpha) if conv_dims is not None else None
    if lr_weights is not None:
        for i, weight in enumerate(lr_weights):
            if weight == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return BlockRanks(dims, alphas, None if conv_dims is None else [int(d) for d in conv_dims], conv_alphas)


def block_problems(layout: KohyaBlocks, lists: dict[str, Sequence[float] | None],
                   lr_weights: dict[str, str | float | Sequence[float] | None]) -> list[str]:
    """Lists of the wrong length for the family's blocks."""
    found = [f"{name} must have {layout.total} values for this model family (kohya's blocks), not {len(value)}"
             for name, value in lists.items() if value is not None and len(value) != layout.total]
    if lists.get("block_alphas") is not None and lists.get("block_dims") is None:
        found.append("block_alphas needs block_dims")
    if lists.get("conv_block_alphas") is not None and lists.get("conv_block_dims") is None:
        found.append("conv_block_alphas needs conv_block_dims")
    for name, value in lr_weights.items():
        most = layout.mid if name == "mid_lr_weight" else layout.down
        if isinstance(value, list | tuple) and len(value) > most:
            found.append(f"{name} must have at most {most} values for this model family, not {len(value)}")
    return found


def _text(value: str | float | Sequence[float]) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return ",".join(str(v) for v in value)


def block_network_args(values: dict[str, str | float | Sequence[float] | None]) -> dict[str, str]:
    """The set block-wise arguments as kohya's ss_network_args writes them: comma-separated text."""
    return {name: _text(value) for name, value in values.items() if value is not None}
