"""Self-distillation through an OpenAI-compatible server, against a local fake of the protocol."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medusa_liger.inference import distill_backends
from medusa_liger.inference.distill import DistillSettings, self_distill


class FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/models and /v1/chat/completions; a prompt's last turn picks special behaviour."""

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - the http.server interface
        if self.path == "/v1/models":
            self._reply(200, {"data": [{"id": "fake-model"}, {"id": "other"}]})
        else:
            self._reply(404, {"error": "no such path"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.log.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        last = body["messages"][-1]["content"]
        if "TOO LONG" in last:
            return self._reply(400, {"error": {"message": "This model's maximum context length is 64 tokens."}})
        if "BAD" in last:
            return self._reply(422, {"error": {"message": "unsupported field"}})
        if "TGI LONG" in last:  # TGI's answer to a prompt that leaves no room for max_new_tokens
            return self._reply(422, {"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be "
                                              "<= 64. Given: 60 `inputs` tokens and 16 `max_new_tokens`"})
        if "RATE" in last:
            with self.server.lock:
                self.server.rate_left -= 1
                limited = self.server.rate_left >= 0
            if limited:
                self.send_response(429)
                self.send_header("Retry-After", "7")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
        if "NO CHAT TEMPLATE" in last:  # vLLM serving a model that has none: every request fails alike
            return self._reply(400, {"error": {"message": "As of transformers v4.44, default chat template is no "
                                                          "longer allowed, so you must provide a chat template"}})
        if "TEMPLATE" in last:  # vLLM's answer when the model's chat template raises
            return self._reply(400, {"error": {"message": "jinja2.exceptions.TemplateError: System role not supported",
                                               "type": "BadRequestError"}})
        if "HTML" in last:  # a proxy's error page
            data = b"<html><body>502 Bad Gateway</body></html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        if "SERVER ERROR" in last:  # a plain 500 once (any 5xx is retried)
            with self.server.lock:
                self.server.errors_left = getattr(self.server, "errors_left", 1) - 1
                fail = self.server.errors_left >= 0
            if fail:
                return self._reply(500, {"error": "boom"})
        if "MISSING LONG" in last:  # a context phrase under a code that does not mean "too long"
            return self._reply(404, {"error": {"message": "model not found: maximum context length unknown"}})
        if "HOLD" in last:  # an answer that takes long, then a 503 (retried, unless the run has stopped)
            self.server.release.wait(3)
            return self._reply(503, {"error": "overloaded"})
        if "NEEDS KEY" in last:
            return self._reply(401, {"error": {"message": "Unauthorized"}})
        if "NO USAGE" in last:  # usage without a token count
            return self._reply(200, {"choices": [{"message": {"role": "assistant", "content": "hi"},
                                                  "finish_reason": "stop"}], "usage": {"completion_tokens": None}})
        if "NULL" in last:  # tool-call and reasoning replies may carry no content
            return self._reply(200, {"choices": [{"message": {"role": "assistant", "content": None},
                                                  "finish_reason": "stop"}], "usage": {"completion_tokens": 0}})
        if "FLAKY" in last:
            with self.server.lock:
                self.server.flaky_left -= 1
                fail = self.server.flaky_left >= 0
            if fail:
                return self._reply(503, {"error": "overloaded"})
        answered = sum(m["role"] == "assistant" for m in body["messages"])
        self._reply(200, {
            "choices": [{"message": {"role": "assistant", "content": f"  answer {answered} to {last}\n"},
                         "finish_reason": "length" if body["max_tokens"] < 8 else "stop"}],
            "usage": {"completion_tokens": 5},
        })

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server(monkeypatch):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    httpd.log, httpd.lock, httpd.flaky_left, httpd.rate_left, httpd.waits = [], threading.Lock(), 2, 2, []
    httpd.release = threading.Event()
    monkeypatch.setattr(distill_backends.time, "sleep", httpd.waits.append)  # retries without waiting
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_server_answers_every_turn_from_the_regenerated_history(server, tmp_path):
    httpd, url = server
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"conversations": [{"from": "human", "value": "What is assert?"}, {"from": "gpt", "value": "old"},
                           {"from": "human", "value": "And FLAKY pass?"}, {"from": "gpt", "value": "old"}]},
        {"prompt": "Write a loop."},
        {"text": "a document"},  # needs the model in this process: skipped
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old"},
                      {"role": "user", "content": "TOO LONG"}, {"role": "assistant", "content": "old"}]},
        {"messages": [{"role": "user", "content": "TOO LONG from the start"}]},
    ])
    out = tmp_path / "out.jsonl"
    summary = self_distill(source, out, DistillSettings(max_new_tokens=16, block_records=2), server=url + "/",
                           api_key="k", concurrency=4, progress=False)
    records = read_lines(out)
    assert [r["id"] for r in records] == [0, 1, 3]
    assert records[0]["messages"] == [
        {"role": "user", "content": "What is assert?"}, {"role": "assistant", "content": "answer 0 to What is assert?"},
        {"role": "user", "content": "And FLAKY pass?"}, {"role": "assistant", "content": "answer 1 to And FLAKY pass?"},
    ]
    assert records[1]["messages"][1]["content"] == "answer 0 to Write a loop."
    assert [m["content"] for m in records[2]["messages"]] == ["hi", "answer 0 to hi"]  # the turn that fits
    assert len(summary.skipped) == 2 and "text records need the model in this process" in summary.skipped[0]
    assert "exceed the model's context" in summary.skipped[1]
    assert summary.generations == 4 and summary.new_tokens == 20 and summary.truncated == 0
    # The second turn's request carried the first regenerated answer; the 503s were retried.
    second = [e["body"] for e in httpd.log if e["body"]["messages"][-1]["content"] == "And FLAKY pass?"]
    assert len(second) == 3 and second[-1]["messages"][1]["content"] == "answer 0 to What is assert?"
    assert httpd.waits == [1, 2]  # backoff: 1 s, then 2 s
    assert {e["path"] for e in httpd.log} == {"/v1/chat/completions"} and {e["auth"] for e in httpd.log} == {"Bearer k"}
    assert {e["body"]["model"] for e in httpd.log} == {"fake-model"}
    assert all(e["body"]["max_tokens"] == 16 and e["body"]["temperature"] == 0 for e in httpd.log)
    assert json.loads((tmp_path / "out.jsonl.settings.json").read_text())["server_model"] == "fake-model"


