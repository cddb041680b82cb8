"""Issue 25's network_args, kohya's names: block-wise ranks, alphas and learning rates (block_dims, block_alphas,
conv_block_dims, down/mid/up_lr_weight) and the LoRA dropouts (network_dropout, rank_dropout, module_dropout).
One shared two-epoch run on tiny-sd with all of them (the file's shapes, the optimizer's groups, the header and
MLflow, a resume); tiny-sdxl's blocks without training (and in diffusers); the dropouts against the plain LoRA
on one batch; tiny-flux's dropouts; the refusals."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.training.blocks import block_lr_weights
from lora_pipeline.core.training.kohya.dropout import ATTRIBUTE, reseed_dropout
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata, save_lora
from lora_pipeline.core.training.kohya.network import add_network, kohya_state_dict
from lora_pipeline.core.training.recipe_checks import fast_path_blockers
from lora_pipeline.core.training.recipe_groups import FlowSettings
from lora_pipeline.core.training.run.checkpoint import load_state
from lora_pipeline.core.training.run.tracking import TrainingTracker
from lora_pipeline.core.training.run.trainer import train_lora
from lora_pipeline.core.training.step.flux_step import RectifiedFlow
from lora_pipeline.core.training.step.loop import StepBatch, denoising_loss, draw_noise
from lora_pipeline_tests.helpers import (
    Crash,
    assert_same_tensors,
    crash_after,
    lora_layers,
    recipe_refusal,
    tiny_recipe,
    train,
)
from lora_pipeline_tests.test_lora_file import unet_inputs, unet_out

pytestmark = pytest.mark.xdist_group("network_args")

SD15, SDXL = model_family("sd15"), model_family("sdxl")
SD15_BLOCKS = SD15.kohya_blocks
assert SD15_BLOCKS is not None and SD15_BLOCKS.total == 25 and SDXL.kohya_blocks and SDXL.kohya_blocks.total == 23

SD_DIMS = [0, 2, 3, 0, 1, 2, 3, 4, 1, 2, 3, 4, 0, 4, 3, 2, 1, 4, 3, 2, 1, 4, 3, 2, 1]  # 25: IN00-11, MID, OUT00-11
SD_ALPHAS = [float(d or 1) / 2 for d in SD_DIMS]
BLOCKS = tiny_recipe(
    epochs=2, validation_split=0.0, optimizer="AdamW", learning_rate=1e-2, block_dims=SD_DIMS,
    block_alphas=SD_ALPHAS, conv_block_dims=[3] * 25, down_lr_weight=[0.5, 2.0], mid_lr_weight=3.0,
    up_lr_weight="linear+0.1", block_lr_zero_threshold=0.15, network_dropout=0.1, rank_dropout=0.2,
    module_dropout=0.1,
)


@pytest.fixture(scope="module")
def root(module_snapshot):
    return module_snapshot(n=4, repeats=1)


@pytest.fixture(scope="module")
def blocks_run(root):
    return train_lora(root, "train-v1", BLOCKS, out_dir=root.root / "blocks", device="cpu",
                      provenance={"code_commit": "test-commit"}, tracker=TrainingTracker(root.mlflow),
                      log=lambda line: None)


def _ranks(tensors: dict[str, torch.Tensor], family: str) -> dict[str, tuple[int, bool, float]]:
    """{kohya module: (rank, is a 3x3 conv, alpha)} of a file's U-Net modules."""
    return {key.split(".")[0]: (down.shape[0], down.ndim == 4 and down.shape[-1] == 3,
                                float(tensors[key.replace("lora_down.weight", "alpha")]))
            for key, down in tensors.items() if key.endswith(".lora_down.weight")}


