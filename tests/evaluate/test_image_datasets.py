"""Image datasets for `salience evaluate`: the imagenet-photos metadata against its sources, image
folders and CSV files (labels by name, boxes, errors with line numbers), the fashion-mnist hook, the
runner's box plumbing (the pointing game gets each example's box), storage by reference (schema 2
and its migration), resuming, and one short end-to-end run of zoo:efficientnet-lite0 on
imagenet-photos."""

from __future__ import annotations

import json
import sqlite3
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import salience
from salience.cli import main
from salience.datasets.photos import load_photos, photos_metadata
from salience.errors import ParameterError
from salience.evaluate.config import RunConfig, parse_method_spec, parse_metric_spec
from salience.evaluate.datasets import DatasetError, load_dataset
from salience.evaluate.image_datasets import label_index, parse_box
from salience.evaluate.runner import EvaluationError, run_evaluation
from salience.evaluate.store import SCHEMA_VERSION, Store
from tiny_cnn import LABELS, photo, tiny_classifier

CLASSES = Path(salience.__file__).with_name("zoo") / "imagenet_classes.txt"


# ------------------------------------------------------------------ helpers
def _png(path: Path, seed: int, size: tuple[int, int] = (30, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo(size[1], size[0], seed)).save(path)
    return path


def _folder(root: Path) -> Path:
    """cat: 2 images, Dog: 1 (a label in another case), bird: 3 (one in a sub-folder); a README."""
    for name, seed in (("cat/a.png", 1), ("cat/b.png", 2), ("Dog/a.png", 3), ("bird/x.png", 4), ("bird/y.jpg", 5),
                       ("bird/more/z.png", 6)):
        _png(root / name, seed)
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _config(dataset, metrics, methods=("saliency",), **kwargs) -> RunConfig:
    return RunConfig(model="tiny-cnn", dataset=str(dataset), methods=tuple(map(parse_method_spec, methods)),
                     metrics=tuple(map(parse_metric_spec, metrics)), **kwargs)


# ------------------------------------------------------------------ imagenet-photos
def test_photos_metadata_matches_its_sources():
    """Each entry's file is what its source function returns, its label name is ImageNet's name of
    its index, its box lies inside the photo and the recorded prediction check is consistent."""
    skimage_data = pytest.importorskip("skimage.data")
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    classes = CLASSES.read_text().splitlines()
    photos = load_photos()
    entries = photos_metadata()["photos"]
    assert len(photos) == len(entries) >= 6 and len({p.id for p in photos}) == len(photos)
    for photo_, entry in zip(photos, entries):
        assert classes[photo_.label] == photo_.label_name
        assert entry["efficientnet_lite0"]["correct"] == (photo_.predicted == photo_.label)
        assert classes[photo_.predicted] == entry["efficientnet_lite0"]["predicted_name"]
        left, top, right, bottom = photo_.box
        assert 0 <= left < right <= photo_.size[0] and 0 <= top < bottom <= photo_.size[1]
        if photo_.source.startswith("skimage.data."):
            loaded = getattr(skimage_data, photo_.source.removeprefix("skimage.data."))()
            loaded = loaded[0] if isinstance(loaded, tuple) else loaded  # stereo_motorcycle: (left, right, disparity)
        else:
            loaded = sklearn_datasets.load_sample_image(photo_.path.name)
        assert np.array_equal(np.asarray(Image.open(photo_.path)), loaded), photo_.id
        assert loaded.shape[:2] == (photo_.size[1], photo_.size[0])
    assert "hand-made" in photos_metadata()["boxes"].lower()


def test_imagenet_photos_dataset():
    model = tiny_classifier()
    data = load_dataset("imagenet-photos", model)
    photos = load_photos()
    assert data.kind == "image" and data.total == len(photos) == len(data.examples) and data.reference == "boxes"
    first = data.examples[0]
    assert (first.id, first.label, first.box, first.reference) == ("coffee", 967, photos[0].box, "imagenet-photos:coffee")
    assert first.input == str(photos[0].path) and first.stored_input == "imagenet-photos:coffee" and first.rationale is None
    limited = load_dataset("imagenet_photos", model, limit=2)
    assert [e.id for e in limited.examples] == ["coffee", "chelsea"] and limited.fingerprint == data.fingerprint


def test_datasets_and_models_of_other_kinds_are_refused():
    text_model = types.SimpleNamespace(name="toy", kind="text classifier", explanation_kind="text", labels=["no", "yes"])
    with pytest.raises(DatasetError, match="dataset imagenet-photos holds images, and toy is a text classifier"):
        load_dataset("imagenet-photos", text_model)
    with pytest.raises(DatasetError, match="dataset planted holds texts, and tiny-cnn is an image classifier"):
        load_dataset("planted", tiny_classifier())
    with pytest.raises(DatasetError, match=r"unknown dataset 'imagenet-photo' \(did you mean 'imagenet-photos'\?\)"):
        load_dataset("imagenet-photo", tiny_classifier())
    with pytest.raises(DatasetError, match="imagenet-photos has no splits"):
        load_dataset("imagenet-photos", tiny_classifier(), split="train")


# ------------------------------------------------------------------ fashion-mnist (a fake loader: no files needed)
@pytest.fixture()
def fake_fashion_mnist(monkeypatch):
    calls = []

    def load_fashion_mnist(split="test", limit=None):
        calls.append((split, limit))
        n = {"test": 5, "train": 7}[split]
        images = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28).astype(np.uint8)
        return (images if split == "test" else 255 - images), np.arange(n, dtype=np.int64) % 10

    module = types.ModuleType("salience.datasets.fashion_mnist")
    module.load_fashion_mnist = load_fashion_mnist  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "salience.datasets.fashion_mnist", module)
    monkeypatch.setattr(salience.datasets, "fashion_mnist", module, raising=False)
    return calls


