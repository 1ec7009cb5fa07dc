"""Scorer backends besides the offline default: Detoxify (optional package) and Perspective API (a fake
server on localhost answers like the API, with 429s), and their one-line errors."""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline import scoring
from pipeline.config import ConfigError, ScorerConfig, from_dict


class FakePerspective(BaseHTTPRequestHandler):
    """Scores each requested attribute of a text: TOXICITY by its share of the letter x, INSULT of the letter y,
    the others 0; answers 429 to the server's first n_429 requests and 403
    once it has scored n_ok texts; closes the connection unanswered on its first n_drop requests; sends
    `error` as the body of a refusal and `answer`, where set, in place of a score; takes `delay` seconds
    over each answer and counts the most requests it held at once."""

    def do_POST(self):
        srv = self.server
        with srv.lock:
            srv.in_flight += 1
            srv.most_in_flight = max(srv.most_in_flight, srv.in_flight)
        try:
            self.answer(srv)
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def answer(self, srv):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.seen.append((time.monotonic(), self.path, body))
        time.sleep(srv.delay)
        if len(srv.seen) <= srv.n_slow:
            time.sleep(1.5)
        if len(srv.seen) <= srv.n_drop:
            self.close_connection = True  # no status line: the client sees the connection end
            return
        if len(srv.seen) <= srv.n_429:
            self.send_response(429)
            self.end_headers()
            return
        with srv.lock:
            status = srv.status if len(srv.scored) < srv.n_ok else 403
            if status == 200:
                srv.scored.append(body["comment"]["text"])
        if status != 200:
            self.send_response(status)
            self.send_header("Content-Length", str(len(srv.error)))
            self.end_headers()
            self.wfile.write(srv.error)
            return
        text = body["comment"]["text"]
        planted = {"TOXICITY": text.count("x") / len(text), "INSULT": text.count("y") / len(text)}
        out = srv.answer or {"attributeScores": {attribute: {"summaryScore": {"value": planted.get(attribute, 0.0), "type": "PROBABILITY"}}
                                                 for attribute in body["requestedAttributes"]}}
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
    srv.seen, srv.scored, srv.n_429, srv.n_slow, srv.n_ok, srv.status, srv.delay = [], [], 0, 0, float("inf"), 200, 0.0
    srv.n_drop, srv.error, srv.answer = 0, b"", None
    srv.lock, srv.in_flight, srv.most_in_flight = threading.Lock(), 0, 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def perspective(server, monkeypatch, **kw):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    return scoring.Perspective(url=f"http://127.0.0.1:{server.server_port}/analyze", **kw)


def assert_spaced(starts: list[float], rate: float) -> None:
    """Any k consecutive intervals between the server's arrival times span at least k - 1 of them: an arrival
    may come up to one interval late on a loaded machine (a server thread waiting for a core), while
    requests sent unspaced, or at twice the rate, fall short over three intervals."""
    for i, a in enumerate(starts):
        for j in range(i + 1, len(starts)):
            assert starts[j] - a >= (j - i - 1) / rate, (i, j, starts)


def test_perspective_scores_keyed_requests_at_the_rate_limit(server, monkeypatch):
    sc = perspective(server, monkeypatch, rate_limit=20.0)
    texts = ["xxab", "abcd", "", "x", "axbx"]
    assert sc.score(texts) == [0.5, 0.0, 0.0, 1.0, 0.5]
    assert len(server.seen) == 4  # the empty text is not sent
    assert all(path.endswith("?key=test-key") for _, path, _ in server.seen)
    assert sorted(b["comment"]["text"] for _, _, b in server.seen) == ["abcd", "axbx", "x", "xxab"]
    assert_spaced(sorted(t for t, _, _ in server.seen), rate=20.0)
    assert scoring.label(sc) == "perspective==v1alpha1-max7"


def test_perspective_score_is_the_largest_of_the_papers_seven_attributes(server, monkeypatch):
    """The paper's code requests seven attributes and scores a text by the largest (Lee et al.'s
    metric_funcs.py): INSULT alone makes a text toxic here."""
    sc = perspective(server, monkeypatch, rate_limit=1000.0)
    assert sc.score(["yyab", "xyyy", "xxxy", "abcd"]) == [0.5, 0.75, 0.75, 0.0]
    assert all(set(b["requestedAttributes"]) == {"TOXICITY", "SEVERE_TOXICITY", "INSULT", "PROFANITY", "THREAT",
                                                  "IDENTITY_ATTACK", "SEXUALLY_EXPLICIT"} for *_, b in server.seen)