def test_block_dims_give_each_module_its_blocks_rank_in_the_written_file(blocks_run):
    tensors = load_file(blocks_run.epochs[-1]["file"])
    ranks = _ranks(tensors, "sd15")
    weights = block_lr_weights(SD15_BLOCKS, [0.5, 2.0], 3.0, "linear+0.1", 0.15)
    assert weights[13] == 0.0 and weights[14] > 0  # OUT00's weight 0.1 is at the threshold: no LoRA there
    seen = set()
    for module, (rank, is_3x3, alpha) in ranks.items():
        index = SD15.kohya_block_index(module)
        seen.add(index)
        want = (3, 1.0) if is_3x3 else (SD_DIMS[index], SD_ALPHAS[index])  # conv_block_alphas: conv_alpha's 1.0
        assert (rank, alpha) == want, module
        assert SD_DIMS[index] or is_3x3, module  # block_dims 0: only the 3x3 convolutions' LoRA in that block
    assert 13 not in seen  # OUT00: lr weight 0, not even its convolutions
    assert {is_3x3 for module, (_, is_3x3, _) in ranks.items() if SD15.kohya_block_index(module) == 12} == {True}
    assert {1, 2, 5, 11, 14, 24} <= seen
    assert any(is_3x3 for _, is_3x3, _ in ranks.values())  # conv_block_dims turned LoCon on
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 2  # IN01
    assert tensors["lora_unet_up_blocks_3_attentions_2_proj_out.lora_up.weight"].shape[1] == 1  # OUT11


def test_lr_weights_reach_the_optimizers_param_groups(blocks_run):
    groups = load_state(blocks_run.out_dir).optimizer["param_groups"]
    weights = block_lr_weights(SD15_BLOCKS, [0.5, 2.0], 3.0, "linear+0.1", 0.15)
    by_name = {group["name"]: group["lr"] for group in groups}
    assert by_name["unet_block1"] == pytest.approx(2e-2)  # down_lr_weight[0] is IN00 (conv_in: no LoRA)
    assert by_name["unet_block2"] == pytest.approx(1e-2)  # a short list is filled with 1.0
    assert by_name["unet_block3"] == pytest.approx(1e-2)  # IN02: the downsampler's LoCon only (block_dims 0)
    assert "unet_block13" not in by_name  # weight 0: no LoRA, no group
    for name, lr in by_name.items():
        assert lr == pytest.approx(1e-2 * weights[int(name.removeprefix("unet_block"))])
    assert by_name["unet_block24"] == pytest.approx(1e-2 * 1.1)  # linear ends at 1.0, + 0.1


def test_the_network_args_are_in_the_header_and_mlflow(root, blocks_run):
    meta = read_lora_metadata(Path(blocks_run.epochs[-1]["file"]))
    args = json.loads(meta["ss_network_args"])
    assert args["block_dims"] == ",".join(map(str, SD_DIMS)) and args["conv_block_dims"] == ",".join(["3"] * 25)
    assert args["down_lr_weight"] == "0.5,2.0" and args["mid_lr_weight"] == "3.0"
    assert args["up_lr_weight"] == "linear+0.1" and args["block_lr_zero_threshold"] == "0.15"
    assert (args["rank_dropout"], args["module_dropout"], meta["ss_network_dropout"]) == ("0.2", "0.1", "0.1")
    params = TrainingTracker(root.mlflow).client.get_run(blocks_run.mlflow_run_id).data.params
    assert params["block_dims"] == json.dumps(SD_DIMS, separators=(",", ":"))
    assert (params["network_dropout"], params["up_lr_weight"]) == ("0.1", "linear+0.1")



