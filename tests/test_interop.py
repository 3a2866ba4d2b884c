"""LoRA files against the real clients, beyond what tests/test_lora.py already proves.

Already covered elsewhere (not repeated here):
- our kohya and diffusers files of every target mode (incl. `all`) through diffusers'
  `StableDiffusionXLPipeline.load_lora_weights` with no warning but the text-encoder notice, and diffusers'
  UNet output == ours with `load_lora` (rel. L2 < 2e-5): test_lora.py::test_loads_in_diffusers;
- `unet_sgm_names` covering every full-SDXL module (meta device) with kohya-style examples:
  test_sgm.py::test_unet_names_full_sdxl;
- kohya files with diffusers-style names and bare peft files loading (outputs within 1e-5), unknown
  modules, conv LoRAs, text-encoder keys, truncated files, a LoRA for another UNet config (every module
  mis-shaped) refused with the weights unchanged: test_lora.py.

New here:
- a training checkpoint folder's own lora.safetensors / ema.safetensors (peft names, alpha != rank kept in
  diffusers' lora_adapter_metadata) and extract_lora_weights.py's outputs through `load_lora_weights`:
  diffusers' UNet output == our UNet with `load_lora` of the folder (rel. L2 < 2e-5, as in test_lora.py);
- full-SDXL kohya key names for target mode `all`, mapped back by diffusers' own kohya/SGM converter
  (`StableDiffusionXLPipeline.lora_state_dict` with the SDXL UNet config; the full UNet is never built):
  every key lands on the diffusers module it came from, tensors and alphas unchanged;
- each file spelling `load_lora` accepts round-trips tensor for tensor (exact; the folded diffusers
  format within one fp32 rounding);
- SD 1.5 LoRAs (kohya SGM names, kohya diffusers-style names, peft names; 320 wide) and a single
  mis-shaped or made-up module among valid ones: an error naming the key, and no weight changed.
"""

import logging
import warnings

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors.torch import load_file, save_file

import extract_lora_weights
from lora.files import LoRAWeights, write_lora
from lora.layer import LoRAConfig, lora_parameters, lora_state_dict
from sdxl.configs import unet_config_to_diffusers
from sdxl.loading import load_unet
from sdxl.lora import apply_lora, load_lora, lora_names, lora_target_names, read_lora_file, save_lora
from sdxl.tiny import TINY_UNET_CONFIG
from sdxl.unet import SDXL_CONFIG, SDXLUNet
from training.run.checkpoints import load_checkpoint, lora_file_of, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = LoRAConfig(rank=4, alpha=2.0, target_mode="all")  # alpha != rank: the scale must travel with the file
TINY = unet_config_to_diffusers(TINY_UNET_CONFIG)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_UNET_CONFIG
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(sample=torch.randn(b, 4, 8, 8, generator=g), timestep=torch.tensor([999, 250][:b]),
                encoder_hidden_states=torch.randn(b, 77, cfg.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(b, pooled, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * b)})


