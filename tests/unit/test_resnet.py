"""ResNet as torchvision builds it: the same state-dict keys and shapes, strict loads, and the
torch image runtime reading a torchvision-named checkpoint from a version folder."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inferd.errors import ModelLoadError
from inferd.models.resnet import build
from inferd.models.runtimes import RuntimeOptions, create_model, sample_batch, validate_output
from inferd.models.spec import ModelSpec

FIXTURE = Path(__file__).parent / "data" / "resnet18_state_dict.txt"


def _expected() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in FIXTURE.read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape = line.split()
        rows.append((key, () if shape == "-" else tuple(int(n) for n in shape.split("x"))))
    return rows


def test_resnet18_state_dict_matches_torchvision_layout() -> None:
    state = build("resnet18", 1000, use_torchvision=False).state_dict()
    got = [(key, tuple(value.shape)) for key, value in state.items()]
    assert got == _expected()


def test_resnet34_has_torchvision_stage_depths() -> None:
    keys = build("resnet34", 1000, use_torchvision=False).state_dict().keys()
    blocks = {k.split(".")[0]: int(k.split(".")[1]) for k in keys if k.startswith("layer")}
    assert blocks == {"layer1": 2, "layer2": 3, "layer3": 5, "layer4": 2}  # last block index


def _spec(**extra: object) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "resnet",
            "runtime": "torch",
            "architecture": "resnet18",
            "input": {"type": "image"},
            "image": {"size": 64},
            **extra,
        }
    )


def test_a_saved_torchvision_checkpoint_loads_strictly_and_answers_like_the_net(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    net = build("resnet18", 1000, use_torchvision=False).eval()
    torch.save(net.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    model = create_model(_spec(), 1, tmp_path, RuntimeOptions(device="cpu"))
    model.load()
    assert model.classes() == list(range(1000))

    batch = sample_batch(model.spec, 2)
    assert batch.shape == (2, 3, 64, 64)
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    out = model.predict(x)  # type: ignore[arg-type]
    with torch.inference_mode():
        expected = torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
    validate_output(model.spec, 1, model.classes(), batch, model.predict(batch))


def test_labels_txt_names_the_classes(tmp_path: Path) -> None:
    net = build("resnet-small", 3, in_channels=1)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "resnet-small-x.pth")  # a checkpoint
    (tmp_path / "labels.txt").write_text("zero\none\ntwo\n")
    spec = _spec(architecture="resnet-small", image={"size": 16, "channels": "L"})
    model = create_model(spec, 1, tmp_path, RuntimeOptions(device="cpu"))
    model.load()
    assert model.classes() == ["zero", "one", "two"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("none", r"no weights file matching 'resnet18-\*\.pth'"),
        ("two", "several files match"),
        ("wrong-arch", "does not fit architecture 'resnet18'"),
        ("garbage", "corrupt or not a torch state dict"),
        ("labels", "the model has 1000 classes but 2 labels"),
    ],
)
def test_bad_weights_fail_the_load_with_the_reason(
    tmp_path: Path, setup: str, message: str
) -> None:
    extra: dict[str, object] = {}
    if setup == "two":
        for name in ("resnet18-a.pth", "resnet18-b.pth"):
            (tmp_path / name).write_bytes(b"x")
    elif setup == "wrong-arch":
        torch.save(build("resnet-small", 1000).state_dict(), tmp_path / "resnet18-x.pth")
    elif setup == "garbage":
        (tmp_path / "resnet18-x.pth").write_bytes(b"not a checkpoint")
    elif setup == "labels":
        torch.save(
            build("resnet18", 1000, use_torchvision=False).state_dict(), tmp_path / "resnet18-x.pth"
        )
        extra = {"output": {"labels": ["a", "b"]}}
    model = create_model(_spec(**extra), 1, tmp_path, RuntimeOptions(device="cpu"))
    with pytest.raises(ModelLoadError, match=message):
        model.load()


def test_without_torch_the_load_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    model = create_model(_spec(), 1, tmp_path, RuntimeOptions(device="cpu"))
    with pytest.raises(ModelLoadError, match=r"pip install 'inferd\[vision\]'"):
        model.load()


def test_cuda_asked_for_without_a_gpu_fails_clearly(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    torch.save(
        build("resnet18", 1000, use_torchvision=False).state_dict(), tmp_path / "resnet18-x.pth"
    )
    model = create_model(_spec(), 1, tmp_path, RuntimeOptions(device="cuda"))
    with pytest.raises(ModelLoadError, match="torch sees no GPU"):
        model.load()


def test_image_specs_are_checked() -> None:
    with pytest.raises(ValueError, match=r"image\.mean needs 1 values"):
        _spec(image={"channels": "L", "mean": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match='runtime "torch" serves image input only'):
        ModelSpec.model_validate(
            {
                "name": "x",
                "runtime": "torch",
                "architecture": "resnet18",
                "input": {"features": ["a"]},
            }
        )
    with pytest.raises(ValueError, match="needs architecture"):
        ModelSpec.model_validate({"name": "x", "runtime": "torch", "input": {"type": "image"}})
