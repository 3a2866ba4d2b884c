"""SD 3.5 LoRAs (sd3/lora.py, lora/files.py, lora/reading.py): where they go, the files we write and read, and one
training step, against diffusers (+ peft) and against SAI-named weights as ComfyUI applies a kohya file.

- Target modes: the documented layers; `all` is every Linear of the joint blocks.
- diffusers format: our file through `StableDiffusion3Pipeline.load_lora_weights` gives our transformer's output
  (fp32, rel < 1e-5: the same math, a peft branch there and our LoRALayer here, ~1e-7).
- kohya format: SAI names with our q/k/v fused into SAI's qkv and the last context block's and final layer's adaLN
  halves swapped. Applied the way ComfyUI applies it (W_sai += alpha/rank up @ down, DoRA per output row) to the
  SAI weights and converted back by sd3/sai.py, it equals our merged model (rel < 1e-6: row blocks of one matmul vs
  separate matmuls); read back, it gives exactly our tensors (written and read again: the same bytes).
- Files other trainers write: kohya sd-scripts (one shared down per qkv, adaLN layers), kohya-style diffusers names,
  SimpleTuner / ai-toolkit peft files without metadata (alpha = rank, as diffusers reads them).
- One training step (loss and every LoRA gradient) equals diffusers' SD3Transformer2DModel with a peft LoRA on the
  same targets (rel < 1e-4, the project's bound; measured ~1e-6).
"""

import dataclasses

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import compute_loss_weighting_for_sd3
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import families
from lora.files import save_lora, write_lora
from lora.layer import LoRAConfig, add_lora, lora_modules, lora_parameters
from lora.reading import load_lora, read_lora, read_lora_file
from sd3 import family as sd3
from sd3 import lora as sd3_lora
from sd3 import sai
from sd3.configs import SD35_LARGE, SD35_MEDIUM
from sd3.tiny import tiny_sd3_path
from tests.test_sd3_family import noise_settings
from training.loop.loss import diffusion_loss, weighted

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd3_path()


@pytest.fixture(scope="module")
def names(tiny):
    return sd3.lora_names("tiny-sd3")


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 16, 8, 12, generator=g), "encoder_hidden_states":
            torch.randn(2, 20, 128, generator=g), "pooled_projections": torch.randn(2, 96, generator=g),
            "timestep": torch.tensor([300.0, 850.0])}


def output(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x["hidden_states"], x["encoder_hidden_states"], x["pooled_projections"], x["timestep"])


