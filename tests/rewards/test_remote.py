"""RemoteReward and `visalign serve-reward`: a reward scored in another process, over HTTP on 127.0.0.1.

Servers run in a background thread (RewardServer) or, for the command line, in a subprocess, on
ephemeral ports of the loopback interface. Nothing binds any other address.
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra (pip install -e '.[serve]')")

import visalign as va  # noqa: E402
from visalign.errors import ConfigError, InvalidInputError, RewardError, RewardUnavailableError  # noqa: E402
from visalign.rewards import Combined, OCRReward, RemoteReward, call_reward  # noqa: E402
from visalign.rewards.server import RewardServer, check_bind, is_loopback, load_reward  # noqa: E402
from visalign.testing import brightness, tiny_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def darkness(images, prompts=None):
    return 1 - brightness(images, prompts)


def make_combined():
    """A factory for `serve-reward tests.rewards.test_remote:make_combined` (module:attr)."""
    return Combined({"bright": (brightness, 2.0), "dark": (darkness, 0.5)})


def quantised(*shape, seed=0):
    """Images that are exactly k/255, so the uint8 transport is lossless for them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 255


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bright_server():
    with RewardServer(brightness) as server:
        yield server


# ----------------------------------------------------------------------------- scoring
def test_remote_brightness_equals_local_exactly(bright_server):
    remote = RemoteReward(bright_server.url)
    x = quantised(5, 3, 16, 12)
    assert torch.equal(remote(x, ["p"] * 5), brightness(x))  # uint8 on the wire, lossless here
    assert torch.equal(RemoteReward(bright_server.url, batch_size=2)(x, None), brightness(x))  # 3 requests
    y = torch.rand(3, 3, 8, 8)
    assert torch.equal(RemoteReward(bright_server.url, image_dtype="float32")(y, None), brightness(y))
    video = quantised(2, 4, 3, 8, 8)
    assert torch.equal(remote(video, None), brightness(video))
    out = remote(x, None)
    assert out.dtype == torch.float32 and out.shape == (5,) and remote.differentiable is False


def test_uint8_transport_scores_the_8bit_image(bright_server):
    y = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(
        RemoteReward(bright_server.url)(y, None), brightness((y * 255).round() / 255), rtol=0, atol=1e-7
    )


def test_combined_components_round_trip():
    local = make_combined()
    x = quantised(4, 3, 8, 8, seed=1)
    with RewardServer(make_combined()) as server:
        remote = RemoteReward(server.url, batch_size=3)
        got, want = call_reward(remote, x, ["a"] * 4), call_reward(local, x, ["a"] * 4)
    assert torch.equal(got.total, want.total)
    assert got.components.keys() == want.components.keys() == {"bright", "dark"}
    for key in want.components:
        assert torch.equal(got.components[key], want.components[key])
        assert torch.equal(got.raw[key], want.raw[key])
    assert got.weights == want.weights == {"bright": 2.0, "dark": 0.5}


def noisy_reference_reward(images, prompts, reference_images, generator, labels=None):
    """Uses tensor, list and generator conditioning: remote must equal local draw for draw."""
    noise = torch.rand(images.shape[0], generator=generator)
    bonus = torch.tensor([len(label) for label in labels]) if labels is not None else 0
    return (images - reference_images).abs().flatten(1).mean(1) + noise + bonus


def test_conditioning_and_generators_travel():
    x, ref = torch.rand(5, 3, 4, 4), torch.rand(5, 3, 4, 4)
    labels = ["a", "bb", "ccc", "dddd", "eeeee"]
    with RewardServer(noisy_reference_reward) as server:
        remote = RemoteReward(server.url, image_dtype="float32", batch_size=2)
        assert remote.accepted_conditioning == {"reference_images", "generator", "labels"}
        g_remote, g_local = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        got = remote(x, None, reference_images=ref, generator=g_remote, labels=labels)
        want = va.rewards.as_reward(noisy_reference_reward, name="n")
        want.batch_size = 2
        want = want(x, None, reference_images=ref, generator=g_local, labels=labels)
        assert torch.equal(got, want)
        assert torch.equal(g_remote.get_state(), g_local.get_state())  # advanced as locally
        with pytest.raises(InvalidInputError, match="cannot travel"):
            remote(x, None, reference_images=ref, generator=g_remote, labels=[object()] * 5)


