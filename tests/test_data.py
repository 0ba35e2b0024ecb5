"""Data sources: .npy, .npz, image folders (+labels.json), file.py:function; validation and selection."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from PIL import Image

from fixtures import models
from onnxopt.data import RANDOM_SAMPLES, DataSpec, ImageOptions, open_data
from onnxopt.errors import DataError


def _x(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------------------------------- npy
def test_npy_samples_and_batches(tmp_path):
    x = _x(7)
    np.save(tmp_path / "x.npy", x)
    src = open_data(str(tmp_path / "x.npy"), models.tiny_cnn(), batch_size=3)
    assert src.kind == "npy" and src.count() == 7
    samples = list(src.samples())
    assert len(samples) == 7 and samples[2]["input"].shape == (1, 3, 8, 8)
    np.testing.assert_array_equal(samples[2]["input"][0], x[2])
    batches = list(src.batches())
    assert [b["input"].shape[0] for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), x)
    assert src.labels() is None
    # a fresh pass each call (what PassContext.data expects)
    assert len(list(src())) == len(list(src())) == 3


def test_fixed_batch_model_gets_its_batch(tmp_path):
    np.save(tmp_path / "x.npy", _x(5))
    src = open_data(str(tmp_path / "x.npy"), models.tiny_cnn(batch=1), batch_size=4)
    assert [b["input"].shape[0] for b in src.batches()] == [1] * 5


def test_npy_for_a_two_input_model_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(DataError, match="feeds one input"):
        open_data(str(tmp_path / "x.npy"), models.two_input_model())


def test_int_data_is_cast_to_a_float_input(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 3, 8, 8), np.int32))
    feed = next(iter(open_data(str(tmp_path / "x.npy"), models.tiny_cnn()).samples()))
    assert feed["input"].dtype == np.float32


# ---------------------------------------------------------------------------------------- npz
def test_npz_keyed_by_input_name_with_labels(tmp_path):
    a = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    k = np.arange(24, dtype=np.int64).reshape(6, 4)
    np.savez(tmp_path / "d.npz", a=a, k=k, labels=np.arange(6))
    src = open_data(str(tmp_path / "d.npz"), models.two_input_model(), batch_size=4)
    batches = list(src.batches())
    assert [b["a"].shape[0] for b in batches] == [4, 2]
    np.testing.assert_array_equal(np.concatenate([b["k"] for b in batches]), k)
    assert batches[0]["k"].dtype == np.int64
    np.testing.assert_array_equal(src.labels(), np.arange(6))


def test_npz_missing_key_names_what_it_has(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 4), np.float32), other=np.zeros((2, 4)))
    with pytest.raises(DataError, match=r"no array for input\(s\) k .*it has a, other"):
        list(open_data(str(tmp_path / "d.npz"), models.two_input_model()).samples())


def test_npz_unequal_counts(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 4), np.float32), k=np.zeros((3, 4), np.int64))
    with pytest.raises(DataError, match="different numbers of samples"):
        list(open_data(str(tmp_path / "d.npz"), models.two_input_model()).samples())


def test_npz_x_y_convention_and_uint8_images(tmp_path):
    """An (x, y) .npz for a single-input model: uint8 images are normalized like an image folder."""
    x = np.full((3, 3, 8, 8), 200, np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([1, 2, 3]))
    src = open_data(str(tmp_path / "d.npz"), models.tiny_cnn(), image={"scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    feed = next(iter(src.samples()))
    np.testing.assert_allclose(feed["input"], (200 / 255 - 0.5) / 0.25, rtol=1e-6)
    np.testing.assert_array_equal(src.labels(), [1, 2, 3])


def test_separate_labels_file(tmp_path):
    np.save(tmp_path / "x.npy", _x(4))
    np.save(tmp_path / "y.npy", np.array([3, 1, 4, 1]))
    src = open_data(str(tmp_path / "x.npy"), models.tiny_cnn(), labels=str(tmp_path / "y.npy"))
    np.testing.assert_array_equal(src.labels(), [3, 1, 4, 1])
    np.save(tmp_path / "yf.npy", np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="integer"):
        open_data(str(tmp_path / "x.npy"), models.tiny_cnn(), labels=str(tmp_path / "yf.npy")).labels()
    with pytest.raises(DataError, match="does not exist"):
        open_data(str(tmp_path / "x.npy"), models.tiny_cnn(), labels=str(tmp_path / "none.npy")).labels()


# ------------------------------------------------------------------------------------- images
def _images(folder, colors, size=(12, 10)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(colors):
        Image.new("RGB", size, c).save(folder / f"img{i:02d}.png")
    return folder


def test_image_folder_preprocessing_and_list_labels(tmp_path):
    folder = _images(tmp_path / "imgs", [(255, 0, 0), (0, 128, 255), (10, 20, 30)])
    (folder / "labels.json").write_text(json.dumps([{"file": f"img{i:02d}.png", "class_index": c} for i, c in enumerate([4, 0, 2])]))
    (folder / "notes.txt").write_text("not an image")
    src = open_data(str(folder), models.tiny_cnn(), image={"size": 10, "crop": 8, "mean": [127.0], "std": [128.0]})
    assert src.kind == "images" and src.count() == 3
    feeds = list(src.samples())
    assert feeds[1]["input"].shape == (1, 3, 8, 8) and feeds[1]["input"].dtype == np.float32
    np.testing.assert_allclose(feeds[1]["input"][0, :, 4, 4], (np.array([0, 128, 255]) - 127) / 128, atol=1e-6)
    np.testing.assert_array_equal(src.labels(), [4, 0, 2])


def test_image_folder_of_class_subfolders_interleaves_the_classes_and_labels_them(tmp_path):
    """torchvision's ImageFolder layout (root/<class>/<image>): it used to stop with "holds no
    images". The classes are numbered in sorted folder order, as ImageFolder does, and the images
    are read class by class in turn, so any first samples hold every class."""
    root = tmp_path / "train"
    _images(root / "dog", [(0, 0, 250), (0, 0, 240)])
    _images(root / "cat", [(250, 0, 0), (240, 0, 0), (230, 0, 0)])
    _images(root / "emu" / "extra", [(0, 250, 0)])   # nested deeper: still the class 'emu'
    _images(root / ".cache", [(1, 1, 1)])             # hidden: skipped
    src = open_data(str(root), models.tiny_cnn(), image={"size": 8, "crop": 8, "scale": 1 / 255})
    assert src.count() == 6
    np.testing.assert_array_equal(src.labels(), [0, 1, 2, 0, 1, 0])   # cat, dog, emu, cat, dog, cat
    assert src.labels_origin == "class subfolders" and src.describe() == "6 images in 3 class subfolders"
    red = [int(np.argmax(f["input"][0, :, 4, 4])) for f in src.samples()]
    assert red == [0, 2, 1, 0, 2, 0]   # cat red, dog blue, emu green: pixels and labels in the same order
    # with --every the selection and the labels stay together
    np.testing.assert_array_equal(open_data(str(root), models.tiny_cnn(), image={"size": 8, "crop": 8, "scale": 1 / 255},
                                            every=2).labels(), [0, 2, 1])
    # labels.json still wins, keyed by the path in the folder or by the file name
    (root / "labels.json").write_text(json.dumps({"cat/img00.png": 7, "img01.png": 8, "dog/img00.png": 9,
                                                  "emu/extra/img00.png": 3, "cat/img02.png": 5}))
    src = open_data(str(root), models.tiny_cnn(), image={"size": 8, "crop": 8, "scale": 1 / 255})
    np.testing.assert_array_equal(src.labels(), [7, 9, 3, 8, 8, 5])
    assert src.labels_origin == "labels.json"


def test_image_folder_for_a_greyscale_input_feeds_each_images_luma(tmp_path):
    """A one-channel input ([N, 1, H, W], NHWC [N, H, W, 1] or [N, H, W]: digits, text lines, scans) is fed
    each image's luma (PIL's "L"); it stopped with a shape error ([1, 3, H, W] given). A 3-value
    mean (an RGB preset) for it says the input is greyscale."""
    from onnx import TensorProto, helper
    folder = _images(tmp_path / "imgs", [(255, 0, 0), (0, 255, 0)])
    for layout, shape in (("NCHW", ["N", 1, 8, 8]), ("NHWC", ["N", 8, 8, 1]), ("NHW", ["N", 8, 8])):
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "grey",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        feeds = list(open_data(str(folder), model, image={"size": 8, "crop": 8, "scale": 1 / 255}).samples())
        luma = np.array([float(feed["x"].reshape(-1)[27]) for feed in feeds])
        expected = {"NCHW": (1, 1, 8, 8), "NHWC": (1, 8, 8, 1), "NHW": (1, 8, 8)}[layout]
        assert feeds[0]["x"].shape == expected
        src = open_data(str(folder), model, image={"preset": "none"})
        src.check()
        assert "greyscale" in src.preprocessing.describe(src.grey) and "RGB" not in src.preprocessing.describe(src.grey)
        np.testing.assert_allclose(luma, np.array([76, 150]) / 255, atol=1 / 255)   # PIL: L = 0.299 R + 0.587 G + 0.114 B
        with pytest.raises(DataError, match=r"--mean \(of --preprocess imagenet\) gives 3 values, but the data has 1 channel\(s\): "
                                            "the model's input is greyscale"):
            open_data(str(folder), model, image={"preset": "imagenet"}).check()
    # a flat input has no image geometry: said, where it was an internal IndexError
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "flat",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])])
    flat = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(DataError, match=r"an image folder feeds an image input .*; input 'x' is \[\?, 64\]"):
        open_data(str(folder), flat, image={"preset": "none"}).check()


def test_image_folder_bgr_scale_nhwc_and_dict_labels(tmp_path):
    folder = _images(tmp_path / "imgs", [(200, 100, 50), (1, 2, 3)], size=(9, 6))
    (folder / "labels.json").write_text(json.dumps({"img00.png": 7, "img01.png": 8}))
    src = open_data(str(folder), models.nhwc_model(), image={"bgr": True, "scale": 0.5})
    feed = next(iter(src.samples()))
    assert feed["input"].shape == (1, 6, 6, 3)  # layout derived from the model: NHWC
    np.testing.assert_allclose(feed["input"][0, 3, 3], [25, 50, 100])
    np.testing.assert_array_equal(src.labels(), [7, 8])


def test_image_folder_reads_every_common_mode_as_rgb_and_16_bit_grey_scaled(tmp_path):
    """RGBA, palette, CMYK, 8- and 16-bit grey: each is the same picture in RGB. A 16-bit grey PNG
    (a depth map, a scan) is scaled to 0..255; PIL's own conversion saturated it to white."""
    folder = tmp_path / "modes"
    folder.mkdir()
    base = Image.new("RGB", (8, 8), (51, 51, 51))   # a grey the GIF's web palette holds exactly
    base.convert("RGBA").save(folder / "a_rgba.png")
    base.convert("P").save(folder / "b_palette.gif")
    base.convert("CMYK").save(folder / "c_cmyk.jpg", quality=100)
    base.convert("L").save(folder / "d_grey.png")
    Image.fromarray(np.full((8, 8), 51 * 257, np.uint16)).save(folder / "e_grey16.png")
    assert Image.open(folder / "e_grey16.png").mode.startswith("I")
    feeds = list(open_data(str(folder), models.tiny_cnn(), image={"size": 8, "crop": 8, "mean": [0.0], "std": [1.0]}).samples())
    assert len(feeds) == 5
    for f in feeds:
        np.testing.assert_allclose(f["input"], 51.0, atol=1.0)