def test_a_run_with_blocks_and_dropouts_resumes_to_the_same_file(root, blocks_run):
    """The per-block optimizer groups come back from the state, the dropout masks from (seed, step)."""
    with pytest.raises(Crash):
        train(root, BLOCKS, "blocks-resumed", log=crash_after(1))
    resumed, _ = train(root, BLOCKS, "blocks-resumed")
    assert resumed.resumed_from_epoch == 1 and resumed.loss_history == blocks_run.loss_history
    assert_same_tensors(blocks_run.epochs[-1]["file"], resumed.epochs[-1]["file"])


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match")  # diffusers' loader, below
def test_sdxl_block_dims_use_kohyas_23_blocks_and_load_in_diffusers(tiny_model, tmp_path):
    folder, recipe_alpha = tiny_model("tiny-sdxl"), tiny_recipe().network_alpha
    base = load_base_model(folder.parent, "tiny-sdxl", "sdxl")
    dims = [(i % 4) + 1 for i in range(23)]
    recipe = tiny_recipe(base_model="tiny-sdxl", model_family="sdxl", block_dims=dims, optimizer="AdamW",
                         block_alphas=[0.5 * d for d in dims], mid_lr_weight=[1.0, 0.0, 1.0], conv_dim=2,
                         conv_alpha=recipe_alpha)
    add_network(base, recipe.network, 0)
    unet = base.denoiser
    tensors = kohya_state_dict(unet, "sdxl", None)
    ranks = _ranks(tensors, "sdxl")
    indices = {SDXL.kohya_block_index(module) for module in ranks}
    for module, (rank, is_3x3, alpha) in ranks.items():
        index = SDXL.kohya_block_index(module)
        assert (rank, alpha) == ((2, recipe_alpha) if is_3x3 else (dims[index], 0.5 * dims[index])), module
    # MID01 (the middle transformer) has weight 0: neither its attention nor anything else has a LoRA
    assert 11 not in indices and {10, 12} <= indices and min(indices) >= 2 and max(indices) <= 21
    assert ranks["lora_unet_input_blocks_4_1_proj_in"][0] == 2  # IN04 (index 5): dims[5] = 2
    # block-wise ranks load exactly in diffusers' kohya loader (the evaluation grid's); its alphas per module do not:
    # diffusers gives every module the most common alpha (evaluate refuses such files)
    with torch.no_grad():
        for _, layer in lora_layers(unet, "default"):
            layer.lora_B["default"].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(7))
    unet.eval()
    inputs = unet_inputs(unet)
    assert _diffusers_error(folder, unet, inputs, tmp_path) > 1e-3
    for _, layer in lora_layers(unet, "default"):  # the same ranks at network_alpha
        layer.lora_alpha["default"] = recipe.network_alpha
        layer.scaling["default"] = recipe.network_alpha / layer.r["default"]
    assert _diffusers_error(folder, unet, inputs, tmp_path) < 1e-5


def _diffusers_error(folder: Path, unet: torch.nn.Module, inputs: dict, tmp_path: Path) -> float:
    """The largest difference of the U-Net's output with the file of its LoRA loaded by diffusers."""
    path = tmp_path / "lora.safetensors"
    save_lora(path, kohya_state_dict(unet, "sdxl", None), {})
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.load_lora_weights(path)
    return float((unet_out(pipe.unet, inputs) - unet_out(unet, inputs)).abs().max())


def _batch(base) -> tuple[StepBatch, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, base.denoiser.config.cross_attention_dim, generator=generator)
    return StepBatch(latents, hidden), generator


def _loss(base, recipe, step: int) -> torch.Tensor:
    batch, generator = _batch(base)
    reseed_dropout(base.denoiser, recipe.seed, step)
    return denoising_loss(base.denoiser, base.noise_scheduler, batch, draw_noise(batch.latents,
                          base.noise_scheduler, generator, recipe.noise), recipe.noise)


def test_dropout_changes_the_training_loss_only_while_training(tiny_model):
    """The same LoRA weights (up made non-zero), batch and noise: with kohya's three dropouts the training loss
    differs from the plain LoRA's (the hooks removed) and is the same at the same step; in eval() and without
    gradients (validation, sampling) it is the plain LoRA's. The file has the same keys and shapes."""
    base = load_base_model(tiny_model("tiny-sd").parent, "tiny-sd", "sd15")
    recipe = tiny_recipe(network_dropout=0.3, rank_dropout=0.3, module_dropout=0.2)
    add_network(base, recipe.network, 0)
    with torch.no_grad():
        for _, layer in lora_layers(base.denoiser, "default"):
            layer.lora_B["default"].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    unet = base.denoiser
    unet.train()
    trained = [float(_loss(base, recipe, step).detach()) for step in (1, 1, 2)]
    with torch.no_grad():
        without_grad = _loss(base, recipe, 1)
    unet.eval()
    in_eval = _loss(base, recipe, 1)
    file = kohya_state_dict(unet, "sd15", 2.0)
    for handle in getattr(unet, ATTRIBUTE).handles:
        handle.remove()
    unet.train()
    plain = _loss(base, recipe, 1)
    assert torch.equal(without_grad, plain) and torch.equal(in_eval.detach(), plain.detach())
    assert not math.isclose(trained[0], float(plain.detach()), rel_tol=1e-4)
    assert trained[0] == trained[1] and trained[2] != trained[0]  # the masks are drawn from (seed, step)
    plain_file = kohya_state_dict(unet, "sd15", 2.0)
    assert file.keys() == plain_file.keys() and all(file[k].shape == plain_file[k].shape for k in file)