def test_fashion_mnist_hook(fake_fashion_mnist):
    model = tiny_classifier()
    data = load_dataset("fashion-mnist", model, limit=3)
    assert fake_fashion_mnist == [("test", None)]  # the whole split is read: it is all fingerprinted
    assert [e.id for e in data.examples] == ["test-00000", "test-00001", "test-00002"] and data.total == 5
    assert [e.stored_input for e in data.examples] == ["fashion-mnist:test:0", "fashion-mnist:test:1", "fashion-mnist:test:2"]
    assert data.examples[1].input.shape == (28, 28) and data.examples[1].input.dtype == np.uint8
    assert [e.label for e in data.examples] == [0, 1, 2] and all(e.box is None for e in data.examples)
    train = load_dataset("fashion-mnist", model, split="train")
    assert len(train.examples) == 7 and train.examples[0].id == "train-00000" and train.fingerprint != data.fingerprint
    with pytest.raises(DatasetError, match="fashion-mnist has no split 'dev'; choose test or train"):
        load_dataset("fashion-mnist", model, split="dev")


def test_fashion_mnist_through_the_real_reader(tmp_path, monkeypatch):
    """The hook with salience.datasets.fashion_mnist itself, on tiny IDX files written here (the
    format by hand: two zero bytes, type 0x08, the number of dimensions, big-endian sizes, bytes)."""
    from salience.datasets import fashion_mnist as reader

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.array([3, 1, 4, 1], dtype=np.uint8)
    for prefix in ("t10k", "train"):
        for kind, values in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            header = bytes([0, 0, 0x08, values.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in values.shape)
            (tmp_path / f"{prefix}-{kind}").write_bytes(header + values.tobytes())
    monkeypatch.setattr(reader, "fashion_mnist_dir", lambda: tmp_path)
    data = load_dataset("fashion-mnist", tiny_classifier(), limit=3)
    assert [e.label for e in data.examples] == [3, 1, 4] and data.total == 4
    assert all(np.array_equal(e.input, images[i]) for i, e in enumerate(data.examples))


# ------------------------------------------------------------------ image folder
def test_image_folder_labels_order_and_fingerprint(tmp_path):
    root = _folder(tmp_path / "pets")
    model = tiny_classifier()
    data = load_dataset(str(root), model)
    # classes in name order (Dog, bird, cat as sorted names), images taken in turn from each class
    assert [e.id for e in data.examples] == ["Dog/a.png", "bird/more/z.png", "cat/a.png", "bird/x.png", "cat/b.png", "bird/y.jpg"]
    assert [LABELS[e.label] for e in data.examples] == ["dog", "bird", "cat", "bird", "cat", "bird"]
    assert data.examples[0].input == str((root / "Dog" / "a.png").resolve()) == data.examples[0].stored_input
    assert data.kind == "image" and data.total == 6 and data.examples[0].box is None
    assert [e.id for e in load_dataset(str(root), model, limit=3).examples] == ["Dog/a.png", "bird/more/z.png", "cat/a.png"]
    assert load_dataset(str(root), model).fingerprint == data.fingerprint
    _png(root / "cat" / "b.png", seed=99)  # same name, other pixels: another dataset
    assert load_dataset(str(root), model).fingerprint != data.fingerprint


def test_image_folder_errors(tmp_path):
    model = tiny_classifier()
    root = _folder(tmp_path / "pets")
    (root / "kat").mkdir()
    (root / "fish").mkdir()
    with pytest.raises(DatasetError, match=r"2 class folders match no label of tiny-cnn .*: 'fish', 'kat' \(did you mean 'cat'\?\)"):
        load_dataset(str(root), model)
    (root / "kat").rmdir()
    (root / "fish").rmdir()
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    _png(root / "stray.png", 7)
    with pytest.raises(DatasetError, match=r"2 invalid files .*stray.png: an image outside the class folders; "
                                           r"cat/broken.png: .* not an image file Pillow can read"):
        load_dataset(str(root), model)
    data = load_dataset(str(root), model, skip_invalid=True)
    assert len(data.examples) == 6 and len(data.skipped) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="has no class folders"):
        load_dataset(str(empty), model)