def test_image_folder_for_a_uint8_input_feeds_raw_pixels_without_flags(tmp_path):
    """A model that takes uint8 pixels (NHWC, normalizing inside: tflite conversions, end-to-end
    exports) needs no preprocessing flag: before, its image folder was refused until the user
    said `--preprocess none`, and `--preprocess imagenet` cast normalized floats to uint8 (zeros)."""
    from helpers import make_model
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Cast", ["img"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["f"], ["y"], perm=[0, 3, 1, 2])]
    m = make_model(nodes, [("img", ["N", 6, 6, 3], TensorProto.UINT8)], [("y", ["N", 3, 6, 6])])
    folder = _images(tmp_path / "imgs", [(200, 100, 50), (1, 2, 3)], size=(9, 6))
    src = open_data(DataSpec(str(folder), require_preprocessing=True), m)
    feed = next(iter(src.samples()))
    assert feed["img"].dtype == np.uint8 and feed["img"].shape == (1, 6, 6, 3)
    np.testing.assert_array_equal(feed["img"][0, 3, 3], [200, 100, 50])
    assert src.preprocessing.preset == "none"          # said on the console and recorded like a stated one
    with pytest.raises(DataError, match="takes raw pixels and normalizes them itself"):
        next(iter(open_data(DataSpec(str(folder), image=ImageOptions(preset="imagenet"), require_preprocessing=True), m).samples()))


