"""Prompt sources (lists, txt/csv/jsonl files), image columns, and the distributed, resumable sampler."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from visalign.errors import InvalidInputError
from visalign.training.prompts import PromptSampler, PromptSource, load_images


# ---------------------------------------------------------------- sources
def test_list_of_strings_and_dicts():
    src = PromptSource.from_any(["a cat", "a dog"])
    assert len(src) == 2 and src.prompts == ["a cat", "a dog"] and src[1] == {"prompt": "a dog"}
    assert src.base_dir is None and PromptSource.from_any(src) is src
    rows = PromptSource.from_any([{"caption": "x", "image": "a.png"}], prompt_column="caption")
    assert rows[0] == {"caption": "x", "image": "a.png", "prompt": "x"}
    assert rows.columns == ["prompt", "caption", "image"]


def test_records_are_copies():
    src = PromptSource.from_any([{"prompt": "a", "k": 1}])
    src[0]["k"] = 2
    assert src[0]["k"] == 1


def test_txt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# a comment\na red circle\n\n  a blue square  \n   # indented comment\n")
    src = PromptSource.from_any(path)
    assert src.prompts == ["a red circle", "a blue square"]
    assert src.base_dir == str(tmp_path.resolve())


def test_csv_and_jsonl_keep_extra_columns(tmp_path):
    (tmp_path / "d.csv").write_text('caption,image,score\nred,img/r.png,1\n"blue, big",img/b.png,2\n')
    src = PromptSource.from_any(str(tmp_path / "d.csv"), prompt_column="caption")
    assert src.prompts == ["red", "blue, big"]
    assert src[1] == {"caption": "blue, big", "image": "img/b.png", "score": "2", "prompt": "blue, big"}

    lines = [{"prompt": "red", "image": "img/r.png", "meta": {"k": 1}}, {"prompt": "blue", "image": "img/b.png"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    src = PromptSource.from_any(tmp_path / "d.jsonl")
    assert src[0]["meta"] == {"k": 1} and src.columns == ["prompt", "image", "meta"]


def test_load_images_resolves_relative_paths(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "img" / "r.png")
    Image.new("L", (6, 4), 128).save(tmp_path / "img" / "g.png")  # grayscale becomes RGB
    (tmp_path / "d.csv").write_text("prompt,image\nred,img/r.png\ngray,img/g.png\n")
    src = PromptSource.from_any(tmp_path / "d.csv")
    images = load_images([src[0], src[1]], "image", base_dir=src.base_dir)
    assert images.shape == (2, 3, 4, 6) and images.dtype == torch.float32
    assert torch.allclose(images[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(images[1], torch.full((3, 4, 6), 128 / 255))
    resized = load_images([src[0]], "image", base_dir=src.base_dir, size=(8, 5))
    assert resized.shape == (1, 3, 8, 5) and resized.min() >= 0 and resized.max() <= 1


def test_load_images_errors(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "b.png")
    with pytest.raises(InvalidInputError, match=r"row 1 \(prompt 'q'\).*'missing.png'.*does not exist"):
        load_images([{"prompt": "p", "im": "a.png"}, {"prompt": "q", "im": "missing.png"}], "im", base_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="no image column 'image'"):
        load_images([{"prompt": "p", "im": "a.png"}], "image", base_dir=tmp_path)
    with pytest.raises(InvalidInputError, match=r"different sizes.*size=\(height, width\)"):
        load_images([{"im": "a.png"}, {"im": "b.png"}], "im", base_dir=tmp_path)
    with pytest.raises(InvalidInputError, match=r"size must be \(height, width\)"):
        load_images([{"im": "a.png"}], "im", base_dir=tmp_path, size=(4.5, 4))
    (tmp_path / "c.png").write_text("not a png")
    with pytest.raises(InvalidInputError, match="could not be read as an image"):
        load_images([{"im": "c.png"}], "im", base_dir=tmp_path)


@pytest.mark.parametrize(
    "obj, match",
    [
        ([], "holds no prompts"),
        ([{"caption": "x"}], r"no prompt column 'prompt'; columns found: 'caption'.*prompt_column="),
        ([{"prompt": 3}], r"item 0.*must be a string, got int"),
        (["ok", 5], r"item 1 is of type int"),
        ("a cat on a mat", r"single prompt must be passed as a list"),
        (42, "list of strings"),
    ],
)
def test_source_errors(obj, match):
    with pytest.raises(InvalidInputError, match=match):
        PromptSource.from_any(obj)


def test_file_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        PromptSource.from_any(tmp_path / "nope.txt")
    (tmp_path / "p.parquet").write_text("x")
    with pytest.raises(InvalidInputError, match=r"unsupported suffix '.parquet'.*\.txt, \.csv, \.jsonl"):
        PromptSource.from_any(tmp_path / "p.parquet")
    (tmp_path / "e.txt").write_text("# only a comment\n\n")
    with pytest.raises(InvalidInputError, match="holds no prompts"):
        PromptSource.from_any(tmp_path / "e.txt")
    (tmp_path / "d.csv").write_text("caption,image\nx,a.png\n")
    with pytest.raises(
        InvalidInputError, match=r"header has no prompt column 'prompt'; columns found: 'caption', 'image'"
    ):
        PromptSource.from_any(tmp_path / "d.csv")
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n{"prompt": null}\n')
    with pytest.raises(InvalidInputError, match=r"line 2.*must be a string, got NoneType"):
        PromptSource.from_any(tmp_path / "d.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(InvalidInputError, match=r"line 2 is not valid JSON"):
        PromptSource.from_any(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------- sampler
def numbered(n):
    return PromptSource.from_any([f"p{i}" for i in range(n)])


def draw(sampler, k):
    return [[r["prompt"] for r in sampler.next_batch()] for _ in range(k)]


def test_sampler_deterministic_and_covers_each_epoch():
    a, b = draw(PromptSampler(numbered(10), 5, seed=3), 4), draw(PromptSampler(numbered(10), 5, seed=3), 4)
    assert a == b
    assert sorted(a[0] + a[1]) == sorted(f"p{i}" for i in range(10))  # epoch 0 is a permutation
    assert a[:2] != a[2:]  # epoch 1 has its own order
    assert draw(PromptSampler(numbered(10), 5, seed=4), 2) != a[:2]
    assert draw(PromptSampler(numbered(4), 2, shuffle=False), 3) == [["p0", "p1"], ["p2", "p3"], ["p0", "p1"]]


def test_batches_straddle_epochs_or_drop_last():
    order = lambda e: [f"p{i}" for i in np.random.default_rng([0, e]).permutation(5)]
    assert draw(PromptSampler(numbered(5), 3), 2) == [order(0)[:3], order(0)[3:] + order(1)[:1]]
    assert draw(PromptSampler(numbered(5), 3, drop_last=True), 2) == [order(0)[:3], order(1)[:3]]


def test_ranks_disjoint_and_cover_epoch():
    src = numbered(12)
    ranks = [PromptSampler(src, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    single = PromptSampler(src, 6, seed=1)
    seen = []
    for _ in range(2):  # 2 steps x 2 ranks x 3 records = one epoch
        b0, b1 = draw(ranks[0], 1)[0], draw(ranks[1], 1)[0]
        assert not set(b0) & set(b1)
        # Together the ranks draw what one process with the whole step's batch draws.
        assert b0 + b1 == draw(single, 1)[0]
        seen += b0 + b1
    assert sorted(seen) == sorted(src.prompts)


def test_resume_is_exact():
    full = draw(PromptSampler(numbered(5), 2, seed=7), 7)
    first = PromptSampler(numbered(5), 2, seed=7)
    head = draw(first, 3)
    state = first.state_dict()
    resumed = PromptSampler(numbered(5), 2, seed=7)
    resumed.load_state_dict(state)
    assert head + draw(resumed, 4) == full


def test_sampler_errors():
    with pytest.raises(InvalidInputError, match="batch_size must be an int >= 1"):
        PromptSampler(numbered(3), 0)
    with pytest.raises(InvalidInputError, match=r"rank must be in \[0, 2\)"):
        PromptSampler(numbered(3), 1, rank=2, world_size=2)
    with pytest.raises(InvalidInputError, match="drop_last=True needs"):
        PromptSampler(numbered(3), 2, world_size=2, drop_last=True)
    saved = PromptSampler(numbered(3), 1, seed=1).state_dict()
    with pytest.raises(InvalidInputError, match="seed=1.*seed=0"):
        PromptSampler(numbered(3), 1, seed=0).load_state_dict(saved)
    with pytest.raises(InvalidInputError, match="num_records=3"):
        PromptSampler(numbered(4), 1, seed=1).load_state_dict(saved)
    # Wrapping is allowed: a step bigger than the source still serves full batches.
    assert [len(b) for b in draw(PromptSampler(numbered(3), 4), 2)] == [4, 4]
