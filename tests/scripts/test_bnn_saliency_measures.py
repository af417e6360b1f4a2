"""The measures and report helpers of the binarized-network saliency study (scripts/bnn_saliency_*.py)
against hand-computed values and scipy / scikit-image."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from oracles import in_ci

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bnn_saliency_measures as measures  # noqa: E402
import bnn_saliency_report as report  # noqa: E402


def test_tv_ratio_of_maps_with_known_values() -> None:
    spike = np.zeros((5, 5))
    spike[2, 2] = 3.0  # four neighbours differ by 3: TV 12, L1 3
    assert measures.tv_ratio(spike) == pytest.approx(4.0, abs=1e-12)
    assert measures.tv_ratio(np.full((4, 4), 2.5)) == 0.0
    ramp = np.tile(np.arange(4.0), (3, 1))  # rows 0 1 2 3: TV 3 per row, 3 rows; L1 6 per row
    assert measures.tv_ratio(ramp) == pytest.approx(9.0 / 18.0, abs=1e-12)
    assert measures.tv_ratio(-ramp) == pytest.approx(0.5, abs=1e-12)  # sign-free
    assert measures.tv_ratio(7.0 * ramp) == pytest.approx(0.5, abs=1e-12)  # scale-free
    assert np.isnan(measures.tv_ratio(np.zeros((3, 3))))
    with pytest.raises(ValueError, match="2-D"):
        measures.tv_ratio(np.ones(9))


def test_tv_ratio_of_uniform_noise_is_near_its_expectation() -> None:
    # E|U - V| = 1/3, E U = 1/2: 2 n (n - 1) / 3 over n^2 / 2 = 4 (n - 1) / (3 n) = 1.2857 at n = 28;
    # the mean of 50 seeded maps has a standard error of about 0.004, so 0.02 is five of them
    rng = np.random.default_rng(0)
    values = [measures.tv_ratio(rng.random((28, 28))) for _ in range(50)]
    assert np.mean(values) == pytest.approx(4 * 27 / (3 * 28), abs=0.02)


def test_rank_correlation_equals_scipy_with_ties() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, size=(6, 6)).astype(float)  # many ties
    b = a + rng.normal(size=(6, 6))
    assert measures.rank_correlation(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)
    assert np.isnan(measures.rank_correlation(np.ones((3, 3)), b[:3, :3]))


def test_block_means_average_each_block() -> None:
    m = np.arange(16.0).reshape(4, 4)
    np.testing.assert_array_equal(measures.block_means(m, 2), [[2.5, 4.5], [10.5, 12.5]])  # e.g. (0 + 1 + 4 + 5) / 4
    with pytest.raises(ValueError, match="multiples of 3"):
        measures.block_means(m, 3)


def test_ssim01_is_scale_free_and_one_for_equal_maps() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.random((28, 28)), rng.random((28, 28))
    assert measures.ssim01(a, a) == pytest.approx(1.0, abs=1e-12)
    assert measures.ssim01(a, 5.0 * b + 3.0) == pytest.approx(measures.ssim01(a, b), abs=1e-12)
    low, high = a.min(), a.max()  # what min-max normalisation does, written out
    expected = structural_similarity((a - low) / (high - low), (b - b.min()) / np.ptp(b), data_range=1.0)
    assert measures.ssim01(a, b) == pytest.approx(expected, abs=1e-12)
    assert measures.ssim01(a, -a) < 0  # anti-correlated structure
    assert np.isnan(measures.ssim01(a, np.zeros((28, 28))))
    with pytest.raises(ValueError, match="one shape"):
        measures.ssim01(a, b[:27])


def test_garment_mass_and_peak() -> None:
    m = np.array([[1.0, -2.0], [3.0, 4.0]])
    garment = np.array([[True, False], [False, True]])
    assert measures.garment_mass(m, garment) == pytest.approx(5.0 / 10.0)
    assert measures.peak_on_garment(m, garment) is True
    assert measures.peak_on_garment(np.array([[0.0, 9.0], [0.0, 0.0]]), garment) is False
    assert measures.peak_on_garment(np.zeros((2, 2)), garment) is None
    assert np.isnan(measures.garment_mass(np.zeros((2, 2)), garment))


def test_derangements_pair_every_item_with_another() -> None:
    rng = np.random.default_rng(3)
    partner = measures.derangement(50, rng)
    assert sorted(partner) == list(range(50)) and np.all(partner != np.arange(50))
    labels = np.array([0, 1, 0, 2, 1, 0, 3, 2])  # class 3 has one image
    same = measures.same_class_derangement(labels, rng)
    assert same[6] == -1
    for i, j in enumerate(same):
        if i != 6:
            assert j != i and labels[j] == labels[i]
    with pytest.raises(ValueError, match="at least 2"):
        measures.derangement(1, rng)


def test_stat_leaves_out_and_counts_undefined_values() -> None:
    values = [1.0, 2.0, float("nan"), 3.0, 4.0]
    result = measures.stat(values)
    assert result.mean == pytest.approx(2.5) and result.n == 4 and result.missing == 1
    assert result.low <= result.mean <= result.high
    assert str(result).endswith("(1 undefined)")
    assert str(measures.stat([float("nan")])) == "n/a"


def test_grid_images_take_the_first_image_of_distinct_classes() -> None:
    labels = np.array([9, 2, 9, 1, 2, 6, 4, 5, 7])
    available = np.array([True, True, True, True, True, False, True, True, True])
    assert report.grid_images(labels, available, count=4) == [0, 1, 3, 6]


def test_replace_section_keeps_the_handwritten_text(tmp_path: Path) -> None:
    doc = tmp_path / "study.md"
    doc.write_text(f"# Title\n\nsetup\n\n{report.START}\nold\n{report.END}\n\n## Verdicts\n", encoding="utf-8")
    report.replace_section(doc, [report.START, "new", report.END])
    assert doc.read_text(encoding="utf-8") == f"# Title\n\nsetup\n\n{report.START}\nnew\n{report.END}\n\n## Verdicts\n"
    fresh = tmp_path / "fresh.md"
    report.replace_section(fresh, [report.START, "tables", report.END])
    assert fresh.read_text(encoding="utf-8") == f"{report.START}\ntables\n{report.END}\n"


def test_study_end_to_end_on_a_few_images(tmp_path: Path) -> None:
    """The whole script on 6 images: every map lands at its own image (the script explains class
    by class), tables and figure are written."""
    import study_bnn_saliency as study
    import torch

    from salience.assets import fashion_mnist_dir
    from salience.errors import AssetMissingError
    from salience.zoo.fmnist import build_fmnist, images_to_tensor

    try:
        fashion_mnist_dir()
    except AssetMissingError as error:  # the real test split is needed; CI has it
        (pytest.fail if in_ci() else pytest.skip)(str(error))
    out = tmp_path / "results"
    study.main(["--images", "6", "--neuromask-images", "3", "--neuromask-iterations", "3", "--repeat-images", "2",
                "--smoothgrad-samples", "4", "--out", str(out), "--doc", str(tmp_path / "doc.md"),
                "--grid", str(tmp_path / "grid.png")])
    saved = np.load(out / "maps.npz")
    images, labels = saved["images"], saved["labels"]
    for kind, net in (("cnn", "FP"), ("bnn", "BNN")):  # Gradient = |d logit(true class) / d normalised pixel|
        model = build_fmnist(kind)[0]
        x = images_to_tensor(images).requires_grad_(True)
        model(x).gather(1, torch.as_tensor(labels)[:, None]).sum().backward()
        expected = x.grad[:, 0].abs().numpy()  # float32 gradients: 1e-6 relative
        np.testing.assert_allclose(saved[f"{net}|Gradient"], expected, rtol=1e-5, atol=1e-6 * float(expected.max()))
    assert np.isnan(saved["FP|NeuroMask"][3:]).all() and not np.isnan(saved["FP|NeuroMask"][:3]).any()
    rows = report.read_csv(out / "maps.csv")
    assert len(rows) == 2 * (6 * 6 + 3)  # 2 networks x (Gradient, IxG, DeepLIFT, SmoothGrad, Grad-CAM, Random on 6 + NeuroMask on 3)
    deeplift = [r for r in rows if r["method"] == "DeepLIFT"]
    assert len(deeplift) == 12 and all(abs(float(r["summation_delta"])) < 1e-4 * abs(float(r["output_gap"])) for r in deeplift)
    pairs = report.read_csv(out / "pairs.csv")
    assert {p["comparison"] for p in pairs} >= {report.SAME, report.OTHER, f"{report.SEEDS} FP"}
    text = (tmp_path / "doc.md").read_text(encoding="utf-8")
    assert text.startswith(report.START) and "### Similarity of the FP and the BNN map" in text
    assert (tmp_path / "grid.png").stat().st_size > 0