def trained(mode="all", rank=4, alpha=2.0, dora=False, seed=1):
    """Our tiny transformer with a 'trained' LoRA: random down, up (and DoRA magnitude near the row norms)."""
    model = sd3.load_denoiser("tiny-sd3")
    config = LoRAConfig(rank, alpha, 0.0, mode, use_dora=dora)
    add_lora(model, sd3.lora_targets(model, config), dora=dora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(p * (1 + 0.1 * torch.randn(p.shape, generator=g)) if p.ndim == 1
                    else torch.randn(p.shape, generator=g) * 0.1)
    return model, config


def merged_state(model) -> dict[str, torch.Tensor]:
    """Our LoRA model's weights with every LoRA merged: the diffusers state dict the file must produce."""
    for m in lora_modules(model).values():
        m.merge()
    sd = {k.replace(".base.", "."): v.clone() for k, v in model.state_dict().items() if "lora_" not in k
          and not k.endswith("magnitude")}
    for m in lora_modules(model).values():
        m.unmerge()
    return sd


def comfy_apply(base: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """A kohya LoRA file applied to a diffusers state dict the way ComfyUI applies it to an SAI checkpoint:
    `lora_unet_<SAI key without .weight, . -> _>`, W += alpha / rank * up @ down (DoRA: times dora_scale over the new
    row norms); then back to diffusers names."""
    weights = sai.transformer_diffusers_to_sai(base)
    keys = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k for k in weights if k.endswith(".weight")}
    tensors = load_file(str(path))
    used = set()
    for key in tensors:
        name = key.partition(".")[0]
        if name in used:
            continue
        used.add(name)
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        alpha = tensors[f"{name}.alpha"].item()
        w = weights[keys[name]]
        new = w + alpha / down.shape[0] * (up @ down)
        if f"{name}.dora_scale" in tensors:
            new = new * (tensors[f"{name}.dora_scale"] / new.norm(dim=1, keepdim=True))
        weights[keys[name]] = new
    assert used, "no LoRA keys"
    return sai.transformer_sai_to_diffusers(weights)


# ---------------------------------------------------------------------------------------------------
# targets and names


def test_target_modes_pick_the_documented_layers(names):
    model = sd3.load_denoiser("tiny-sd3")  # 4 blocks: 0-1 with attn2, 3 pre-only
    attention = sd3_lora.lora_target_names(model, "attention")
    assert set(attention) == names.targets["attention"]
    assert [n.removeprefix("transformer_blocks.0.") for n in attention if n.startswith("transformer_blocks.0.")] \
        == ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj", "attn.add_q_proj",
            "attn.to_out.0", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    last = [n.removeprefix("transformer_blocks.3.") for n in attention if n.startswith("transformer_blocks.3.")]
    assert last == ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj", "attn.add_q_proj",
                    "attn.to_out.0"]  # pre-only: no to_add_out
    every_linear = {f"transformer_blocks.{i}.{n}" for i, b in enumerate(model.transformer_blocks)
                    for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names.targets["all"] == every_linear
    assert names.targets["all"] - names.targets["attention_mlp"] == {
        n for n in every_linear if n.endswith(("norm1.linear", "norm1_context.linear"))}
    assert {n.rpartition(".")[2] for n in names.targets["attention_mlp"] - names.targets["attention"]} == {"proj", "2"}
    with pytest.raises(ValueError, match="SD 3.5's MMDiT has none"):
        sd3.lora_targets(model, LoRAConfig(4, 4.0, 0.0, "attention", conv_rank=4))
    with pytest.raises(ValueError, match="not one of SD 3.5's attention, attention_mlp, all"):
        sd3.lora_targets(model, LoRAConfig(4, 4.0, 0.0, "attention_out"))


def test_names_of_the_released_models_without_weights(tiny, tmp_path):
    medium, large = sd3.lora_names("sd3.5-medium"), sd3.lora_names("sd3.5-large")
    assert medium.layers["transformer_blocks.0.attn2.to_q"] == (1536, 1536)
    assert large.layers["transformer_blocks.37.attn.to_q"] == (2432, 2432)
    assert large.kohya["transformer_blocks.5.attn.add_v_proj"] == \
        ("lora_unet_joint_blocks_5_context_block_attn_qkv", 2 * 2432, 2432)
    assert large.kohya_swapped == {"norm_out.linear", "transformer_blocks.37.norm1_context.linear"}
    assert medium.metadata["modelspec.architecture"] == "stable-diffusion-v3.5-medium/lora"
    assert large.metadata["modelspec.architecture"] == "stable-diffusion-v3.5-large/lora"
    assert medium.metadata["ss_base_model_version"] == "5-medium" and medium.peft_prefix == "transformer"  # kohya's
    assert large.metadata["ss_base_model_version"] == "5-large"
    assert sd3.lora_names("sd3.5-medium") is medium  # cached
    assert sd3.lora_names(tiny).layers == sd3.lora_names("tiny-sd3").layers  # a folder: its config
    # an SAI single file: its config from the header's shapes, no tensor read
    sd = sai.transformer_diffusers_to_sai(sd3.load_denoiser("tiny-sd3").state_dict())
    save_file({sai.PREFIXES["transformer"] + k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    from_file = sd3_lora.config_of(tmp_path / "m.safetensors")  # sample_size is not stored (it names no layer)
    assert dataclasses.replace(from_file, sample_size=32) == sd3_lora.CONFIGS["tiny-sd3"]
    assert sd3_lora.config_of(tmp_path / "gone" / "sd3.5-large") == SD35_LARGE
    assert sd3_lora.config_of(tmp_path / "gone") == SD35_MEDIUM


# ---------------------------------------------------------------------------------------------------
# diffusers format: loads in diffusers' pipeline


@pytest.fixture(scope="module")
def pipe(tiny):
    return StableDiffusion3Pipeline.from_pretrained(tiny, local_files_only=True)


@pytest.mark.parametrize("mode,dora", [("attention", False), ("attention_mlp", False), ("all", False),
                                       ("all", True)])
def test_diffusers_file_loads_in_the_pipeline(tmp_path, names, pipe, mode, dora):
    model, config = trained(mode, dora=dora)
    path = save_lora(model, tmp_path / "lora.safetensors", config, names, format="diffusers")
    x = inputs()
    ours = output(model, x)
    pipe.load_lora_weights(str(path))
    try:
        assert len([m for m in pipe.transformer.modules() if hasattr(m, "lora_A")]) == len(lora_modules(model))
        with torch.no_grad():
            ref = pipe.transformer(**x).sample
    finally:
        pipe.unload_lora_weights()
    assert rel_err(ours, ref) < 1e-5
    assert rel_err(output(sd3.load_denoiser("tiny-sd3"), x), ref) > 1e-2  # the LoRA matters
    merged = sd3.load_denoiser("tiny-sd3")
    load_lora(merged, path, names)  # read back and merged: the same function
    assert rel_err(output(merged, x), ours) < 1e-5


# ---------------------------------------------------------------------------------------------------
# kohya format: SAI names, fused qkv, swapped halves


@pytest.mark.parametrize("mode,dora", [("attention", False), ("all", False), ("all", True)])
def test_kohya_file_is_what_comfyui_applies_and_round_trips(tmp_path, names, mode, dora):
    model, config = trained(mode, dora=dora)
    path = save_lora(model, tmp_path / "k.safetensors", config, names, format="kohya")
    tensors = load_file(str(path))
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight" in tensors
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in tensors
    assert not any("to_q" in k or k.startswith("transformer") for k in tensors)
    if mode == "all":
        assert "lora_unet_joint_blocks_3_context_block_adaLN_modulation_1.alpha" in tensors
    assert ("lora_unet_joint_blocks_1_context_block_attn_qkv.dora_scale" in tensors) == dora

    # what ComfyUI computes on the SAI checkpoint == our merged model
    base = sd3.load_denoiser("tiny-sd3").state_dict()
    expected, got = merged_state(model), comfy_apply(base, path)
    assert got.keys() == expected.keys()
    worst = max(rel_err(got[k], expected[k]) for k in expected)
    assert worst < 1e-6, worst
    changed = [k for k in expected if not torch.equal(expected[k], base[k])]
    assert "transformer_blocks.3.attn.to_v.weight" in changed  # a fused part
    if mode == "all":
        assert "transformer_blocks.3.norm1_context.linear.weight" in changed  # a swapped layer

    # read back: exactly our tensors (each q/k/v gets the stacked down and its block of the up)
    modules, _ = read_lora_file(path, names)
    ours = lora_modules(model)
    assert modules.keys() == ours.keys()
    for name, (down, up, alpha) in modules.items():
        m = ours[name]
        cols = up.any(dim=0).nonzero().flatten()  # a fused part: its block of the up, the rest zero
        assert len(cols) == m.rank and alpha / down.shape[0] == m.alpha / m.rank, name
        assert torch.equal(up[:, cols], m.lora_up.weight) and torch.equal(down[cols], m.lora_down.weight), name
    again = save_lora(model, tmp_path / "k2.safetensors", config, names, format="kohya")
    weights = read_lora(path, [names])
    third = write_lora(weights, tmp_path / "k3.safetensors")  # kohya -> kohya: the same tensors, bit for bit
    a, b, c = load_file(str(path)), load_file(str(again)), load_file(str(third))
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], c[k]) and torch.equal(a[k], b[k]) for k in a)
    merged = sd3.load_denoiser("tiny-sd3")
    load_lora(merged, path, names)
    assert max(rel_err(merged.state_dict()[k], expected[k]) for k in expected) < 1e-6
    # kohya -> diffusers (extract_lora_weights.py): the split q/k/v parts own their tensors; the same update
    converted = write_lora(weights, tmp_path / "d.safetensors", format="diffusers")
    merged = sd3.load_denoiser("tiny-sd3")
    load_lora(merged, converted, names)
    assert max(rel_err(merged.state_dict()[k], expected[k]) for k in expected) < 1e-6