def test_answers_cut_at_max_tokens_count_as_truncated(server, tmp_path):
    _, url = server
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}, {"prompt": "two"}])
    summary = self_distill(source, tmp_path / "out.jsonl", DistillSettings(max_new_tokens=4, temperature=0.7, seed=3),
                           server=url, server_model="named", progress=False)
    assert summary.truncated == 2 and summary.records == 2


def test_a_refused_request_stops_after_the_finished_blocks(server, tmp_path):
    httpd, url = server
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}, {"prompt": "two"}, {"prompt": "BAD"}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="HTTP 422: .*unsupported field"):
        self_distill(source, out, DistillSettings(block_records=1), server=url, progress=False)
    assert [r["id"] for r in read_lines(out)] == [0, 1]  # the finished blocks are kept for a resume
    httpd.flaky_left = 10  # a server that keeps failing gives up after the retries
    source = write_jsonl(tmp_path / "flaky.jsonl", [{"prompt": "FLAKY"}])
    with pytest.raises(ValueError, match="HTTP 503"):
        self_distill(source, tmp_path / "flaky_out.jsonl", server=url, progress=False)


def test_an_unreachable_server_fails_before_touching_the_output(tmp_path, monkeypatch):
    monkeypatch.setattr(distill_backends.time, "sleep", lambda seconds: None)
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}])
    with pytest.raises(ValueError, match="127.0.0.1:9/v1/models"):
        self_distill(source, tmp_path / "out.jsonl", server="http://127.0.0.1:9", progress=False)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "pass either model and tokenizer"),
    ({"server": "localhost:8000"}, "server must be an http"),
    ({"server": "http://127.0.0.1:9", "concurrency": 0}, "concurrency must be an integer >= 1"),
])
def test_bad_backend_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        self_distill(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}]), tmp_path / "out.jsonl", **kwargs)