def test_labels_json_must_label_every_image(tmp_path):
    """Regression: unlabeled images used to be dropped from the labels, shifting every later label."""
    folder = _images(tmp_path / "imgs", [(1, 1, 1)] * 3)
    (folder / "labels.json").write_text(json.dumps({"img00.png": 1, "img02.png": 2}))
    with pytest.raises(DataError, match="no entry in labels.json.*img01.png"):
        open_data(str(folder), models.tiny_cnn()).labels()
    (folder / "labels.json").write_text("[{'file': broken")
    with pytest.raises(DataError, match="not valid JSON"):
        open_data(str(folder), models.tiny_cnn()).labels()
    for bad, words in (([{"name": "img00.png"}], "need 'file'"), (["img00.png:class"], "need 'file'"),
                       ({"img00.png": "cat"}, "not an integer"), (3, "must be a mapping")):
        (folder / "labels.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=words):
            open_data(str(folder), models.tiny_cnn()).labels()


@pytest.mark.parametrize("image, words", [
    ({"mean": [1.0, 2.0]}, r"--mean gives 2 values, but the data has 3 channel\(s\)\."),
    ({"std": [0.0]}, "--std contains 0"),
    ({"std": [1.0, 0.0, 1.0]}, "--std contains 0"),
])
def test_bad_mean_std(tmp_path, image, words):
    """Regression: a mean of the wrong length ended in a NumPy broadcast traceback, a zero std in
    a misleading 'the data holds NaN' message."""
    folder = _images(tmp_path / "imgs", [(1, 2, 3)])
    with pytest.raises(DataError, match=words):
        list(open_data(str(folder), models.tiny_cnn(), image=image).samples())
    np.savez(tmp_path / "d.npz", x=np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=words):
        list(open_data(str(tmp_path / "d.npz"), models.tiny_cnn(), image=image).samples())


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images"):
        open_data(str(tmp_path / "empty"), models.tiny_cnn())
    with pytest.raises(DataError, match="does not exist"):
        open_data(str(tmp_path / "nothing.npy"), models.tiny_cnn())
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(DataError, match="unsupported"):
        open_data(str(tmp_path / "data.csv"), models.tiny_cnn())


def test_unreadable_image(tmp_path):
    folder = _images(tmp_path / "imgs", [(1, 1, 1)])
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read image"):
        list(open_data(str(folder), models.tiny_cnn()).samples())


# -------------------------------------------------------------------------------- python data
def test_python_function_batched_and_unbatched(tmp_path):
    script = tmp_path / "feeds.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        def batched():
            for i in range(2):
                yield {"input": np.full((3, 3, 8, 8), i, np.float32)}
        def single():
            return [{"input": np.zeros((3, 8, 8), np.float32)} for _ in range(4)]
        def not_dicts():
            yield [1, 2]
        def fails_midway():
            yield {"input": np.zeros((1, 3, 8, 8), np.float32)}
            raise KeyError("no such file")
        def not_iterable():
            return 3
    """))
    src = open_data(f"{script}:batched", models.tiny_cnn(), batch_size=2)
    samples = list(src.samples())
    assert len(samples) == 6 and all(s["input"].shape == (1, 3, 8, 8) for s in samples)
    assert [float(s["input"].max()) for s in samples] == [0, 0, 0, 1, 1, 1]
    assert [b["input"].shape[0] for b in src.batches()] == [2, 2, 2]
    assert len(list(open_data(f"{script}:single", models.tiny_cnn()).samples())) == 4
    with pytest.raises(DataError, match="not a feed dict"):
        list(open_data(f"{script}:not_dicts", models.tiny_cnn()).samples())
    with pytest.raises(DataError, match=r"fails_midway' failed: KeyError: 'no such file'"):
        list(open_data(f"{script}:fails_midway", models.tiny_cnn()).samples())
    with pytest.raises(DataError, match="not_iterable' failed: TypeError"):
        list(open_data(f"{script}:not_iterable", models.tiny_cnn()).samples())
    with pytest.raises(DataError, match="has no function 'missing'"):
        open_data(f"{script}:missing", models.tiny_cnn())
    with pytest.raises(DataError, match="does not exist"):
        open_data(f"{tmp_path}/nope.py:f", models.tiny_cnn())


def test_python_function_yielding_arrays_or_inputs_and_labels(tmp_path):
    """What a torch DataLoader loop yields: (inputs, labels) pairs, and bare arrays for a one-input
    model. Both used to stop with "not a feed dict"; the labels now serve compare and finetune."""
    script = tmp_path / "loader.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        def pairs():
            for i in range(3):
                yield np.full((2, 3, 8, 8), i, np.float32), np.array([i, 10 + i])
        def dict_pairs():
            yield {"input": np.zeros((3, 8, 8), np.float32)}, 7    # one sample, no batch axis
            yield {"input": np.ones((3, 8, 8), np.float32)}, 8
        def arrays():
            for i in range(2):
                yield np.full((1, 3, 8, 8), i, np.float32)
        def hugging_face():
            yield {"input": np.zeros((2, 3, 8, 8), np.float32), "labels": np.array([4, 5])}
    """))
    src = open_data(f"{script}:pairs", models.tiny_cnn())
    assert [float(s["input"].max()) for s in src.samples()] == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(src.labels(), [0, 10, 1, 11, 2, 12])
    assert src.labels_origin == "data function"
    np.testing.assert_array_equal(open_data(f"{script}:pairs", models.tiny_cnn(), every=2).labels(), [0, 1, 2])
    np.testing.assert_array_equal(open_data(f"{script}:pairs", models.tiny_cnn(), max_samples=3).labels(), [0, 10, 1])
    np.testing.assert_array_equal(open_data(f"{script}:dict_pairs", models.tiny_cnn()).labels(), [7, 8])
    src = open_data(f"{script}:hugging_face", models.tiny_cnn())   # a batch dict's "labels" key: no input of that name
    assert len(list(src.samples())) == 2
    np.testing.assert_array_equal(src.labels(), [4, 5])
    src = open_data(f"{script}:arrays", models.tiny_cnn())
    assert len(list(src.samples())) == 2 and src.labels() is None
    from onnx import TensorProto, helper
    two = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 8, 8]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(DataError, match="yielded an array, but the model has 2 inputs: a, b"):
        open_data(f"{script}:arrays", two).check()


