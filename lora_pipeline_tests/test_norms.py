import torch
from diffusers import UNet2DConditionModel

from lora_pipeline.core.training.step.norms import lora_inputs_uncast, norms_in_dtype


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


def _lora_unet() -> UNet2DConditionModel:
    from peft import LoraConfig

    unet = _unet(torch.bfloat16)
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trained LoRA weights are float32, the frozen base bf16 (as the trainer has them)
    return unet


def test_lora_inputs_left_uncast_give_the_same_loss_and_gradients_without_the_float32_copies():
    cast, uncast = _lora_unet(), _lora_unet()
    from peft.tuners.lora import LoraLayer

    assert lora_inputs_uncast(uncast) == sum(isinstance(m, LoraLayer) for m in uncast.modules()) > 10
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    copies: list[int] = []
    results = []
    for unet in (cast, uncast):
        before = len(copies)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
            loss = unet(sample, 10, text).sample.float().pow(2).mean()
        copies.append(sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy") - before)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in unet.parameters() if p.requires_grad]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert copies[1] < copies[0]  # the input copies to float32 are gone
