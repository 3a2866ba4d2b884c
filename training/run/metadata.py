"""The metadata a trained LoRA file carries about its run, under kohya's `ss_*` and the SAI model spec's
`modelspec.*` names (what A1111/Forge's LoRA info and kohya's tools show).

kohya (sd-scripts, train_network.py) writes: ss_output_name, ss_resolution "(W, H)", ss_v2, ss_num_train_images,
ss_tag_frequency {dir: {tag: count}} and ss_dataset_dirs {dir: {n_repeats, img_count}} (JSON), ss_steps, ss_seed,
ss_learning_rate, ss_training_started_at / ss_training_finished_at (Unix times); modelspec.title, .date (ISO),
.resolution "WxH", .prediction_type ("epsilon" or "v"). The format keys (ss_network_*, modelspec.architecture,
the sshs_* hashes) are written with the tensors, by lora/files.py. Checkpoints carry these entries too, so a
LoRA extracted from one (extract_lora_weights.py) has the same set.
"""

import datetime
import json
from collections import Counter
from pathlib import Path

UTC = datetime.timezone.utc  # noqa: UP017 (datetime.UTC is Python 3.11; we run on 3.10)
# ours -> the model spec's; rectified flow (SD 3.5, FLUX.1) has none: kohya leaves modelspec.prediction_type out
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}


def dataset_metadata(data, data_dir) -> dict[str, str]:
    """ss_num_train_images, and for a folder dataset the caption tags (comma-separated) per folder."""
    records = data.records
    meta = {"ss_num_train_images": str(data.summary()["num_images"] if records is None else len(records))}
    if records is not None:
        folder = Path(str(data_dir)).name
        tags = Counter(tag.strip() for r in records for tag in r.caption.split(",") if tag.strip())
        meta |= {"ss_tag_frequency": json.dumps({folder: dict(tags.most_common())}),
                 "ss_dataset_dirs": json.dumps({folder: {"n_repeats": 1, "img_count": len(records)}})}
    return meta


def run_metadata(config: dict, step: int, started_at: float, finished_at: float) -> dict[str, str]:
    """The run's settings and times (config: the resolved config, as a dict)."""
    size = int(config["image_size"])
    prediction_type = PREDICTION_TYPES.get(config.get("prediction_type", "epsilon"))
    return {
        "ss_output_name": Path(str(config["output_dir"])).name,
        "ss_resolution": f"({size}, {size})",
        "ss_v2": "False",
        "ss_steps": str(step),
        "ss_seed": str(config["seed"]),
        "ss_learning_rate": str(config["learning_rate"]),
        "ss_training_started_at": repr(float(started_at)),
        "ss_training_finished_at": repr(float(finished_at)),
        "modelspec.title": Path(str(config["output_dir"])).name,
        "modelspec.date": datetime.datetime.fromtimestamp(finished_at, UTC).isoformat(timespec="seconds"),
        "modelspec.resolution": f"{size}x{size}",
    } | ({"modelspec.prediction_type": prediction_type} if prediction_type else {})


def is_run_key(key: str) -> bool:
    """Entries of a checkpoint's LoRA file that a LoRA extracted from it keeps."""
    return key.startswith(("ss_", "modelspec."))
