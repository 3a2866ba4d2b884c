"""evaluate_images.py and the evaluation package, against torchmetrics on the same images and networks.

No download anywhere: the feature network is a small random CNN scripted to TorchScript here, with the
calling convention of the real Inception-v3 file (`net(uint8 images, return_features=True)`); the CLIP model
is a tiny random transformers CLIPModel saved to a temporary folder with a locally built tokenizer.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchmetrics  # the `eval` extra (also in `dev`): every test here compares against it
from PIL import Image

from evaluate_images import main
from evaluation import metrics
from evaluation.clip import ClipScorer, clip_score
from evaluation.evaluate import reference_features, score_images
from evaluation.folders import ImageFile, make_groups, read_prompt
from evaluation.inception import INCEPTION_URL, inception_input

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.usefixtures("one_thread"),  # TorchScript is deprecated in torch 2.13; the file is one
              pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save:UserWarning")]



# ---------------------------------------------------------------------------------------------------
# Fixtures: a TorchScript feature network, image folders, a tiny CLIP


class RandomFeatureNet(torch.nn.Module):
    """Stand-in for inception-2015-12-05.pt: uint8-range (N, 3, H, W) -> (N, 16) with return_features=True."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.conv2 = torch.nn.Conv2d(8, 16, 4, stride=4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = x.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = torch.relu(self.conv2(torch.relu(self.conv1((x - 128) / 128))))
        features = x.mean(dim=(2, 3))  # (N, 16)
        return features if return_features else features.sum(dim=1, keepdim=True)


