"""tools/pretrain_tiny.py end to end at smoke size: with `--vae_from`, the VAE of an earlier run is reused as it is
(its tensors and the scale in its metadata), and the run writes a tiny model folder and its report."""

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tools.pretrain_tiny import main


def test_vae_from_reuses_an_earlier_vae(tmp_path, one_thread):
    from sdxl.tiny import WEIGHTS

    out = tmp_path / "out"
    assert main(["sdxl", str(out), "--num_images", "64", "--vae_from", str(WEIGHTS), "--denoiser_steps", "2",
                 "--denoiser_batch", "4", "--eval_images", "1", "--threads", "1"]) == 0
    got, want = load_file(out / "vae.safetensors"), load_file(WEIGHTS / "vae.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with safe_open(str(out / "vae.safetensors"), "pt") as f, safe_open(str(WEIGHTS / "vae.safetensors"), "pt") as g:
        assert f.metadata()["scaling_factor"] == g.metadata()["scaling_factor"]
    report = json.loads((out / "pretrain_report.json").read_text())
    assert report["vae"]["from"] == str(WEIGHTS) and "colour_table" in report["vae"]
    assert (out / "unet.fp16.safetensors").is_file()
    assert main(["sdxl", str(out), "--vae_from", str(WEIGHTS)]) == 2  # never over an earlier run's weights
