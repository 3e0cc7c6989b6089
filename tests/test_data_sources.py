"""Local image folders (CSV/JSONL annotations) and Hugging Face datasets as data sources, RGB pixels,
and the clear errors for bad data (issue #5, item 3).

Every folder here is written with Pillow into tmp_path: solid-colour RGB PNGs of varying sizes, red
for the class "cat" and blue for "dog", so a decoded pixel tells which file it came from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from params.schema import ParamsError, validate
from vlmprune.data.check import check_data
from vlmprune.data.decode import fit_rgb
from vlmprune.data.images import (GENERIC_EVAL_TEMPLATES, GENERIC_TRAIN_TEMPLATES, draw_calibration_images,
                                  image_split, to_pixel_values)
from vlmprune.data.spec import DataSpec

try:
    import datasets
except ImportError:  # the optional hub extra
    datasets = None
needs_datasets = pytest.mark.skipif(datasets is None, reason="needs the datasets package (pip install datasets)")

COLOURS = {"cat": (200, 30, 10), "dog": (10, 40, 220)}
SIZES = [(20, 12), (16, 16), (12, 30), (40, 20), (9, 9)]


def make_folder(root, n_per_class=5, captions=True, fmt="csv", columns=None):
    """n_per_class images of each class under root/img/, listed in root/labels.<fmt>; every other
    image has a caption "a <colour> <label> number <i>"."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for label, colour in COLOURS.items():
        for i in range(n_per_class):
            name = f"img/{label}_{i}.png"
            Image.new("RGB", SIZES[i % len(SIZES)], colour).save(root / name)
            row = {"image": name, "label": label}
            if captions:
                row["caption"] = f"a {'red' if label == 'cat' else 'blue'} {label} number {i}" if i % 2 == 0 else ""
            rows.append(row)
    write_annotations(root / f"labels.{fmt}", rows, columns)
    return rows


def write_annotations(path, rows, columns=None):
    columns = columns or list(rows[0]) if rows else (columns or ["image", "label"])
    if path.suffix == ".csv":
        lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text("".join(json.dumps({c: r[c] for c in columns if c in r}) + "\n" for r in rows))


def folder_spec(root, **kw):
    return DataSpec(name="image_folder", path=str(root), image_size=kw.pop("image_size", 16), **kw)


# ---- decoding and pixels ------------------------------------------------------------------------

def test_fit_rgb_resizes_the_shorter_side_and_keeps_the_centre():
    # 40 x 20, left half red, right half blue -> 10 x 10: resized to 20 x 10, crop columns 5..14,
    # so the crop's left part is red and its right part blue
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    out = fit_rgb(image, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (out[:, :2] == (255, 0, 0)).all() and (out[:, -2:] == (0, 0, 255)).all()
    # portrait 10 x 40 with green bands in rows 0-5 and 34-39 -> 5 x 20, crop rows 7..11 (source
    # rows 14..23, far from either band): no green left
    tall = Image.new("RGB", (10, 40), (0, 0, 0))
    tall.paste((0, 255, 0), (0, 0, 10, 6))
    tall.paste((0, 255, 0), (0, 34, 10, 40))
    assert fit_rgb(tall, 5).shape == (5, 5, 3) and (fit_rgb(tall, 5) == 0).all()
    # greyscale becomes three equal channels
    grey = fit_rgb(Image.new("L", (7, 9), 77), 4)
    assert (grey == 77).all() and grey.shape == (4, 4, 3)


def test_to_pixel_values_rgb_formula_and_greyscale_unchanged():
    rgb = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    rgb[0] = (255, 127, 0)
    rgb[1] = (1, 2, 3)
    x = to_pixel_values(rgb, 8)
    assert x.shape == (2, 3, 8, 8)
    # x = (pixel - 127) / 128 per channel; bilinear resizing keeps a constant image constant
    expected = (torch.tensor([[255, 127, 0], [1, 2, 3]], dtype=torch.float32) - 127) / 128
    assert torch.allclose(x, expected[:, :, None, None].expand(-1, -1, 8, 8))
    # greyscale (n, h, w) equals the same image as RGB with three equal channels
    grey = np.random.default_rng(0).integers(0, 256, size=(3, 5, 6), dtype=np.uint8)
    as_rgb = np.repeat(grey[..., None], 3, axis=-1)
    assert torch.equal(to_pixel_values(grey, 7), to_pixel_values(as_rgb, 7))


def test_clip_pixel_values_rgb_formula():
    from vlmprune.adapters.clip import pixel_values

    rgb = np.zeros((1, 3, 5, 3), dtype=np.uint8)
    rgb[0] = (255, 0, 51)
    mean, std = (0.5, 0.25, 0.2), (0.5, 0.25, 0.1)
    x = pixel_values(rgb, 4, mean, std)
    # (pixel / 255 - mean) / std per channel: (1 - .5) / .5 = 1, (0 - .25) / .25 = -1, (.2 - .2) / .1 = 0
    assert x.shape == (1, 3, 4, 4)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 0.0]), atol=1e-6)
    grey = np.full((1, 3, 3), 51, dtype=np.uint8)
    assert torch.allclose(pixel_values(grey, 4), pixel_values(np.repeat(grey[..., None], 3, -1), 4))