def test_health_endpoint(bright_server):
    conn = http.client.HTTPConnection("127.0.0.1", bright_server.port, timeout=10)
    conn.request("GET", "/health")
    response = conn.getresponse()
    health = json.loads(response.read())
    assert response.status == 200
    assert health["status"] == "ok" and health["name"] == "brightness" and health["differentiable"] is True
    assert health["protocol"] == 1 and health["auth"] is False and health["max_body_bytes"] > 0
    assert RemoteReward(bright_server.url).health()["name"] == "brightness"


# ----------------------------------------------------------------------------- failures
def test_api_key_is_required_and_checked(monkeypatch):
    monkeypatch.delenv("VISALIGN_REWARD_API_KEY", raising=False)
    x = quantised(2, 3, 4, 4)
    with RewardServer(brightness, api_key="s3cret-key") as server:
        with pytest.raises(ConfigError, match="rejected the API key.*No key was sent"):
            RemoteReward(server.url)(x, None)
        with pytest.raises(ConfigError, match="rejected the API key"):
            RemoteReward(server.url, api_key="s3cret-kez")(x, None)
        assert torch.equal(RemoteReward(server.url, api_key="s3cret-key")(x, None), brightness(x))
        monkeypatch.setenv("MY_REWARD_KEY", "s3cret-key")
        assert torch.equal(RemoteReward(server.url, api_key_env="MY_REWARD_KEY")(x, None), brightness(x))


def test_dead_server_fails_after_bounded_retries():
    port = free_port()
    remote = RemoteReward(f"http://127.0.0.1:{port}", retries=2, backoff=0.1, timeout=5)
    start = time.monotonic()
    with pytest.raises(RewardUnavailableError, match=r"not reachable after 3 tries.*visalign serve-reward") as info:
        remote(quantised(2, 3, 4, 4), None)
    assert time.monotonic() - start < 5.0  # 0.1 + 0.2 s of backoff, refused connections are instant
    assert isinstance(info.value, RewardError)  # so trainers skip the step


def test_oversized_payload_gets_413_and_a_batch_size_hint():
    x = quantised(8, 3, 64, 64)  # 96 KiB of pixels, ~130 KiB of base64
    with RewardServer(brightness, max_body_bytes=64 * 1024) as server:
        with pytest.raises(ConfigError, match=r"too large \(413.*batch_size"):
            RemoteReward(server.url)(x, None)
        assert torch.equal(RemoteReward(server.url, batch_size=2)(x, None), brightness(x))
        # the server answers from Content-Length alone, before any byte of the body arrives
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.putrequest("POST", "/score")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10**9))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"] == "PayloadTooLarge"
        conn.close()


def test_server_reports_bad_requests_and_reward_failures():
    def broken(images, prompts):
        raise RuntimeError("the reward model fell over")

    reader = SimpleNamespace(txts=("hello",))
    ocr = OCRReward(lambda image: reader)
    with RewardServer(ocr) as server:
        with pytest.raises(InvalidInputError, match=r"reward server at .*'no quotes'.*\"TEXT\""):
            RemoteReward(server.url)(quantised(1, 3, 8, 8), ["no quotes"])
        assert RemoteReward(server.url)(quantised(1, 3, 8, 8), ['"hello"']).tolist() == [1.0]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/score", body=b'{"protocol": 1, "images": {"dtype": "object", "shape": [1], "data": ""}}')
        response = conn.getresponse()
        assert response.status == 400 and "dtype" in json.loads(response.read())["message"]
    with RewardServer(broken) as server:
        with pytest.raises(RewardUnavailableError, match="failed 2 tries.*fell over"):
            RemoteReward(server.url, retries=1, backoff=0.01)(quantised(1, 3, 8, 8), None)


def test_binding_off_loopback_requires_a_key(monkeypatch, capsys):
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "reward-box.example"):
        assert not is_loopback(host)
        with pytest.raises(ConfigError, match="without an API key.*VISALIGN_REWARD_API_KEY"):
            check_bind(host, None)
        check_bind(host, "a-key")
    with pytest.raises(ConfigError, match="without an API key"):
        RewardServer(brightness, host="0.0.0.0")  # refused before binding anything
    # the command line refuses too, before loading the reward or binding
    from visalign.cli import main

    monkeypatch.delenv("VISALIGN_REWARD_API_KEY", raising=False)
    assert main(["serve-reward", "brightness", "--host", "0.0.0.0", "--port", "0"]) == 1
    assert "without an API key" in capsys.readouterr().err


