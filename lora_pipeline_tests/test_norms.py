import torch
from diffusers import UNet2DConditionModel

from lora_pipeline.core.training.step.norms import norms_in_dtype


def _unet(dtype: torch.dtype) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4,
    )
    return unet.requires_grad_(False).to(dtype)


def test_frozen_norms_run_in_bf16_and_match_autocast_float32_to_bf16_rounding():
    reference, patched = _unet(torch.bfloat16), _unet(torch.bfloat16)
    count = norms_in_dtype(patched, torch.bfloat16)
    expected = sum(isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm) for m in patched.modules())
    assert count == expected > 10
    seen: list[torch.dtype] = []
    patched.down_blocks[0].resnets[0].norm1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    sample = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(sample, 10, text).sample.float()
        got = patched(sample, 10, text).sample.float()
    assert seen == [torch.bfloat16]  # under autocast the norm would have returned float32
    assert torch.isfinite(got).all()
    # the norms' output is rounded to bf16 once more than under autocast: bf16-sized differences, no more
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_trainable_or_float32_norms_are_left_to_autocast():
    unet = _unet(torch.float32)
    assert norms_in_dtype(unet, torch.bfloat16) == 0
    half = _unet(torch.bfloat16)
    half.conv_norm_out.requires_grad_(True)
    total = sum(isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm) for m in half.modules())
    assert norms_in_dtype(half, torch.bfloat16) == total - 1