class AsTorchmetricsFeature(torch.nn.Module):
    """The network as torchmetrics' `feature=` module (the oracle): images in, float64 features out."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images):
        return self.net(images, return_features=True).double()


@pytest.fixture(scope="module")
def net_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("net") / "inception-2015-12-05.pt"
    torch.jit.script(RandomFeatureNet().eval()).save(str(path))
    return path


def smooth_image(rng: np.random.Generator, size: int, shift: int = 0) -> Image.Image:
    """A random smooth picture (bicubic-upsampled 6x6 noise), brightened by `shift`."""
    small = Image.fromarray((rng.random((6, 6, 3)) * 200).astype(np.uint8))
    pixels = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC)).astype(np.int64) + shift
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_images(folder: Path, count: int, seed: int, size: int = 64, shift: int = 0, prompt: str | None = None,
                 sidecar: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng, paths = np.random.default_rng(seed), []
    for i in range(count):
        path = folder / f"{i:05d}.png"
        smooth_image(rng, size, shift).save(path)
        if prompt is not None and sidecar:
            path.with_suffix(".json").write_text(json.dumps({"prompt": prompt, "seed": i}))
        elif prompt is not None:
            path.with_suffix(".txt").write_text(prompt)
        paths.append(path)
    return paths


def as_uint8(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def run_cli(*argv) -> tuple[int, dict | None]:
    """main(argv) in-process; returns (exit status, the --out report if one was written)."""
    argv = [str(a) for a in argv]
    code = main(argv)
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    return code, json.loads(out.read_text()) if out is not None and out.is_file() else None


def value(report: dict, metric: str, group: str = "all"):
    return next(r["value"] for r in report["results"] if r["metric"] == metric and r["group"] == group)


def result(report: dict, metric: str, group: str = "all") -> dict:
    return next(r for r in report["results"] if r["metric"] == metric and r["group"] == group)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffusion.tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer("<|endoftext|>")
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------
# FID and KID


def test_fid_and_kid_equal_torchmetrics_with_the_network_as_feature(net_file, tmp_path):
    """Our FID/KID (features computed once, batched, through the CLI) == torchmetrics fed the images."""
    real = write_images(tmp_path / "real", 12, seed=1, size=299)
    gen = write_images(tmp_path / "gen", 10, seed=2, size=299, shift=30)
    code, report = run_cli(tmp_path / "real", tmp_path / "gen", "--inception-weights", net_file, "--metrics",
                           "fid,kid", "--kid-subsets", 7, "--batch-size", 4, "--out", tmp_path / "r.json")
    assert code == 0

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    feature = AsTorchmetricsFeature(torch.jit.load(str(net_file)))
    real_images = torch.stack([as_uint8(p) for p in real])  # 299x299: the resize is the identity
    gen_images = torch.stack([as_uint8(p) for p in gen])
    fid = FrechetInceptionDistance(feature=feature)
    kid = KernelInceptionDistance(feature=feature, subsets=7, subset_size=10)  # 10 = the smaller set
    for m in (fid, kid):
        m.update(real_images, real=True)
        m.update(gen_images, real=False)
    torch.manual_seed(0)  # our --seed: the same subsets
    kid_mean, kid_std = kid.compute()
    assert value(report, "fid") == pytest.approx(float(fid.compute()), rel=1e-6)
    assert value(report, "kid_mean") == pytest.approx(float(kid_mean), rel=1e-6)
    assert value(report, "kid_std") == pytest.approx(float(kid_std), rel=1e-6, abs=1e-12)
    assert result(report, "kid_mean")["subset_size"] == 10
    assert value(report, "fid") > 0


def test_kid_against_itself_is_near_zero_and_against_changed_colours_clearly_larger(net_file, tmp_path):
    """Through the training API: real features once, then PIL images scored against them."""
    from evaluation import load_inception

    inception = load_inception(net_file)
    write_images(tmp_path / "real", 16, seed=3)
    real_features = reference_features(tmp_path / "real", inception)
    same = [Image.open(p).convert("RGB") for p in sorted((tmp_path / "real").glob("*.png"))]
    recoloured = [Image.fromarray(255 - np.asarray(im)[:, :, ::-1]) for im in same]  # channels swapped, inverted
    itself = score_images(same, real_features, inception, kid_subsets=20)
    shifted = score_images(recoloured, real_features, inception, kid_subsets=20)
    assert itself["n_real"] == itself["n_generated"] == 16 and itself["kid_subset_size"] == 16
    assert shifted["kid_mean"] > 1e-4
    assert abs(itself["kid_mean"]) < 0.05 * shifted["kid_mean"]
    assert itself["fid"] < 0.05 * shifted["fid"]
    assert "clip_score" not in itself


def test_kid_subset_size_adapts_to_small_sets():
    real, gen = torch.randn(5, 8), torch.randn(7, 8) + 1
    assert metrics.kid(real, gen, subsets=3, subset_size=1000)[2] == 5
    assert metrics.kid(real, gen, subsets=3, subset_size=3)[2] == 3
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = metrics.kid(real, gen, subsets=5, subset_size=4, seed=1)
    assert metrics.kid(real, gen, subsets=5, subset_size=4, seed=1) == first  # fixed seed
    assert torch.equal(torch.get_rng_state(), state)  # and the caller's RNG left as it was


# ---------------------------------------------------------------------------------------------------
# SSIM and MS-SSIM


def test_nearest_ssim_and_ms_ssim_pairs_equal_torchmetrics_on_known_pairs():
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
        structural_similarity_index_measure,
    )

    rng = np.random.default_rng(0)
    real = torch.stack([inception_input(smooth_image(rng, 64), 64) for _ in range(4)])  # (4, 3, 64, 64) uint8
    gen = torch.stack([real[2], inception_input(smooth_image(rng, 64), 64)])  # a copy of real 2, and a new one
    values, best = metrics.nearest(metrics.ssim_pairs, gen, real, [0, 1], [0, 1, 2, 3], higher_is_closer=True,
                                   batch_size=3)
    assert best[0] == 2 and values[0] == pytest.approx(1.0, abs=1e-6)

    def lib_ssim(a, b):
        return float(structural_similarity_index_measure(a[None].float() / 255, b[None].float() / 255,
                                                         data_range=1.0))

    expected = [lib_ssim(gen[1], r) for r in real]
    assert values[1] == pytest.approx(max(expected), rel=1e-6)
    assert best[1] == int(np.argmax(expected))

    big = torch.stack([inception_input(smooth_image(rng, 256), 256) for _ in range(3)])
    pairs = metrics.sample_pairs([0, 1, 2], 10, seed=0)
    assert pairs == [(0, 1), (0, 2), (1, 2)]
    ours = metrics.pair_values(metrics.ms_ssim_function(256), big, big, pairs, batch_size=2)
    for (i, j), v in zip(pairs, ours, strict=True):  # 256 px: the library's default 5 scales and weights
        lib = multiscale_structural_similarity_index_measure(big[i][None].float() / 255, big[j][None].float() / 255,
                                                             data_range=1.0)
        assert float(v) == pytest.approx(float(lib), rel=1e-5)


def test_ms_ssim_scales_by_image_size():
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    assert metrics.ms_ssim_betas(256) == metrics.MS_SSIM_BETAS
    assert len(metrics.ms_ssim_betas(128)) == 4 and len(metrics.ms_ssim_betas(64)) == 3
    assert sum(metrics.ms_ssim_betas(128)) == pytest.approx(1.0)
    x = torch.rand(2, 3, 128, 128)
    with pytest.raises(ValueError):  # why: the library refuses 5 scales at 128 px
        ms_ssim(x, x.flip(0), data_range=1.0)
    for size in (64, 128, 176):
        x = torch.rand(2, 3, size, size)
        assert metrics.ms_ssim_function(size)(x, x.flip(0)).shape == (2,)
        assert metrics.ms_ssim_function(size)(x, x) == pytest.approx(torch.ones(2), abs=1e-5)


def test_ssim_rows_through_the_cli_equal_the_library_on_the_files(tmp_path):
    """Same-size square files: thumbnails are the images, so the row is the library's value on them."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    real = write_images(tmp_path / "real", 5, seed=4, size=64)
    gen = write_images(tmp_path / "gen", 3, seed=5, size=64, shift=10)
    code, report = run_cli(tmp_path / "real", tmp_path / "gen", "--metrics", "ssim,ms_ssim", "--ssim-size", 64,
                           "--out", tmp_path / "r.json")
    assert code == 0
    r = torch.stack([as_uint8(p) for p in real]).float() / 255
    g = torch.stack([as_uint8(p) for p in gen]).float() / 255
    nearest = [max(float(ssim(gi[None], ri[None], data_range=1.0)) for ri in r) for gi in g]
    assert value(report, "ssim_nearest_real") == pytest.approx(sum(nearest) / 3, rel=1e-5)
    assert result(report, "ms_ssim_generated_pairs")["n_pairs"] == 3
    assert result(report, "ms_ssim_real_pairs")["n_pairs"] == 10
    assert report["settings"]["ms_ssim_betas"] == pytest.approx(list(metrics.ms_ssim_betas(64)))


