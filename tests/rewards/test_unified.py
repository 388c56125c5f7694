"""UnifiedReward: the parsers on canned answers, a real OpenAI-style chat server on 127.0.0.1, a tiny local VLM."""

import base64
import io
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from tests.rewards._util import rand_images
from visalign.errors import ConfigError, InvalidInputError, RewardError, RewardUnavailableError
from visalign.rewards import UnifiedReward, call_reward
from visalign.rewards.unified_endpoint import ChatEndpointJudge
from visalign.rewards.unified_text import UnparseableAnswerError, parse_pairwise, parse_pointwise, parse_pointwise_v2

KEY_ENV = "VISALIGN_TEST_JUDGE_KEY"


# ----------------------------------------------------------------------------- parsers
@pytest.mark.parametrize(
    "answer, expected",
    [
        ("The cat is there and sharp.\nFinal Score: 4", 4.0),
        ("Final Score:3", 3.0),
        ("**Final Score:** 3.5", 3.5),
        ("final score: 5.", 5.0),
        ("I first thought Final Score: 2, but on reflection\nFinal Score: 1", 1.0),
    ],
)
def test_pointwise_parser_reads_the_last_final_score(answer, expected):
    assert parse_pointwise(answer) == expected


@pytest.mark.parametrize("answer", ["", "The image is great. 5/5", "Final Score: 9", "Final Score: 10", "Score: 4"])
def test_pointwise_parser_rejects_answers_without_a_1_to_5_final_score(answer):
    with pytest.raises(UnparseableAnswerError, match="Final Score: X") as err:
        parse_pointwise(answer)
    assert isinstance(err.value, RewardError)


def test_pointwise_v2_parser_reads_the_three_sub_scores():
    answer = "Alignment Score (1-5): 4\nCoherence Score (1-5): 3.5\nStyle Score (1-5): 2"
    assert parse_pointwise_v2(answer) == {"alignment": 4.0, "coherence": 3.5, "style": 2.0}
    assert parse_pointwise_v2("alignment score: 5, coherence score: 5, **Style Score:** 1")["style"] == 1.0
    for bad in (
        "Alignment Score (1-5): 4\nCoherence Score (1-5): 3",
        "Alignment Score: 7 Coherence Score: 3 Style Score: 2",
    ):
        with pytest.raises(UnparseableAnswerError, match="Style Score|Alignment Score"):
            parse_pointwise_v2(bad)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Image 1 is better.", 1.0),
        ("The second one is crisper. Image 2 is better", 0.0),
        ("Both images are equally good.", 0.5),
        ("Options: 'Image 1 is better.', 'Image 2 is better.' ... Verdict: image 2 is better.", 0.0),
    ],
)
def test_pairwise_parser_reads_the_last_verdict(answer, expected):
    assert parse_pairwise(answer) == expected


def test_pairwise_parser_rejects_an_answer_without_a_verdict():
    with pytest.raises(UnparseableAnswerError, match="Image 1 is better"):
        parse_pairwise("I like the first one.")


# ----------------------------------------------------------------------------- a real chat server
class ChatServer:
    """A tiny OpenAI-compatible server: POST /v1/chat/completions answers from ``reply(body)``.

    ``status`` (a list) gives the HTTP status of the next requests (popped front; 200 when empty);
    ``key`` requires ``Authorization: Bearer key``; ``requests`` keeps (headers, body) of each request.
    """

    def __init__(self, reply, key=None):
        self.reply, self.key, self.status, self.requests = reply, key, [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((dict(self.headers), body))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if server.key and self.headers.get("Authorization") != f"Bearer {server.key}":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                status = server.status.pop(0) if server.status else 200
                if status != 200:
                    return self._send(status, {"error": {"message": "overloaded"}})
                text = server.reply(body)
                if text is None:
                    payload = b"<html>not json</html>"
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return None
                return self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

            def _send(self, status, obj):
                payload = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def caption_of(body):
    text = body["messages"][-1]["content"][-1]["text"]
    return text.split("Text Caption: [", 1)[1].rsplit("]", 1)[0]


@pytest.fixture
def server():
    answers = {}
    srv = ChatServer(lambda body: answers.get(caption_of(body), "no idea"), key="secret")
    srv.answers = answers
    yield srv
    srv.close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "secret")


def endpoint_reward(server, **kwargs):
    kwargs = {"api_key_env": KEY_ENV, "retries": 1, "backoff": 0.0, "timeout": 10.0, **kwargs}
    return UnifiedReward("unified-reward-test", base_url=server.base_url, **kwargs)


