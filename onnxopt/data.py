"""Input data for verification, comparison, calibration and finetuning.

A source is a ``.npy`` (one input), an ``.npz`` keyed by input name, an image folder (or its class
subfolders, as torchvision's ImageFolder), ``file.py:function`` returning feed dicts, arrays or
``(inputs, labels)`` pairs, or ``random``. Data is streamed (never more than one batch of images in memory),
and every sample is checked against the model's inputs with an error that says what does not fit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from onnx import ModelProto
from PIL import Image

from .errors import DataError
from .feeds import plan_feeds
from .input_dims import real_inputs
from .runtime import np_dtype
from .userfiles import load_user_function

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff", ".gif"}


@dataclass
class ImageOptions:
    """Preprocessing of an image folder (and of uint8 arrays for a float input). ``None`` means
    "derive from the model" for the geometry, "not given" for the pixel values."""

    size: Optional[int] = None          # resize short side to this (default: crop / crop_fraction, else the crop)
    crop: Optional[int] = None          # center crop (default: model input H/W)
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    scale: Optional[float] = None       # multiply raw 0..255 pixels first
    bgr: bool = False
    layout: Optional[str] = None        # "NCHW" / "NHWC" (default: from the model input)
    letterbox: Optional[int] = None     # YOLO-style letterbox with this pad value
    preset: Optional[str] = None        # a name of PRESETS; the fields above override it
    crop_fraction: Optional[float] = None  # the crop is this fraction of the resized short side (0.875: 256 -> 224)

    def given(self) -> bool:
        """Whether the pixel values' preprocessing was stated (a preset, or any value flag).
        ``preset="none"`` states it too: raw 0..255 pixels, on purpose."""
        return bool(self.preset or self.bgr or any(v is not None for v in (self.scale, self.mean, self.std, self.letterbox)))

    def resolved(self) -> "ImageOptions":
        """The preset's values with the explicitly given fields on top."""
        if not self.preset:
            return self
        if self.preset not in PRESETS:
            raise DataError(f"unknown preprocessing preset '{self.preset}'.", f"valid presets: {', '.join(PRESETS)}")
        base = dict(PRESETS[self.preset][1])
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "bgr":
                base["bgr"] = base.get("bgr", False) or value
            elif value is not None:
                base[f.name] = value
        base["preset"] = self.preset
        return ImageOptions(**base)

    def to_metadata(self) -> dict:
        """What ``onnxopt.preprocessing`` records: the resolved values that were set."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) not in (None, False)}
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in out.items()}

    def describe(self, grey: bool = False) -> str:
        """One line for the console, e.g. "imagenet (x*0.00392, mean 0.485,0.456,0.406, std ...)";
        ``grey``: the images were read as greyscale (a one-channel input), not in RGB / BGR."""
        o = self.resolved()
        parts = []
        if o.scale is not None:
            parts.append(f"x*{o.scale:.6g}")
        parts += [f"{what} " + ",".join(f"{v:g}" for v in values) for what, values in (("mean", o.mean), ("std", o.std))
                  if values is not None]
        parts.append("greyscale" if grey else "BGR" if o.bgr else "RGB")
        if o.letterbox is not None:
            parts.append(f"letterbox pad {o.letterbox}")
        elif o.crop_fraction:
            parts.append(f"center crop {o.crop_fraction:g} of the short side")
        if not any(v is not None for v in (o.scale, o.mean, o.std)):
            parts.append("raw 0..255 pixels")
        return f"{o.preset} ({', '.join(parts)})" if o.preset else ", ".join(parts)


# Named preprocessing for image folders: (what it is for, ImageOptions fields); explicit flags override them.
PRESETS = {
    "imagenet": ("torchvision / timm ImageNet models: x/255, then mean/std per RGB channel, 256 -> 224 crop",
                 {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_fraction": 0.875}),
    "imagenet-tf": ("TensorFlow / Keras 'tf' mode (EfficientNet-Lite, MobileNet): (x - 127.5) / 127.5, RGB, 256 -> 224 crop",
                    {"mean": [127.5] * 3, "std": [127.5] * 3, "crop_fraction": 0.875}),
    "caffe": ("Caffe / Keras 'caffe' mode (VGG, ResNet-50 Caffe): BGR, ImageNet BGR mean subtracted, 0..255 scale",
              {"bgr": True, "mean": [103.939, 116.779, 123.68], "crop_fraction": 0.875}),
    "yolo": ("Ultralytics-style YOLO: letterbox padded with 114, RGB, x/255",
             {"scale": 1 / 255, "letterbox": 114}),
    "yolox": ("YOLOX-style: letterbox padded with 114, BGR, raw 0..255",
              {"bgr": True, "letterbox": 114}),
    "none": ("raw RGB pixels 0..255, resized and center-cropped to the input (the model normalizes itself)", {}),
}

# The metadata key of the preprocessing the data was given with (written by `apply`, read by every command).
PREPROCESSING_KEY = "onnxopt.preprocessing"


def recorded_preprocessing(model: Optional[ModelProto]) -> Optional[ImageOptions]:
    """The preprocessing recorded in ``model``'s metadata, or None."""
    prop = next((p for p in (model.metadata_props if model is not None else ()) if p.key == PREPROCESSING_KEY), None)
    if prop is None:
        return None
    try:
        known = {f.name for f in fields(ImageOptions)}
        return ImageOptions(**{k: v for k, v in json.loads(prop.value).items() if k in known})
    except (ValueError, TypeError, AttributeError):
        return None