def test_python_script_that_fails_to_import(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(DataError, match="failed to import.*boom"):
        open_data(f"{script}:f", models.tiny_cnn())


# --------------------------------------------------------------------------------- validation
def test_wrong_shape(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 9, 8), np.float32))
    src = open_data(str(tmp_path / "x.npy"), models.tiny_cnn())
    with pytest.raises(DataError, match=r"shape \[1, 3, 9, 8\], but the model expects \[\?, 3, 8, 8\]"):
        src.check()
    np.save(tmp_path / "x2.npy", np.zeros((2, 3, 8), np.float32))
    with pytest.raises(DataError, match="shape"):
        list(open_data(str(tmp_path / "x2.npy"), models.tiny_cnn()).samples())


def test_a_model_without_a_batch_axis_is_refused_with_the_fix(tmp_path):
    # input [3, 8, 8] is one whole sample: samples of it cannot be stacked on axis 0, and the
    # data's natural layout [N, 3, 8, 8] used to end in a shape error naming the wrong cause
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "unbatched",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    np.save(tmp_path / "x.npy", _x(4))
    with pytest.raises(DataError, match=r"input 'x' has no batch axis: the model takes one sample as \[3, 8, 8\]") as err:
        open_data(str(tmp_path / "x.npy"), model).check()
    assert "export the model with a batch axis" in err.value.hint
    # a leading fixed 1 is a batch axis: data one axis too deep is a plain shape error
    np.save(tmp_path / "x5.npy", _x(4)[:, None])
    with pytest.raises(DataError, match=r"shape \[1, 1, 3, 8, 8\]"):
        open_data(str(tmp_path / "x5.npy"), models.tiny_cnn(batch=1)).check()


