"""The seam (families.py): every registered family implements the whole `Family` interface, models are told apart
without loading them, and nothing above the seam names a family."""

import ast
import typing
from pathlib import Path

import pytest
from safetensors.torch import save_file

import families

ROOT = Path(__file__).resolve().parent.parent
ABOVE_THE_SEAM = ("training", "sampling", "evaluation")


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_each_family_has_every_name_of_the_interface(name):
    module = families.get(name)
    wanted = typing.get_type_hints(families.Family)
    missing = [n for n in wanted if not hasattr(module, n)]
    assert not missing, f"{name}/family.py lacks {missing}"
    assert module.NAME == name and module.SCRIPT == f"train_{name}.py" and (ROOT / module.SCRIPT).is_file()
    assert families.name_of(module.TINY) == name
    callables = [n for n, hint in wanted.items() if typing.get_origin(hint) is not None
                 and "Callable" in str(hint)]
    assert all(callable(getattr(module, n)) for n in callables)


def test_models_are_told_apart_without_loading_them(tmp_path):
    assert families.name_of("tiny") == "sdxl" and families.name_of("tiny-sdxl") == "sdxl"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert families.name_of(tmp_path / "folder") == "sdxl"
    import torch

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, tmp_path / "sgm.safetensors")
    assert families.name_of(tmp_path / "sgm.safetensors") == "sdxl"
    save_file({"something.else": torch.zeros(1)}, tmp_path / "other.safetensors")
    assert families.name_of(tmp_path / "other.safetensors") is None
    with pytest.raises(ValueError, match="not a model of a known family"):
        families.of(tmp_path / "other.safetensors")


def test_nothing_above_the_seam_names_a_family():
    """training/, sampling/ and evaluation/ import no family package: they reach a model through families.py."""
    offenders = []
    for package in ABOVE_THE_SEAM:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                              if n.split(".")[0] in families.FAMILIES]
    assert not offenders, offenders
