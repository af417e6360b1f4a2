"""Fashion-MNIST's IDX reader and its asset lookup and fetch step, on tiny IDX files written here
(tests on the real files: tests/zoo/test_fmnist.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

import salience.assets as assets
from salience.datasets.fashion_mnist import load_fashion_mnist, read_idx
from salience.errors import AssetMissingError, InputError, ParameterError


def _idx(values: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, written by hand from the format's definition."""
    header = bytes([0, 0, 0x08, values.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in values.shape)
    return header + values.astype(np.uint8).tobytes()


def _write_split(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gzipped: bool) -> None:
    for kind, values in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        data = _idx(values)
        if gzipped:
            (folder / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / f"{prefix}-{kind}").write_bytes(data)


@pytest.fixture()
def tiny_data(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A folder with tiny training (gzipped) and test (plain) splits of random images and labels."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    splits = {}
    for split, prefix, n, gzipped in (("train", "train", 5, True), ("test", "t10k", 3, False)):
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
        _write_split(folder, prefix, images, labels, gzipped)
        splits[split] = (images, labels)
    return folder, splits


def test_reads_gzipped_and_plain_idx(tiny_data) -> None:
    folder, splits = tiny_data
    for split, (images, labels) in splits.items():
        got_images, got_labels = load_fashion_mnist(split, folder=folder)
        assert got_images.dtype == np.uint8 and got_images.shape == images.shape
        assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
        assert got_labels.dtype == np.int64
    first_two = load_fashion_mnist("train", limit=2, folder=folder)
    assert np.array_equal(first_two[0], splits["train"][0][:2]) and np.array_equal(first_two[1], splits["train"][1][:2])


def test_bad_idx_and_arguments_raise_one_line_errors(tiny_data, tmp_path: Path) -> None:
    folder, _ = tiny_data
    with pytest.raises(ParameterError, match="unknown Fashion-MNIST split 'validation'; choose train, test"):
        load_fashion_mnist("validation", folder=folder)
    with pytest.raises(ParameterError, match="limit must be >= 0"):
        load_fashion_mnist("test", limit=-1, folder=folder)
    cases = {
        b"\x01\x00\x08\x01\x00\x00\x00\x01\x07": "not an IDX file",
        b"\x00\x00\x0d\x01\x00\x00\x00\x01\x07\x07\x07\x07": "IDX type 0x0d",
        b"\x00\x00\x08\x02\x00\x00\x00\x01": "ends inside its IDX header",
        _idx(np.zeros((2, 3), np.uint8))[:-1]: "has 5 data bytes; its header (2, 3) needs 6",
    }
    for data, message in cases.items():
        path = tmp_path / "bad.idx"
        path.write_bytes(data)
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
            read_idx(path)
        assert "\n" not in str(error.value)
    _write_split(tmp_path, "t10k", np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8), gzipped=False)
    with pytest.raises(InputError, match=r"holds \(2,\) labels for 3 images"):
        load_fashion_mnist("test", folder=tmp_path)


def test_asset_lookup_prefers_the_debian_folder_then_the_cache(tiny_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = tiny_data
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "FASHION_MNIST_SYSTEM_DIR", missing)
    with pytest.raises(AssetMissingError, match=r"Fashion-MNIST missing \(looked in .*nowhere and .*cache.fashion-mnist\); "
                                                r"run `python -m salience.assets fetch`.*github.com/zalandoresearch") as error:
        assets.fashion_mnist_dir()
    assert "\n" not in str(error.value)
    (tmp_path / "cache").mkdir()
    folder.rename(tmp_path / "cache" / "fashion-mnist")
    assert assets.fashion_mnist_dir() == tmp_path / "cache" / "fashion-mnist"
    (tmp_path / "cache" / "fashion-mnist").rename(missing)
    assert assets.fashion_mnist_dir() == missing
    assert assets._fetch_fashion_mnist() == missing  # nothing fetched when present


def test_fetch_without_apt_explains_the_manual_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(assets.shutil, "which", lambda tool: None)
    with pytest.raises(AssetMissingError, match=r"apt-get and dpkg-deb not found .*install the package dataset-fashion-mnist, "
                                                r"or put the four IDX files .* into .*fashion-mnist"):
        assets._fetch_fashion_mnist()


def _fake_tool(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_fetch_unpacks_the_debian_package_into_the_cache(tiny_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fetch step with stand-ins for apt-get (writes a .deb into the working folder) and dpkg-deb
    (unpacks the tiny IDX files where the package keeps them): the files land in the cache, readable."""
    folder, splits = tiny_data
    tools = tmp_path / "bin"
    tools.mkdir()
    _fake_tool(tools, "apt-get", 'test "$1 $2" = "download dataset-fashion-mnist" && touch dataset-fashion-mnist_0.0_all.deb\n')
    system = tmp_path / "nowhere"  # where the package would install (absent: not installed)
    _fake_tool(tools, "dpkg-deb", f'mkdir -p "$3{system}" && cp {folder}/* "$3{system}/"\n')
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "FASHION_MNIST_SYSTEM_DIR", system)
    cached = assets._fetch_fashion_mnist()
    assert cached == tmp_path / "cache" / "fashion-mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert np.array_equal(load_fashion_mnist("train", folder=cached)[0], splits["train"][0])
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".fetch-")]  # the temp folder is gone
    _fake_tool(tools, "apt-get", "exit 100\n")
    (cached / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(AssetMissingError, match=r"could not download dataset-fashion-mnist \(apt-get download dataset-fashion-mnist "
                                                r"exited 100; try `apt-get update` first\), or put the four IDX files"):
        assets._fetch_fashion_mnist()