# ------------------------------------------------------------------ CSV
def test_csv_paths_labels_and_boxes(tmp_path):
    _png(tmp_path / "img" / "a.png", 1)
    _png(tmp_path / "img" / "b.png", 2)
    absolute = _png(tmp_path / "elsewhere" / "c.png", 3)
    path = _csv(tmp_path / "data.csv", ["path,label,box", "img/a.png,cat,1 2 11 12", 'img/b.png,2,"0,0,30,20"', "",
                                        f"{absolute},Dog,", "img/a.png,,"])
    data = load_dataset(str(path), tiny_classifier(), skip_invalid=True)
    assert [e.id for e in data.examples] == ["img/a.png", "img/b.png", str(absolute)]  # line 6 repeats the id img/a.png
    assert data.skipped == ["line 6: id 'img/a.png' repeats line 2"]
    assert [e.label for e in data.examples] == [0, 2, 1]
    assert [e.box for e in data.examples] == [(1, 2, 11, 12), (0, 0, 30, 20), None]
    assert [e.line for e in data.examples] == [2, 3, 5]
    assert data.examples[0].input == str((tmp_path / "img" / "a.png").resolve()) and data.reference == "boxes"
    with_ids = _csv(tmp_path / "ids.csv", ["id,path", "first,img/a.png", "second,img/a.png"])
    assert [e.id for e in load_dataset(str(with_ids), tiny_classifier()).examples] == ["first", "second"]


def test_csv_errors_name_their_lines(tmp_path):
    model = tiny_classifier()
    _png(tmp_path / "a.png", 1)
    path = _csv(tmp_path / "bad.csv", [
        "path,label,box",
        "missing.png,cat,",
        "a.png,kat,",
        "a.png,7,",
        "a.png,cat,1 2 3",
        "a.png,cat,0 0 31 10",
        '"a.png",cat,"0 0\n5 5",extra',
    ])
    with pytest.raises(DatasetError) as caught:
        load_dataset(str(path), model)
    message = str(caught.value)
    assert "6 invalid lines" in message and "\n" not in message
    for expected in ("line 2: no image file at", "line 3: label 'kat' is not a class of the model (did you mean 'cat'?)",
                     "line 4: class index 7 is out of range: the model has 3 classes", "line 5: box '1 2 3' has 3 numbers"):
        assert expected in message
    assert "... (1 more)" in message  # five listed, as for JSONL
    skipped = _csv(tmp_path / "mixed.csv", ["path,label,box", "a.png,cat,0 0 31 10", '"a.png",cat,"0 0\n5 5",extra', "a.png,cat,"])
    with pytest.raises(DatasetError) as caught:
        load_dataset(str(skipped), model)
    assert "line 2: box (0, 0, 31, 10) is empty or not inside the 30x20 image" in str(caught.value)
    assert "line 3: 4 fields, more than the header's 3" in str(caught.value)  # a quoted field spans lines 3 and 4
    assert [e.line for e in load_dataset(str(skipped), model, skip_invalid=True).examples] == [5]
    for header, pattern in (("path,lable", "unknown column 'lable' .did you mean 'label'.."),
                            ("file,label", "header with a 'path' column")):
        with pytest.raises(DatasetError, match=pattern):
            load_dataset(str(_csv(tmp_path / "h.csv", [header, "a.png,cat"])), model)


def test_label_and_box_parsing():
    labels = ["tench", "Egyptian cat", "crane (machine)"]
    assert [label_index(x, labels) for x in ("tench", "egyptian_cat", "Egyptian  Cat", "2")] == [0, 1, 1, 2]
    assert parse_box(" 1, 2 ,3 4 ") == (1, 2, 3, 4) and parse_box("") is None and parse_box("0.5 1 2.5 3") == (0.5, 1, 2.5, 3)
    with pytest.raises(ValueError, match="not four numbers"):
        parse_box("a b c d")