def random_lora(unet, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return {k: v.clone() for k, v in lora_state_dict(unet).items()}


@pytest.fixture(scope="module")
def checkpoint(tiny_dir, tmp_path_factory):
    """A checkpoint folder (LoRA and different EMA weights) of a run on the tiny model."""
    unet = load_unet(tiny_dir)
    apply_lora(unet, CONFIG)
    lora, ema = random_lora(unet, 1), random_lora(unet, 2)
    state = {"step": 5, "epoch": 0, "position": 5, "micro_step": 5, "last_loss": 0.5}
    return save_checkpoint(tmp_path_factory.mktemp("run"), 5, lora, state, "pretrained_model: tiny\n", CONFIG,
                           ema=ema)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_in_diffusers(pipe, path) -> list[str]:
    """`pipe.load_lora_weights(path)`; returns every warning but the (right) 'no text-encoder LoRA keys'."""
    records = Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    return [m for m in records.messages + [str(w.message) for w in caught]
            if not m.startswith("No LoRA keys associated to CLIPText")]


@pytest.mark.parametrize("which", ["lora.safetensors", "ema.safetensors", "extracted kohya", "extracted diffusers"])
def test_checkpoint_loras_load_in_diffusers(checkpoint, pipe, tiny_dir, tmp_path, which):
    if which.startswith("extracted"):
        path, fmt = tmp_path / "extracted.safetensors", which.split()[1]
        assert extract_lora_weights.main([str(checkpoint), "-o", str(path), "--format", fmt]) == 0
        ours_from = checkpoint / "lora.safetensors"
    else:
        path = checkpoint / which
        ours_from = checkpoint if which == "ema.safetensors" else path  # a folder's LoRA file: its EMA weights
    ours = load_unet(tiny_dir)
    load_lora(ours, lora_file_of(ours_from))
    problems = load_in_diffusers(pipe, path)
    try:
        assert not problems
        adapted = [m for m in pipe.unet.modules() if hasattr(m, "lora_A")]
        assert len(adapted) == len(lora_target_names(ours, "all"))
        x = inputs()
        with torch.no_grad():
            expected, got = pipe.unet(**x).sample, ours(**x)
            without = load_unet(tiny_dir)(**x)
        assert rel_err(got, expected) < 2e-5
        # the LoRA matters, and at alpha / rank = 0.5, not 1: a file read with the wrong scale would fail above
        assert rel_err(without, expected) > 1e-3
    finally:
        pipe.unload_lora_weights()


def test_full_sdxl_kohya_names_map_back_through_diffusers(tmp_path):
    """Every `all`-mode kohya key of full SDXL is `lora_unet_` + an SGM module path, and diffusers' converter
    (the one load_lora_weights uses for kohya files) maps each back to the diffusers module it came from."""
    with torch.device("meta"):
        unet = SDXLUNet(SDXL_CONFIG)  # no memory behind the 2.6 B weights
    names = lora_target_names(unet, "all")
    layers = dict(unet.named_modules())
    g = torch.Generator().manual_seed(0)
    modules = {n: (torch.randn(1, layers[n].in_features, generator=g),
                   torch.randn(layers[n].out_features, 1, generator=g), 0.5) for n in names}
    path = write_lora(LoRAWeights(modules, {}, lora_names("sdxl"), "test"), tmp_path / "sdxl_all.safetensors")
    keys = list(load_file(path))
    assert len(names) == 722 and len(keys) == 3 * len(names)
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in keys)
    sdxl_config = FrozenDict(unet_config_to_diffusers(SDXL_CONFIG))
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=sdxl_config)
    ours, _ = read_lora_file(path)  # our reader, default config: SDXL base
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in sd.items()})
    assert {k.rsplit(".lora_", 1)[0] for k in peft} == set(names)
    for name, (down, up, alpha) in modules.items():
        assert torch.equal(peft[f"{name}.lora_A.weight"], down) and torch.equal(peft[f"{name}.lora_B.weight"], up)
        assert torch.equal(ours[name][0], down) and torch.equal(ours[name][1], up) and ours[name][2] == alpha
    assert len(alphas) == len(names) and set(alphas.values()) == {0.5}


def spellings(unet, config: LoRAConfig, tmp_path) -> dict:
    """The same LoRA in every spelling load_lora reads -> (path, folded: whether alpha / rank is in lora_B)."""
    sd = lora_state_dict(unet)
    names = sorted({k.rpartition(".lora_")[0] for k in sd})
    files = {"kohya (SGM names)": (save_lora(unet, tmp_path / "k.safetensors", config), False),
             "diffusers (peft, folded)": (save_lora(unet, tmp_path / "d.safetensors", config, format="diffusers"),
                                          True)}
    kohya_diffusers_names, peft_bare = {}, {}
    for name in names:
        key = "lora_unet_" + name.replace(".", "_")
        kohya_diffusers_names |= {f"{key}.lora_down.weight": sd[f"{name}.lora_down.weight"],
                                  f"{key}.lora_up.weight": sd[f"{name}.lora_up.weight"],
                                  f"{key}.alpha": torch.tensor(config.alpha)}
        peft_bare |= {f"{name}.lora_A.weight": sd[f"{name}.lora_down.weight"],
                      f"{name}.lora_B.weight": sd[f"{name}.lora_up.weight"] * (config.alpha / config.rank)}
    save_file(kohya_diffusers_names, tmp_path / "kd.safetensors")
    save_file(peft_bare, tmp_path / "p.safetensors")
    files["kohya (diffusers-style names)"] = (tmp_path / "kd.safetensors", False)
    files["peft, no metadata (folded)"] = (tmp_path / "p.safetensors", True)
    return files


