"""The metadata of kohya files: the run's ss_* / modelspec.* entries (training/run/metadata.py) and the sshs_*
hashes A1111 indexes LoRAs by, checked against A1111's own computation (modules/hashes.py) written out here."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save

import extract_lora_weights
from lora.layer import LoRAConfig
from sdxl.lora import apply_lora, save_lora
from tests.test_lora import tiny_unet
from tests.test_lora_kinds import randomize

ROOT = Path(__file__).resolve().parent.parent
RUN_KEYS = {"ss_output_name", "ss_resolution", "ss_v2", "ss_num_train_images", "ss_tag_frequency", "ss_dataset_dirs",
            "ss_steps", "ss_seed", "ss_learning_rate", "ss_training_started_at", "ss_training_finished_at",
            "modelspec.title", "modelspec.date", "modelspec.resolution", "modelspec.prediction_type"}
FORMAT_KEYS = {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
               "modelspec.architecture", "modelspec.sai_model_spec", "modelspec.implementation", "sshs_model_hash",
               "sshs_legacy_hash"}


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def a1111_addnet_hash(path) -> str:
    """A1111 modules/hashes.py addnet_hash_safetensors: SHA-256 of the file after its header."""
    data = Path(path).read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_hashes_as_a1111_and_kohya_compute_them(tmp_path):
    unet = tiny_unet()
    config = LoRAConfig(rank=32, alpha=16, target_mode="all", conv_rank=8)
    apply_lora(unet, config)
    randomize(unet)
    path = save_lora(unet, tmp_path / "big.safetensors", config, metadata={"ss_seed": "3", "note": "not hashed"})
    assert path.stat().st_size > 0x110000  # the legacy hash reads bytes 1 MiB .. 1 MiB + 64 KiB
    meta = metadata(path)
    assert meta["sshs_model_hash"] == a1111_addnet_hash(path)
    # kohya: the legacy hash is over the file as written with only its ss_* metadata
    ss_only = save(load_file(path), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert len(set(ss_only[0x100000:0x110000])) > 1  # tensor bytes, not padding


def test_training_writes_the_run_metadata_and_extract_keeps_it(tmp_path):
    out = tmp_path / "my_lora"
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), "--config", str(ROOT / "tests/data/tiny_run.yaml"),
           "--output_dir", str(out), "--max_train_steps", "2", "--batch_size", "2", "--save_interval", "2",
           "--validation_prompts", "--val_data_dir", "", "--conv_rank", "2", "--use_dora"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    meta = metadata(out / "lora_final.safetensors")
    assert RUN_KEYS | FORMAT_KEYS <= set(meta)
    assert meta["ss_output_name"] == meta["modelspec.title"] == "my_lora"
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert meta["ss_v2"] == "False" and meta["modelspec.prediction_type"] == "epsilon" and meta["ss_steps"] == "2"
    captions = [p.read_text().strip() for p in sorted((ROOT / "data/demo/train").glob("*.txt"))]
    assert meta["ss_num_train_images"] == str(len(captions))
    tags = json.loads(meta["ss_tag_frequency"])["train"]
    assert tags[captions[0].split(",")[0].strip()] >= 1
    assert sum(tags.values()) == sum(c.count(",") + 1 for c in captions)
    assert json.loads(meta["ss_dataset_dirs"]) == {"train": {"n_repeats": 1, "img_count": len(captions)}}
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0", "algo": "locon",
                                                   "dora_wd": "True"}
    assert meta["sshs_model_hash"] == a1111_addnet_hash(out / "lora_final.safetensors")

    extracted = tmp_path / "extracted.safetensors"
    assert extract_lora_weights.main([str(out / "checkpoints/step_000002"), "-o", str(extracted)]) == 0
    again = metadata(extracted)
    assert RUN_KEYS | FORMAT_KEYS <= set(again)
    assert {k: again[k] for k in RUN_KEYS - {"ss_training_finished_at", "modelspec.date"}} == \
        {k: meta[k] for k in RUN_KEYS - {"ss_training_finished_at", "modelspec.date"}}
    assert again["sshs_model_hash"] == meta["sshs_model_hash"]  # the same tensors