# ------------------------------------------------------------------ the runner
def _grid_pixels_in(box, size, grid):
    """Grid pixels of a model that stretches the whole image onto ``grid`` x ``grid`` (no crop)
    whose centre, mapped back to the original image, lies in ``box`` (the pointing game's region)."""
    (left, top, right, bottom), (width, height) = box, size
    x = (np.arange(grid) + 0.5) * width / grid
    y = (np.arange(grid) + 0.5) * height / grid
    return int(np.sum((x >= left) & (x < right)) * np.sum((y >= top) & (y < bottom)))


def test_boxes_reach_box_metrics_and_are_stored(tmp_path):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2)
    data = _csv(tmp_path / "d.csv", ["path,label,box", "a.png,cat,3 4 13 14", "b.png,dog,"])
    store = Store(tmp_path / "r.db")
    outcome = run_evaluation(_config(data, ["pointing_game"]), store, model=tiny_classifier(), progress=False,
                             log=lambda _: None)
    rows = {r["example_id"]: r for r in store.results(outcome.run_id)}
    # the 30 x 20 image is stretched onto the 16 x 16 grid: 5 columns x 8 rows have their centre in the box
    assert rows["a.png"]["value"] in (0.0, 1.0) and rows["a.png"]["details"]["region_pixels"] == 40 == _grid_pixels_in(
        (3, 4, 13, 14), (30, 20), 16)
    assert rows["b.png"]["value"] is None and "example b.png: pointing_game needs a box" in rows["b.png"]["error"]
    examples = {e["example_id"]: e for e in store.examples(outcome.run_id)}
    assert examples["a.png"]["input"] == str((tmp_path / "a.png").resolve()) and examples["a.png"]["box"] == [3, 4, 13, 14]
    assert examples["b.png"]["box"] is None and examples["b.png"]["label"] == 1
    stored = salience.Explanation.from_json(store.explanations(outcome.run_id)[0]["explanation"])
    assert stored.kind == "image" and stored.method == "saliency"


def test_box_metric_on_a_dataset_without_boxes_stops_before_work(tmp_path, fake_fashion_mnist):
    store = Store(tmp_path / "r.db")
    with pytest.raises(EvaluationError, match="metric pointing_game needs a box around the object, and dataset fashion-mnist has none"):
        run_evaluation(_config("fashion-mnist", ["pointing_game"]), store, model=tiny_classifier(), progress=False)
    with pytest.raises(EvaluationError, match="metric token_f1 needs a rationale .* rationales are marked words of texts"):
        run_evaluation(_config("imagenet-photos", ["token_f1"]), store, model=tiny_classifier(), progress=False)
    with pytest.raises(salience.errors.ParameterError, match="the box comes from the dataset"):
        parse_metric_spec("pointing_game:box=[1,2,3,4]")
    assert store.runs() == []


def test_arrays_are_stored_by_reference_and_runs_resume(tmp_path, fake_fashion_mnist):
    """fashion-mnist (arrays): the database holds "fashion-mnist:test:i", never pixels; a second run
    computes nothing, a larger limit only the new examples."""
    store = Store(tmp_path / "r.db")
    config = _config("fashion-mnist", ["sparseness"], methods=("saliency", "input_x_gradient"))
    model = tiny_classifier()
    first = run_evaluation(config, store, model=model, limit=2, progress=False, log=lambda _: None)
    assert all(r["value"] is not None for r in store.results(first.run_id))
    assert (first.computed, first.reused) == (4, 0)
    assert [e["input"] for e in store.examples(first.run_id)] == ["fashion-mnist:test:0", "fashion-mnist:test:1"]
    raw = sqlite3.connect(tmp_path / "r.db").execute("SELECT input FROM examples").fetchall()
    assert all(len(json.loads(r[0])) < 40 for r in raw)  # references, not 784 pixel values
    again = run_evaluation(config, store, model=model, limit=2, progress=False, log=lambda _: None)
    assert (again.run_id, again.created, again.computed, again.reused) == (first.run_id, False, 0, 4)
    more = run_evaluation(config, store, model=model, limit=3, progress=False, log=lambda _: None)
    assert (more.run_id, more.computed, more.reused) == (first.run_id, 2, 4)