def sai_linear_keys(model) -> dict[str, tuple[int, int]]:
    """Every Linear weight of the SAI layout of our model: key -> (out, in)."""
    sd = sai.transformer_diffusers_to_sai(model.state_dict())
    return {k: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2}


def test_reads_kohya_sd_scripts_files(tmp_path, names):
    """sd-scripts' SD3 LoRA: one module per SAI Linear of the joint blocks (qkv with one shared down, proj, mlp,
    adaLN, the swapped last context adaLN), plus emb_dims layers (context_embedder, the final adaLN), at alpha 1."""
    model = sd3.load_denoiser("tiny-sd3")
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for key, (out, n_in) in sai_linear_keys(model).items():
        if not (key.startswith("joint_blocks.") or key in ("context_embedder.weight",
                                                             "final_layer.adaLN_modulation.1.weight")):
            continue
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        tensors |= {f"{name}.lora_down.weight": torch.randn(4, n_in, generator=g) * 0.1,
                    f"{name}.lora_up.weight": torch.randn(out, 4, generator=g) * 0.1,
                    f"{name}.alpha": torch.tensor(1.0)}
    path = tmp_path / "sd_scripts.safetensors"
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora_sd3", "ss_base_model_version": "5-medium"})
    base = {k: v.clone() for k, v in model.state_dict().items()}
    expected = comfy_apply(base, path)
    load_lora(model, path, names)
    got = model.state_dict()
    assert max(rel_err(got[k], expected[k]) for k in expected) < 1e-6
    for swapped in ("norm_out.linear.weight", "transformer_blocks.3.norm1_context.linear.weight"):
        assert not torch.equal(got[swapped], base[swapped])
    assert families.read_lora(path).names.base == "tiny-sd3"  # the first known base it fits


