"""Image augmentation: bounded, seeded, same size, written where asked, nothing for text-only examples."""

from __future__ import annotations

import random

import pytest

from fewtune.augment.base import AugmentError
from fewtune.augment.methods import get_method
from fewtune.augment.image import ImageOptions, augment_image
from fewtune.data.formats import Example, Message

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageChops, ImageStat  # noqa: E402


def picture(size=(64, 48)):
    img = Image.new("RGB", size, (120, 90, 60))
    for x in range(size[0]):  # a gradient and a bar, so rotations and crops change pixels
        for y in range(10, 20):
            img.putpixel((x, y), (2 * x, 200, 255 - 2 * x))
    return img


def mean_difference(a, b) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


def test_same_seed_same_image_and_params():
    img = picture()
    a, pa = augment_image(img, random.Random(3), ImageOptions())
    b, pb = augment_image(img, random.Random(3), ImageOptions())
    c, pc = augment_image(img, random.Random(4), ImageOptions())
    assert pa == pb and a.tobytes() == b.tobytes()
    assert pa != pc


def test_changes_are_bounded_and_size_kept():
    img = picture()
    options = ImageOptions()
    for seed in range(20):
        new, params = augment_image(img, random.Random(seed), options)
        assert new.size == img.size and new.mode == img.mode
        assert abs(params["brightness"]) <= options.brightness and abs(params["contrast"]) <= options.contrast
        assert abs(params["rotate"]) <= options.rotate
        assert all(0 <= c <= options.crop for c in params["crop"]) and len(params["crop"]) == 4
        assert mean_difference(img, new) < 40  # a light change, not another picture (0..255 scale)


def test_zero_options_change_nothing():
    img = picture()
    new, params = augment_image(img, random.Random(0), ImageOptions(brightness=0, contrast=0, rotate=0, crop=0))
    assert mean_difference(img, new) == 0
    assert params == {"brightness": 0, "contrast": 0, "rotate": 0, "crop": [0, 0, 0, 0]}


def test_brightness_goes_the_way_params_say():
    img = picture()
    new, params = augment_image(img, random.Random(1), ImageOptions(brightness=0.3, contrast=0, rotate=0, crop=0))
    before, after = sum(ImageStat.Stat(img).mean), sum(ImageStat.Stat(new).mean)
    assert (after > before) == (params["brightness"] > 0)


def test_options_have_ceilings():
    with pytest.raises(ValueError):
        ImageOptions(rotate=90)
    with pytest.raises(ValueError):
        ImageOptions(crop=0.5)


def test_augmenter_writes_images_and_points_at_them(tmp_path):
    src = tmp_path / "cat.png"
    picture().save(src)
    example = Example([Message("user", "<image>What colour is the bar?", images=(str(src),)),
                       Message("assistant", "green")], "d.jsonl", 1)
    out = tmp_path / "aug"
    augment = get_method("image").make({"out_dir": str(out)})
    cands = augment(example, 2, random.Random(0), [])
    assert len(cands) == 2
    for cand in cands:
        (path,) = cand.example.images
        assert path.startswith(str(out)) and path != str(src)
        with Image.open(path) as img:
            assert img.size == (64, 48)
        assert [m.content for m in cand.example.messages] == [m.content for m in example.messages]  # text kept
        assert cand.example.messages[0].images == (path,)  # the placeholder now points at the changed picture
        assert set(cand.params["images"][0]) == {"brightness", "contrast", "rotate", "crop"}
    assert cands[0].example.images != cands[1].example.images
    assert example.images == [str(src)]  # the source example is not changed
    again = get_method("image").make({"out_dir": str(out)})(example, 2, random.Random(0), [])
    assert [c.params for c in again] == [c.params for c in cands]


def test_examples_without_images_give_nothing():
    augment = get_method("image").make()
    assert augment(Example([Message("user", "hi"), Message("assistant", "hello")]), 3, random.Random(0), []) == []


def test_missing_image_file_is_an_error(tmp_path):
    example = Example([Message("user", "<image>hi", images=(str(tmp_path / "gone.png"),))])
    with pytest.raises(AugmentError, match="not found"):
        get_method("image").make()(example, 1, random.Random(0), [])


def test_the_pipeline_keeps_image_candidates_whose_text_is_unchanged(tmp_path):
    from fewtune.augment.pipeline import AugmentSettings, augment_examples

    src = tmp_path / "cat.png"
    picture().save(src)
    examples = [Example([Message("user", "<image>What colour is the bar?", images=(str(src),)),
                         Message("assistant", "green")], "d.jsonl", 1),
                Example([Message("user", "What colour is the bar?"), Message("assistant", "green")], "d.jsonl", 2)]
    settings = AugmentSettings(["image"], per_example=2, options={"image": {"out_dir": str(tmp_path / "aug")}})
    kept, rejected, counts = augment_examples(examples, settings, progress=False)
    assert [(i, name) for i, name, _ in kept] == [(0, "image"), (0, "image")]
    assert not rejected and counts["image"].generated == 2