def test_cli_with_a_server(server, tmp_path, capsys):
    from medusa_liger.cli import main

    _, url = server
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}, {"prompt": "two"}])
    assert main(["distill", "--server", url, "--data", source, "--output", str(tmp_path / "o.jsonl")]) == 0
    assert "wrote 2 records" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # one engine at a time
        main(["distill", "--server", url, "--backbone", "x", "--data", source, "--output", str(tmp_path / "p.jsonl")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_servers_other_answers_rate_limits_length_errors_and_pages(server, tmp_path):
    """A 429 ended the run (hosted APIs send them under load); TGI's 422 for a prompt too long ended it
    too, where vLLM's 400 drops the record, as did vLLM's 400 for a conversation the chat template
    rejects (at every resume); a proxy's HTML page was a bare JSONDecodeError."""
    httpd, url = server
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "RATE one"}, {"prompt": "TGI LONG two"}, {"prompt": "three"},
                                                 {"prompt": "TEMPLATE four"}])
    summary = self_distill(source, tmp_path / "out.jsonl", DistillSettings(max_new_tokens=16), server=url,
                           progress=False)
    assert [r["id"] for r in read_lines(tmp_path / "out.jsonl")] == [0, 2]
    assert len(summary.skipped) == 2 and "exceed the model's context" in summary.skipped[0]
    assert "the server's chat template rejected this conversation: " in summary.skipped[1]
    assert "System role not supported" in summary.skipped[1]
    assert httpd.waits == [7.0, 7.0]  # the server's Retry-After, twice
    # Stops: not one record's fault (dropping it, and every later one on a resume, would lose them for good).
    source = write_jsonl(tmp_path / "none.jsonl", [{"prompt": "one"}, {"prompt": "NO CHAT TEMPLATE"}])
    with pytest.raises(ValueError, match="HTTP 400: .*you must provide a chat template"):
        self_distill(source, tmp_path / "none_out.jsonl", server=url, progress=False)
    source = write_jsonl(tmp_path / "page.jsonl", [{"prompt": "HTML"}])
    with pytest.raises(ValueError, match=r"/v1/chat/completions: the reply is not JSON: '<html><body>502"):
        self_distill(source, tmp_path / "page_out.jsonl", server=url, progress=False)


def test_any_5xx_and_connection_failures_are_retried_with_a_capped_wait(server, tmp_path, monkeypatch):
    httpd, url = server
    out = tmp_path / "out.jsonl"
    self_distill(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "SERVER ERROR"}]), out, server=url, progress=False)
    assert [r["id"] for r in read_lines(out)] == [0] and httpd.waits == [1]
    assert distill_backends._retry_after("3600") == 60.0 and distill_backends._retry_after("2.5") == 2.5
    # A connection refused once, then the server answers.
    real_urlopen, failures = distill_backends.urllib.request.urlopen, [1]

    def flaky_urlopen(*args, **kwargs):
        if failures and args[0].full_url.endswith("/chat/completions"):
            failures.pop()
            raise distill_backends.urllib.error.URLError("connection refused")
        return real_urlopen(*args, **kwargs)

    monkeypatch.setattr(distill_backends.urllib.request, "urlopen", flaky_urlopen)
    httpd.waits.clear()
    self_distill(write_jsonl(tmp_path / "two.jsonl", [{"prompt": "one"}]), tmp_path / "two_out.jsonl", server=url,
                 progress=False)
    assert [r["id"] for r in read_lines(tmp_path / "two_out.jsonl")] == [0] and httpd.waits == [1]


def test_a_context_phrase_under_another_status_is_no_length_error(server, tmp_path):
    _, url = server
    with pytest.raises(ValueError, match="HTTP 404"):
        self_distill(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "MISSING LONG"}]), tmp_path / "out.jsonl",
                     server=url, progress=False)


def test_an_answer_without_content_is_an_empty_answer(server, tmp_path):
    _, url = server
    summary = self_distill(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "NULL"}]), tmp_path / "out.jsonl",
                           server=url, progress=False)
    assert summary.empty == 1 and read_lines(tmp_path / "out.jsonl")[0]["messages"][1]["content"] == ""


def test_greedy_requests_carry_no_seed_and_sampled_ones_do(server, tmp_path):
    httpd, url = server
    self_distill(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}]), tmp_path / "o.jsonl", server=url,
                 progress=False)
    assert httpd.log and all("seed" not in e["body"] for e in httpd.log)
    self_distill(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}]), tmp_path / "p.jsonl", server=url,
                 settings=DistillSettings(temperature=0.7, seed=9), progress=False)
    assert httpd.log[-1]["body"]["seed"] == 9