def test_wrong_dtype(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 4), np.float32), k=np.zeros((2, 4), np.float32))
    with pytest.raises(DataError, match="input 'k' is int64 but sample 0 is float32"):
        list(open_data(str(tmp_path / "d.npz"), models.two_input_model()).samples())
    np.save(tmp_path / "b.npy", np.zeros((2, 3, 8, 8), bool))
    with pytest.raises(DataError, match="float32 but sample 0 is bool"):
        list(open_data(str(tmp_path / "b.npy"), models.tiny_cnn()).samples())


def test_nan_and_inf_are_refused(tmp_path):
    for bad in (np.nan, np.inf):
        x = _x(3)
        x[1, 0, 0, 0] = bad
        np.save(tmp_path / "x.npy", x)
        with pytest.raises(DataError, match="sample 1 .* NaN or Inf"):
            list(open_data(str(tmp_path / "x.npy"), models.tiny_cnn()).samples())


def test_unknown_input_name(tmp_path):
    script = tmp_path / "f.py"
    script.write_text("import numpy as np\ndef f():\n    yield {'inp': np.zeros((1, 3, 8, 8), np.float32)}\n")
    with pytest.raises(DataError, match="missing input; unknown inp"):
        list(open_data(f"{script}:f", models.tiny_cnn()).samples())