def test_every_spelling_round_trips_tensor_for_tensor(tmp_path, checkpoint):
    torch.manual_seed(0)
    unet = SDXLUNet(TINY_UNET_CONFIG)
    config = LoRAConfig(rank=4, alpha=3.0, target_mode="attention_out")  # 3/4: folding rounds
    apply_lora(unet, config)
    sd = random_lora(unet, 3)
    files = spellings(unet, config, tmp_path)
    files["training checkpoint (peft, unfolded)"] = (checkpoint / "lora.safetensors", False)
    for label, (path, folded) in files.items():
        entries, _ = read_lora_file(path, TINY)
        reference = sd if "checkpoint" not in label else load_checkpoint(checkpoint).lora
        alpha = CONFIG.alpha if "checkpoint" in label else config.alpha
        assert sorted(entries) == sorted({k.rpartition(".lora_")[0] for k in reference}), label
        for name, (down, up, file_alpha) in entries.items():
            assert torch.equal(down, reference[f"{name}.lora_down.weight"]), (label, name)
            if folded:  # alpha / rank is in up; the file's alpha is its rank
                assert file_alpha == down.shape[0], label
                expected = reference[f"{name}.lora_up.weight"] * (alpha / down.shape[0])
                torch.testing.assert_close(up, expected, rtol=1e-7, atol=0)
            else:
                assert file_alpha == alpha and torch.equal(up, reference[f"{name}.lora_up.weight"]), (label, name)


SD15_Q = ("input_blocks_1_1_transformer_blocks_0_attn1_to_q",  # SD 1.5's first attention: SDXL has none there
          "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")


def bad_files() -> dict[str, tuple[dict, str]]:
    """name -> (extra tensors added to a valid tiny-model kohya/peft file, the key the error must name)."""
    z = torch.zeros
    return {
        "sd15 kohya SGM": ({f"lora_unet_{SD15_Q[0]}.lora_down.weight": z(4, 320),
                            f"lora_unet_{SD15_Q[0]}.lora_up.weight": z(320, 4),
                            f"lora_unet_{SD15_Q[0]}.alpha": torch.tensor(4.0)}, f"lora_unet_{SD15_Q[0]}"),
        "sd15 kohya diffusers-style": ({f"lora_unet_{SD15_Q[1]}.lora_down.weight": z(4, 320),
                                        f"lora_unet_{SD15_Q[1]}.lora_up.weight": z(320, 4)}, f"lora_unet_{SD15_Q[1]}"),
        "sd15 peft": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": z(4, 320),
                       "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": z(320, 4)},
                      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_"),
        "made-up module": ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn3_to_q.lora_down.weight": z(4, 64),
                            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn3_to_q.lora_up.weight": z(64, 4)},
                           "lora_unet_input_blocks_4_1_transformer_blocks_0_attn3_to_q"),
    }


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_loras_for_other_models_are_refused_whole(tmp_path, fmt):
    torch.manual_seed(0)
    unet = SDXLUNet(TINY_UNET_CONFIG)
    config = LoRAConfig(rank=4, alpha=4.0, target_mode="attention")
    apply_lora(unet, config)
    random_lora(unet, 4)
    good = load_file(save_lora(unet, tmp_path / "good.safetensors", config, format=fmt))
    target = SDXLUNet(TINY_UNET_CONFIG)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    cases = bad_files()
    # one valid module name with a wrong shape (SD 1.5 width 320 on a 64-wide layer), among valid ones
    key = {"kohya": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
           "diffusers": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"}[fmt]
    assert key in good
    cases["one mis-shaped module"] = ({key: torch.zeros(4, 320)}, key.split(".lora_")[0])
    for name, (extra, named) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        save_file(good | extra, path)
        with pytest.raises(ValueError) as e:
            load_lora(target, path)
        message = str(e.value)
        assert named in message and str(path) in message and "\n" not in message, (name, message)
        assert "another base model" in message, (name, message)
        after = target.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items()), f"{name}: weights changed"