def test_generic_templates_are_disjoint():
    assert not set(GENERIC_TRAIN_TEMPLATES) & set(GENERIC_EVAL_TEMPLATES)
    assert all("{}" in t for t in GENERIC_TRAIN_TEMPLATES + GENERIC_EVAL_TEMPLATES)


# ---- image folders ------------------------------------------------------------------------------

def test_image_folder_split_labels_and_pixels(tmp_path):
    rows = make_folder(tmp_path)
    spec = folder_spec(tmp_path)
    data, train, test = image_split(spec)
    assert data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0 if r["label"] == "cat" else 1 for r in rows]
    assert len(train) == 7 and len(test) == 3 and not set(train) & set(test)
    images = data.images[test]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    for image, label in zip(images, data.labels[test]):
        assert (image == COLOURS[data.class_names[label]]).all()
    x = to_pixel_values(images, 8)
    colour = np.array(COLOURS[data.class_names[data.labels[test][0]]], dtype=np.float32)
    assert torch.allclose(x[0, :, 3, 3], torch.from_numpy((colour - 127) / 128))
    # the split follows data.seed
    assert not np.array_equal(image_split(folder_spec(tmp_path, seed=1))[2], test)


def test_image_folder_calibration_uses_captions_when_given(tmp_path):
    rows = make_folder(tmp_path)
    data, index, labels, captions, _ = draw_calibration_images(folder_spec(tmp_path), 6, seed=0)
    assert len(index) == 6 and len(set(index.tolist())) == 6
    for i, y, caption in zip(index, labels, captions):
        own = rows[i]["caption"]
        if own:
            assert caption == own
        else:
            assert caption in [t.format(data.class_names[y]) for t in GENERIC_TRAIN_TEMPLATES]
    # without captions: the same draw, every caption a template
    plain = tmp_path / "plain"
    make_folder(plain, captions=False)
    _, index2, labels2, captions2, _ = draw_calibration_images(folder_spec(plain), 6, seed=0)
    assert index2.tolist() == index.tolist() and labels2.tolist() == labels.tolist()
    assert [c for c, i in zip(captions, index) if not rows[i]["caption"]] == \
           [c for c, i in zip(captions2, index) if not rows[i]["caption"]]
    summary = check_data(folder_spec(tmp_path), 6)
    assert summary == {"kind": "image", "examples": 10, "train": 7, "heldout": 3, "classes": 2}


def test_image_folder_jsonl_matches_csv(tmp_path):
    make_folder(tmp_path / "a", fmt="csv")
    make_folder(tmp_path / "b", fmt="jsonl")
    a, _, _ = image_split(folder_spec(tmp_path / "a"))
    b, _, _ = image_split(folder_spec(tmp_path / "b"))
    assert a.class_names == b.class_names and a.labels.tolist() == b.labels.tolist()
    assert a.captions == b.captions and a.captions[1] is None
    # an explicit data.annotations, relative to the folder
    (tmp_path / "b" / "labels.jsonl").rename(tmp_path / "b" / "mine.jsonl")
    c, _, _ = image_split(folder_spec(tmp_path / "b", annotations="mine.jsonl"))
    assert c.labels.tolist() == b.labels.tolist()


# ---- bad folders: each a clear error ----------------------------------------------------------------