def test_version_1_database_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, name TEXT, status TEXT NOT NULL, model TEXT NOT NULL,
            dataset TEXT NOT NULL, config TEXT NOT NULL, versions TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
        CREATE TABLE examples (run_id TEXT NOT NULL REFERENCES runs(run_id), example_id TEXT NOT NULL,
            position INTEGER NOT NULL, input TEXT NOT NULL, label TEXT, rationale TEXT, PRIMARY KEY (run_id, example_id));
        INSERT INTO runs VALUES ('r1', NULL, 'complete', 'm', 'd', '{}', '{}', 0, 0);
        INSERT INTO examples VALUES ('r1', 'e1', 0, '"good film"', '1', '[0, 1]');
    """)
    conn.close()
    with Store(path) as store:
        assert store.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION) == "2"
        assert store.examples("r1") == [{"run_id": "r1", "example_id": "e1", "position": 0, "input": "good film", "label": 1,
                                         "rationale": [0, 1], "box": None}]
    with Store(path) as store:  # opening again changes nothing
        assert len(store.examples("r1")) == 1


# ------------------------------------------------------------------ end to end (the real zoo model)
def test_evaluate_command_on_imagenet_photos(tmp_path, capsys):
    """`salience evaluate` with zoo:efficientnet-lite0 on the first two photos: saliency (one
    gradient each), the pointing game (needs the box) and deletion on a 10-step curve; a rerun
    computes nothing."""
    argv = ["evaluate", "--model", "zoo:efficientnet-lite0", "--dataset", "imagenet-photos", "--method", "saliency",
            "--metric", "pointing_game", "--metric", "deletion_auc:max_steps=10", "--limit", "2",
            "--db", str(tmp_path / "r.db"), "--out", str(tmp_path / "out"), "--no-progress", "--no-color"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "new run" in captured.err and "2 units computed, 0 already stored (2 examples of imagenet-photos" in captured.err
    assert "pointing_game ↑" in captured.out and "deletion_auc:max_steps=10 ↓" in captured.out
    assert main(argv) == 0
    assert "resumed run" in (err := capsys.readouterr().err) and "0 units computed, 2 already stored" in err
    photos = {p.id: p for p in load_photos()}
    with Store(tmp_path / "r.db") as store:
        run = store.runs()[0]
        rows = {(r["example_id"], r["metric"]): r for r in store.results(run.run_id)}
        assert len(rows) == 4 and all(r["value"] is not None for r in rows.values())
        for name in ("coffee", "chelsea"):
            # EfficientNet-Lite0 stretches the whole photo onto 224 x 224: the box's region there
            pointing = rows[(name, "pointing_game")]
            assert pointing["details"]["region_pixels"] == _grid_pixels_in(photos[name].box, photos[name].size, 224)
            assert pointing["value"] in (0.0, 1.0) and 0.0 <= rows[(name, "deletion_auc:max_steps=10")]["value"] <= 1.0
        assert run.config["identity"]["model"].startswith("zoo:efficientnet-lite0/sha256-")
        examples = store.examples(run.run_id)
        assert [e["input"] for e in examples] == ["imagenet-photos:coffee", "imagenet-photos:chelsea"]
        assert [e["box"] for e in examples] == [list(photos["coffee"].box), list(photos["chelsea"].box)]


def test_method_specs_carry_the_level_and_feature_options(tmp_path):
    _png(tmp_path / "a.png", 1)
    data = _csv(tmp_path / "d.csv", ["path,label", "a.png,cat"])
    spec = parse_method_spec("occlusion:level=superpixel,n_segments=6")
    assert spec.params == {"level": "superpixel", "n_segments": 6}
    with pytest.raises(ParameterError, match="n_segmnts"):
        parse_method_spec("occlusion:n_segmnts=6")  # misspelt: neither the method's nor any adapter's
    store = Store(tmp_path / "r.db")
    outcome = run_evaluation(_config(data, ["sparseness"], methods=("occlusion:level=superpixel,n_segments=6",)),
                             store, model=tiny_classifier(), progress=False, log=lambda _: None)
    stored = salience.Explanation.from_json(store.explanations(outcome.run_id)[0]["explanation"])
    direct = salience.explain(tiny_classifier(), str((tmp_path / "a.png").resolve()), method="occlusion",
                              level="superpixel", n_segments=6, output="probability")
    assert stored.level == "superpixel" and stored.params["n_segments"] == 6
    np.testing.assert_allclose(stored.scores, direct.scores, rtol=0, atol=1e-12)
    # an option of another kind of model is refused with one error, not recorded example by example
    with pytest.raises(ParameterError, match="spans"):
        run_evaluation(_config(data, ["sparseness"], methods=("occlusion:spans=1",)), Store(tmp_path / "s.db"),
                       model=tiny_classifier(), progress=False, log=lambda _: None)
