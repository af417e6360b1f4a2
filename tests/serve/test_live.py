"""The live explain page: a typed text (XSS payload included) is explained by each chosen method
and rendered escaped, nothing is written, bad forms give 400 and cross-site posts 403, the model
runs one request at a time (a queue of one), a full queue gives 503 and the time limit 504.
Image uploads and --record: test_live_upload.py."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from servekit import build_text_db
from starlette.testclient import TestClient

import salience
from salience.cli import main
from salience.serve import create_app
from salience.serve.live import MAX_TEXT, MAX_WAITING, LiveModel, LiveOutcome, LiveResult

PAYLOAD = '<script>alert("typed")</script><img src=x onerror=alert(3)>'


@pytest.fixture(scope="module")
def text_db(toy_dir, tmp_path_factory):
    return build_text_db(tmp_path_factory.mktemp("live"), toy_dir)


@pytest.fixture(scope="module")
def live(toy_dir):
    model = LiveModel("toy", model=salience.load_model(str(toy_dir)), time_limit=30)
    yield model
    model.close()


def _client(database, live):
    return TestClient(create_app(database, live=live), base_url="http://127.0.0.1", raise_server_exceptions=False)


def test_typed_text_is_explained_and_escaped_and_nothing_is_written(text_db, live):
    before = hashlib.sha256(text_db[0].read_bytes()).hexdigest()
    client = _client(text_db[0], live)
    form = client.get("/explain")
    assert form.status_code == 200 and 'name="text"' in form.text and 'href="/explain"' in form.text
    page = client.post("/explain", data={"text": f"{PAYLOAD} the film was good", "method": ["occlusion", "saliency"]})
    assert page.status_code == 200
    assert page.text.count('class="explanation"') == 2 and "<h3>occlusion</h3>" in page.text and "<h3>saliency</h3>" in page.text
    assert "<script" not in page.text.lower() and "<img src=x" not in page.text
    assert "&lt;script&gt;alert(&#34;typed&#34;)&lt;/script&gt;" in page.text  # in the form, as text
    direct = salience.explain(live.model, f"{PAYLOAD} the film was good", method="occlusion")
    assert f"{direct.cost.forward_passes} fwd" in page.text  # the cost line of the same explanation
    assert hashlib.sha256(text_db[0].read_bytes()).hexdigest() == before


@pytest.mark.parametrize(("data", "message"), [
    ({"text": "", "method": ["occlusion"]}, "type a text"),
    ({"text": "good", "method": []}, "pick at least one method"),
    ({"text": "good", "method": ["bogus"]}, "unknown method"),
    ({"text": "x" * (MAX_TEXT + 1), "method": ["occlusion"]}, "at most"),
    ({"text": "good", "method": ["occlusion"], **{f"f{i}": "1" for i in range(20)}}, "cannot be read"),
])
def test_bad_forms_give_400(text_db, live, data, message):
    page = _client(text_db[0], live).post("/explain", data=data)
    assert page.status_code == 400 and message in page.text and "Traceback" not in page.text


def test_cross_site_post_is_refused_and_no_model_no_page(text_db, live):
    page = _client(text_db[0], live).post("/explain", data={"text": "good", "method": ["occlusion"]},
                                          headers={"origin": "http://attacker.example"})
    assert page.status_code == 403
    assert _client(text_db[0], None).get("/explain").status_code == 404
    assert _client(text_db[0], None).post("/explain", data={"text": "good", "method": ["occlusion"]}).status_code == 404


class SlowModel(LiveModel):
    """A live model whose computation sleeps and records how many ran at once."""

    def __init__(self, seconds: float, time_limit: float) -> None:
        super().__init__("slow", model=object(), time_limit=time_limit)
        self.seconds = seconds
        self.running = 0
        self.most = 0
        self.guard = threading.Lock()

    def _compute(self, text, methods):
        with self.guard:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self.guard:
            self.running -= 1
        return LiveOutcome([LiveResult(m, f"<div>{len(text)}</div>", self.seconds) for m in methods])


def test_one_computation_at_a_time_and_a_full_queue_is_503(text_db):
    slow = SlowModel(0.3, time_limit=10)
    slow.methods = lambda: ["occlusion"]  # type: ignore[method-assign]
    client = _client(text_db[0], slow)
    n = MAX_WAITING + 4
    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(lambda _: client.post("/explain", data={"text": "good", "method": ["occlusion"]}).status_code,
                                 range(n)))
    assert slow.most == 1  # never two computations at once
    # one running + MAX_WAITING queued are admitted; the rest, arriving while they wait, get 503 at once
    assert set(statuses) <= {200, 503} and statuses.count(200) >= MAX_WAITING + 1 and 503 in statuses
    slow.close()


def test_time_limit_gives_504(text_db):
    slow = SlowModel(0.5, time_limit=0.05)
    slow.methods = lambda: ["occlusion"]  # type: ignore[method-assign]
    page = _client(text_db[0], slow).post("/explain", data={"text": "good", "method": ["occlusion"]})
    assert page.status_code == 504 and "0.05 s limit" in page.text
    slow.close()


def test_the_cli_serves_a_live_model(text_db, toy_dir, monkeypatch, capsys):
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    assert main(["serve", "--db", str(text_db[0]), "--model", str(toy_dir), "--time-limit", "5"]) == 0
    assert "live explanations of" in capsys.readouterr().err
    form = TestClient(apps[-1], base_url="http://127.0.0.1").get("/explain")
    assert form.status_code == 200 and "waits at most 5 s" in form.text
    assert main(["serve", "--db", str(text_db[0]), "--model", str(toy_dir), "--time-limit", "0"]) == 2