def expect(error, match, fn, *args):
    with pytest.raises(error) as caught:
        fn(*args)
    message = str(caught.value)
    for part in match:
        assert part in message, message
    return message


def test_missing_folder_and_annotations(tmp_path):
    expect(FileNotFoundError, ["data.path", "nope", "not found"], check_data, folder_spec(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    expect(FileNotFoundError, ["labels.csv", "labels.jsonl", "data.annotations"], check_data,
           folder_spec(tmp_path / "empty"))
    make_folder(tmp_path / "f")
    expect(FileNotFoundError, ["data.annotations", "other.csv"], check_data,
           folder_spec(tmp_path / "f", annotations="other.csv"))


def test_missing_column_names_it_and_lists_the_present_ones(tmp_path):
    rows = make_folder(tmp_path, captions=False)
    write_annotations(tmp_path / "labels.csv", [{"image": r["image"], "kind": r["label"]} for r in rows])
    expect(ValueError, ["no column 'label'", "data.label_column", "columns present: image, kind"],
           check_data, folder_spec(tmp_path))
    # the column named by data.label_column is used
    assert image_split(folder_spec(tmp_path, label_column="kind"))[0].class_names == ["cat", "dog"]


def test_empty_annotation_file(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("image,label\n")
    expect(ValueError, ["lists no images", "empty"], check_data, folder_spec(tmp_path))


def test_listed_image_missing_is_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "img" / "dog_3.png").unlink()
    expect(FileNotFoundError, ["1 image(s)", "dog_3.png", "not found"], check_data, folder_spec(tmp_path))


def test_unreadable_image_is_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "img" / "cat_2.png").write_bytes(b"not a png at all")
    expect(ValueError, ["unreadable image", "cat_2.png"], check_data, folder_spec(tmp_path))
    # decoding it directly names it too
    data, _, _ = image_split(folder_spec(tmp_path))
    expect(ValueError, ["unreadable image", "cat_2.png"], data.images.__getitem__, 2)


def test_too_few_examples_for_calibration(tmp_path):
    make_folder(tmp_path)
    message = expect(ValueError, ["calibration.n_samples=20", "only 7", "lower calibration.n_samples"],
                     check_data, folder_spec(tmp_path), 20)
    assert "data.test_fraction" in message


def test_empty_held_out_split(tmp_path):
    make_folder(tmp_path, n_per_class=1)
    expect(ValueError, ["held-out split", "data.test_fraction=0.1", "empty"], check_data,
           folder_spec(tmp_path, test_fraction=0.1))


def test_question_column_needs_an_answer_column(tmp_path):
    rows = make_folder(tmp_path, captions=False)
    write_annotations(tmp_path / "labels.csv", [{**r, "question": "what?"} for r in rows])
    expect(ValueError, ["question column 'question'", "no answer column 'answer'"], check_data, folder_spec(tmp_path))


@pytest.mark.parametrize("data,message", [
    ({"name": "image_folder"}, "data.name 'image_folder' needs data.path"),
    ({"name": "hf"}, "data.name 'hf' needs data.hf_id"),
    ({"name": "digits", "annotations": "a.csv"}, "data.annotations is only read when data.name is 'image_folder'"),
    ({"name": "image_folder", "path": "x", "hf_id": "y"}, "data.hf_id is only read when data.name is 'hf'"),
    ({"name": "image_folder", "path": "x", "split": "test"}, "data.split is only read"),
    ({"name": "wikipedia", "image_size": 64}, "data.image_size is only read"),
    ({"name": "image_folder", "path": "x", "text_column": "t"}, "data.text_column is only read"),
    ({"name": "hf", "hf_id": "x", "image_size": 4}, "greater than or equal to 8"),
])
def test_data_params_field_combinations(data, message):
    with pytest.raises(ParamsError, match=message):
        validate({"data": data})


def test_valid_source_params_pass():
    assert validate({"data": {"name": "image_folder", "path": "x", "annotations": "a.jsonl"}}).data.path == "x"
    hf = validate({"data": {"name": "hf", "hf_id": "user/set", "split": "test", "text_column": "body"}}).data
    assert hf.split == "test" and hf.text_column == "body"


# ---- Hugging Face datasets (local: no hub here) --------------------------------------------------

def save_image_dataset(path, n_per_class=5, as_dict=False):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"]),
                                  "caption": datasets.Value("string")})
    images, labels, captions = [], [], []
    for y, colour in enumerate(COLOURS.values()):
        for i in range(n_per_class):
            images.append(Image.new("RGB", SIZES[i % len(SIZES)], colour))
            labels.append(y)
            captions.append(f"caption {y} {i}" if i == 0 else None)
    ds = datasets.Dataset.from_dict({"image": images, "label": labels, "caption": captions}, features=features)
    (datasets.DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(path))
    return path