def test_reads_kohya_style_diffusers_names_and_peft_files_of_other_trainers(tmp_path, names, pipe):
    """`lora_unet_transformer_blocks_0_attn_to_q` (kohya-style diffusers names) and SimpleTuner / ai-toolkit's
    `transformer.<path>.lora_A/B.weight` without lora_adapter_metadata (alpha = rank, as diffusers reads them)."""
    model, config = trained("attention_mlp", rank=4, alpha=4.0)
    layers = lora_modules(model)
    peft = {}
    kohya_style = {}
    for name, m in layers.items():
        peft |= {f"transformer.{name}.lora_A.weight": m.lora_down.weight.detach().clone(),
                 f"transformer.{name}.lora_B.weight": m.lora_up.weight.detach().clone()}
        key = "lora_unet_" + name.replace(".", "_")
        kohya_style |= {f"{key}.lora_down.weight": m.lora_down.weight.detach().clone(),
                        f"{key}.lora_up.weight": m.lora_up.weight.detach().clone(), f"{key}.alpha": torch.tensor(4.0)}
    save_file(peft, tmp_path / "simpletuner.safetensors")
    save_file(kohya_style, tmp_path / "kohya_style.safetensors")
    x = inputs(1)
    ours = output(model, x)  # alpha = rank: scale 1
    for file in ("simpletuner.safetensors", "kohya_style.safetensors"):
        merged = sd3.load_denoiser("tiny-sd3")
        load_lora(merged, tmp_path / file, names)
        assert rel_err(output(merged, x), ours) < 1e-5, file
    pipe.load_lora_weights(str(tmp_path / "simpletuner.safetensors"))
    try:
        with torch.no_grad():
            ref = pipe.transformer(**x).sample
    finally:
        pipe.unload_lora_weights()
    assert rel_err(ours, ref) < 1e-5