def presets_help() -> str:
    return "; ".join(f"{name}: {what}" for name, (what, _) in PRESETS.items())


@dataclass
class DataSpec:
    source: str
    image: ImageOptions = field(default_factory=ImageOptions)
    batch_size: int = 1
    max_samples: Optional[int] = None
    labels: Optional[str] = None        # .npy of ints; overrides labels found in the source
    every: int = 1                      # take every n-th sample ...
    offset: int = 0                     # ... starting here (splits such as "every 5th")
    exclude_every: bool = False         # take the complement of the every/offset selection
    # the command line requires the preprocessing of images (and of uint8 arrays for a float
    # input) to be stated, by flags, a preset or the model's metadata; the API keeps raw pixels
    require_preprocessing: bool = False


RANDOM_SAMPLES = 16  # generated inputs never end: without a sample limit, 'random' yields this many


class DataSource:
    """A validated, streamable source of feed dicts for one model."""

    def __init__(self, spec: DataSpec, model: ModelProto, input_shapes: Optional[dict] = None,
                 recorded: Optional[ImageOptions] = None):
        # stated preprocessing wins; else the one recorded in the model (or in ``recorded``,
        # another model's, e.g. compare's candidate), which the caller prints
        found = None if spec.image.given() else recorded_preprocessing(model) or recorded
        self.preprocessing_origin = "given" if spec.image.given() else None if found is None else "model"
        if found is not None:
            spec = dataclasses.replace(spec, image=found)
        self.spec = spec = dataclasses.replace(spec, image=spec.image.resolved())
        self.model = model
        self._pixels_used = False  # images read, or uint8 arrays normalized: the preprocessing mattered
        self.labels_origin: Optional[str] = None   # where labels() found the labels, once it did
        self.grey = False   # images read as greyscale, for a one-channel input
        self._inputs = graph_inputs(model)
        self._overrides = input_shapes
        self.kind, self._open = self._resolve(spec.source)
        if spec.batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {spec.batch_size}.", "use --batch-size 1 or more")
        if spec.max_samples is not None and spec.max_samples < 1:
            raise DataError(f"the sample limit must be at least 1, got {spec.max_samples}.",
                            "give --calib-samples / --max-samples 1 or more, or leave it out to use all the data")

    # -- public API --------------------------------------------------------------------
    @property
    def max_samples(self) -> Optional[int]:
        """The sample limit: the spec's, else RANDOM_SAMPLES for generated inputs, else none."""
        if self.spec.max_samples is None and self.kind == "random":
            return RANDOM_SAMPLES
        return self.spec.max_samples

    def samples(self) -> Iterator[dict]:
        """Feed dicts of one sample each (batch axis of size 1), validated, in order."""
        count = 0
        for count, feed in enumerate(itertools.islice(self._selected(self._open()), self.max_samples), 1):
            self._validate(feed, count - 1)
            yield feed
        if count == 0:
            raise DataError(f"data source '{self.spec.source}' yielded no samples.", "check the path (an empty folder? a selection that takes nothing?)")

    def batches(self, batch_size: Optional[int] = None) -> Iterator[dict]:
        """Feed dicts of up to ``batch_size`` samples on axis 0 (of the model's batch size when it is fixed)."""
        fixed = self._fixed_batch()
        bs = fixed if fixed is not None else batch_size or self.spec.batch_size
        pending: list = []
        for feed in self.samples():
            pending.append(feed)
            if len(pending) == bs:
                yield _stack(pending)
                pending = []
        if pending and (fixed is None or len(pending) == fixed):
            yield _stack(pending)

    def __call__(self) -> Iterator[dict]:
        """A fresh pass over the data in batches (what PassContext.data expects)."""
        return self.batches()

    def labels(self) -> Optional[np.ndarray]:
        """Integer labels of the selected samples, or None when the source has none."""
        if self.spec.labels:
            p = Path(self.spec.labels)
            if not p.is_file():
                raise DataError(f"labels file '{p}' does not exist.", "give a .npy of integer class indices")
            with _numpy_file(p):
                if p.suffix == ".npz":
                    with np.load(p) as z:
                        if "labels" not in z:
                            raise DataError(f"'{p}' has no 'labels' array.", "store the labels under the key 'labels'")
                        lab = z["labels"]
                else:
                    lab = np.load(p)
        elif self.kind == "npz":
            with _numpy_file(self.spec.source), np.load(self.spec.source) as z:
                key = "labels" if "labels" in z else ("y" if "y" in z and "y" not in self._inputs else None)
                if key is None:
                    return None
                lab = z[key]
        elif self.kind == "python":
            lab = self._python_labels()
            if lab is None:
                return None
        elif self.kind == "images":
            table, files = Path(self.spec.source) / "labels.json", self._image_files()
            if table.is_file():
                lab = self._labels_json(table, files)
            elif self._class_of:
                self.labels_origin = "class subfolders"
                lab = np.array([self._class_of[f] for f in files], dtype=np.int64)
            else:
                return None
        else:
            return None
        lab = per_sample_labels(lab)
        if lab.dtype.kind not in "iu":
            raise DataError("labels must be integer class indices.", "save them as np.int64")
        return lab[np.asarray(self._selected_indices(len(lab)), dtype=np.int64)]

    def _labels_json(self, table: Path, files: list) -> np.ndarray:
        """The labels ``labels.json`` gives ``files``, in their order: an image in a class subfolder is
        keyed by its path in the folder ("cat/1.jpg"), or by its name."""
        try:
            mapping = _label_mapping(json.loads(table.read_text()))
        except json.JSONDecodeError as exc:
            raise DataError(f"'{table}' is not valid JSON: {exc}", "write {\"a.jpg\": 3, ...} or [{\"file\": \"a.jpg\", \"class_index\": 3}, ...]") from None
        keys = [f.relative_to(table.parent).as_posix() if f.relative_to(table.parent).as_posix() in mapping else f.name
                for f in files]
        unlabeled = [k for k in keys if k not in mapping]
        if unlabeled:
            # dropping them would shift every later label onto the wrong image
            raise DataError(f"{len(unlabeled)} image(s) in '{self.spec.source}' have no entry in labels.json (e.g. '{unlabeled[0]}').",
                            "add them to labels.json or remove them from the folder")
        self.labels_origin = "labels.json"
        return np.array([int(mapping[k]) for k in keys], dtype=np.int64)

    def _python_labels(self) -> Optional[np.ndarray]:
        """The labels of a data function's ``(inputs, labels)`` pairs, one per sample, in the order
        of :meth:`samples` (a pass over the function); None when it yields inputs alone."""
        parts, count = [], 0
        for arrays, labels, batched in self._python_items():
            if labels is None:
                return None
            lab = np.asarray(labels)
            parts.append(lab[None] if not batched or lab.ndim == 0 else lab)
            count += len(parts[-1])
            if self.spec.max_samples is not None and len(self._selected_indices(count)) >= self.spec.max_samples:
                break   # the samples taken are labelled: reading on would decode the rest of the data for nothing
        if not parts:
            return None
        self.labels_origin = "data function"
        return np.concatenate(parts, axis=0)

    def check(self) -> None:
        """Read and validate the first sample now, so a bad source fails before any work is done."""
        next(iter(self.samples()))

    @property
    def preprocessing(self) -> Optional[ImageOptions]:
        """The image preprocessing this data was read with, when it mattered (an image folder, or
        uint8 arrays normalized for a float input; known once a sample was read), else None."""
        return self.spec.image if self._pixels_used else None

    def describe(self) -> Optional[str]:
        """What an image folder holds, for the console (``509 images in 10 class subfolders``); None
        for other sources."""
        if self.kind != "images":
            return None
        files = self._image_files()
        where = f" in {len(set(self._class_of.values()))} class subfolders" if self._class_of else ""
        return f"{len(files)} images{where}"

    def count(self) -> Optional[int]:
        """Number of samples this source will yield, when known without reading them."""
        if self.kind == "images":
            return len(self._selected_indices(len(self._image_files())))
        n = self._array_len() if self.kind in ("npz", "npy") else None
        return self.max_samples if n is None else len(self._selected_indices(n))

    def _selected_indices(self, n: int) -> list:
        """The indices among ``n`` samples the selection and the sample limit take."""
        picked = list(self._selected(range(n)))
        return picked if self.spec.max_samples is None else picked[: self.spec.max_samples]

    # -- resolution --------------------------------------------------------------------
    def _resolve(self, source: str):
        if source == "random":
            return "random", self._random
        if ".py:" in source:
            return "python", self._python(source)
        p = Path(source)
        if not p.exists():
            raise DataError(f"data path '{source}' does not exist.", "give a .npy, .npz, an image folder, or file.py:function")
        if p.is_dir():
            if not self._image_files():
                raise DataError(f"data folder '{source}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).", "point the data option (--calib-data, --data) at a folder holding images, or class subfolders of images")
            return "images", self._images
        if p.suffix == ".npy":
            if len(self._inputs) != 1:
                raise DataError(f"a .npy file feeds one input, but the model has {len(self._inputs)}: {', '.join(self._inputs)}.",
                                "save an .npz keyed by input name instead")
            return "npy", self._npy
        if p.suffix == ".npz":
            return "npz", self._npz
        raise DataError(f"unsupported data '{source}'.", "give a .npy, .npz, a folder of images, or file.py:function")

    def _array_len(self) -> Optional[int]:
        try:
            if self.kind == "npy":
                return int(np.load(self.spec.source, mmap_mode="r").shape[0])
            with np.load(self.spec.source) as z:
                keys = [k for k in z.files if k in self._inputs] or [k for k in z.files if k not in ("labels", "y")]
                return int(z[keys[0]].shape[0]) if keys else None
        except (OSError, ValueError, IndexError, zipfile.BadZipFile):  # unreadable here: check() names the problem
            return None

    def _selected(self, it):
        every, offset = max(1, self.spec.every), self.spec.offset
        for i, item in enumerate(it):
            hit = i >= offset and (i - offset) % every == 0
            if hit != self.spec.exclude_every:
                yield item

    def _random(self):
        # built from the model (onnxopt.feeds): batch 1, sizes it runs at, valid indices for integer inputs
        overrides = {n: [1] + [int(d) for d in s[1:]] for n, s in (self._overrides or {}).items()}
        plan = plan_feeds(self.model, overrides or None, two_sizes=False)
        for seed in itertools.count():
            yield plan.feed(0, seed)

    def _python(self, source: str):
        fn = load_user_function(source, "data script", "the function must return an iterable of {input_name: array} dicts, "
                                "arrays (one input), or (inputs, labels) pairs", DataError)

        def user_items():
            # the user's function failing is a user error: one message (ONNXOPT_DEBUG=1 shows the traceback)
            try:
                for item in fn():
                    yield self._feed_and_labels(item, source)
            except DataError:
                raise
            except Exception as exc:
                raise DataError(f"data function '{source}' failed: {type(exc).__name__}: {exc}",
                                "fix the function; set ONNXOPT_DEBUG=1 to see its traceback") from exc

        def gen():
            for arrays, _, batched in user_items():
                # a user batch is split into samples so batching is uniform
                if not batched:
                    yield {k: a[None] for k, a in arrays.items()}  # one sample without its batch axis
                    continue
                for i in range(min((a.shape[0] for a in arrays.values() if a.ndim), default=1)):
                    yield {k: a[i:i + 1] for k, a in arrays.items()}

        self._python_items = user_items
        return gen

    def _feed_and_labels(self, item, source: str) -> tuple:
        """One item of a data function as (arrays by input name, its labels or None, whether the arrays
        hold a batch axis): a feed dict (its ``labels`` / ``label`` key, when no input has that name,
        holds the labels, as a Hugging Face batch does); an array for a one-input model; or an
        ``(inputs, labels)`` pair of either, as a torch DataLoader yields (tensors are read through
        ``numpy.asarray``)."""
        labels = None
        if isinstance(item, (tuple, list)) and len(item) == 2 and (isinstance(item[0], dict) or hasattr(item[0], "__array__")):
            item, labels = item
        if hasattr(item, "__array__") and not isinstance(item, dict):
            if len(self._inputs) != 1:
                raise DataError(f"'{source}' yielded an array, but the model has {len(self._inputs)} inputs: "
                                f"{', '.join(self._inputs)}.", "yield {input_name: numpy array} dicts")
            item = {next(iter(self._inputs)): item}
        if not isinstance(item, dict):
            raise DataError(f"'{source}' yielded a {type(item).__name__}, not a feed dict.",
                            "yield {input_name: numpy array} dicts, arrays (one input), or (inputs, labels) pairs")
        key = next((k for k in ("labels", "label") if k in item and k not in self._inputs), None)
        if key is not None:   # a Hugging Face batch: {"input_ids": ..., "attention_mask": ..., "labels": ...}
            item = dict(item)
            found = item.pop(key)
            labels = found if labels is None else labels
        arrays = {k: np.asarray(v) for k, v in item.items()}
        batched = all(a.ndim == len(self._inputs[k]["shape"]) for k, a in arrays.items() if k in self._inputs)
        return arrays, labels, batched

    def _npy(self):
        with _numpy_file(self.spec.source):
            arr = np.load(self.spec.source, mmap_mode="r")
        name = next(iter(self._inputs))
        for i in range(arr.shape[0]):
            yield {name: self._cast_raw(name, np.asarray(arr[i:i + 1]))}

    def _npz(self):
        with _numpy_file(self.spec.source), np.load(self.spec.source) as z:
            missing = [n for n in self._inputs if n not in z.files]
            if missing and not (len(self._inputs) == 1 and "x" in z.files):  # one input may be stored as 'x'
                raise DataError(f"'{self.spec.source}' has no array for input(s) {', '.join(missing)} (it has {', '.join(z.files)}).",
                                "key the .npz arrays by the model's input names")
            arrays = {n: z["x" if missing else n] for n in self._inputs}
        lengths = {a.shape[0] for a in arrays.values()}
        if len(lengths) != 1:
            raise DataError(f"arrays in '{self.spec.source}' hold different numbers of samples: {sorted(lengths)}.", "give every input the same count on axis 0")
        for i in range(lengths.pop()):
            yield {n: self._cast_raw(n, a[i:i + 1]) for n, a in arrays.items()}

    def _cast_raw(self, name: str, arr: np.ndarray) -> np.ndarray:
        """uint8 images stored for a float input are scaled like an image folder would be."""
        want = self._inputs[name]["dtype"]
        if arr.dtype == np.uint8 and want.kind == "f":
            if self.spec.require_preprocessing and not self.spec.image.given():
                raise DataError(
                    f"input '{name}' is {want} but '{self.spec.source}' holds uint8 values: raw 0..255 pixels would be fed.",
                    "give the preprocessing: --scale 0.00392 (1/255) with --mean/--std, or --preprocess PRESET "
                    f"({', '.join(PRESETS)}; `none` feeds 0..255 on purpose), or save the arrays as preprocessed {want}")
            self._pixels_used = True
            return self._normalize(arr.astype(np.float32), channel_axis=1 if self._layout(name) == "NCHW" else -1)
        return arr

    def _image_files(self) -> list:
        """The folder's images in the order they are read; without images of its own, those of its
        class subfolders (:func:`class_folder_images`), whose classes ``self._class_of`` holds."""
        if not hasattr(self, "_files"):
            folder = Path(self.spec.source)
            self._files, self._class_of = sorted(f for f in folder.iterdir() if _is_image(f)), {}
            if not self._files:
                self._files, self._class_of = class_folder_images(folder)
        return self._files

    def _layout(self, name: str) -> str:
        if self.spec.image.layout:
            return self.spec.image.layout
        shape = self._inputs[name]["shape"]
        return "NHWC" if len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3) else "NCHW"

    def _normalize(self, x: np.ndarray, channel_axis: int) -> np.ndarray:
        o = self.spec.image
        if o.scale is not None:
            x = x * np.float32(o.scale)
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        if o.mean is not None:
            x = x - _per_channel(o.mean, "mean", x.shape[channel_axis], o.preset).reshape(shape)
        if o.std is not None:
            x = x / _per_channel(o.std, "std", x.shape[channel_axis], o.preset).reshape(shape)
        return x.astype(np.float32)

    def _images(self):
        if len(self._inputs) != 1:
            raise DataError("an image folder feeds one input, but the model has several.", "use an .npz or a file.py:function")
        name = next(iter(self._inputs))
        dtype = self._inputs[name]["dtype"]
        if dtype == np.uint8:   # a uint8 image input: the model normalizes the raw pixels itself
            o = self.spec.image
            if any(v is not None for v in (o.scale, o.mean, o.std)):
                raise DataError(f"input '{name}' is {dtype}: the model takes raw pixels and normalizes them itself, so "
                                f"--scale/--mean/--std{f' (of --preprocess {o.preset})' if o.preset else ''} do not apply.",
                                "drop them (the pixels are fed as they are, resized and cropped to the input)")
            if not o.given():
                self.spec = dataclasses.replace(self.spec, image=dataclasses.replace(o, preset="none"))
        if self.spec.require_preprocessing and not self.spec.image.given():
            raise DataError(
                f"image folder '{self.spec.source}' needs its preprocessing stated: fed as raw 0..255 pixels, "
                "most models see garbage and calibration, comparison and finetuning are silently wrong.",
                "give --preprocess PRESET (" + ", ".join(PRESETS) + "; `none` feeds raw pixels on purpose), or "
                "--scale/--mean/--std/--bgr/--letterbox. Presets: " + presets_help())
        self._pixels_used = True
        layout = self._layout(name)
        shape = self._inputs[name]["shape"]
        if len(shape) not in (3, 4):
            dims = ", ".join(str(d) if isinstance(d, int) else "?" for d in shape)
            raise DataError(f"an image folder feeds an image input ([N, C, H, W], [N, H, W, C], or greyscale [N, H, W]); "
                            f"input '{name}' is [{dims}].",
                            "feed it arrays shaped as the input: a .npy / .npz, or a file.py:function")
        # a one-channel input (MNIST-style digits, text lines, scans) is fed each image's luma; [N, H, W]
        # is one with no channel axis
        grey = self.grey = len(shape) == 3 or (shape[1] if layout == "NCHW" else shape[3]) == 1
        h, w = (shape[1], shape[2]) if len(shape) == 3 else (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
        o = self.spec.image
        if o.crop:
            h = w = o.crop
        if not isinstance(h, int) or not isinstance(w, int):
            raise DataError(f"input '{name}' has dynamic height/width; onnxopt cannot tell the image size.", "give --crop SIZE")
        for f in self._image_files():
            try:
                img = _open_rgb(f)
            except Exception as exc:
                raise DataError(f"cannot read image '{f}': {exc}", "remove or re-encode it") from None
            if grey:
                img = img.convert("L")
            if o.letterbox is not None:
                r = min(h / img.height, w / img.width)
                nh, nw = int(round(img.height * r)), int(round(img.width * r))
                arr = np.full((h, w, 1 if grey else 3), o.letterbox, np.float32)
                arr[:nh, :nw] = np.asarray(img.resize((nw, nh), Image.BILINEAR), np.float32).reshape(nh, nw, -1)
            else:
                short = o.size or (int(round(max(h, w) / o.crop_fraction)) if o.crop_fraction else max(h, w))
                r = short / min(img.width, img.height)
                img = img.resize((max(w, int(round(img.width * r))), max(h, int(round(img.height * r)))), Image.BILINEAR)
                left, top = (img.width - w) // 2, (img.height - h) // 2
                arr = np.asarray(img.crop((left, top, left + w, top + h)), np.float32).reshape(h, w, -1)
            if o.bgr:
                arr = arr[..., ::-1]
            arr = self._normalize(arr, channel_axis=-1)
            if len(shape) == 3:
                arr = arr[..., 0]
            elif layout == "NCHW":
                arr = arr.transpose(2, 0, 1)
            yield {name: np.ascontiguousarray(arr[None]).astype(self._inputs[name]["dtype"])}

    # -- validation --------------------------------------------------------------------
    def _fixed_batch(self) -> Optional[int]:
        dims = [vi["shape"][0] for vi in self._inputs.values() if vi["shape"]]
        fixed = [d for d in dims if isinstance(d, int)]
        return fixed[0] if fixed and len(fixed) == len(dims) else None

    def _validate(self, feed: dict, index: int) -> None:
        unknown = [k for k in feed if k not in self._inputs]
        missing = [k for k in self._inputs if k not in feed]
        if unknown or missing:
            raise DataError(
                f"sample {index} of '{self.spec.source}' does not match the model's inputs"
                + (f": missing {', '.join(missing)}" if missing else "") + (f"; unknown {', '.join(unknown)}" if unknown else "") + ".",
                f"the model's inputs are: {', '.join(self._inputs)}")
        for name, arr in feed.items():
            want = self._inputs[name]
            expected = ", ".join(str(d) if isinstance(d, int) else "?" for d in want["shape"])
            if want["shape"] and want["shape"][0] != 1 and arr.ndim == len(want["shape"]) + 1 and arr.shape[0] == 1 and all(
                    not isinstance(d, int) or d == a for d, a in zip(want["shape"], arr.shape[1:])):
                # samples are fed stacked on axis 0; a model whose input is one whole sample ([C, H, W],
                # [T, F]) has no axis to stack them on, and its output no sample axis to compare along
                # (a leading fixed 1 is a batch axis: such data is one axis too deep, the error below)
                raise DataError(
                    f"input '{name}' has no batch axis: the model takes one sample as [{expected}], and onnxopt "
                    "stacks samples on a leading batch axis, which this input lacks.",
                    "export the model with a batch axis (torch: an example input with a leading batch dimension, "
                    "marked dynamic), then run onnxopt on that export")
            if arr.ndim != len(want["shape"]) or any(isinstance(d, int) and d != a for d, a in zip(want["shape"][1:], arr.shape[1:])):
                raise DataError(
                    f"sample {index} of '{self.spec.source}' gives input '{name}' the shape {list(arr.shape)}, "
                    f"but the model expects [{expected}].",
                    "check the preprocessing (--crop/--layout) or the arrays' layout (samples on axis 0)")
            if arr.dtype != want["dtype"]:
                if arr.dtype == np.uint8 and want["dtype"].kind == "f" and self.spec.require_preprocessing:
                    raise DataError(f"input '{name}' is {want['dtype']} but sample {index} of '{self.spec.source}' is uint8: "
                                    "raw 0..255 pixels would be fed.", "return preprocessed float arrays from the data function")
                if arr.dtype.kind == want["dtype"].kind or (arr.dtype.kind in "iu" and want["dtype"].kind in "iu") or (arr.dtype.kind in "iuf" and want["dtype"].kind == "f"):
                    feed[name] = arr = arr.astype(want["dtype"])
                else:
                    raise DataError(f"input '{name}' is {want['dtype']} but sample {index} is {arr.dtype}.", "convert the data to the model's dtype")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise DataError(f"sample {index} of '{self.spec.source}' holds NaN or Inf values for input '{name}'.", "clean the data: onnxopt refuses non-finite inputs")


# the "ignore" label of segmentation datasets (VOC, Cityscapes): compare does not count such positions,
# finetune does not train on them
IGNORED_LABEL = 255


def per_sample_labels(labels) -> np.ndarray:
    """Labels as one entry per sample on axis 0: class indices ``[N]`` (``[N, 1]`` flattened), or a
    class per position (``[N, H, W]``: a segmentation map's ground truth), kept as it is."""
    lab = np.asarray(labels)
    return lab if lab.ndim >= 2 and lab[0].size > 1 else lab.reshape(-1)


@contextlib.contextmanager
def _numpy_file(path):
    """Reading ``path`` with numpy: a file that holds no numeric arrays (text, pickled Python objects,
    a broken zip) is the user's data error, not an internal one."""
    try:
        yield
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read '{path}' as numeric NumPy data: {type(exc).__name__}: {exc}",
                        "save the arrays with numpy.save / numpy.savez (numbers, no Python objects)") from None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def class_folder_images(folder: Path) -> tuple:
    """torchvision's ImageFolder layout (``root/<class>/**/<image>``, hidden folders skipped): the
    images, and {image: class index}, the classes numbered in sorted folder order as ImageFolder
    numbers them. The images are interleaved class by class (every class's first image, then every
    class's second...): the calibration search, the bias correction's check and the fallback read
    the first samples, and in folder order those would all be one class's."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = [sorted(p for p in d.rglob("*") if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(d).parts))
                 for d in classes]
    files = [f for group in itertools.zip_longest(*per_class) for f in group if f is not None]
    return files, {f: i for i, group in enumerate(per_class) for f in group}


def _open_rgb(path) -> "Image.Image":
    """An image file as 8-bit RGB. A 16-bit greyscale image (depth maps, scans: PIL mode I;16 or I)
    is scaled to 0..255 first: PIL's own conversion saturates every value above 255, which made
    such a folder calibrate on white images."""
    img = Image.open(path)
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or arr.max() > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def feed_samples(feed: dict) -> int:
    """Samples in one feed: the leading dimension of its first array input (1 for scalars)."""
    return next((int(v.shape[0]) for v in feed.values() if getattr(v, "ndim", 0)), 1)


def take_samples(data, limit: int) -> list:
    """The first batches of ``data`` (a callable returning batches) holding ``limit`` samples or more, or all."""
    feeds, count = [], 0
    for feed in data():
        feeds.append(feed)
        count += feed_samples(feed)
        if count >= limit:
            break
    return feeds


def collect_feeds(data, limit: int) -> list:
    """Up to ``limit`` samples of ``data`` (a callable returning batches) as a list of batches."""
    if data is None:
        raise DataError("sensitivity analysis needs data.", "give --calib-data")
    feeds = take_samples(data, limit)
    if not feeds:
        raise DataError("the data yielded no samples.", "check --calib-data")
    return feeds


def _per_channel(values, what: str, channels: int, preset: Optional[str] = None) -> np.ndarray:
    """--mean/--std as an array of 1 or ``channels`` values (a wrong count would not broadcast,
    a zero std would turn every sample into Inf/NaN)."""
    arr = np.asarray(values, np.float32).reshape(-1)
    if arr.size not in (1, channels):
        of = f" (of --preprocess {preset})" if preset else ""
        raise DataError(f"--{what}{of} gives {arr.size} values, but the data has {channels} channel(s)"
                        + (": the model's input is greyscale" if channels == 1 else "") + ".",
                        f"give --{what} one value or {channels} comma-separated values" if channels > 1 else
                        "give one --mean and one --std value with --scale (e.g. --scale 0.00392 --mean 0.5 --std 0.5), "
                        "or --preprocess none")
    if what == "std" and not np.all(arr != 0):
        raise DataError("--std contains 0; dividing by it would make every input Inf.", "give non-zero standard deviations")
    return arr


def _label_mapping(table) -> dict:
    """labels.json as {file: class} or as a list of {"file": ..., "class_index"|"label": ...} records."""
    fix = "write {\"a.jpg\": 3, ...} or [{\"file\": \"a.jpg\", \"class_index\": 3}, ...]"

    def as_int(file, value):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise DataError(f"labels.json gives '{file}' the class {value!r}, not an integer class index.", fix) from None

    if isinstance(table, dict):
        return {k: as_int(k, v) for k, v in table.items()}
    if not isinstance(table, list):
        raise DataError("labels.json must be a mapping {file: class} or a list of records.", fix)
    mapping = {}
    for rec in table:
        key = next((k for k in ("class_index", "label", "class") if k in rec), None) if isinstance(rec, dict) else None
        if key is None or "file" not in rec:
            raise DataError("labels.json records need 'file' and 'class_index' (or 'label').", "write [{\"file\": \"a.jpg\", \"class_index\": 3}, ...]")
        mapping[rec["file"]] = as_int(rec["file"], rec[key])
    return mapping


def _stack(feeds: list) -> dict:
    if len(feeds) == 1:
        return feeds[0]
    return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}


def graph_inputs(model: ModelProto) -> dict:
    out = {}
    for vi in real_inputs(model):
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        out[vi.name] = {"shape": shape, "dtype": np_dtype(tt.elem_type)}
    return out


def open_data(spec, model: ModelProto, input_shapes: Optional[dict] = None, recorded: Optional[ImageOptions] = None,
              **kwargs) -> DataSource:
    """A :class:`DataSource` for ``spec`` (a DataSpec, or a path string plus DataSpec fields as kwargs)."""
    if isinstance(spec, (str, os.PathLike)):
        image = kwargs.pop("image", None)
        if isinstance(image, dict):
            image = ImageOptions(**{k: v for k, v in image.items() if v is not None or k == "bgr"})
        spec = DataSpec(str(spec), image=image or ImageOptions(), **kwargs)
    return DataSource(spec, model, input_shapes, recorded)
