"""The viewer's security and reliability: stored texts are escaped (an XSS payload in a dataset's
text and id renders as text), bad path and query parameters give 400/404 pages and never a 500,
the database is opened read-only while a writer keeps working, no page carries a script, the Host
header is checked, a non-loopback bind warns, and the report file is self-contained."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from html.parser import HTMLParser

import pytest
from servekit import TEXT_METHODS, XSS, XSS_ID, build_text_db
from starlette.testclient import TestClient

from salience.cli import main
from salience.evaluate.store import Store
from salience.serve import commands as serve_commands
from salience.serve import create_app
from salience.serve.database import ReadOnlyStore
from salience.serve.report import report_html


@pytest.fixture(scope="module")
def text_db(toy_dir, tmp_path_factory):
    """(database, run id) of a complete toy-classifier run (see servekit.build_text_db)."""
    return build_text_db(tmp_path_factory.mktemp("viewer"), toy_dir)


@pytest.fixture(scope="module")
def client(text_db):
    return TestClient(create_app(text_db[0]), base_url="http://127.0.0.1", raise_server_exceptions=False)


def _pages(run_id: str) -> list[str]:
    return ["/", f"/runs/{run_id}", f"/runs/{run_id}/examples", f"/runs/{run_id}/examples?per=50",
            f"/runs/{run_id}/example?id=%3Cb+onmouseover%3Dalert%282%29%3Eex-xss%3C%2Fb%3E",
            f"/runs/{run_id}/examples?label=%3Cscript%3E"]


def test_xss_payload_renders_as_text(client, text_db):
    run_id = text_db[1]
    for path in _pages(run_id):
        page = client.get(path)
        assert page.status_code == 200, path
        assert "<script" not in page.text.lower() and "onerror=" not in page.text.replace("onerror=alert(1)&gt;", "")
        assert "<b onmouseover" not in page.text and "<img src=x" not in page.text
    shown = client.get(f"/runs/{run_id}/examples").text
    assert "&lt;script&gt;alert(&#34;xss&#34;)&lt;/script&gt;" in shown  # the payload as text, in the input line
    assert "&lt;b onmouseover=alert(2)&gt;ex-xss&lt;/b&gt;" in shown  # and the id
    assert XSS not in shown and XSS_ID not in shown


def test_no_script_and_a_strict_content_security_policy(client, text_db):
    page = client.get(f"/runs/{text_db[1]}/examples")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy  # scripts fall back to 'none'
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)  # nothing loaded from elsewhere (no CDN)


@pytest.mark.parametrize(("path", "status"), [
    ("/runs/nope", 404),
    ("/runs/%3Cscript%3Ealert(1)%3C%2Fscript%3E", 404),
    ("/runs/..%2F..%2Fetc%2Fpasswd", 404),
    ("/runs/{run}x", 404),
    ("/runs/{run}/examples?page=0", 400),
    ("/runs/{run}/examples?page=-1", 400),
    ("/runs/{run}/examples?page=abc", 400),
    ("/runs/{run}/examples?page=99999999999999999999", 400),
    ("/runs/{run}/examples?page=99", 404),
    ("/runs/{run}/examples?per=0", 400),
    ("/runs/{run}/examples?per=100000", 400),
    ("/runs/{run}/examples?sort=__class__", 400),
    ("/runs/{run}/examples?order=sideways", 400),
    ("/runs/{run}/examples?correct=maybe", 400),
    ("/runs/{run}/examples?show=occlusion,bogus", 400),
    ("/runs/{run}/examples?sort=value&method=bogus&metric=comprehensiveness", 400),
    ("/runs/{run}/examples?sort=value&method=occlusion&metric=bogus", 400),
    ("/runs/{run}/examples?sort=value", 400),
    ("/runs/{run}/examples?low=nan&method=occlusion&metric=comprehensiveness", 400),
    ("/runs/{run}/examples?high=1e999&method=occlusion&metric=comprehensiveness", 400),
    ("/runs/{run}?sort=bogus", 400),
    ("/runs/{run}?order=up", 400),
    ("/runs/{run}/example?id=missing", 404),
    ("/runs/{run}/example", 404),
    ("/no/such/page", 404),
])
def test_bad_parameters_give_400_or_404_pages(client, text_db, path, status):
    page = client.get(path.format(run=text_db[1]))
    assert page.status_code == status
    assert "Traceback" not in page.text and 'class="error"' in page.text
    assert "<script" not in page.text.lower()


def test_unknown_host_is_refused(text_db):
    page = TestClient(create_app(text_db[0]), base_url="http://attacker.example").get("/")
    assert page.status_code == 400


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_database_is_read_only_and_a_writer_keeps_working(text_db, tmp_path):
    copy = tmp_path / "live.db"
    copy.write_bytes(text_db[0].read_bytes())
    reader = ReadOnlyStore(copy)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.conn.execute("DELETE FROM results")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.set_status(text_db[1], "complete")  # the inherited writing methods fail too
    before = _digest(copy)
    client = TestClient(create_app(copy), base_url="http://127.0.0.1", raise_server_exceptions=False)
    for path in _pages(text_db[1]):
        assert client.get(path).status_code == 200
    assert _digest(copy) == before  # the pages wrote nothing into the database file
    with Store(copy) as writer:  # an evaluation writing while the viewer reads (WAL)
        writer.conn.execute("BEGIN IMMEDIATE")
        writer.conn.execute("INSERT INTO runs VALUES ('feedbeef', 'new', 'running', 'm', 'd', '{}', '{}', 1, 2)")
        assert client.get("/").status_code == 200  # a reader is not blocked by the open write transaction
        assert "feedbeef" not in client.get("/").text  # and sees only committed rows
        writer.conn.execute("COMMIT")
        assert "feedbeef" in client.get("/").text
        writer.set_status("feedbeef", "complete")  # the writer still writes while the viewer holds connections
    assert reader.conn.execute("SELECT status FROM runs WHERE run_id = 'feedbeef'").fetchone()[0] == "complete"
    reader.close()


def test_not_a_database_is_one_line(tmp_path, capsys):
    bogus = tmp_path / "bogus.db"
    bogus.write_text("not sqlite")
    assert main(["report", "x", "--db", str(bogus), "--out", str(tmp_path / "r.html")]) == 2
    assert main(["report", "x", "--db", str(tmp_path / "missing.db"), "--out", str(tmp_path / "r.html")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert not (tmp_path / "r.html").exists()


def test_report_is_one_self_contained_file(text_db, tmp_path, capsys):
    path, run_id = text_db
    out = tmp_path / "out" / "report.html"
    assert main(["report", run_id[:6], "--db", str(path), "--out", str(out), "--sort", "comprehensiveness"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    report = out.read_text(encoding="utf-8")
    assert _unstamped(report) == _unstamped(report_html(path, run_id, sort="comprehensiveness"))
    assert "<table" in report and report.count("<polyline") == len(TEXT_METHODS)
    assert _references(report) == [] and _references('<a href="/">') == ["a href=/"]  # no link, resource or form
    assert "http://" not in report and "https://" not in report and "<script" not in report.lower()
    assert main(["report", "nope", "--db", str(path), "--out", str(tmp_path / "x.html")]) == 2


class _Attributes(HTMLParser):
    """Collects every src, href, action and xlink:href attribute of the document's tags."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [f"{tag} {name}={value}" for name, value in attrs if name in ("src", "href", "action", "xlink:href")]


def _references(document: str) -> list[str]:
    parser = _Attributes()
    parser.feed(document)
    return parser.found


def _unstamped(report: str) -> str:
    """The report without its 'written on' time (two renderings may fall in different minutes)."""
    return re.sub(r"on \d{4}-\d\d-\d\d \d\d:\d\d\.</p>", "", report)


def test_serve_binds_loopback_and_warns_otherwise(text_db, monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append(options))
    assert main(["serve", "--db", str(text_db[0])]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8765
    assert "warning" not in capsys.readouterr().err
    assert main(["serve", "--db", str(text_db[0]), "--host", "0.0.0.0", "--port", "9000"]) == 0
    assert calls[-1]["host"] == "0.0.0.0" and "warning: binding 0.0.0.0" in capsys.readouterr().err
    assert [serve_commands.is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "0.0.0.0",
                                                    "192.168.1.2", "example.org")] == [True] * 5 + [False] * 3
    assert main(["serve", "--db", str(text_db[0]), "--port", "70000"]) == 2
