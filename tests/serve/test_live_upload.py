"""The live page's image upload (the tiny CNN) and ``--record``: an uploaded picture is explained
and drawn on the server (PNG data URIs), a file that is not an image, too large or malformed forms
give 400 with one line; without --record the database is never opened read-write and does not
change, with it each request becomes one example of the day's live run (and only the record path
opens the database read-write)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from servekit import build_text_db
from starlette.testclient import TestClient

import salience
import salience.evaluate.store as store_module
import salience.serve.upload as upload_module
from salience.cli import main
from salience.core.explanation import decode_array
from salience.serve import create_app
from salience.serve.database import ReadOnlyStore
from salience.serve.live import LiveModel
from salience.serve.record import Recorder, run_identity
from salience.serve.upload import MAX_UPLOAD, decode_image
from tiny_cnn import photo, tiny_classifier

TYPED = '<script>alert("rec")</script> the film was good'


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def text_db(toy_dir, tmp_path_factory):
    return build_text_db(tmp_path_factory.mktemp("upload"), toy_dir)


@pytest.fixture(scope="module")
def cnn():
    model = LiveModel("tiny-cnn", model=tiny_classifier(), time_limit=60)
    yield model
    model.close()


def _client(database, live):
    return TestClient(create_app(database, live=live), base_url="http://127.0.0.1", raise_server_exceptions=False)


@pytest.fixture()
def writes(monkeypatch):
    """Counts read-write opens of any results database (ReadOnlyStore does not call Store.__init__)."""
    opened = []
    original = store_module.Store.__init__

    def counting(self, path):
        opened.append(path)
        original(self, path)

    monkeypatch.setattr(store_module.Store, "__init__", counting)
    return opened


def test_uploaded_image_is_explained_and_drawn_on_the_server(text_db, cnn, writes):
    before = hashlib.sha256(text_db[0].read_bytes()).hexdigest()
    client = _client(text_db[0], cnn)
    form = client.get("/explain")
    assert 'enctype="multipart/form-data"' in form.text and 'type="file" name="image"' in form.text
    pixels = photo(seed=3)
    page = client.post("/explain", files={"image": ("<b>cat</b>.png", _png(pixels), "image/png")},
                       data={"method": ["saliency", "occlusion"]})
    assert page.status_code == 200, page.text[-400:]
    overlays = re.findall(r'<img class="overlay"[^>]*src="data:image/png;base64,([^"]+)"', page.text)
    assert len(overlays) == 2 and "<h3>saliency</h3>" in page.text and "<h3>occlusion</h3>" in page.text
    for data in overlays:  # each decodes to a picture that is not one colour
        drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("L"), dtype=float)
        assert drawn.shape[0] > 50 and drawn.std() > 5
    assert "&lt;b&gt;cat&lt;/b&gt;.png" in page.text and "<b>cat</b>" not in page.text  # the file name, escaped
    for method in ("saliency", "occlusion"):  # the cost line of the same explanation of the same pixels
        direct = salience.explain(cnn.model, pixels, method=method)
        assert f"{direct.cost.forward_passes} fwd" in page.text
    assert writes == [] and hashlib.sha256(text_db[0].read_bytes()).hexdigest() == before


def test_decoded_pixels_are_the_uploaded_ones():
    pixels = photo(seed=5)
    assert np.array_equal(decode_image(_png(pixels)), pixels)  # PNG is lossless
    grey = np.asarray(Image.fromarray(pixels).convert("L"))
    assert decode_image(_png(grey)).shape == (*grey.shape, 3)  # converted to RGB


def test_binary_files_survive_the_form_parser():
    from salience.serve.upload import parse_upload

    buffer = io.BytesIO()
    Image.fromarray(photo(60, 80, seed=2)).save(buffer, format="JPEG", quality=70)  # binary with CR / LF bytes inside
    jpeg = buffer.getvalue()
    assert b"\r" in jpeg or b"\n" in jpeg
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1/explain", files={"image": ("a.jpg", jpeg, "image/jpeg")},
                            data={"method": ["saliency", "occlusion"]})
    pixels, methods, name = parse_upload(request.read(), request.headers["content-type"], ["saliency", "occlusion"], 4)
    assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))  # the same bytes decoded
    assert methods == ["saliency", "occlusion"] and name == "a.jpg"


def _truncated_png() -> bytes:
    data = _png(photo())
    return data[: len(data) // 2]


@pytest.mark.parametrize(("files", "data", "message"), [
    ({"image": ("cat.png", b"this is not an image, only text", "image/png")}, {"method": ["saliency"]},
     "not an image Pillow can read"),
    ({"image": ("cat.png", _truncated_png(), "image/png")}, {"method": ["saliency"]}, "broken image"),
    ({"image": ("big.png", b"\x89PNG" + b"0" * (MAX_UPLOAD + 10), "image/png")}, {"method": ["saliency"]}, "at most 5 MB"),
    ({"image": ("big.png", b"\x89PNG" + b"0" * (6 * 1024 * 1024), "image/png")}, {"method": ["saliency"]},
     "upload is larger than 5 MB"),  # the server stops reading the body
    ({"image": ("cat.png", b"", "image/png")}, {"method": ["saliency"]}, "choose one image"),
    ({"other": ("cat.png", _png(photo()), "image/png")}, {"method": ["saliency"]}, "choose one image"),
    ({"image": ("cat.png", _png(photo()), "image/png")}, {}, "pick at least one method"),
    ({"image": ("cat.png", _png(photo()), "image/png")}, {"method": ["<script>x</script>"]}, "unknown method"),
    (None, {"text": "good", "method": ["saliency"]}, "multipart/form-data"),
])
def test_bad_uploads_give_400(text_db, cnn, files, data, message):
    page = _client(text_db[0], cnn).post("/explain", files=files, data=data)
    assert page.status_code == 400 and message in page.text and "Traceback" not in page.text
    assert "<script>x" not in page.text
    assert len(re.findall(r'<p class="error">', page.text)) == 1


def test_too_many_pixels_is_refused_before_decoding(monkeypatch, text_db, cnn):
    monkeypatch.setattr(upload_module, "MAX_PIXELS", 100)
    page = _client(text_db[0], cnn).post("/explain", files={"image": ("cat.png", _png(photo()), "image/png")},
                                         data={"method": ["saliency"]})
    assert page.status_code == 400 and "30 x 20 pixels; the live page takes at most 100 pixels" in page.text  # width x height


def test_record_writes_each_request_to_the_live_run(text_db, toy_dir, tmp_path, writes):
    database = tmp_path / "runs.db"
    shutil.copy(text_db[0], database)
    model = salience.load_model(str(toy_dir))
    live = LiveModel("toy", model=model, time_limit=60)
    live.record = Recorder(database, "toy", live.kind, live.methods())
    client = _client(database, live)
    pages = [client.post("/explain", data={"text": text, "method": ["occlusion", "saliency"]})
             for text in (TYPED, "a dull plot")]
    live.close()
    run_id, name = run_identity("toy", datetime.date.today())
    assert name == f"live-{datetime.date.today().isoformat()}"
    for number, page in enumerate(pages):
        assert page.status_code == 200 and f"recorded as example live{number} of run {name}" in page.text
    assert len(writes) == 2  # one read-write open per recorded request, none for the pages
    with ReadOnlyStore(database) as store:
        info = store.run(run_id)
        assert (info.name, info.status, info.examples, info.units) == (name, "complete", 2, 4)
        examples = store.examples(run_id)
        assert [e["input"] for e in examples] == [TYPED, "a dull plot"]
        stored = {(r["example_id"], r["method"]): r for r in store.explanations(run_id)}
    for method in ("occlusion", "saliency"):  # the stored scores are those of the same explanation made directly
        direct = salience.explain(model, TYPED, method=method)
        scores = decode_array(json.loads(stored[("live0", method)]["explanation"])["scores"])
        np.testing.assert_allclose(scores, direct.scores, rtol=0, atol=1e-12)  # same float64 computation; atol for reordering
        assert stored[("live0", method)]["forward_passes"] == direct.cost.forward_passes
    browser = _client(database, None).get(f"/runs/{run_id}/examples")
    assert browser.status_code == 200 and "<script>alert" not in browser.text and browser.text.count("<h3>occlusion</h3>") == 2


def test_recorded_upload_is_stored_by_reference(text_db, tmp_path):
    database = tmp_path / "runs.db"
    shutil.copy(text_db[0], database)
    live = LiveModel("tiny-cnn", model=tiny_classifier(), time_limit=60)
    live.record = Recorder(database, "tiny-cnn", live.kind, live.methods())
    pixels = photo(seed=1)
    page = _client(database, live).post("/explain", files={"image": ("cat.png", _png(pixels), "image/png")},
                                        data={"method": ["saliency"]})
    live.close()
    assert page.status_code == 200 and "recorded as example live0" in page.text
    run_id = run_identity("tiny-cnn", datetime.date.today())[0]
    with ReadOnlyStore(database) as store:
        stored = store.examples(run_id)[0]["input"]
    assert stored == "upload:" + hashlib.sha256(pixels.tobytes()).hexdigest()[:16]
    shown = _client(database, None).get(f"/runs/{run_id}/example", params={"id": "live0"})
    assert shown.status_code == 200 and shown.text.count('class="explanation') >= 1 and 'class="failed"' not in shown.text


def test_a_record_that_fails_is_said_not_raised(text_db, toy_dir, tmp_path):
    live = LiveModel("toy", model=salience.load_model(str(toy_dir)), time_limit=60)
    (tmp_path / "not-a-db").write_text("plain text, not SQLite")
    live.record = Recorder(tmp_path / "not-a-db", "toy", live.kind, live.methods())
    page = _client(text_db[0], live).post("/explain", data={"text": "good", "method": ["occlusion"]})
    live.close()
    assert page.status_code == 200 and "not recorded: cannot use" in page.text and page.text.count('class="explanation"') == 1


def test_cli_record_flag(text_db, toy_dir, monkeypatch, capsys):
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    assert main(["serve", "--db", str(text_db[0]), "--record"]) == 2
    assert "--record stores live explanations: it needs --model" in capsys.readouterr().err
    assert main(["serve", "--db", str(text_db[0]), "--model", str(toy_dir), "--record"]) == 0
    assert "(recorded)" in capsys.readouterr().err
    form = TestClient(apps[-1], base_url="http://127.0.0.1").get("/explain")
    assert "each explanation is recorded in the database" in form.text