def hf_spec(hf_id, **kw):
    return DataSpec(name="hf", hf_id=str(hf_id), image_size=kw.pop("image_size", 16), **kw)


@needs_datasets
def test_hf_image_dataset_saved_to_disk(tmp_path):
    path = save_image_dataset(tmp_path / "saved")
    data, train, test = image_split(hf_spec(path))
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0] * 5 + [1] * 5
    assert len(train) == 7 and len(test) == 3
    assert data.images[test].shape == (3, 16, 16, 3)
    for image, y in zip(data.images[test], data.labels[test]):
        assert (image == list(COLOURS.values())[y]).all()
    assert data.captions[0] == "caption 0 0" and data.captions[1] is None
    assert check_data(hf_spec(path), 7)["classes"] == 2
    expect(ValueError, ["only 7"], check_data, hf_spec(path), 8)


@needs_datasets
def test_hf_dataset_dict_split_and_local_imagefolder(tmp_path):
    path = save_image_dataset(tmp_path / "dict", as_dict=True)
    assert len(image_split(hf_spec(path))[0]) == 10
    expect(ValueError, ["data.split 'test'", "splits: train"], image_split, hf_spec(path, split="test"))
    # a plain folder of class sub-folders, read by load_dataset's imagefolder builder
    root = tmp_path / "classes"
    for label, colour in COLOURS.items():
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 14), colour).save(root / label / f"{i}.png")
    data, _, _ = image_split(hf_spec(root))
    assert data.class_names == ["cat", "dog"] and sorted(data.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    for i in range(len(data)):
        assert (data.images[i] == COLOURS[data.class_names[data.labels[i]]]).all()


@needs_datasets
def test_hf_text_dataset(tmp_path):
    from vlmprune.data.text import load_text_corpus, require_text

    docs = [f"document number {i}. " * 3 for i in range(10)] + ["", "   "]
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "text"))
    spec = hf_spec(tmp_path / "text", text_column="body")
    require_text(spec, "causal_lm")
    corpus = load_text_corpus(spec)
    assert len(corpus.calibration) == 7 and len(corpus.heldout) == 3
    assert sorted(corpus.calibration + corpus.heldout) == sorted(d.strip() for d in docs if d.strip())
    assert check_data(spec)["kind"] == "text"
    # an image family given this text set: the missing image column is named
    expect(ValueError, ["no column 'image'", "columns present: body"], image_split, spec)
    # neither column
    expect(ValueError, ["neither an image column 'image'", "text column 'text'", "columns present: body"],
           check_data, hf_spec(tmp_path / "text"))


@needs_datasets
def test_hf_missing_label_column_and_empty_text(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "name": ["x"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "name": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "a"))
    expect(ValueError, ["no column 'label'", "data.label_column", "columns present: image, name"],
           check_data, hf_spec(tmp_path / "a"))
    # (datasets cannot load back an empty saved dataset, so emptiness is checked on a text set)
    datasets.Dataset.from_dict({"text": ["", "  "]}).save_to_disk(str(tmp_path / "blank"))
    expect(ValueError, ["no non-empty text in column 'text'", "empty"], check_data, hf_spec(tmp_path / "blank"))


@needs_datasets
def test_hf_missing_local_path(tmp_path):
    expect(FileNotFoundError, ["data.hf_id", "not found"], check_data, hf_spec(f"{tmp_path}/nothing"))


