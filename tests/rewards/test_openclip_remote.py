"""Dependency isolation for real: HPSv2 served from the open_clip environment, scored from the main one.

Runs under ``make test-openclip`` (the .venv-openclip interpreter, where open_clip imports). The test
starts ``visalign serve-reward`` with a tiny random HPSv2 in this environment as a subprocess, then
scores through :class:`~visalign.rewards.RemoteReward` from the MAIN environment's interpreter
(``.venv/bin/python``, which has no open_clip and a CPU torch): two interpreters, one reward.
Skipped where open_clip is not importable (the main suite) or the main .venv is missing.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
MAIN_PYTHON = REPO / ".venv" / "bin" / "python"


def _open_clip_available() -> bool:
    try:
        import open_clip  # noqa: F401
    except Exception:  # ImportError, or torchvision's operator errors from a mismatched build
        return False
    return True


pytestmark = [
    pytest.mark.skipif(
        not _open_clip_available(),
        reason="open_clip is not importable here (the HPSv2 server needs the 'openclip' environment; run "
        "`make test-openclip`)",
    ),
    pytest.mark.skipif(
        not MAIN_PYTHON.exists(), reason=f"the main environment's interpreter {MAIN_PYTHON} is missing (make venv)"
    ),
]

PROMPTS = ["a red cat", "a photo of a blue square", "a green field"]


def tiny_hps():
    """The served reward (``serve-reward tests.rewards.test_openclip_remote:tiny_hps``): HPSv2 on a tiny open_clip."""
    from visalign.rewards import HPSv2
    from visalign.testing.rewards import tiny_open_clip

    model, tokenizer = tiny_open_clip(seed=0)
    return HPSv2(model=model, tokenizer=tokenizer)


def images() -> torch.Tensor:
    """Exactly-8-bit images (k/255), so the uint8 transport carries them losslessly."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 3, 40, 48), generator=g).float() / 255


CLIENT = """
import importlib.util, json, sys
import torch
from visalign.rewards import RemoteReward, call_reward
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (3, 3, 40, 48), generator=g).float() / 255
remote = RemoteReward(sys.argv[1], batch_size=2)
result = call_reward(remote, x, json.loads(sys.argv[2]))
print(json.dumps({"scores": result.total.tolist(), "health": remote.health(), "torch": torch.__version__,
                  "open_clip_here": importlib.util.find_spec("open_clip") is not None}))
"""


def test_hps_served_from_the_openclip_env_scored_from_the_main_env():
    from tests.rewards.test_remote import serve_in_subprocess

    proc, url = serve_in_subprocess(
        sys.executable, "tests.rewards.test_openclip_remote:tiny_hps", "--device", "cpu", timeout=300
    )
    try:
        out = subprocess.run(
            [str(MAIN_PYTHON), "-c", CLIENT, url, json.dumps(PROMPTS)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        answer = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        proc.terminate()
        proc.wait(30)
    assert answer["health"]["name"] == "hpsv2" and answer["health"]["differentiable"] is True
    with torch.no_grad():
        local = tiny_hps()(images(), PROMPTS)
    torch.testing.assert_close(torch.tensor(answer["scores"]), local, rtol=0, atol=1e-6)
    print(
        f"main env: torch {answer['torch']}, open_clip importable there: {answer['open_clip_here']}; "
        f"this env: torch {torch.__version__}"
    )