def test_flux_takes_the_dropouts_on_its_lora_layers(tiny_model):
    """FLUX.1 (kohya's lora_flux.py has the same dropouts): the hooks sit on every LoRA layer, training only."""
    base = load_base_model(tiny_model("tiny-flux").parent, "tiny-flux", "flux1")
    recipe = tiny_recipe(base_model="tiny-flux", model_family="flux1", rank_dropout=0.5, module_dropout=0.3)
    add_network(base, recipe.network, 0)
    with torch.no_grad():
        for _, layer in lora_layers(base.denoiser, "default"):
            layer.lora_B["default"].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    assert len(getattr(base.denoiser, ATTRIBUTE).handles) == len(lora_layers(base.denoiser, "default"))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    text, pooled = torch.randn(2, 7, 32, generator=generator), torch.randn(2, 32, generator=generator)
    flow = RectifiedFlow.of(FlowSettings(), base.denoiser, recipe.noise)
    noise, sigmas = flow.draw(tuple(latents.shape), torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        reseed_dropout(base.denoiser, recipe.seed, 1)
        return flow.loss(base.denoiser, latents, noise, sigmas, text, pooled).detach()

    base.denoiser.train()
    dropped = loss()
    with torch.no_grad():
        plain = loss()
    assert torch.equal(dropped, loss()) and not torch.equal(dropped, plain)


def test_the_options_keep_old_hashes_and_say_why_there_is_no_fast_path():
    recipe = tiny_recipe()
    changes = {"block_dims": SD_DIMS, "network_dropout": 0.1, "rank_dropout": 0.1, "module_dropout": 0.1,
               "up_lr_weight": "sine", "block_lr_zero_threshold": 0.1, "resolutions": (64, 96)}
    hashes = {replace(recipe, optimizer="AdamW", **{name: value}).sha256 for name, value in changes.items()}
    assert recipe.sha256 not in hashes and len(hashes) == len(changes)
    assert replace(recipe, block_dims=None, network_dropout=None, resolutions=()).sha256 == recipe.sha256
    assert not fast_path_blockers(replace(recipe, optimizer="AdamW", block_dims=SD_DIMS))
    assert "own learning rates" in fast_path_blockers(replace(recipe, optimizer="AdamW", mid_lr_weight=0.5))[0]
    assert "dropout" in fast_path_blockers(replace(recipe, optimizer="AdamW", rank_dropout=0.1))[0]


def test_the_recipe_refuses_what_cannot_train_in_one_line(tmp_path):
    flux = {"base_model": "tiny-flux", "model_family": "flux1"}
    assert "block_dims is not an option of a FLUX.1 model (model_family: flux1): it has no kohya U-Net blocks" in (
        recipe_refusal(tmp_path, **flux, block_dims=[1] * 25))
    assert "rank_dropout" not in recipe_refusal(tmp_path, **flux, rank_dropout=0.1, up_lr_weight="sine")
    assert "block_dims must have 25 values" in recipe_refusal(tmp_path, optimizer="AdamW", block_dims=[1] * 23)
    sdxl = {"base_model": "tiny-sdxl", "model_family": "sdxl", "optimizer": "AdamW"}
    assert "block_dims must have 23 values" in recipe_refusal(tmp_path, **sdxl, block_dims=[1] * 25)
    assert "down_lr_weight must have at most 9 values" in recipe_refusal(tmp_path, **sdxl, down_lr_weight=[1.0] * 12)
    assert "DAdaptAdamW adapts one step size" in recipe_refusal(tmp_path, up_lr_weight="cosine")
    assert "block_alphas needs block_dims" in recipe_refusal(tmp_path, optimizer="AdamW", block_alphas=[1.0] * 25)
    assert "gradient_checkpointing" in recipe_refusal(tmp_path, rank_dropout=0.1, gradient_checkpointing=True)
    assert "up_lr_weight" in recipe_refusal(tmp_path, optimizer="AdamW", up_lr_weight="steps")
    assert "resolutions must not repeat" in recipe_refusal(tmp_path, resolutions=[64, 64])
