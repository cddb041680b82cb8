"""The FLUX.1 rectified-flow objective (flow.py): each timestep sampling's distribution, the straight-line noisy
latents, the loss weights and prediction types on known values, and agreement with kohya's own code."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lora_pipeline.core.training.step.flow import (
    FlowSettings,
    flow_loss,
    flow_match_sigmas,
    flow_target,
    loss_weighting,
    model_prediction,
    noisy_input,
)

# --- kohya's reference, copied as-is (global RNG and all) from kohya-ss/sd-scripts at commit
# 48d368fa557731ad0488c07304dfeba8c07910eb: library/flux_train_utils.py (time_shift, get_lin_function, get_sigmas,
# compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, get_noisy_model_input_and_timesteps
# without its ip_noise_gamma branch, apply_model_prediction_type), library/sd3_train_utils.py
# (FlowMatchEulerDiscreteScheduler.__init__'s sigmas and timesteps) and train_network.py (process_batch's loss, l2,
# with custom_train_functions.apply_masked_loss's alpha-mask branch). Test-only: the objective's specification.


def time_shift(mu: float, sigma: float, t: torch.Tensor):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15):
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def kohya_scheduler(num_train_timesteps: int = 1000, shift: float = 1.0):
    timesteps = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
    timesteps = torch.from_numpy(timesteps).to(dtype=torch.float32)
    sigmas = timesteps / num_train_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return SimpleNamespace(timesteps=sigmas * num_train_timesteps, sigmas=sigmas.to("cpu"),
                           config=SimpleNamespace(num_train_timesteps=num_train_timesteps))


def get_sigmas(noise_scheduler, timesteps, device, n_dim=4, dtype=torch.float32):
    sigmas = noise_scheduler.sigmas.to(device=device, dtype=dtype)
    schedule_timesteps = noise_scheduler.timesteps.to(device)
    timesteps = timesteps.to(device)
    step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    return sigma


def compute_density_for_timestep_sampling(weighting_scheme, batch_size, logit_mean=None, logit_std=None,
                                          mode_scale=None):
    if weighting_scheme == "logit_normal":
        u = torch.normal(mean=logit_mean, std=logit_std, size=(batch_size,), device="cpu")
        u = torch.nn.functional.sigmoid(u)
    elif weighting_scheme == "mode":
        u = torch.rand(size=(batch_size,), device="cpu")
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = torch.rand(size=(batch_size,), device="cpu")
    return u


def compute_loss_weighting_for_sd3(weighting_scheme, sigmas=None):
    if weighting_scheme == "sigma_sqrt":
        weighting = (sigmas**-2.0).float()
    elif weighting_scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas**2
        weighting = 2 / (math.pi * bot)
    else:
        weighting = torch.ones_like(sigmas)
    return weighting


def get_noisy_model_input_and_timesteps(args, noise_scheduler, latents, noise, device, dtype):
    bsz, h, w = latents.shape[0], latents.shape[-2], latents.shape[-1]
    num_timesteps = noise_scheduler.config.num_train_timesteps
    if args.timestep_sampling == "uniform" or args.timestep_sampling == "sigmoid":
        if args.timestep_sampling == "sigmoid":
            sigmas = torch.sigmoid(args.sigmoid_scale * torch.randn((bsz,), device=device))
        else:
            sigmas = torch.rand((bsz,), device=device)
        timesteps = sigmas * num_timesteps
    elif args.timestep_sampling == "shift":
        shift = args.discrete_flow_shift
        sigmas = torch.randn(bsz, device=device)
        sigmas = sigmas * args.sigmoid_scale
        sigmas = sigmas.sigmoid()
        sigmas = (sigmas * shift) / (1 + (shift - 1) * sigmas)
        timesteps = sigmas * num_timesteps
    elif args.timestep_sampling == "flux_shift":
        sigmas = torch.randn(bsz, device=device)
        sigmas = sigmas * args.sigmoid_scale
        sigmas = sigmas.sigmoid()
        mu = get_lin_function(y1=0.5, y2=1.15)((h // 2) * (w // 2))
        sigmas = time_shift(mu, 1.0, sigmas)
        timesteps = sigmas * num_timesteps
    else:
        u = compute_density_for_timestep_sampling(
            weighting_scheme=args.weighting_scheme, batch_size=bsz, logit_mean=args.logit_mean,
            logit_std=args.logit_std, mode_scale=args.mode_scale,
        )
        indices = (u * num_timesteps).long()
        timesteps = noise_scheduler.timesteps[indices].to(device=device)
        sigmas = get_sigmas(noise_scheduler, timesteps, device, n_dim=latents.ndim, dtype=dtype)
    sigmas = sigmas.view(-1, 1, 1, 1) if latents.ndim == 4 else sigmas.view(-1, 1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * latents + sigmas * noise
    return noisy_model_input.to(dtype), timesteps.to(dtype), sigmas


def apply_model_prediction_type(args, model_pred, noisy_model_input, sigmas):
    weighting = None
    if args.model_prediction_type == "raw":
        pass
    elif args.model_prediction_type == "additive":
        model_pred = model_pred + noisy_model_input
    elif args.model_prediction_type == "sigma_scaled":
        model_pred = model_pred * (-sigmas) + noisy_model_input
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
    return model_pred, weighting


def process_batch_loss(noise_pred, target, weighting, alpha_masks):
    loss = F.mse_loss(noise_pred.float(), target.float(), reduction="none")
    if weighting is not None:
        loss = loss * weighting
    if alpha_masks is not None:
        mask_image = alpha_masks.to(dtype=loss.dtype).unsqueeze(1)
        mask_image = torch.nn.functional.interpolate(mask_image, size=loss.shape[2:], mode="area")
        loss = loss * mask_image
    return loss.mean(dim=list(range(1, loss.ndim)))


# --- end of kohya's reference

SAMPLINGS = ["sigma", "uniform", "sigmoid", "shift", "flux_shift"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _timesteps(n: int = 20000, hw: int = 2, image_seq_len: int | None = None, **settings) -> torch.Tensor:
    latents = torch.zeros(n, 1, hw, hw)
    return noisy_input(latents, latents, FlowSettings(**settings), _gen(), image_seq_len=image_seq_len)[1]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_every_sampling_draws_timesteps_between_0_and_1000(sampling):
    timesteps = _timesteps(timestep_sampling=sampling)
    assert timesteps.min() >= 0 and timesteps.max() <= 1000
    assert sampling == "sigma" or timesteps.max() < 1000  # only "sigma" reads 1000: the scheduler's first sigma, 1
    assert timesteps.unique().numel() >= 1000  # spread, not a few values
    if sampling == "sigma":  # the scheduler's own timesteps
        assert torch.isin(timesteps, flow_match_sigmas(FlowSettings()) * 1000).all()


def test_each_sampling_has_its_distribution():
    uniform = _timesteps(timestep_sampling="uniform")
    assert uniform.mean().item() == pytest.approx(500, abs=10)
    assert uniform.std().item() == pytest.approx(1000 / 12**0.5, abs=10)
    sigmoid = _timesteps(timestep_sampling="sigmoid")  # sigmoid(N(0, 1)): symmetric around 500
    assert sigmoid.median().item() == pytest.approx(500, abs=10) and sigmoid.mean().item() == pytest.approx(500, abs=10)
    assert (sigmoid < 250).float().mean().item() == pytest.approx((sigmoid > 750).float().mean().item(), abs=0.01)
    wide = _timesteps(timestep_sampling="sigmoid", sigmoid_scale=3.0)  # larger scale: more mass at the ends
    assert (wide < 100).float().mean() > (sigmoid < 100).float().mean() + 0.1
    shifted = _timesteps(timestep_sampling="shift")  # shift 3 moves the median from 500 to 3 * 0.5 / 2 = 750
    assert shifted.median().item() == pytest.approx(750, abs=10) and shifted.mean() > sigmoid.mean() + 150
    unshifted = _timesteps(timestep_sampling="shift", discrete_flow_shift=1.0)
    assert torch.equal(unshifted, sigmoid)
    # the "sigma" default reads the scheduler's sigmas shifted by 3 at uniform indices: also a median of 750
    assert _timesteps(timestep_sampling="sigma").median().item() == pytest.approx(750, abs=10)
    logit_normal = _timesteps(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=1.0)
    assert logit_normal.median().item() == pytest.approx(1000 * 3 * 0.2689 / (1 + 2 * 0.2689), abs=10)  # sigmoid(-1)


def test_flux_shift_gives_larger_images_larger_sigmas():
    # median sigma e^mu / (e^mu + 1) with mu from 0.5 at 256 image tokens to 1.15 at 4096
    small = _timesteps(timestep_sampling="flux_shift", image_seq_len=256)
    large = _timesteps(timestep_sampling="flux_shift", image_seq_len=4096)
    assert small.median().item() == pytest.approx(1000 / (1 + math.exp(-0.5)), abs=10)
    assert large.median().item() == pytest.approx(1000 / (1 + math.exp(-1.15)), abs=10)
    assert (large > small).all()  # the same draws, shifted further
    from_latents = _timesteps(n=64, hw=128, timestep_sampling="flux_shift")  # 128x128 latents: 64 * 64 tokens
    assert torch.equal(from_latents, _timesteps(n=64, timestep_sampling="flux_shift", image_seq_len=4096))


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_the_noisy_latents_are_on_the_straight_line_to_the_noise(sampling):
    latents, noise = torch.randn(4, 16, 8, 8, generator=_gen(1)), torch.randn(4, 16, 8, 8, generator=_gen(2))
    noisy, timesteps, sigmas = noisy_input(latents, noise, FlowSettings(timestep_sampling=sampling), _gen())
    assert sigmas.shape == (4, 1, 1, 1) and torch.equal(noisy, (1 - sigmas) * latents + sigmas * noise)
    torch.testing.assert_close(sigmas.flatten(), timesteps / 1000)
    assert torch.equal(flow_target(noise, latents), noise - latents)
    packed = noisy_input(latents.flatten(2).transpose(1, 2), noise.flatten(2).transpose(1, 2),
                         FlowSettings(timestep_sampling=sampling), _gen(), image_seq_len=16)
    assert packed[2].shape == (4, 1, 1)  # packed (b, tokens, channels) latents broadcast too


def test_the_scheduler_sigmas_are_the_ones_kohya_makes():
    for shift in (1.0, 3.0, 3.1582):
        expected = kohya_scheduler(1000, shift).sigmas
        assert torch.equal(flow_match_sigmas(FlowSettings(discrete_flow_shift=shift)), expected)


def test_each_weighting_scheme_on_known_sigmas():
    sigmas = torch.tensor([0.25, 0.5, 1.0]).view(-1, 1, 1, 1)

    def weights(scheme):
        return loss_weighting(FlowSettings(weighting_scheme=scheme), sigmas).flatten().tolist()

    assert weights("sigma_sqrt") == pytest.approx([16.0, 4.0, 1.0])
    assert weights("cosmap") == pytest.approx([2 / (math.pi * 0.625), 4 / math.pi, 2 / math.pi])
    for scheme in ("none", "logit_normal", "mode"):  # these shape the sampling instead
        assert weights(scheme) == [1.0, 1.0, 1.0]


def test_the_three_prediction_types_on_known_tensors():
    output, noisy, sigmas = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), 3.0), torch.tensor([0.25, 0.5])
    sigmas = sigmas.view(-1, 1, 1, 1)

    def predict(kind, scheme="sigma_sqrt"):
        pred, weighting = model_prediction(output, noisy, sigmas, FlowSettings(model_prediction_type=kind,
                                                                               weighting_scheme=scheme))
        return pred[:, 0, 0, 0].tolist(), None if weighting is None else weighting.flatten().tolist()

    assert predict("raw") == ([2.0, 2.0], None)
    assert predict("additive") == ([5.0, 5.0], None)
    assert predict("sigma_scaled") == ([2.5, 2.0], [16.0, 4.0])  # 3 - sigma * 2, weighted sigma^-2
    assert predict("sigma_scaled", "none") == ([2.5, 2.0], [1.0, 1.0])


def test_the_loss_is_the_weighted_masked_per_image_mean():
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert flow_loss(pred, target, None).tolist() == [1.0, 1.0]
    assert flow_loss(pred, target, torch.tensor([2.0, 0.5]).view(-1, 1, 1, 1)).tolist() == [2.0, 0.5]
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :, :8] = 1  # the left half of the first image; area-averaged to the 2x2 latents
    assert flow_loss(pred, target, None, mask).tolist() == [0.5, 0.0]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_the_same_generator_gives_the_same_step_and_leaves_the_global_rng_alone(sampling):
    latents, noise = torch.randn(3, 4, 8, 8, generator=_gen(1)), torch.randn(3, 4, 8, 8, generator=_gen(2))
    settings = FlowSettings(timestep_sampling=sampling)
    state = torch.random.get_rng_state()
    first, again = noisy_input(latents, noise, settings, _gen(5)), noisy_input(latents, noise, settings, _gen(5))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(first[1], noisy_input(latents, noise, settings, _gen(6))[1])


def test_an_unknown_option_is_refused():
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowSettings(timestep_sampling="logit")  # type: ignore[arg-type]


KOHYA_CASES = [
    *[dict(timestep_sampling=s) for s in SAMPLINGS],
    dict(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=0.3, logit_std=1.5),
    dict(timestep_sampling="sigma", weighting_scheme="mode", mode_scale=1.29),
    dict(timestep_sampling="sigma", weighting_scheme="sigma_sqrt", discrete_flow_shift=1.0),
    dict(timestep_sampling="sigma", weighting_scheme="cosmap"),
    dict(timestep_sampling="uniform", weighting_scheme="cosmap", model_prediction_type="raw"),
    dict(timestep_sampling="sigmoid", sigmoid_scale=2.5, model_prediction_type="additive"),
    dict(timestep_sampling="shift", discrete_flow_shift=3.1582, sigmoid_scale=0.7, weighting_scheme="sigma_sqrt"),
    dict(timestep_sampling="flux_shift", sigmoid_scale=1.3, weighting_scheme="cosmap", model_prediction_type="raw"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", KOHYA_CASES, ids=lambda case: "-".join(map(str, case.values())))
def test_kohyas_code_gives_the_same_step_on_the_same_draws(case, dtype):
    settings = FlowSettings(**case)
    args = SimpleNamespace(**vars(settings))
    latents = torch.randn(6, 16, 12, 20, generator=_gen(1)).to(dtype)
    noise = torch.randn(6, 16, 12, 20, generator=_gen(2)).to(dtype)
    output = torch.randn(6, 16, 12, 20, generator=_gen(3)).to(dtype)
    alpha_masks = torch.rand(6, 96, 160, generator=_gen(4))
    scheduler = kohya_scheduler(1000, settings.discrete_flow_shift)
    for seed in range(5):
        torch.manual_seed(seed)  # kohya draws from the global RNG, seeded as our generator
        expected = get_noisy_model_input_and_timesteps(args, scheduler, latents, noise, "cpu", dtype)
        got = noisy_input(latents, noise, settings, _gen(seed))
        for name, a, b in zip(("noisy", "timesteps", "sigmas"), got, expected, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        expected_pred, expected_weighting = apply_model_prediction_type(args, output, *expected[::2])
        pred, weighting = model_prediction(output, got[0], got[2], settings)
        assert torch.equal(pred, expected_pred)
        assert (weighting is None) == (expected_weighting is None)
        assert weighting is None or torch.equal(weighting, expected_weighting)
        target = flow_target(noise, latents)
        assert torch.equal(flow_loss(pred, target, weighting, alpha_masks.unsqueeze(1)),
                           process_batch_loss(expected_pred, noise - latents, expected_weighting, alpha_masks))