def test_bad_batch_size(tmp_path):
    np.save(tmp_path / "x.npy", _x(2))
    with pytest.raises(DataError, match="batch size"):
        open_data(str(tmp_path / "x.npy"), models.tiny_cnn(), batch_size=0)


@pytest.mark.parametrize("limit", [0, -3])
def test_bad_sample_limit(tmp_path, limit):
    """A negative limit used to stop after the first sample: calibration on one image, silently."""
    np.save(tmp_path / "x.npy", _x(2))
    with pytest.raises(DataError, match=f"sample limit must be at least 1, got {limit}"):
        open_data(str(tmp_path / "x.npy"), models.tiny_cnn(), max_samples=limit)


# ---------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("every, offset, exclude, expect", [
    (3, 1, False, [1, 4, 7]),
    (3, 1, True, [0, 2, 3, 5, 6, 8, 9]),
    (1, 0, False, list(range(10))),
    (5, 0, False, [0, 5]),
])
def test_every_offset_selection(tmp_path, every, offset, exclude, expect):
    x = np.zeros((10, 3, 8, 8), np.float32)
    x[:, 0, 0, 0] = np.arange(10)
    np.savez(tmp_path / "d.npz", input=x, labels=np.arange(10) + 100)
    src = open_data(str(tmp_path / "d.npz"), models.tiny_cnn(), every=every, offset=offset, exclude_every=exclude)
    got = [int(s["input"][0, 0, 0, 0]) for s in src.samples()]
    assert got == expect
    assert src.count() == len(expect)
    np.testing.assert_array_equal(src.labels(), np.array(expect) + 100)


def test_max_samples_limits_samples_labels_and_count(tmp_path):
    np.savez(tmp_path / "d.npz", input=_x(10), labels=np.arange(10))
    src = open_data(str(tmp_path / "d.npz"), models.tiny_cnn(), max_samples=4, every=2)
    assert len(list(src.samples())) == 4 == src.count()
    np.testing.assert_array_equal(src.labels(), [0, 2, 4, 6])


def test_selection_that_takes_nothing(tmp_path):
    np.save(tmp_path / "x.npy", _x(2))
    src = open_data(str(tmp_path / "x.npy"), models.tiny_cnn(), every=5, offset=3)
    with pytest.raises(DataError, match="yielded no samples"):
        src.check()


def test_random_source_and_dataspec():
    spec = DataSpec("random", image=ImageOptions(), max_samples=3)
    src = open_data(spec, models.tiny_cnn())
    feeds = list(src.samples())
    assert len(feeds) == 3 and feeds[0]["input"].shape == (1, 3, 8, 8)
    assert not np.array_equal(feeds[0]["input"], feeds[1]["input"])


def test_random_source_without_a_limit_ends():
    """Generated inputs never end: without a limit, `--data random` yields RANDOM_SAMPLES of them
    (finetune --data random used to read them forever)."""
    src = open_data("random", models.tiny_cnn())
    assert len(list(src.samples())) == RANDOM_SAMPLES == src.count()
    assert len(list(src.batches(5))) == 4  # 5 + 5 + 5 + 1