def test_base_models_and_wrong_files(tmp_path, names):
    large = tmp_path / "large.safetensors"  # a LoRA on SD 3.5 Large's 2432-wide layers
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1, 2432),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(2432, 1)}, large)
    assert families.read_lora(large).names.base == "sd3.5-large"
    wrong = tmp_path / "wrong.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 96),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(200, 2)}, wrong)
    with pytest.raises(ValueError, match="288 output rows"):
        load_lora(sd3.load_denoiser("tiny-sd3"), wrong, names)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"lora_unet_joint_blocks_9_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 96),
               "lora_unet_joint_blocks_9_x_block_attn_qkv.lora_up.weight": torch.zeros(288, 2)}, unknown)
    with pytest.raises(ValueError, match="lora_unet_joint_blocks_9_x_block_attn_qkv"):
        load_lora(sd3.load_denoiser("tiny-sd3"), unknown, names)


# ---------------------------------------------------------------------------------------------------
# one training step against diffusers + peft


@pytest.mark.parametrize("mode,dora,scheme,precondition", [("attention", False, "none", False),
                                                           ("all", False, "cosmap", True),
                                                           ("attention_mlp", True, "sigma_sqrt", False)])
def test_one_training_step_equals_diffusers_with_peft(tiny, mode, dora, scheme, precondition):
    ours, config = trained(mode, rank=4, alpha=8.0, dora=dora, seed=3)
    ref = SD3Transformer2DModel.from_pretrained(tiny / "transformer")
    targets = sorted(lora_modules(ours))
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8.0, target_modules=targets, use_dora=dora))
    ref_modules = dict(ref.named_modules())
    with torch.no_grad():  # the same LoRA weights on both
        for name, m in lora_modules(ours).items():
            ref_modules[name].lora_A["default"].weight.copy_(m.lora_down.weight)
            ref_modules[name].lora_B["default"].weight.copy_(m.lora_up.weight)
            if dora:
                ref_modules[name].lora_magnitude_vector["default"].weight.copy_(m.magnitude)
    assert sum(p.numel() for p in ref.parameters() if p.requires_grad) == \
        sum(p.numel() for p in lora_parameters(ours))
    encoder = sd3.load_text_encoder("tiny-sd3", max_sequence_length=16)
    embeds, pooled = encoder.encode(["a red circle", "a small blue star"])
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    objective = sd3.objective(noise_settings(loss_weighting=scheme, precondition_outputs=precondition))
    t = objective.draw_times(2, g, x0.shape)

    loss = weighted(diffusion_loss(lambda x_t, t: sd3.predict(ours, x_t, t, embeds, pooled, {}), objective, x0, t,
                                   noise), objective, t).mean()
    loss.backward()

    # diffusers' train_dreambooth_lora_sd3.py, written out
    s = t.reshape(-1, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    pred = ref(hidden_states=noisy, timestep=t * 1000, encoder_hidden_states=embeds,
               pooled_projections=pooled).sample
    target = noise - x0
    if precondition:
        pred, target = pred * (-s) + noisy, x0
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas=s)
    ref_loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(2, -1), 1).mean()
    ref_loss.backward()

    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-4
    worst = 0.0
    for name, m in lora_modules(ours).items():
        pairs = [(m.lora_down.weight, ref_modules[name].lora_A["default"].weight),
                 (m.lora_up.weight, ref_modules[name].lora_B["default"].weight)]
        if dora:
            pairs.append((m.magnitude, ref_modules[name].lora_magnitude_vector["default"].weight))
        for ours_p, ref_p in pairs:
            if name == "transformer_blocks.3.attn.add_q_proj":  # the pre-only block's text queries feed nothing
                assert not ours_p.grad.any() and not ref_p.grad.any()
                continue
            assert ref_p.grad.norm() > 0, name
            worst = max(worst, rel_err(ours_p.grad, ref_p.grad))
    assert worst < 1e-4, worst