def test_load_reward_specs():
    assert load_reward("brightness") is brightness
    assert isinstance(load_reward('{"type": "ocr", "batch_size": 3}'), OCRReward)
    assert isinstance(load_reward("tests.rewards.test_remote:make_combined"), Combined)  # a factory
    assert load_reward("tests.rewards.test_remote:darkness") is darkness  # a reward function
    with pytest.raises(ConfigError, match="has no attribute"):
        load_reward("tests.rewards.test_remote:nothing_here")
    from visalign.recipes import build_reward

    remote = build_reward({"type": "remote", "url": "http://127.0.0.1:1", "retries": 0})
    assert isinstance(remote, RemoteReward) and remote.url == "http://127.0.0.1:1"
    with pytest.raises(ConfigError, match="needs a url"):
        build_reward("remote")


def serve_in_subprocess(python, spec, *args, cwd=REPO, timeout=120.0):
    """Starts `python -m visalign serve-reward SPEC --port 0 ...`; returns (process, url) once it announces itself."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("VISALIGN_REWARD_API_KEY", None)
    errors = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [str(python), "-m", "visalign", "serve-reward", spec, "--port", "0", "--log-level", "warning", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if "visalign serve-reward: serving" in line:
            return proc, line.split(" on ", 1)[1].split()[0]
    proc.kill()
    proc.wait(30)
    errors.seek(0)
    raise AssertionError(f"serve-reward {spec} did not start: {''.join(lines)}{errors.read()[-3000:]}")


def test_cli_serves_in_a_subprocess():
    proc, url = serve_in_subprocess(sys.executable, "tests.rewards.test_remote:make_combined")
    try:
        assert url.startswith("http://127.0.0.1:")
        x = quantised(3, 3, 8, 8)
        got = call_reward(RemoteReward(url), x, None)
        assert torch.equal(got.total, make_combined()(x, None)) and set(got.components) == {"bright", "dark"}
    finally:
        proc.terminate()
        proc.wait(30)


# ----------------------------------------------------------------------------- trainers
def test_trainer_skips_steps_while_the_server_is_down(tmp_path):
    port = free_port()
    reward = RemoteReward(f"http://127.0.0.1:{port}", retries=1, backoff=0.05)
    cfg = va.GRPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        num_steps=3,
        group_size=2,
        prompts_per_step=2,
        height=32,
        width=32,
        lora_rank=4,
        guidance_scale=1.0,
        trackers=["jsonl"],
    )
    trainer = va.GRPOTrainer(tiny_pipeline("sd3"), reward, ["a red circle", "a blue square"], cfg)
    before = {n: p.detach().clone() for n, p in trainer.policy.denoiser.named_parameters() if p.requires_grad}
    seen, servers = [], []

    def bring_the_server_back(trainer, step, metrics):
        seen.append(dict(metrics))
        if step == 1:  # after the first (skipped) step, the reward server comes up on its address
            servers.append(RewardServer(brightness, port=port).start())

    trainer.add_callback(bring_the_server_back)
    try:
        trainer.train()
    finally:
        for server in servers:
            server.stop()
    assert seen[0]["skipped"] == 1.0 and "not reachable after 2 tries" in seen[0]["skip_reason"]
    assert all(not m.get("skipped") and "reward_mean" in m for m in seen[1:]) and len(seen) == 3
    assert trainer.state.step == 3 and trainer.state.bad_steps == 0
    after = dict(trainer.policy.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # training went on
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert "not reachable" in logged[0]["skip_reason"] and "reward_mean" in logged[-1]


def test_client_rejects_bad_settings():
    with pytest.raises(ConfigError, match="http://HOST:PORT"):
        RemoteReward("ftp://127.0.0.1:21")
    with pytest.raises(ConfigError, match="image_dtype"):
        RemoteReward("http://127.0.0.1:1", image_dtype="jpeg")
    with pytest.raises(ConfigError, match="retries >= 0"):
        RemoteReward("http://127.0.0.1:1", retries=-1)
    with pytest.raises(ConfigError, match="printable ASCII"):
        RemoteReward("http://127.0.0.1:1", api_key="clé\n")
    assert RemoteReward("127.0.0.1:8765/").url == "http://127.0.0.1:8765"