def test_perspective_overlaps_slow_answers_within_the_rate_limit(server, monkeypatch):
    """Answers slower than the spacing do not lower the rate: later requests start while earlier ones wait,
    starts stay spaced, and the scores come back in the texts' order."""
    server.delay = 0.3
    sc = perspective(server, monkeypatch, rate_limit=20.0)
    texts = ["x" * (i + 1) + "a" * (9 - i) for i in range(10)]
    assert sc.score(texts) == [(i + 1) / 10 for i in range(10)]
    assert server.most_in_flight > 1
    assert_spaced(sorted(t for t, _, _ in server.seen), rate=20.0)


def test_perspective_refused_key_stops_the_queue(server, monkeypatch):
    server.status, server.delay = 403, 0.05
    sc = perspective(server, monkeypatch, rate_limit=10.0)
    with pytest.raises(ConfigError, match="HTTP 403"):
        sc.score(["x" * (i + 1) for i in range(200)])
    assert len(server.seen) < 10  # the texts still queued were dropped, not sent to be refused one by one


def test_perspective_requests_each_distinct_text_once(server, monkeypatch):
    sc = perspective(server, monkeypatch, rate_limit=1000.0)
    assert sc.score(["xa", "bb", "xa", "", "bb", "xa"]) == [0.5, 0.0, 0.5, 0.0, 0.0, 0.5]
    assert sorted(server.scored) == ["bb", "xa"]
    assert sc.score(["xx", "xa"]) == [1.0, 0.5]  # a later call asks only for what is new
    assert sorted(server.scored) == ["bb", "xa", "xx"]


def test_perspective_run_that_failed_part_way_resumes_from_the_cache(server, monkeypatch, tmp_path):
    """Answers that arrived before a failure are kept in cache_dir; a new scorer (a rerun) asks only for the
    rest, past a cache line that the crash left unfinished, and gives what a run without failure gives."""
    texts = ["x" * i + "a" * (8 - i) for i in range(8)]
    server.n_ok, server.delay = 3, 0.02
    with pytest.raises(ConfigError, match="HTTP 403"):
        perspective(server, monkeypatch, rate_limit=1000.0, cache_dir=str(tmp_path / "cache")).score(texts)
    first = list(server.scored)
    assert len(first) == 3
    cache = tmp_path / "cache" / "perspective-v1alpha1-max7.jsonl"
    assert len(scoring.read_answers(cache)) == 3
    with open(cache, "a") as f:
        f.write('{"sha256": "')  # killed while writing
    server.scored, server.n_ok = [], float("inf")
    sc = perspective(server, monkeypatch, rate_limit=1000.0, cache_dir=str(tmp_path / "cache"))
    assert sc.score(texts) == [i / 8 for i in range(8)]
    assert sorted(server.scored) == sorted(set(texts) - set(first))
    assert sorted(scoring.read_answers(cache).values()) == [i / 8 for i in range(8)]
    server.scored = []
    assert perspective(server, monkeypatch, cache_dir=str(tmp_path / "cache")).score(texts[::-1]) == [i / 8 for i in range(8)][::-1]
    assert server.scored == []


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
    sc = perspective(server, monkeypatch, rate_limit=1000.0, retry_wait=0.01, max_retries=2, timeout=0.5)
    assert sc.score(["xx"]) == [1.0] and len(server.seen) == 2
    server.seen, server.n_slow = [], 10
    with pytest.raises(ConfigError) as e:
        sc.score(["x"])
    assert "times out (0.5 s) after 2 retries" in str(e.value) and len(server.seen) == 3


def test_perspective_retries_a_dropped_connection(server, monkeypatch):
    """Over a day of requests some connections end before the answer; the request is sent again."""
    server.n_drop = 2
    sc = perspective(server, monkeypatch, rate_limit=1000.0, retry_wait=0.01, max_retries=2)
    assert sc.score(["xx"]) == [1.0] and len(server.seen) == 3
    server.seen, server.n_drop = [], 10
    with pytest.raises(ConfigError) as e:
        sc.score(["x"])
    assert "drops the connection (RemoteDisconnected) after 2 retries" in str(e.value) and len(server.seen) == 3