def test_a_server_resume_may_change_what_the_server_decides(server, tmp_path):
    """A server applies its own chat template, takes no text records and gets the seed with each request:
    a resume may change the template, the text prompt length, the blocks and the batching, also sampling."""
    _, url = server
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}, {"prompt": "two"}, {"prompt": "three"}])
    out = tmp_path / "out.jsonl"
    self_distill(source, out, DistillSettings(temperature=0.7, block_records=1, num_records=1), server=url,
                 progress=False)
    summary = self_distill(source, out, DistillSettings(temperature=0.7, block_records=2, batch_size=4,
                                                        num_records=2), server=url, progress=False)
    assert (summary.resumed, summary.records) == (1, 1)
    summary = self_distill(source, out, DistillSettings(temperature=0.7, chat_template="builtin",
                                                        text_prompt_tokens=7), server=url, progress=False)
    assert (summary.resumed, summary.records) == (2, 1)


def test_a_model_and_a_server_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pass either model and tokenizer"):
        self_distill(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}]), tmp_path / "o.jsonl", model=object(),
                     tokenizer=object(), server="http://127.0.0.1:9", server_model="m", progress=False)


def test_requests_pin_the_options_a_server_fills_from_the_models_generation_config(server, tmp_path):
    """vLLM fills the sampling options a request leaves out from the model's generation_config.json (an
    instruct model's repetition_penalty, top_k): greedy answers then differ from the local backend's,
    which pins them."""
    httpd, url = server
    self_distill(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}]), tmp_path / "o.jsonl", server=url,
                 progress=False)
    body = httpd.log[-1]["body"]
    assert (body["top_k"], body["min_p"], body["repetition_penalty"]) == (-1, 0.0, 1.0)


def test_a_failed_request_ends_the_call_at_once_and_stops_the_others(server, tmp_path):
    """The run waited for every earlier request in flight before reporting a refused one, those kept
    being retried after it, and the pool's threads held the process (Ctrl-C too) until they ended."""
    import time

    httpd, url = server
    before = set(threading.enumerate())
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "HOLD"}, {"prompt": "BAD"}])
    started = time.perf_counter()
    with pytest.raises(ValueError, match="HTTP 422"):
        self_distill(source, tmp_path / "out.jsonl", server=url, concurrency=2, progress=False)
    assert time.perf_counter() - started < 2
    # A thread still waiting on the held request must not keep the process from exiting.
    assert not [t for t in set(threading.enumerate()) - before if not t.daemon and t.is_alive()]
    httpd.release.set()
    threading.Event().wait(0.5)  # (time.sleep is the fixture's no-op here: distill_backends.time is this time module)
    assert sum(e["body"]["messages"][-1]["content"] == "HOLD" for e in httpd.log) == 1  # not retried


def test_a_reply_without_a_token_count_and_a_missing_key(server, tmp_path):
    _, url = server
    summary = self_distill(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "NO USAGE"}]), tmp_path / "o.jsonl",
                           server=url, progress=False)
    assert summary.records == 1 and summary.new_tokens == 0
    with pytest.raises(ValueError, match="HTTP 401: .*pass --api-key or set OPENAI_API_KEY"):
        self_distill(write_jsonl(tmp_path / "k.jsonl", [{"prompt": "NEEDS KEY"}]), tmp_path / "k_out.jsonl",
                     server=url, progress=False)


def test_cli_an_empty_server_url_is_refused_by_name(tmp_path, capsys):
    from medusa_liger.cli import main

    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}])
    assert main(["distill", "--server", "", "--data", source, "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "server must be an http(s) URL" in capsys.readouterr().err


def test_a_failed_request_sends_no_next_one(server, tmp_path):
    """The thread whose request failed took (and sent) the next conversation before the calling thread had
    set the stop event: one more request after the failure, every time, with --concurrency 1."""
    httpd, url = server
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "BAD"}] + [{"prompt": f"fine {i}"} for i in range(3)])
    with pytest.raises(ValueError, match="HTTP 422"):
        self_distill(source, tmp_path / "out.jsonl", server=url, concurrency=1, progress=False)
    threading.Event().wait(0.3)  # (a real wait: the fixture makes time.sleep a no-op)
    sent = [e["body"]["messages"][-1]["content"] for e in httpd.log if e["path"].endswith("/chat/completions")]
    assert sent == ["BAD"]
