import pytest

from vitrail.errors import VitrailError
from vitrail.launch import config as config_module


def _write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_demo_and_paper_recipes_validate():
    paper = config_module.load("configs/dino_vit_small.yaml")
    assert paper.method.out_dim == 65536 and paper.method.local_crops_number == 10
    assert (paper.method.global_crop_size, paper.method.local_crop_size) == (224, 96)
    assert paper.model.backbone == "vit_small" and paper.optim.lr == 5e-4
    demo = config_module.load("configs/demo.yaml")
    assert demo.data.channels == 1


def test_overrides_are_typed_and_nested(tmp_path):
    path = _write(tmp_path, "method: {name: dino}\n")
    config = config_module.load(path, ["optim.lr=0.001", "model.kwargs.patch_size=8", "method.global_crops_scale=[0.3, 1.0]"])
    assert config.optim.lr == 0.001
    assert config.model.kwargs == {"patch_size": 8}
    assert config.method.global_crops_scale == (0.3, 1.0)


@pytest.mark.parametrize("override, message", [
    ("model.bogus=1", "unknown config key 'model.bogus'"),
    ("method.teacher_tmp=0.04", "unknown config key 'method.teacher_tmp'"),
    ("optim.batch_size=many", "optim.batch_size"),
    ("model.backbone=vit_huge", "unknown backbone 'vit_huge'"),
    ("model.kwargs.depht=3", "model.kwargs.depht is not an argument of vit_small"),
    ("method.name=simclr", "method"),
    ("optim", "not of the form section.key=value"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    path = _write(tmp_path, "method: {name: dino}\n")
    with pytest.raises(VitrailError, match=message):
        config_module.load(path, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(VitrailError, match="does not exist"):
        config_module.load(tmp_path / "absent.yaml")
    with pytest.raises(VitrailError, match="not valid YAML"):
        config_module.load(_write(tmp_path, "method: [unclosed\n"))