# ---------------------------------------------------------------------------------------------------
# Folders, prompts, groups, bad files


def test_prompts_come_from_json_then_metadata_then_txt(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert read_prompt(image, None, "a.png") is None
    image.with_suffix(".txt").write_text(" from txt \n")
    assert read_prompt(image, None, "a.png") == "from txt"
    assert read_prompt(image, {"a.png": "from metadata"}, "a.png") == "from metadata"
    image.with_suffix(".json").write_text(json.dumps({"prompt": "from json", "seed": 3}))
    assert read_prompt(image, {"a.png": "from metadata"}, "a.png") == "from json"
    image.with_suffix(".json").write_text("[1, 2]")  # not our sidecar: ignored
    assert read_prompt(image, None, "a.png") == "from txt"


def test_groups_by_folder_and_by_prompt():
    def files(*keys_prompts):
        return [ImageFile(Path(k), k, p) for k, p in keys_prompts]

    real = files(("cat/1.png", "a cat"), ("cat/2.png", "a cat"), ("dog/1.png", None), ("top.png", "a bird"))
    gen = files(("cat/9.png", "a cat"), ("cow/1.png", "a cow"), ("x.png", "a bird"))
    groups, notes = make_groups(real, gen, "folder")
    by_name = {g.name: g for g in groups}
    assert list(by_name) == ["all", "(top level)", "cat", "cow"]
    assert by_name["cat"].real == [0, 1] and by_name["cat"].generated == [0]
    assert by_name["cow"].real == [] and by_name["(top level)"].real == [3]
    assert notes == ["real subfolders without generated images: dog"]

    groups, _ = make_groups(real, gen, "prompt")
    by_name = {g.name: g for g in groups}
    assert by_name["a cat"].real == [0, 1]  # real images of the same prompt
    assert by_name["a cow"].real == [0, 1, 2, 3]  # none has it: all of REAL
    assert by_name["a bird"].real == [3] and by_name["a bird"].generated == [2]
    assert [g.name for g in make_groups(real, gen, "none")[0]] == ["all"]


def test_folder_groups_equal_evaluating_each_subfolder_alone(net_file, tmp_path):
    for name, shift in (("healthy", 0), ("wound", 60)):
        write_images(tmp_path / "real" / name, 6, seed=10 + shift, shift=shift)
        write_images(tmp_path / "gen" / name, 5, seed=20 + shift, shift=shift + 5)
    common = ["--inception-weights", net_file, "--metrics", "fid,kid,ssim", "--ssim-size", 64, "--kid-subsets", 5]
    code, report = run_cli(tmp_path / "real", tmp_path / "gen", *common, "--out", tmp_path / "all.json")
    assert code == 0 and report["groups_by"] == "folder"
    assert [g["name"] for g in report["groups"]] == ["all", "healthy", "wound"]
    for name in ("healthy", "wound"):
        _, alone = run_cli(tmp_path / "real" / name, tmp_path / "gen" / name, *common, "--groups", "none",
                           "--out", tmp_path / f"{name}.json")
        for metric in ("fid", "kid_mean", "ssim_nearest_real"):
            assert value(report, metric, name) == pytest.approx(value(alone, metric), rel=1e-6)
        assert result(report, "fid", name)["n_real"] == 6 and result(report, "fid", name)["n_generated"] == 5
    assert value(report, "fid", "wound") != pytest.approx(value(report, "fid", "healthy"))


def test_unreadable_files_are_skipped_and_each_named_once(net_file, tmp_path, caplog):
    write_images(tmp_path / "real", 4, seed=6)
    write_images(tmp_path / "gen", 4, seed=7)
    (tmp_path / "gen" / "empty.png").write_bytes(b"")
    (tmp_path / "gen" / "text.jpg").write_text("not an image")
    good = (tmp_path / "gen" / "00000.png").read_bytes()
    (tmp_path / "gen" / "truncated.png").write_bytes(good[: len(good) // 2])
    odd = tmp_path / "gen" / "odd"
    odd.mkdir()
    Image.new("RGBA", (40, 24), (255, 0, 0, 0)).save(odd / "rgba.png")  # transparent: white after RGB conversion
    Image.new("I;16", (30, 50), 30000).save(odd / "gray16.png")
    Image.new("L", (20, 20), 7).save(odd / "gray.jpg")
    code, report = run_cli(tmp_path / "real", tmp_path / "gen", "--inception-weights", net_file, "--metrics",
                           "fid,ssim", "--ssim-size", 32, "--groups", "none", "--out", tmp_path / "r.json")
    assert code == 0
    skipped = {Path(s["path"]).name: s["reason"] for s in report["generated"]["skipped"]}
    assert set(skipped) == {"empty.png", "text.jpg", "truncated.png"}
    assert skipped["empty.png"] == "empty file (0 bytes)"
    assert skipped["text.jpg"].startswith("not an image")
    assert skipped["truncated.png"].startswith("corrupt or truncated")
    warnings = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert sorted(Path(w.split(": ", 1)[1].split(" (")[0]).name for w in warnings) == sorted(skipped)
    assert report["generated"]["n_found"] == 10 and report["generated"]["n_used"] == 7
    assert result(report, "fid")["n_generated"] == 7


def test_any_size_and_mode_become_the_documented_rgb_inputs():
    from common.images import to_rgb
    from evaluation.extract import square_thumbnail

    rgba = to_rgb(Image.new("RGBA", (40, 24), (255, 0, 0, 0)))
    assert inception_input(rgba).shape == (3, 299, 299) and int(inception_input(rgba).min()) == 255
    wide = Image.new("RGB", (90, 30), (0, 0, 0))
    wide.paste((255, 255, 255), (30, 0, 60, 30))  # white centre square
    thumb = square_thumbnail(wide, 16)
    assert thumb.shape == (3, 16, 16) and int(thumb.min()) == 255  # centre crop: only the white square
    assert int(inception_input(to_rgb(Image.new("I;16", (30, 50), 65535))).min()) == 255  # 16-bit white


# ---------------------------------------------------------------------------------------------------
# CLIP score


class _TensorFeatures(torch.nn.Module):
    """transformers 5's get_*_features return output objects; torchmetrics 1.9 expects the tensors."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        out = self.model.get_image_features(pixel_values=pixel_values)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, input_ids, attention_mask):
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clip_score_equals_torchmetrics_functional_form(tiny_clip_dir):
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score
    from transformers import CLIPProcessor

    rng = np.random.default_rng(8)
    images = [smooth_image(rng, 48) for _ in range(4)]
    prompts = ["a red circle", "a blue square on a white background", "a green triangle", "two dogs"]
    scorer = ClipScorer.from_pretrained(tiny_clip_dir)
    cosines = scorer.cosines(images, prompts)
    model, processor = scorer.model, CLIPProcessor.from_pretrained(tiny_clip_dir, local_files_only=True)
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]
    with torch.no_grad():
        per_image = [float(tm_clip_score(t, p, model_name_or_path=lambda: (_TensorFeatures(model), processor)))
                     for t, p in zip(tensors, prompts, strict=True)]
        whole = tm_clip_score(tensors, prompts, model_name_or_path=lambda: (_TensorFeatures(model), processor))
    assert [max(100 * float(c), 0.0) for c in cosines] == pytest.approx(per_image, abs=1e-4)
    assert clip_score(cosines) == pytest.approx(float(whole), abs=1e-4)


def test_clip_score_rows_per_prompt_from_sidecars(tiny_clip_dir, tmp_path):
    write_images(tmp_path / "real", 3, seed=9)
    write_images(tmp_path / "gen", 3, seed=10, prompt="a red circle", sidecar=True)
    write_images(tmp_path / "gen" / "more", 2, seed=11, prompt="a blue square")  # .txt prompts
    code, report = run_cli(tmp_path / "real", tmp_path / "gen", "--metrics", "clip", "--clip-model", tiny_clip_dir,
                           "--out", tmp_path / "r.json")  # auto: GENERATED has a subfolder, REAL none: prompt
    assert code == 0
    assert report["groups_by"] == "prompt"
    assert [g["name"] for g in report["groups"]] == ["all", "a blue square", "a red circle"]
    scorer = ClipScorer.from_pretrained(tiny_clip_dir)
    images = [Image.open(p).convert("RGB") for p in sorted((tmp_path / "gen").glob("*.png"))]
    expected = clip_score(scorer.cosines(images, ["a red circle"] * 3))
    assert value(report, "clip_score", "a red circle") == pytest.approx(expected, abs=1e-4)
    assert result(report, "clip_score")["n_generated"] == 5
    assert report["settings"]["clip_model"] == str(tiny_clip_dir)


# ---------------------------------------------------------------------------------------------------
# LPIPS: unavailable without torchvision; the pairing with a stand-in distance


def test_lpips_unavailable_is_one_line_and_the_rest_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as on a machine without a working torchvision
    write_images(tmp_path / "real", 3, seed=12)
    write_images(tmp_path / "gen", 3, seed=13)
    code, report = run_cli(tmp_path / "real", tmp_path / "gen", "--metrics", "ssim,lpips", "--ssim-size", 32,
                           "--out", tmp_path / "r.json")
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lpips:")]
    assert len(lines) == 1 and lines[0].startswith("lpips: unavailable (needs torchvision")
    assert report["unavailable"]["lpips"].startswith("unavailable (needs torchvision")
    assert value(report, "ssim_nearest_real") is not None
    assert not [r for r in report["results"] if r["metric"].startswith("lpips")]
    with pytest.raises(metrics.LpipsUnavailable):
        metrics.load_lpips()


def test_lpips_rows_with_a_stand_in_distance(tmp_path, monkeypatch):
    def mean_abs_difference(a, b):  # stands in for LPIPS: (B, 3, S, S) in [0, 1] twice -> (B,)
        return (a - b).abs().mean(dim=(1, 2, 3))

    monkeypatch.setattr(metrics, "load_lpips", lambda net, device: mean_abs_difference)
    real = write_images(tmp_path / "real", 4, seed=14, size=32)
    gen = write_images(tmp_path / "gen", 3, seed=15, size=32, shift=20)
    code, report = run_cli(tmp_path / "real", tmp_path / "gen", "--metrics", "lpips", "--ssim-size", 32,
                           "--max-real-pool", 3, "--out", tmp_path / "r.json")
    assert code == 0
    r = torch.stack([as_uint8(p) for p in real]).float() / 255
    g = torch.stack([as_uint8(p) for p in gen]).float() / 255
    pool = metrics.sample_indices([0, 1, 2, 3], 3, seed=0)
    assert result(report, "lpips_nearest_real")["n_real"] == 3
    nearest = [min(float((gi - r[k]).abs().mean()) for k in pool) for gi in g]
    assert value(report, "lpips_nearest_real") == pytest.approx(sum(nearest) / 3, rel=1e-6)
    pairs = [float((g[i] - g[j]).abs().mean()) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert value(report, "lpips_generated_pairs") == pytest.approx(sum(pairs) / 3, rel=1e-6)
    assert result(report, "lpips_real_pairs")["n_pairs"] == 6


# ---------------------------------------------------------------------------------------------------
# Errors, outputs, the script


def test_missing_inception_weights_say_how_to_get_them(tmp_path, capsys):
    write_images(tmp_path / "real", 2, seed=16)
    write_images(tmp_path / "gen", 2, seed=17)
    out = tmp_path / "r.json"
    code, _ = run_cli(tmp_path / "real", tmp_path / "gen", "--inception-weights", tmp_path / "none.pt",
                      "--out", out)
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and err.startswith("error: --inception-weights")
    assert INCEPTION_URL in err and "curl" in err
    pickle_file = tmp_path / "inception-2015-12-05.pkl"
    pickle_file.write_bytes(b"\x80\x04")
    assert run_cli(tmp_path / "real", tmp_path / "gen", "--inception-weights", pickle_file)[0] == 2
    assert "never load" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing real", "empty generated", "metric", "subset size", "target", "device",
                                  "ssim size", "out is a folder", "clip folder"])
def test_bad_input_is_a_one_line_error_and_nothing_is_written(tmp_path, capsys, case):
    write_images(tmp_path / "real", 2, seed=18)
    write_images(tmp_path / "gen", 2, seed=19)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("no images here")
    out = tmp_path / "report.json"
    argv = [tmp_path / "real", tmp_path / "gen", "--metrics", "ssim", "--out", out]
    argv = {
        "missing real": [tmp_path / "nope", *argv[1:]],
        "empty generated": [argv[0], tmp_path / "empty", *argv[2:]],
        "metric": [*argv, "--metrics", "fid,sharpness"],
        "subset size": [*argv, "--kid-subset-size", 1],
        "target": [*argv, "--target", "fid=40"],
        "device": [*argv, "--device", "cuda:7" if torch.cuda.is_available() else "cuda"],
        "ssim size": [*argv, "--ssim-size", 8],
        "out is a folder": [*argv[:-1], tmp_path / "empty"],
        "clip folder": [*argv, "--metrics", "clip", "--clip-model", tmp_path / "empty"],
    }[case]
    code, _ = run_cli(*argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not out.exists()
    named = {"missing real": "nope", "empty generated": "empty", "metric": "sharpness", "subset size": "1",
             "target": "fid=40", "device": "cuda", "ssim size": "8", "out is a folder": "empty",
             "clip folder": "empty"}[case]
    assert named in err


def test_png_summary_and_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    write_images(tmp_path / "real", 3, seed=20, size=32)
    write_images(tmp_path / "gen", 3, seed=21, size=32)
    argv = [tmp_path / "real", tmp_path / "gen", "--metrics", "ssim,ms_ssim", "--ssim-size", 32]
    assert run_cli(*argv, "--png", tmp_path / "summary.png", "--target", "ssim_nearest_real>0.01")[0] == 0
    with Image.open(tmp_path / "summary.png") as im:
        assert im.format == "PNG" and im.size[0] > 200
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert run_cli(*argv, "--png", tmp_path / "none.png")[0] == 0
    assert "png: not written (needs matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "none.png").exists()


def test_script_end_to_end_with_a_missed_target(net_file, tmp_path):
    write_images(tmp_path / "real", 4, seed=22)
    write_images(tmp_path / "gen", 4, seed=23, shift=40)
    out = tmp_path / "sub" / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate_images.py"), str(tmp_path / "real"), str(tmp_path / "gen"),
         "--inception-weights", str(net_file), "--metrics", "fid,kid,ssim", "--ssim-size", "32", "--out", str(out),
         "--target", "kid_mean<-1", "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                     "HOME": str(tmp_path)},
    )
    assert proc.returncode == 1, proc.stderr  # done, but the target was missed
    header = next(line for line in proc.stdout.splitlines() if line.startswith("group"))
    assert "FID" in header and "KID" in header and "SSIM nn" in header
    assert "target kid_mean <-1 in all:" in proc.stdout and "MISSED" in proc.stdout
    report = json.loads(out.read_text())
    assert report["format_version"] == 1 and report["versions"]["torchmetrics"] == torchmetrics.__version__
    assert result(report, "kid_mean")["passed"] is False
    assert {r["metric"] for r in report["results"]} == {"fid", "kid_mean", "kid_std", "ssim_nearest_real"}