def test_perspective_retries_a_tls_drop_and_any_network_error_once_it_has_answered(server, monkeypatch):
    import socket
    import ssl
    import urllib.error
    import urllib.request

    urlopen, failures = urllib.request.urlopen, [urllib.error.URLError(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))]

    def flaky(*args, **kwargs):  # the first request's TLS connection is dropped
        if failures:
            raise failures.pop()
        return urlopen(*args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", flaky)
    sc = perspective(server, monkeypatch, rate_limit=1000.0, retry_wait=0.01, max_retries=2)
    assert sc.score(["xx"]) == [1.0] and len(server.seen) == 1 and not failures
    with socket.socket() as s:  # the API answered before: a refused connection now is a network hiccup, retried
        s.bind(("127.0.0.1", 0))
        sc.url = f"http://127.0.0.1:{s.getsockname()[1]}/analyze"
    with pytest.raises(ConfigError) as e:
        sc.score(["x"])
    assert "drops the connection (ConnectionRefusedError) after 2 retries" in str(e.value)


def test_perspective_refusal_gives_the_apis_reason_and_blames_the_key_only_on_401_or_403(server, monkeypatch):
    server.status = 400
    server.error = json.dumps({"error": {"code": 400, "message": "Comment text too long.", "status": "INVALID_ARGUMENT"}}).encode()
    sc = perspective(server, monkeypatch, rate_limit=1000.0, retry_wait=0.01)
    with pytest.raises(ConfigError) as e:
        sc.score(["x" * 50])
    msg = str(e.value)
    assert "HTTP 400: Comment text too long." in msg and "'xxxx" in msg and "PERSPECTIVE_API_KEY" not in msg
    assert "\n" not in msg and len(server.seen) == 1


@pytest.mark.parametrize("answer", [{"attributeScores": {}},
                                    {"attributeScores": {"TOXICITY": {"summaryScore": {"value": 0.5}}}}])
def test_perspective_answer_without_every_score_is_a_one_line_error(server, monkeypatch, answer):
    server.answer = answer
    with pytest.raises(ConfigError) as e:
        perspective(server, monkeypatch, rate_limit=1000.0).score(["x"])
    assert "without a score for" in str(e.value) and "SEVERE_TOXICITY" in str(e.value) and "\n" not in str(e.value)


def test_perspective_host_that_refuses_connections_is_one_line_and_not_retried(monkeypatch):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    sc = scoring.Perspective(url=f"http://127.0.0.1:{port}/analyze", rate_limit=1000.0, retry_wait=10.0)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        sc.score(["x"])
    assert "Perspective API unreachable" in str(e.value) and "\n" not in str(e.value)
    assert time.monotonic() - t0 < 5  # no retry's 10 s wait


def test_perspective_refused_key_is_not_retried(server, monkeypatch):
    server.status = 403
    sc = perspective(server, monkeypatch, rate_limit=1000.0, retry_wait=0.01)
    with pytest.raises(ConfigError, match="HTTP 403.*PERSPECTIVE_API_KEY"):
        sc.score(["x"])
    assert len(server.seen) == 1


def test_perspective_cache_dir_that_cannot_be_made_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    (tmp_path / "file").write_text("")
    cfg = ScorerConfig(backend="perspective", cache_dir=str(tmp_path / "file" / "scores"))
    for call in (scoring.check, scoring.get_scorer):  # the runner's check before any stage, and the stage's own
        with pytest.raises(ConfigError) as e:
            call(cfg)
        assert "cache_dir" in str(e.value) and "writable folder" in str(e.value) and "\n" not in str(e.value)


def test_perspective_without_key_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(ConfigError) as e:
        scoring.get_scorer(ScorerConfig(backend="perspective"))
    assert "PERSPECTIVE_API_KEY" in str(e.value) and "\n" not in str(e.value)


def test_detoxify_scores_with_the_real_package_offline_from_a_local_checkpoint(detoxify_checkpoint, monkeypatch):
    """The detoxify package itself loads a checkpoint in its own format (trained in conftest to flag a
    planted word list) with no network, and the scorer reads its toxicity column in batches."""
    import numpy as np

    from tests.conftest import detoxify_sentence

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once at import: the variable is too late
    rng = np.random.default_rng(1)  # sentences the checkpoint was not trained on
    toxic = [detoxify_sentence(rng, True) for _ in range(20)]
    neutral = [detoxify_sentence(rng, False) for _ in range(20)]
    sc = scoring.get_scorer(ScorerConfig(backend="detoxify", checkpoint=str(detoxify_checkpoint), batch_size=7))
    tox, neu = sc.score(toxic), sc.score(neutral)
    assert min(tox) > 0.5 > max(neu)
    one = scoring.get_scorer(ScorerConfig(backend="detoxify", checkpoint=str(detoxify_checkpoint), batch_size=1))
    assert one.score(toxic[:3]) == pytest.approx(tox[:3], abs=1e-5)  # a batch of one comes back as a float
    assert sc.score([]) == []


def test_blank_texts_score_zero_with_every_backend(detoxify_checkpoint, server, monkeypatch):
    """A continuation of only end-of-text tokens decodes to blanks; Perspective refuses such a text, so
    no backend reads its own noise into it (profanity-check would give it 0.036) and backends agree."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once at import: the variable is too late
    texts = ["", "you stupid idiot, xxx", "  ", "\n", "the garden needs water"]  # the fake API scores the share of x's
    fresh = [lambda: scoring.get_scorer(ScorerConfig(backend="profanity-check", batch_size=2)),
             lambda: scoring.get_scorer(ScorerConfig(backend="detoxify", checkpoint=str(detoxify_checkpoint), batch_size=2)),
             lambda: perspective(server, monkeypatch, rate_limit=50.0, cache_dir="")]
    for make in fresh:
        sc = make()
        got = sc.score(texts)
        assert [got[i] for i in (0, 2, 3)] == [0.0, 0.0, 0.0], sc.name
        assert [got[1], got[4]] == pytest.approx(make().score([texts[1], texts[4]]), abs=1e-6), sc.name
        assert got[1] > got[4], sc.name
    assert {b["comment"]["text"] for _, _, b in server.seen} == {texts[1], texts[4]}  # no blank text was sent


def test_detoxify_label_names_package_version_and_checkpoint_content(detoxify_checkpoint, tmp_path):
    import importlib.metadata
    import shutil

    import torch

    sc = scoring.get_scorer(ScorerConfig(backend="detoxify", checkpoint=str(detoxify_checkpoint)))
    version = importlib.metadata.version("detoxify")
    assert scoring.label(sc).startswith(f"detoxify=={version}-toxic-bert-tiny@")
    # the same file name with other weights is another scorer
    other = tmp_path / detoxify_checkpoint.name
    shutil.copy(detoxify_checkpoint, other)
    ck = torch.load(other, weights_only=False)
    ck["state_dict"]["classifier.bias"] += 1.0
    torch.save(ck, other)
    assert scoring.label(scoring.get_scorer(ScorerConfig(backend="detoxify", checkpoint=str(other)))) != scoring.label(sc)


def test_detoxify_missing_package_or_checkpoint_is_a_one_line_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"\[scorer\] checkpoint .* is not a file"):
        scoring.get_scorer(ScorerConfig(backend="detoxify", checkpoint=str(tmp_path / "missing.ckpt")))
    (tmp_path / "damaged.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError) as e:
        scoring.get_scorer(ScorerConfig(backend="detoxify", checkpoint=str(tmp_path / "damaged.ckpt")))
    assert "Detoxify checkpoint could not be loaded" in str(e.value) and "\n" not in str(e.value)
    import torch

    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")  # no config: not a Detoxify checkpoint
    with pytest.raises(ConfigError, match="Detoxify checkpoint could not be loaded"):
        scoring.get_scorer(ScorerConfig(backend="detoxify", checkpoint=str(tmp_path / "foreign.ckpt")))
    import urllib.error

    def offline(url, **kw):  # what torch.hub's download raises on a machine without network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError) as e:
        scoring.get_scorer(ScorerConfig(backend="detoxify", detoxify_model="unbiased"))
    assert "name resolution" in str(e.value) and "set [scorer] checkpoint" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="detoxify_model must be one of"):
        from_dict({"scorer": {"backend": "detoxify", "detoxify_model": "toxic-bert"}}, source="x.toml")
    monkeypatch.setitem(sys.modules, "detoxify", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="pip install detoxify"):
        scoring.get_scorer(ScorerConfig(backend="detoxify"))


def test_config_knows_every_scorer_backend():
    from pipeline import config

    assert set(config.SCORER_BACKENDS) == set(scoring.BACKENDS)