@needs_datasets
def test_hf_offline_unknown_id_says_what_to_do():
    code = ("from vlmprune.data.hub import open_hf; from vlmprune.data.spec import DataSpec; "
            "open_hf(DataSpec(name='hf', hf_id='no-such-user/no-such-dataset'))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            check=False)
    assert result.returncode != 0
    assert "not found locally" in result.stderr and "HF_HUB_OFFLINE=0" in result.stderr, result.stderr[-2000:]


def test_hf_without_datasets_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    expect(ImportError, ["pip install", "datasets"], check_data, hf_spec(tmp_path))


# ---- end to end: a tiny CLIP calibrated and evaluated on an image folder ---------------------------

def test_tiny_clip_calibrate_and_evaluate_on_image_folder(tmp_path):
    from safetensors.torch import load_file

    from tasks.calibrate import calibrate
    from tests.tiny import build_tiny_clip, family_params, save_tiny
    from vlmprune.adapters import ADAPTERS

    make_folder(tmp_path / "data", n_per_class=8)
    model, processor = build_tiny_clip()
    directory = save_tiny(model, processor, tmp_path / "clip")
    data = {"name": "image_folder", "path": str(tmp_path / "data"), "image_size": 32}
    params = family_params(directory, tmp_path / "artifacts", data)
    calibrate.fn(params)
    batch = load_file(str(tmp_path / "artifacts" / "calibrate" / "calibration.safetensors"))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    # red cat / blue dog survive the pixel path: channel 0 (red) above channel 2 (blue) for cats
    red_minus_blue = batch["pixel_values"][:, 0].mean((1, 2)) - batch["pixel_values"][:, 2].mean((1, 2))
    assert ((red_minus_blue > 0) == (batch["labels"] == 0)).all()
    adapter = ADAPTERS.get("clip")()
    loaded = adapter.load(str(directory), torch.float32, "cpu")
    spec = DataSpec(**params.data.model_dump())
    metrics, outputs = adapter.evaluate(loaded, spec, batch_size=8, max_samples=None, device="cpu")
    assert outputs["image"].shape[0] == 5 and outputs["text"].shape[0] == 2  # 16 images, 5 held out; 2 classes
    assert all(0 <= v <= 1 for v in metrics.values())
    # a bad count fails in the stage before the model is loaded
    with pytest.raises(ValueError, match="calibration.n_samples=50"):
        calibrate.fn(family_params(directory, tmp_path / "a2", data, calibration={"n_samples": 50}))


def test_empty_text_file_is_an_error(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    expect(ValueError, ["holds no text", "empty"], check_data, DataSpec(name="text_file", path=str(tmp_path / "blank.txt")))


# ---- per-example VQA questions and answers (image-to-text families) ----------------------------------

VQA_QUESTIONS = ["What colour is it?", "Which animal is it?", "How many animals?"]


def make_vqa_folder(root, n=12, label=False, fmt="jsonl", rows_fn=None):
    """n solid-colour images (cat red / dog blue, alternating) listed in root/labels.<fmt> with a
    question (cycling through VQA_QUESTIONS) and its answer: the colour, the animal, or "one"/"two"."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        animal = "cat" if i % 2 == 0 else "dog"
        name = f"img/{i}.png"
        Image.new("RGB", SIZES[i % len(SIZES)], COLOURS[animal]).save(root / name)
        question = VQA_QUESTIONS[i % 3]
        answer = {0: "red" if animal == "cat" else "blue", 1: animal, 2: "one" if i % 4 < 2 else "two"}[i % 3]
        rows.append({"image": name, "question": question, "answer": answer, **({"label": animal} if label else {})})
    rows = rows_fn(rows) if rows_fn else rows
    write_annotations(root / f"labels.{fmt}", rows, list(rows[0]))
    return rows


def test_vqa_folder_carries_questions_and_answers(tmp_path):
    rows = make_vqa_folder(tmp_path / "a")
    data, _, test = image_split(folder_spec(tmp_path / "a", test_fraction=0.5))
    assert data.questions == [r["question"] for r in rows] and data.answers == [r["answer"] for r in rows]
    # no label column: the class names are the distinct answers, each label its answer's index
    assert data.class_names == sorted({r["answer"] for r in rows})
    assert [data.class_names[y] for y in data.labels] == data.answers
    sub = data.subset(test)
    assert sub.questions == [rows[i]["question"] for i in test] and sub.answers == [rows[i]["answer"] for i in test]
    assert check_data(folder_spec(tmp_path / "a"))["questions"] == 3
    # a label column is kept as the labels; CSV reads the same questions
    make_vqa_folder(tmp_path / "b", label=True, fmt="csv")
    b, _, _ = image_split(folder_spec(tmp_path / "b"))
    assert b.class_names == ["cat", "dog"] and b.questions == data.questions and b.answers == data.answers
    # renamed columns through data.question_column / data.answer_column
    make_vqa_folder(tmp_path / "c", rows_fn=lambda rs: [{"image": r["image"], "q": r["question"], "a": r["answer"]}
                                                          for r in rs])
    c, _, _ = image_split(folder_spec(tmp_path / "c", question_column="q", answer_column="a"))
    assert c.questions == data.questions and c.answers == data.answers
    # without the columns nothing changes
    make_folder(tmp_path / "d")
    assert image_split(folder_spec(tmp_path / "d"))[0].questions is None


def test_vqa_bad_inputs_name_the_problem(tmp_path):
    def folder(name, rows_fn):
        make_vqa_folder(tmp_path / name, rows_fn=rows_fn)
        return folder_spec(tmp_path / name)

    drop = lambda column: lambda rs: [{k: v for k, v in r.items() if k != column} for r in rs]
    expect(ValueError, ["answer column 'answer'", "no question column 'question'", "data.question_column"],
           check_data, folder("a", drop("question")))
    expect(ValueError, ["question column 'question'", "no answer column 'answer'", "data.answer_column"],
           check_data, folder("b", drop("answer")))
    blank = lambda column, row: lambda rs: [{**r, column: "  "} if i == row else r for i, r in enumerate(rs)]
    expect(ValueError, ["row 3", "empty 'question'", "data.question_column"], check_data, folder("c", blank("question", 2)))
    expect(ValueError, ["row 5", "empty 'answer'", "data.answer_column"], check_data, folder("d", blank("answer", 4)))
    # renamed columns: the messages name the configured column
    make_vqa_folder(tmp_path / "e")
    expect(ValueError, ["no question column 'q'", "data.question_column"], check_data,
           folder_spec(tmp_path / "e", question_column="q"))
    # params: only image_folder and hf read the columns
    with pytest.raises(ParamsError, match="data.question_column is only read"):
        validate({"data": {"name": "digits", "question_column": "q"}})
    assert validate({"data": {"name": "hf", "hf_id": "x", "answer_column": "a"}}).data.answer_column == "a"


@needs_datasets
def test_vqa_hf_dataset(tmp_path):
    rows = make_vqa_folder(tmp_path / "src")
    images = [Image.open(tmp_path / "src" / r["image"]) for r in rows]
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": images, "question": [r["question"] for r in rows],
                                     "answer": [r["answer"] for r in rows]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    data, _, _ = image_split(hf_spec(tmp_path / "saved"))
    assert data.questions == [r["question"] for r in rows] and data.answers == [r["answer"] for r in rows]
    assert [data.class_names[y] for y in data.labels] == data.answers
    # several answers per row (VQAv2's "answers") is not one text value: a clear error
    listed = datasets.Dataset.from_dict({"image": images[:2], "question": ["q", "q"], "answer": [["a", "b"], ["c"]]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "question": datasets.Value("string"),
                                                                    "answer": datasets.Sequence(datasets.Value("string"))}))
    listed.save_to_disk(str(tmp_path / "listed"))
    expect(ValueError, ["row 0", "'answer'", "list", "one string per example"], image_split, hf_spec(tmp_path / "listed"))


def tiny_image_to_text(family):
    from tests.tiny import build_tiny_blip2, build_tiny_llava, build_tiny_vision_lm
    from vlmprune.adapters import ADAPTERS
    from vlmprune.adapters.base import LoadedModel

    builder = {"blip2": build_tiny_blip2, "llava": build_tiny_llava, "vision_lm": build_tiny_vision_lm}[family]
    model, tokenizer = builder()
    return ADAPTERS.get(family)(), LoadedModel(model, tokenizer), tokenizer


@pytest.mark.parametrize("family", ["blip2", "llava", "vision_lm"])
def test_vqa_calibration_targets_each_examples_own_answer(family, tmp_path):
    rows = make_vqa_folder(tmp_path)
    adapter, loaded, tokenizer = tiny_image_to_text(family)
    spec = folder_spec(tmp_path, test_fraction=0.25)
    batch = adapter.make_calibration(loaded, spec, 6, seed=0)
    pad = tokenizer.pad_token_id
    lengths = set()
    for ids, mask, labels, i in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["index"].tolist()):
        n = int(mask.sum())
        lengths.add(n)
        assert mask[:n].all() and not mask[n:].any() and (ids[n:] == pad).all()  # right padding only
        target = labels != -100
        start = int(target.nonzero()[0])
        assert target[start:n].all() and not target[:start].any() and not target[n:].any()
        assert torch.equal(labels[target], ids[target])
        # the labelled tokens are exactly this example's answer and EOS; the prompt holds its own question
        end = n if tokenizer.eos_token_id is None else n - 1  # answer tokens, then EOS where the tokenizer has one
        assert end == n or labels[end] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[start:end]).strip() == rows[i]["answer"]
        assert tokenizer.decode(ids[:start], skip_special_tokens=True).split("?")[0].lower().endswith(
            rows[i]["question"].lower().rstrip("?"))
        assert int((ids[:start] == adapter.image_token_id(loaded.model)).sum()) == adapter.n_image_tokens(loaded.model)
    assert len(lengths) > 1  # the prompts differ in length, so padding was exercised
    assert adapter.loss(loaded.model, batch).isfinite()


@pytest.mark.parametrize("family", ["llava"])  # vision_lm inherits evaluate (its calibration is tested above)
def test_vqa_evaluation_groups_by_question_and_scores_own_answers(family, tmp_path):
    from vlmprune.adapters.causal_lm import lm_loss

    rows = make_vqa_folder(tmp_path, n=18, label=True)  # labels cat/dog: the class names are not the answers
    adapter, loaded, tokenizer = tiny_image_to_text(family)
    spec = folder_spec(tmp_path, test_fraction=0.5)
    _, _, test = image_split(spec)
    # a fake greedy decoder answering one fixed word per question
    said = {"colour": "red", "which": "dog", "many": "two"}
    calls = []

    def generate(input_ids, pixel_values, attention_mask, max_new_tokens, **kw):
        assert attention_mask.all() and (input_ids == input_ids[:1]).all()  # one prompt per call, no padding
        prompt = tokenizer.decode(input_ids[0], skip_special_tokens=True)
        key = next(k for k in said if k in prompt.lower())
        calls.append((key, len(input_ids)))
        answer = torch.tensor(tokenizer(" " + said[key], add_special_tokens=False)["input_ids"])
        return torch.cat([input_ids, answer.expand(len(input_ids), -1)], dim=1)

    loaded.model.generate = generate
    metrics, outputs = adapter.evaluate(loaded, spec, batch_size=2, max_samples=None, device="cpu")
    by_question = {}
    for i in test.tolist():
        by_question.setdefault(rows[i]["question"], []).append(i)
    assert len(by_question) == 3
    # every call saw one question; the calls cover each question's held-out images, in batches of <= 2
    assert sorted(n for _, n in calls) == sorted(min(2, len(v) - s) for v in by_question.values()
                                                 for s in range(0, len(v), 2))
    seen = {}
    for key, n in calls:
        seen[key] = seen.get(key, 0) + n
    key_of = {"What colour is it?": "colour", "Which animal is it?": "which", "How many animals?": "many"}
    assert seen == {key_of[q]: len(v) for q, v in by_question.items()}
    expected = np.mean([said[key_of[rows[i]["question"]]] == rows[i]["answer"] for i in test.tolist()])
    assert 0 < expected < 1  # the case discriminates
    assert metrics["vqa_accuracy"] == pytest.approx(expected)
    # answer loss: the mean over all answer tokens of each image's own question + answer, one at a time
    data, _, _ = image_split(spec)
    total, count = 0.0, 0
    for i in test.tolist():
        one = adapter._question_sequences(loaded, data, np.array([i]))
        pixels = adapter._pixels(loaded, data.images[np.array([i])])
        with torch.no_grad():
            logits = adapter.run_full(loaded.model, {**one, "pixel_values": pixels}).logits
        total += float(lm_loss(logits, one["labels"], reduction="none")[one["labels"][:, 1:] != -100].sum())
        count += int((one["labels"] != -100).sum())
    assert metrics["answer_loss"] == pytest.approx(total / count, rel=1e-4)
    assert outputs["answer_logits"].shape[0] <= count