def decode_png(url):
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_pointwise_over_the_endpoint_scores_x_over_5_and_sends_lossless_png(server, key):
    server.answers.update({"a red cat": "Sharp and faithful.\nFinal Score: 4", "a blue dog": "Final Score: 2.5"})
    reward = endpoint_reward(server)
    images = rand_images(2, size=(24, 20))
    scores = reward(images, ["a red cat", "a blue dog"])
    assert torch.allclose(scores, torch.tensor([0.8, 0.5]))
    assert len(server.requests) == 2
    for headers, body in server.requests:
        assert headers["Authorization"] == "Bearer secret"
        assert body["model"] == "unified-reward-test" and body["temperature"] == 0.0 and body["max_tokens"] == 512
        (message,) = body["messages"]
        assert message["role"] == "user"
        image_part, text_part = message["content"]
        assert image_part["type"] == "image_url" and text_part["type"] == "text"
        assert "Final Score" in text_part["text"]
    by_caption = {caption_of(b): b for _, b in server.requests}
    for i, caption in enumerate(["a red cat", "a blue dog"]):
        pixels = decode_png(by_caption[caption]["messages"][0]["content"][0]["image_url"]["url"])
        expected = (images[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert pixels.shape == (24, 20, 3) and np.array_equal(pixels, expected)


def test_pointwise_v2_maps_the_mean_to_0_1_with_the_sub_scores_as_parts(server, key):
    server.answers["a cat"] = "Alignment Score (1-5): 5\nCoherence Score (1-5): 3\nStyle Score (1-5): 4"
    server.answers["a dog"] = "Alignment Score (1-5): 1\nCoherence Score (1-5): 1\nStyle Score (1-5): 2"
    reward = endpoint_reward(server, mode="pointwise_v2")
    result = call_reward(reward, rand_images(2), ["a cat", "a dog"])
    assert torch.allclose(result.total, torch.tensor([(4.0 - 1) / 4, (4 / 3 - 1) / 4]))
    assert torch.allclose(result.raw["alignment"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(result.raw["style"], torch.tensor([0.75, 0.25]))
    assert torch.allclose(sum(result.components.values()), result.total)
    assert result.weights == {"alignment": 1 / 3, "coherence": 1 / 3, "style": 1 / 3}


def test_pairwise_sends_the_candidate_then_the_reference_and_maps_verdicts(server, key):
    server.answers.update({"a": "Image 1 is better.", "b": "Image 2 is better.", "c": "Both images are equally good."})
    reward = endpoint_reward(server, mode="pairwise")
    images, refs = rand_images(3, seed=1), rand_images(3, seed=2)
    scores = reward(images, ["a", "b", "c"], reference_images=refs)
    assert torch.allclose(scores, torch.tensor([1.0, 0.0, 0.5]))
    body = next(b for _, b in server.requests if caption_of(b) == "a")
    first, second, text = body["messages"][0]["content"]
    assert first["type"] == second["type"] == "image_url" and "Image 1 is better" in text["text"]
    assert np.array_equal(
        decode_png(first["image_url"]["url"]), (images[0] * 255).round().byte().permute(1, 2, 0).numpy()
    )
    assert np.array_equal(
        decode_png(second["image_url"]["url"]), (refs[0] * 255).round().byte().permute(1, 2, 0).numpy()
    )
    with pytest.raises(InvalidInputError, match="reference_images"):
        reward(images, ["a", "b", "c"])


def test_pairwise_both_orders_averages_the_verdicts_for_the_candidate(server, key):
    # A judge with a position bias: it always prefers Image 1. Asked both ways, every candidate ties.
    server.reply = lambda body: "Image 1 is better."
    reward = endpoint_reward(server, mode="pairwise", both_orders=True)
    scores = reward(rand_images(2), ["x", "y"], reference_images=rand_images(2, seed=3))
    assert torch.allclose(scores, torch.tensor([0.5, 0.5])) and len(server.requests) == 4


def test_unparseable_answer_raises_a_reward_error_by_default(server, key):
    server.answers["a cat"] = "What a lovely picture!"
    reward = endpoint_reward(server)
    with pytest.raises(UnparseableAnswerError, match="What a lovely picture") as err:
        reward(rand_images(1), ["a cat"])
    assert isinstance(err.value, RewardError) and "on_unparseable='zero'" in str(err.value)


def test_unparseable_answer_scores_zero_with_a_warning_when_asked(server, key, caplog):
    server.answers.update({"a cat": "What a lovely picture!", "a dog": "Final Score: 5"})
    reward = endpoint_reward(server, on_unparseable="zero")
    with caplog.at_level(logging.WARNING, logger="visalign.rewards.unified"):
        scores = reward(rand_images(2), ["a cat", "a dog"])
    assert scores.tolist() == [0.0, 1.0] and reward.unparseable == 1
    assert "What a lovely picture" in caplog.text


def test_a_rejected_key_is_a_config_error_naming_the_variable(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(ConfigError, match=f"rejected the API key.*{KEY_ENV}"):
        endpoint_reward(server)(rand_images(1), ["a cat"])
    assert len(server.requests) == 1  # not retried
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match="No key was sent"):
        endpoint_reward(server)(rand_images(1), ["a cat"])


def test_a_wrong_base_url_is_a_config_error(server, key):
    reward = UnifiedReward("m", base_url=server.base_url.replace("/v1", "/v2"), api_key_env=KEY_ENV, retries=0)
    with pytest.raises(ConfigError, match="404.*base_url"):
        reward(rand_images(1), ["a cat"])


def test_a_server_that_is_down_raises_reward_unavailable_after_the_retries():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = ChatEndpointJudge(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff=0.0, timeout=5.0)
    reward = UnifiedReward(judge=judge)
    with pytest.raises(RewardUnavailableError, match="not available after 3 tries.*base_url") as err:
        reward(rand_images(1), ["a cat"])
    assert isinstance(err.value, RewardError)  # trainers skip the step


def test_busy_answers_are_retried_then_scored(server, key):
    server.answers["a cat"] = "Final Score: 3"
    server.status[:] = [503, 429]
    reward = endpoint_reward(server, retries=2)
    assert reward(rand_images(1), ["a cat"]).tolist() == [pytest.approx(0.6)]
    assert len(server.requests) == 3
    server.status[:] = [500, 500, 500]
    with pytest.raises(RewardUnavailableError, match="HTTP 500"):
        reward(rand_images(1), ["a cat"])


def test_an_answer_that_is_not_a_chat_completion_is_a_reward_error(server, key):
    server.reply = lambda body: None
    with pytest.raises(RewardError, match="not a chat completion"):
        endpoint_reward(server)(rand_images(1), ["a cat"])


def test_configuration_errors():
    with pytest.raises(ConfigError, match="needs a judge"):
        UnifiedReward()
    with pytest.raises(ConfigError, match="mode"):
        UnifiedReward("m", base_url="http://127.0.0.1:1/v1", mode="listwise")
    with pytest.raises(ConfigError, match="both_orders"):
        UnifiedReward("m", base_url="http://127.0.0.1:1/v1", both_orders=True)
    with pytest.raises(ConfigError, match="prompt"):
        UnifiedReward("m", base_url="http://127.0.0.1:1/v1", template="Rate it.")
    with pytest.raises(ConfigError, match="base_url"):
        UnifiedReward("m", base_url="ftp://host/v1")


def test_recipe_name_builds_the_endpoint_reward(server, key):
    from visalign.recipes import build_reward

    server.answers["a cat"] = "Final Score: 5"
    reward = build_reward({"type": "unified_reward", "base_url": server.base_url, "model": "m", "api_key_env": KEY_ENV})
    assert isinstance(reward, UnifiedReward) and reward(rand_images(1), ["a cat"]).tolist() == [1.0]


# ----------------------------------------------------------------------------- a local VLM
def test_local_tiny_vlm_runs_end_to_end_and_handles_its_random_answers(vlm_pair):
    model, processor = vlm_pair
    reward = UnifiedReward(model, processor, max_new_tokens=4, on_unparseable="zero", batch_size=2)
    images = rand_images(3, size=(32, 32))
    scores = reward(images, ["a red cat", "a dog", "a blue square"])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert reward.unparseable == 3 - int((scores > 0).sum())  # random text: (almost surely) unparseable
    answers = reward.judge.generate([([images[0]], reward.render("a red cat"))])
    assert isinstance(answers[0], str)
    assert reward.judge.generate([([images[0]], reward.render("a red cat"))]) == answers  # greedy
    strict = UnifiedReward(model, processor, max_new_tokens=4)
    if reward.unparseable:
        with pytest.raises(UnparseableAnswerError):
            strict(images, ["a red cat", "a dog", "a blue square"])


def test_local_tiny_vlm_pairwise_reads_two_images_per_request(vlm_pair):
    model, processor = vlm_pair
    reward = UnifiedReward(model, processor, mode="pairwise", max_new_tokens=3, on_unparseable="zero")
    scores = reward(rand_images(2, size=(32, 32)), ["a cat", "a dog"], reference_images=rand_images(2, size=(32, 32)))
    assert scores.shape == (2,) and len(reward.last_answers) == 2
