"""Scorer backends besides the offline default: Detoxify (optional package) and Perspective API (a fake
server on localhost answers like the API, with 429s), and their one-line errors."""

import json
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline import scoring
from pipeline.config import ConfigError, ScorerConfig


class FakePerspective(BaseHTTPRequestHandler):
    """Scores a text by its share of the letter x; answers 429 to the server's first n_429 requests."""

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.seen.append((time.monotonic(), self.path, body))
        if len(srv.seen) <= srv.n_slow:
            time.sleep(0.5)
        if len(srv.seen) <= srv.n_429:
            self.send_response(429)
            self.end_headers()
            return
        if srv.status != 200:
            self.send_response(srv.status)
            self.end_headers()
            return
        text = body["comment"]["text"]
        out = {"attributeScores": {"TOXICITY": {"summaryScore": {"value": text.count("x") / len(text), "type": "PROBABILITY"}}}}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakePerspective)
    srv.seen, srv.n_429, srv.n_slow, srv.status = [], 0, 0, 200
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def perspective(server, monkeypatch, **kw):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    return scoring.Perspective(url=f"http://127.0.0.1:{server.server_port}/analyze", **kw)


def test_perspective_scores_keyed_requests_at_the_rate_limit(server, monkeypatch):
    sc = perspective(server, monkeypatch, rate_limit=20.0)
    texts = ["xxab", "abcd", "", "x", "axbx"]
    assert sc.score(texts) == [0.5, 0.0, 0.0, 1.0, 0.5]
    assert len(server.seen) == 4  # the empty text is not sent
    assert all(path.endswith("?key=test-key") for _, path, _ in server.seen)
    assert [b["comment"]["text"] for _, _, b in server.seen] == ["xxab", "abcd", "x", "axbx"]
    gaps = [b[0] - a[0] for a, b in zip(server.seen, server.seen[1:])]
    assert min(gaps) >= 1 / 20 - 0.005
    assert scoring.label(sc) == "perspective==v1alpha1"


def test_perspective_retries_429_with_doubling_waits(server, monkeypatch):
    server.n_429 = 2
    sc = perspective(server, monkeypatch, rate_limit=1000.0, retry_wait=0.05, max_retries=3)
    assert sc.score(["xx"]) == [1.0]
    times = [t for t, _, _ in server.seen]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.05 - 0.005 and times[2] - times[1] >= 0.1 - 0.005


def test_perspective_gives_up_after_max_retries_in_one_line(server, monkeypatch):
    server.n_429 = 10
    sc = perspective(server, monkeypatch, rate_limit=1000.0, retry_wait=0.01, max_retries=2)
    with pytest.raises(ConfigError) as e:
        sc.score(["x"])
    assert "429 after 2 retries" in str(e.value) and "\n" not in str(e.value) and len(server.seen) == 3


def test_perspective_retries_a_request_that_times_out(server, monkeypatch):
    server.n_slow = 1
    sc = perspective(server, monkeypatch, rate_limit=1000.0, retry_wait=0.01, max_retries=2, timeout=0.2)
    assert sc.score(["xx"]) == [1.0] and len(server.seen) == 2
    server.seen, server.n_slow = [], 10
    with pytest.raises(ConfigError) as e:
        sc.score(["x"])
    assert "times out (0.2 s) after 2 retries" in str(e.value) and len(server.seen) == 3


def test_perspective_refused_key_is_not_retried(server, monkeypatch):
    server.status = 403
    sc = perspective(server, monkeypatch, rate_limit=1000.0, retry_wait=0.01)
    with pytest.raises(ConfigError, match="HTTP 403.*PERSPECTIVE_API_KEY"):
        sc.score(["x"])
    assert len(server.seen) == 1


def test_perspective_without_key_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(ConfigError) as e:
        scoring.get_scorer(ScorerConfig(backend="perspective"))
    assert "PERSPECTIVE_API_KEY" in str(e.value) and "\n" not in str(e.value)


def test_detoxify_batches_and_labels_with_its_version(monkeypatch):
    """The package is optional: a stand-in module with Detoxify's interface checks the wrapper."""
    calls = []

    class Model:
        def __init__(self, variant, device):
            calls.append(("init", variant, device))

        def predict(self, texts):
            calls.append(("predict", len(texts)))
            return {"toxicity": [len(t) / 10 for t in texts], "insult": [0.0] * len(texts)}

    monkeypatch.setitem(sys.modules, "detoxify", types.SimpleNamespace(Detoxify=Model))
    monkeypatch.setattr(scoring.importlib.metadata, "version", lambda name: {"detoxify": "0.5.2"}[name])
    sc = scoring.get_scorer(ScorerConfig(backend="detoxify", batch_size=2))
    assert sc.score(["a", "abc", "abcde"]) == [0.1, 0.3, 0.5]
    assert calls == [("init", "original", "cpu"), ("predict", 2), ("predict", 1)]
    assert scoring.label(sc) == "detoxify==0.5.2-original"


def test_detoxify_missing_package_or_checkpoint_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "detoxify", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="pip install detoxify"):
        scoring.get_scorer(ScorerConfig(backend="detoxify"))

    def offline(variant, device):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")

    monkeypatch.setitem(sys.modules, "detoxify", types.SimpleNamespace(Detoxify=offline))
    with pytest.raises(ConfigError) as e:
        scoring.get_scorer(ScorerConfig(backend="detoxify"))
    assert "Detoxify checkpoint could not be loaded" in str(e.value) and "\n" not in str(e.value)
