"""Side by side: onnxopt's qdq defaults against the peer ONNX quantizers, same models, data, split.

    nice python tools/bench_peers.py [--models effnet,resnet20,resnet56,yolox,se,mnist_vit,mnist_mbv2,mnist_gru] [--results results.json]
        [--peers-root DIR] [--limit-eval N] [--skip-peers] [--skip-fixed] [--configs ...] [--extra ...] [--fold F]
    python tools/bench_peers.py --folds-summary fold0.json ... fold4.json

Every quantizer runs in its own process (peers in their own virtual environments, whose pins
conflict: numpy 1.x for Neural Compressor, onnxruntime-gpu for ModelOpt), on the same float model
and the same calibration samples, so wall time and peak RSS (``ru_maxrss`` of that process) are
comparable; a peer that cannot run is reported with its error. Then, in this process, each output
is measured with onnxruntime: top-1 on the held-out images (classifiers), top-1 agreement with
fp32, box agreement with fp32 (YOLOX-nano), and int8/fp32 latency (1 thread, median).

Models and splits (shared/ README):
* ``effnet``  -- EfficientNet-Lite0, calibration every 5th of the 1000 ImageNet images (200), top-1
  on the other 800;
* ``resnet20``/``resnet56`` -- CIFAR-10 (cleanup,bnfuse first), 204 calibration / 813 evaluation;
* ``yolox``   -- YOLOX-nano on the COCO photos, 20 calibration / 80 evaluation, box agreement;
* ``se``      -- a HardSwish + squeeze-excite CNN trained here on scikit-learn's digits, whose
  depthwise inputs have channel ranges spread over two decades (BN-folded-like rescaling that
  leaves the float function unchanged): a model where all-int8 loses more than a point;
* ``mnist_vit``/``mnist_mbv2``/``mnist_gru`` -- held out (added after every default was chosen): a
  small vision transformer, a MobileNetV2-style CNN and a GRU over the image rows, trained here on
  the shared MNIST images (``tools/mnist_models.py``), 200 calibration / 2000 evaluation images.

Peer venvs (``--peers-root``, each ``<root>/<name>/bin/python``): ``nncf`` (pip nncf),
``inc`` (pip onnx-neural-compressor prettytable scipy), ``modelopt`` (pip "nvidia-modelopt[onnx]");
onnxruntime ``quantize_static`` runs in this interpreter.

Cross-validation (``--fold 0..4``, then ``--folds-summary``): one split decides a comparison by a
few images, so each fifth of the images calibrates once and the rest is evaluated; the summary
gives the mean top-1 over the five folds and each default against the best peer and the best fixed
method, with a bootstrap interval over images (the SE model has one split).

Leave-one-model-out: for each model, the fixed calibration method a fixed default would have been
chosen as, from the *other* models' mean accuracy, is reported next to ``auto``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONNXOPT_SHARED", ROOT.parent / "shared"))   # ../shared, or where ONNXOPT_SHARED points
CACHE = Path(os.environ.get("ONNXOPT_BENCH_CACHE", tempfile.gettempdir())) / "onnxopt_bench_peers"
FIXED = ("minmax", "percentile", "entropy", "mse")
NOT_MODELS = ("lomo", "fold")   # the results file's keys that are not a model's rows
FOLD = 0   # which fifth of the images calibrates (--fold): the splits below take every 5th sample from here


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- worker side
def _load_calib(path):
    z = np.load(path)
    names = list(z.files)
    arrays = {k: z[k] for k in names}   # each z[k] reads the whole array again: read once
    n = arrays[names[0]].shape[0]
    return [{k: arrays[k][i:i + 1] for k in names} for i in range(n)], z


def worker(args):
    """Quantize ``args.model`` with one peer configuration; write the model and a JSON line."""
    t0 = time.perf_counter()
    feeds, z = _load_calib(args.calib)
    peer, cfg = args.worker, args.config
    if peer == "ort":
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(feeds)

            def get_next(self):
                return next(self.it, None)

        meth = {"MinMax": CalibrationMethod.MinMax, "Entropy": CalibrationMethod.Entropy,
                "Percentile": CalibrationMethod.Percentile}[cfg]
        quantize_static(args.model, args.out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=meth)
    elif peer == "nncf":
        import nncf
        import onnx
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

        model = onnx.load(args.model)
        kw = {}
        if cfg == "no_bias_correction":
            kw["advanced_parameters"] = AdvancedQuantizationParameters(disable_bias_correction=True)
        elif cfg == "full_bias_correction":
            kw["fast_bias_correction"] = False
        q = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds), **kw)
        onnx.save(q, args.out)
    elif peer == "inc":
        from onnx_neural_compressor.quantization import QuantFormat, config, quantize
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.rewind()

            def get_next(self):
                return next(self.it, None)

            def rewind(self):
                self.it = iter(feeds)

        quantize(args.model, args.out, config.StaticQuantConfig(calibration_data_reader=Reader(), quant_format=QuantFormat.QDQ,
                                                               per_channel=True))
    elif peer == "modelopt":
        if len(z.files) != 1:
            raise SystemExit("modelopt: one input only in this benchmark")
        npy = args.out + ".calib.npy"
        np.save(npy, z[z.files[0]])
        cmd = [sys.executable, "-m", "modelopt.onnx.quantization", "--onnx_path", args.model, "--quantize_mode", "int8",
               "--calibration_data_path", npy, "--calibration_eps", "cpu", "--high_precision_dtype", "fp32",
               "--output_path", args.out]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not os.path.exists(args.out):
            raise SystemExit("modelopt failed: " + (r.stderr or r.stdout).strip().splitlines()[-1][:300])
    elif peer == "onnxopt":
        import onnx

        from onnxopt import manager
        from onnxopt.registry import PassContext

        opts = dict(kv.split("=", 1) for kv in cfg.split(",") if kv)
        if "search_samples" in opts:   # ablation of calib_method=auto's held-in sample count (not an option)
            from onnxopt.quant import calib_search
            calib_search.SEARCH_SAMPLES = int(opts.pop("search_samples"))
        model = onnx.load(args.model)
        logs = []
        shapes = {k: list(z[k].shape[:1] and (1,) + z[k].shape[1:]) for k in z.files} if opts.get("target", "").startswith("tidl") else None
        ctx = PassContext(data=lambda: iter(feeds), progress=False, log=logs.append, input_shapes=shapes)
        q, report = manager.apply(model, ["qdq"], {"qdq": opts}, context=ctx, verify=False, summarize_layers=False)
        onnx.save(q, args.out)
        rec = report.passes[-1]
        extra = {"check_violations": rec.extra["check"]["violations"], "log": [l for l in logs if l.startswith(("fallback", "calibration"))]}
        fb = (rec.extra.get("recovery") or {}).get("fallback")
        if fb:
            extra["kept_high_precision"] = len(fb["high_precision_layers"])
            extra["kept_layers"] = fb["high_precision_layers"]
            extra["fallback_met"] = fb["met"]
            extra["calib_agreement_loss"] = [fb["agreement_loss_before"], fb["agreement_loss_after"]]
        cal = rec.extra["info"].get("calibration") or {}
        if cal.get("counts"):
            extra["calib_counts"] = cal["counts"]
        Path(args.out + ".extra.json").write_text(json.dumps(extra))
    else:
        raise SystemExit(f"unknown peer {peer}")
    # VmHWM: this process's own peak (ru_maxrss survives exec, so it would report the driver's);
    # a child (modelopt's CLI) counts through RUSAGE_CHILDREN
    hwm = next((int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")), 0)
    rss = max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if peer == "modelopt" else 0)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": rss / 1024.0}))


# ------------------------------------------------------------------------------- driver side
def run_peer(python, peer, cfg, model_path, calib_path, out_path, timeout=1800):
    cmd = ["nice", str(python), str(Path(__file__).resolve()), "--worker", peer, "--config", cfg, "--model", str(model_path),
           "--calib", str(calib_path), "--out", str(out_path)]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, {"error": f"timed out after {timeout} s"}
    if r.returncode != 0 or not Path(out_path).exists():
        err = (r.stderr or r.stdout).strip().splitlines()
        tail = [l for l in err if l.strip()][-1:] or ["(no output)"]
        return None, {"error": tail[0][:300]}
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    extra_path = Path(str(out_path) + ".extra.json")
    if extra_path.exists():
        stats.update(json.loads(extra_path.read_text()))
    return out_path, stats


def session(path, threads=2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def outputs(path, feeds):
    s = session(path)
    return [s.run(None, f)[0] for f in feeds]


def top1(model, images: np.ndarray) -> np.ndarray:
    """Each image's top-1 class by ``model`` (ModelProto or path), one image at a time, in onnxruntime
    with its default graph optimizations, as a user's session runs it."""
    from onnxopt import runtime   # the driver's interpreter has onnxopt; the peers' venvs need not

    sess = runtime.session(model, optimize=True)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + 1]})[0].reshape(1, -1).argmax(1) for i in range(len(images))])


def latency_ms(path, feed, runs=30):
    from onnxopt.compare import measure_latency   # the driver's interpreter has onnxopt; the peers' venvs need not

    return float(measure_latency(str(path), feed, runs=runs, warmup=3, threads=1)["median_ms"])


def save_calib(feeds, path):
    names = list(feeds[0])
    np.savez(path, **{k: np.concatenate([f[k] for f in feeds]).astype(np.float32) for k in names})


# --------------------------------------------------------------------------------- models
def prepare(name):
    """(float model path, calibration feeds, evaluation feeds, labels or None, kind)."""
    import onnx

    sys.path.insert(0, str(ROOT / "tools"))
    import bench_qdq as B
    import mnist_models

    from onnxopt import manager, model_io
    from onnxopt.data import open_data
    from onnxopt.registry import PassContext

    def split(source, model, img):   # (calibration, evaluation): every 5th sample from FOLD, and the rest
        return (open_data(source, model, image=img, every=5, offset=FOLD),
                open_data(source, model, image=img, every=5, offset=FOLD, exclude_every=True))

    CACHE.mkdir(parents=True, exist_ok=True)
    if name == "effnet":
        model = model_io.load_model(SHARED / "models" / "efficientnet_lite0.onnx")
        img = dict(size=256, crop=224, mean=[127.0], std=[128.0])
        calib, ev = split(str(SHARED / "data" / "imagenet"), model, img)
        cf, ef, labels, kind = list(calib.samples()), list(ev.samples()), ev.labels(), "cls"
    elif name in ("resnet20", "resnet56"):
        src = model_io.load_model(SHARED / "models" / f"{name}_cifar10.onnx")
        model, _ = manager.apply(src, "cleanup,bnfuse", context=PassContext(progress=False), summarize_layers=False)
        img = dict(scale=1 / 255.0, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        npz = str(SHARED / "data" / "cifar10_test_1017.npz")
        calib, ev = split(npz, model, img)
        cf, ef, labels, kind = list(calib.samples()), list(ev.samples()), ev.labels(), "cls"
    elif name == "yolox":
        model = model_io.load_model(SHARED / "models" / "yolox_nano.onnx")
        img = dict(bgr=True, letterbox=114)
        folder = str(SHARED / "data" / "coco100")
        calib, ev = split(folder, model, img)
        cf, ef, labels, kind = list(calib.samples()), list(ev.samples()), None, "det"
    elif name == "se":
        model, cf, ef, labels = _trained(name, "se_digits", se_digits)
        kind = "cls"
    elif name in mnist_models.MODELS:   # held out: trained here after every default was chosen
        model, cf, ef, labels = _trained(name, name, lambda: mnist_models.build(name, SHARED / "data" / "mnist", log=log))
        kind = "cls"
    else:
        raise SystemExit(f"unknown model {name}")
    path = CACHE / f"{name}.fp32.onnx"
    onnx.save(model, path)
    return path, cf, ef, labels, kind, B


def _trained(name, stem, build):
    """(model, calibration feeds, evaluation feeds, labels) of a model this bench trains (``build()``),
    cached as ``<stem>.onnx`` / ``<stem>.npz`` (training takes minutes on a busy 2-core machine). Its
    one split is the rest of its training data, so it has no --fold."""
    import onnx

    if FOLD:
        raise SystemExit(f"the {name} model has one split (its training used the rest): run it without --fold")
    cached, onnx_path = CACHE / f"{stem}.npz", CACHE / f"{stem}.onnx"
    if cached.exists() and onnx_path.exists():
        z = np.load(cached)
        zc, ze = z["calib"], z["eval"]   # each z[...] reads the array again: once, not once per sample
        return (onnx.load(onnx_path), [{"input": zc[i:i + 1]} for i in range(len(zc))],
                [{"input": ze[i:i + 1]} for i in range(len(ze))], z["labels"])
    model, cf, ef, labels = build()
    CACHE.mkdir(parents=True, exist_ok=True)
    onnx.save(model, onnx_path)
    np.savez(cached, calib=np.concatenate([f["input"] for f in cf]), eval=np.concatenate([f["input"] for f in ef]),
             labels=labels)
    return model, cf, ef, labels


SE_TRAIN, SE_CALIB_EVERY = 1197, 6


def digits_split():
    """scikit-learn's digits upsampled to 32x32 and scaled to [-1, 1]: (train images, train labels,
    test images, test labels), 1197 / 600. The SE model trains on the first part and calibrates on
    every 6th of it (200); the test part is its evaluation set."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = ((F.interpolate(x, size=32, mode="bilinear", align_corners=False) - 0.5) / 0.5).numpy()
    y = d.target.astype(np.int64)
    return x[:SE_TRAIN], y[:SE_TRAIN], x[SE_TRAIN:], y[SE_TRAIN:]


def se_block():
    """The squeeze-excite block of the SE models (a torch module class): expand 1x1 Conv+BN+ReLU,
    depthwise 3x3 Conv+BN+HardSwish, SE gate (HardSigmoid), project 1x1 Conv+BN, residual."""
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, cin, mid, cout, stride):
            super().__init__()
            self.exp = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
            self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.Hardswish())
            self.se1, self.se2 = nn.Conv2d(mid, mid // 4, 1), nn.Conv2d(mid // 4, mid, 1)
            self.proj = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.res = stride == 1 and cin == cout

        def forward(self, t):
            h = self.dw(self.exp(t))
            s = F.hardsigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(h, 1)))))
            h = self.proj(h * s)
            return h + t if self.res else h
    return Block


def spread_depthwise_ranges(net, spread: float, seed: int) -> None:
    """Rescale each SE block of the trained ``net`` per channel where the float function allows it:
    the expand BN's gamma/beta times f_c, the depthwise filter of channel c divided by f_c,
    f_c = 10^U(-spread/2, spread/2) (what folding BatchNorm with widely different statistics does)."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "exp") and hasattr(m, "dw"):
                bn, dw = m.exp[1], m.dw[0]
                f = torch.tensor(10.0 ** rng.uniform(-spread / 2, spread / 2, bn.num_features), dtype=torch.float32)
                bn.weight.mul_(f)
                bn.bias.mul_(f)
                dw.weight.div_(f[:, None, None, None])


def se_digits(seed=0, spread=2.0, labels_of=None):
    """A HardSwish + squeeze-excite CNN (MobileNetV3-like, unfused BN) trained on scikit-learn's
    digits (upsampled to 32x32), then rescaled per channel where the float function allows it
    (expand Conv+BN -> ReLU -> depthwise: BN's gamma/beta times f_c, the depthwise filter of
    channel c divided by f_c, f_c = 10^U(-spread/2, spread/2)) -- what folding BatchNorm with
    widely different statistics produces, and what makes per-tensor depthwise inputs lose
    accuracy. Split: 1197 train (of which every 6th, 200, calibrate), 600 test.

    ``labels_of``: a function from the digits to a multi-hot target ``[N, K]`` (attributes of the
    digit); the net then ends in K Sigmoid outputs (``probs``), trained with binary cross
    entropy: a binary (K = 1) or multi-label classifier. Its evaluation labels are that target."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    xtr, ytr, xte, yte = (torch.from_numpy(a) for a in digits_split())

    Block = se_block()
    net = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
                        Block(16, 48, 16, 1), Block(16, 64, 24, 2), Block(24, 72, 24, 1), Block(24, 96, 32, 2),
                        nn.Conv2d(32, 128, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(128, 10 if labels_of is None else labels_of(ytr.numpy()).shape[1]))
    if labels_of is not None:
        ytr, yte = (torch.from_numpy(labels_of(y.numpy()).astype(np.float32)) for y in (ytr, yte))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(25):
        net.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            xb = xtr[idx] + 0.1 * torch.randn(len(idx), 1, 32, 32, generator=g)
            loss = (F.cross_entropy(net(xb), ytr[idx]) if labels_of is None
                    else F.binary_cross_entropy_with_logits(net(xb), ytr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    spread_depthwise_ranges(net, spread, seed)
    with torch.no_grad():
        acc = float((net(xte).argmax(1) == yte).float().mean() if labels_of is None
                    else ((net(xte) > 0) == (yte > 0.5)).all(1).float().mean())
    log(f"se-digits: float test accuracy {100 * acc:.2f} %")
    import io

    import onnx

    out = "logits" if labels_of is None else "probs"
    exported = net if labels_of is None else nn.Sequential(net, nn.Sigmoid())
    buf = io.BytesIO()
    torch.onnx.export(exported, xtr[:1], buf, input_names=["input"], output_names=[out], opset_version=17,
                      dynamic_axes={"input": {0: "N"}, out: {0: "N"}}, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    calib = [{"input": xtr[i:i + 1].numpy()} for i in range(0, SE_TRAIN, SE_CALIB_EVERY)][:200]
    evalf = [{"input": xte[i:i + 1].numpy()} for i in range(len(xte))]
    return model, calib, evalf, yte.numpy()


def add_rows_options(ap) -> None:
    """``--json`` / ``--markdown`` of a bench whose run is a list of rows (see :func:`rows_main`)."""
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--markdown", metavar="JSON", help="print the table of an earlier run's --json file and stop")


def rows_main(args, measure, markdown) -> int:
    """The end of such a bench's ``main``: with ``--markdown JSON`` the table of an earlier run;
    else the rows ``measure()`` returns, written to ``--json`` when given, and their table."""
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    rows = measure()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    return 0


def quantize_as(model, cf, target: str, config: str, before=None) -> tuple:
    """(quantized model, its fallback report, its units kept (None for all int8), seconds):
    ``cleanup,bnfuse,qdq`` on the calibration feeds ``cf`` with no option but ``target``, run as
    ``config`` says: ``defaults``; ``defaults before``, inside the context manager ``before`` (the
    behaviour a change replaced, switched back on); ``all int8`` (``fallback=none``); ``shifted
    check`` (``fallback_check=shifted``)."""
    import contextlib

    from onnxopt import manager
    from onnxopt.registry import PassContext

    ctx = PassContext(data=lambda: iter(cf), progress=False, log=lambda m: None,
                      input_shapes={k: list(v.shape) for k, v in cf[0].items()} if target.startswith("tidl") else None)
    options = {"target": target, **({"fallback": "none"} if config == "all int8" else
                                    {"fallback_check": "shifted"} if config == "shifted check" else {})}
    t0 = time.perf_counter()
    with (before if config == "defaults before" else contextlib.nullcontext()):
        q, report = manager.apply(model, ["cleanup", "bnfuse", "qdq"], {"qdq": options}, context=ctx, verify=False,
                                  summarize_layers=False)
    fb = (report.passes[-1].extra.get("recovery") or {}).get("fallback") or {}
    kept = None if config == "all int8" else len(fb.get("high_precision_layers", []))
    return q, fb, kept, time.perf_counter() - t0


# ---------------------------------------------------------------------------------- run
def configs(skip_peers, skip_fixed, root, extra=()):
    """(peer, config, interpreter, label) of every row; ``extra``: more onnxopt option strings (ablations)."""
    me = sys.executable
    rows = [("onnxopt", "target=ort", me, "onnxopt --target ort (defaults)"),
            ("onnxopt", "target=tensorrt", me, "onnxopt --target tensorrt (defaults)"),
            ("onnxopt", "target=ort,fallback=none", me, "onnxopt ort auto, no fallback"),
            ("onnxopt", "target=tensorrt,fallback=none", me, "onnxopt tensorrt auto, no fallback"),
            ("onnxopt", "target=tidl", me, "onnxopt --target tidl (defaults)"),
            ("onnxopt", "target=tidl,fallback=none", me, "onnxopt tidl auto, no fallback"),
            ("onnxopt", "target=tidl-tda4vm", me, "onnxopt --target tidl-tda4vm (defaults)"),
            ("onnxopt", "target=tidl-tda4vm,fallback=none", me, "onnxopt tidl-tda4vm auto, no fallback"),
            ("onnxopt", "target=ort,depthwise_per_channel=true", me, "onnxopt ort depthwise per-channel activations"),
            ("onnxopt", "target=ort,depthwise_per_channel=true,fallback=none", me, "onnxopt ort depthwise per-channel, no fallback")]
    rows += [("onnxopt", cfg, me, f"onnxopt {cfg}") for cfg in extra]
    if not skip_fixed:
        for t in ("ort", "tensorrt"):
            for m in FIXED:
                rows.append(("onnxopt", f"target={t},calib_method={m},fallback=none", me, f"onnxopt {t} {m}, no fallback"))
    if not skip_peers:
        for m in ("MinMax", "Entropy", "Percentile"):
            rows.append(("ort", m, me, f"ort quantize_static {m}"))
        for cfg, label in (("default", "nncf defaults (fast bias correction)"), ("no_bias_correction", "nncf no bias correction"),
                           ("full_bias_correction", "nncf full bias correction")):
            rows.append(("nncf", cfg, Path(root) / "nncf/bin/python", label))
        rows.append(("inc", "static", Path(root) / "inc/bin/python", "neural-compressor static QDQ per-channel"))
        rows.append(("modelopt", "int8", Path(root) / "modelopt/bin/python", "modelopt int8 (fp32 high precision)"))
    return rows


def evaluate(B, path, kind, ef, labels, ref_outs, fp32_path):
    outs = outputs(path, ef)
    row = {}
    if kind == "cls":
        pred = np.array([int(np.argmax(o)) for o in outs])
        ref = np.array([int(np.argmax(o)) for o in ref_outs])
        row["top1"] = 100.0 * float(np.mean(pred == labels))
        row["right"] = "".join("1" if ok else "0" for ok in pred == labels)   # image by image, for --folds-summary
        row["agreement"] = 100.0 * float(np.mean(pred == ref))
        # paired with fp32, image by image: how many it gets right that fp32 gets wrong, and the
        # reverse (a top-1 difference of a few images is within what these counts make chance)
        row["fixed_vs_fp32"] = int(np.sum((pred == labels) & (ref != labels)))
        row["broke_vs_fp32"] = int(np.sum((pred != labels) & (ref == labels)))
        # onnxopt's task metric: mean KL(fp32 || quantized) of the softmax of the outputs, how far
        # the whole distribution moved (finer than the few images whose top-1 flips)
        from onnxopt import task_metric   # the driver's interpreter has onnxopt; the peers' venvs need not

        row["kl"] = task_metric.measure([np.concatenate(ref_outs)], [np.concatenate(outs)]).outputs[0].kl
    else:
        row.update(B.box_agreement(ref_outs, outs))
    return row


def run_model(name, args, results):
    path, cf, ef, labels, kind, B = prepare(name)
    if args.limit_eval:
        ef = ef[:args.limit_eval]
        labels = None if labels is None else labels[:args.limit_eval]
    calib_path = CACHE / f"{name}.calib.npz"
    save_calib(cf, calib_path)
    ref_outs = outputs(path, ef)
    lat_fp32 = latency_ms(path, ef[0])
    rows = []
    base = evaluate(B, path, kind, ef, labels, ref_outs, path)
    rows.append({"model": name, "config": "fp32", **base, "latency_ms": lat_fp32, "n_images": len(cf) + len(ef)})
    log(json.dumps(rows[-1]))
    wanted = args.configs.split(";") if args.configs else None
    extra = [c for c in args.extra.split(";") if c]
    for peer, cfg, python, label in configs(args.skip_peers, args.skip_fixed, args.peers_root, extra):
        if wanted and label not in wanted and cfg not in wanted:
            continue
        if "tidl" in cfg and name != "se" and cfg not in extra:   # TIDL rows on the model built to show the fallback (time on this machine), or asked for
            continue
        if "depthwise_per_channel" in cfg and name.startswith("resnet"):   # no depthwise conv: the default's model
            continue
        out = CACHE / f"{name}.{peer}.{cfg.replace(',', '_').replace('=', '-')}.onnx"
        if not Path(python).exists():
            rows.append({"model": name, "config": label, "error": f"no venv at {python}"})
            log(json.dumps(rows[-1]))
            continue
        q, stats = run_peer(python, peer, cfg, path, calib_path, out)
        row = {"model": name, "config": label, **stats}
        if q is not None:
            try:
                row.update(evaluate(B, q, kind, ef, labels, ref_outs, path))
                row["latency_ratio"] = latency_ms(q, ef[0]) / lat_fp32
                if peer != "onnxopt":
                    import onnx
                    from onnxopt.quant import check as qcheck
                    qm = onnx.load(q)
                    row["check_tensorrt"] = len(qcheck.check_model(qm, "tensorrt"))
            except Exception as exc:  # a peer's output onnxruntime cannot run
                row["error"] = f"evaluation failed: {str(exc).strip().splitlines()[0][:200]}"
        rows.append(row)
        log(json.dumps({k: v for k, v in row.items() if k not in ("kept_layers", "log")}))
    results[name] = rows


def lomo(results):
    """Leave-one-model-out choice of a fixed calibration method per target, vs auto."""
    out = []
    metric = lambda r: r.get("top1", r.get("mean_iou_all", 0) * 100) if "error" not in r else None  # noqa: E731
    for target in ("ort", "tensorrt"):
        table = {}
        for name, rows in results.items():
            for m in FIXED:
                r = next((r for r in rows if r["config"] == f"onnxopt {target} {m}, no fallback"), None)
                if r is not None and metric(r) is not None:
                    table.setdefault(name, {})[m] = metric(r)
        for name in table:
            others = [n for n in table if n != name and len(table[n]) == len(FIXED)]
            if not others or len(table[name]) != len(FIXED):
                continue
            choice = max(FIXED, key=lambda m: np.mean([table[n][m] for n in others]))
            auto = next((r for r in results[name] if r["config"] == f"onnxopt {target} auto, no fallback"), None)
            out.append({"target": target, "model": name, "lomo_method": choice, "lomo_value": table[name][choice],
                        "best_fixed": max(table[name].values()), "auto": metric(auto) if auto else None})
    return out


def markdown(results) -> str:
    """The results as markdown tables (one per model) plus the leave-one-model-out table."""
    lines = []
    for name, rows in results.items():
        if name in NOT_MODELS:
            continue
        det = any("mean_iou_all" in r for r in rows)
        head = ("| config | matched boxes | mean IoU (all fp32 boxes) | class agreement |" if det else
                "| config | top-1 % | top-1 agreement % | KL vs fp32 | fixed / broke vs fp32 (images) |") + " quant wall s | peak RSS MB | int8/fp32 latency (ort, 1 thr) | kept in high precision | TensorRT check |"
        lines += [f"### {name}", "", head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['config']} | cannot run: {r['error']} |")
                continue
            if det:
                acc = (f"| {r['config']} | {r.get('matched', '-')}/{r.get('fp32_boxes', '-')} | {r.get('mean_iou_all', 0):.3f} | "
                       f"{r.get('class_agreement', 0):.3f} |")
            else:
                kl = f"{r['kl']:.5f}" if "kl" in r else "-"
                acc = (f"| {r['config']} | {r.get('top1', 0):.2f} | {r.get('agreement', 0):.2f} | {kl} | "
                       f"{r.get('fixed_vs_fp32', '-')}/{r.get('broke_vs_fp32', '-')} |")
            chk = r.get("check_violations", r.get("check_tensorrt", "-"))
            kept = r.get("kept_high_precision", "-")
            rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
            lines.append(acc + f" {r.get('seconds', 0):.1f} | {rss} | {r.get('latency_ratio', 1.0):.2f} | {kept} | {chk} |")
        lines.append("")
    if results.get("lomo"):
        lines += ["### leave-one-model-out fixed method vs auto", "", "| target | model | LOMO method | its value | best fixed | auto |",
                  "|---|---|---|---|---|---|"]
        for r in results["lomo"]:
            lines.append(f"| {r['target']} | {r['model']} | {r['lomo_method']} | {r['lomo_value']:.2f} | {r['best_fixed']:.2f} | "
                         f"{r['auto'] if r['auto'] is None else round(r['auto'], 2)} |")
    return "\n".join(lines)


def _config_path(name, row, peer_rows):
    """The cached output of ``row`` (see run_model's naming), in the cache of the run that made it."""
    for peer, cfg, _, lab in peer_rows:
        if lab == row["config"]:
            return Path(row.get("cache", CACHE)) / f"{name}.{peer}.{cfg.replace(',', '_').replace('=', '-')}.onnx"
    return None


def _is_peer(config: str) -> bool:
    return not config.startswith("onnxopt") and config != "fp32"


def paired(results, n_boot=10000, seed=0):
    """Each target's default against that model's best fixed method and against its best peer
    configuration, image by image on the held-out split (the cached outputs run again): the images
    only one of the two gets right, the exact McNemar p-value of that split, and a paired bootstrap
    95 % interval of the top-1 difference."""
    from math import comb

    rng = np.random.default_rng(seed)
    rows = configs(False, False, "", ())
    out = []
    for name, res in results.items():
        if name in NOT_MODELS or not any("top1" in r for r in res):
            continue
        path, _, ef, labels, _, _ = prepare(name)
        peers = [r for r in res if _is_peer(r["config"]) and "top1" in r]
        right = {}

        def correct(r):
            if r["config"] not in right:
                right[r["config"]] = np.array([int(np.argmax(o)) for o in outputs(_config_path(name, r, rows), ef)]) == labels
            return right[r["config"]]

        for target in ("ort", "tensorrt"):
            default = next((r for r in res if r["config"] == f"onnxopt --target {target} (defaults)" and "top1" in r), None)
            fixed = [r for r in res if r["config"] in {f"onnxopt {target} {m}, no fallback" for m in FIXED} and "top1" in r]
            for against, candidates in (("best fixed method", fixed), ("best peer", peers)):
                if default is None or not candidates:
                    continue
                best = max(candidates, key=lambda r: r["top1"])
                a, b = correct(default), correct(best)
                only_default, only_best = int(np.sum(a & ~b)), int(np.sum(~a & b))
                n = only_default + only_best
                k = min(only_default, only_best)
                p_value = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
                idx = rng.integers(0, len(a), size=(n_boot, len(a)))
                diffs = 100.0 * (a[idx].mean(1) - b[idx].mean(1))
                out.append({"model": name, "target": target, "against": against, "best": best["config"],
                            "default_top1": 100 * a.mean(), "best_top1": 100 * b.mean(), "diff": 100 * (a.mean() - b.mean()),
                            "only_default": only_default, "only_best": only_best, "mcnemar_p": p_value,
                            "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]})
                log(json.dumps(out[-1]))
    return out


def paired_markdown(rows) -> str:
    lines = ["| model | target | against | default top-1 | its top-1 | difference (pt) | images right only with default / only with it | McNemar exact p | paired bootstrap 95 % CI (pt) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['target']} | {r['against']}: {r['best'].removeprefix('onnxopt ')} | {r['default_top1']:.2f} | "
                     f"{r['best_top1']:.2f} | {r['diff']:+.2f} | {r['only_default']} / {r['only_best']} | {r['mcnemar_p']:.2f} | "
                     f"[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}] |")
    return "\n".join(lines)


def folds_summary(paths, n_boot=10000, seed=0) -> str:
    """Cross-validated comparison over runs made with ``--fold 0..4`` (each fifth of the images
    calibrates once and the other four fifths are evaluated): mean top-1 per configuration, and
    each target's default against the best peer and the best fixed method by that mean, image by
    image. An image is evaluated in four of the five folds; its score is its mean correctness over
    them, and the 95 % interval of the mean difference comes from a bootstrap over images."""
    folds = [json.loads(Path(p).read_text()) for p in paths]
    rng = np.random.default_rng(seed)
    lines = []
    for name in folds[0]:
        if name in NOT_MODELS or not all(name in f for f in folds):
            continue
        by_fold = [{r["config"]: r for r in f[name] if "right" in r} for f in folds]
        shared = [c for c in by_fold[0] if all(c in b for b in by_fold)]
        if not shared:
            continue
        n_img = next(r["n_images"] for r in folds[0][name] if r["config"] == "fp32")
        ids = [[i for i in range(n_img) if i % 5 != f["fold"]] for f in folds]

        def score(config):   # per image: mean correctness over the folds that evaluate it
            tot, cnt = np.zeros(n_img), np.zeros(n_img)
            for b, idx in zip(by_fold, ids):
                tot[idx] += np.array([c == "1" for c in b[config]["right"]])
                cnt[idx] += 1
            return tot / np.maximum(cnt, 1)

        mean = {c: float(np.mean([b[c]["top1"] for b in by_fold])) for c in shared}
        kl = {c: float(np.mean([b[c].get("kl", np.nan) for b in by_fold])) for c in shared}
        lines += [f"#### {name}: {len(folds)} folds", "", "| config | mean top-1 % | per fold | mean KL vs fp32 | "
                  "units kept in high precision, per fold | mean latency × fp32 |", "|---|---|---|---|---|---|"]
        for c in shared:
            per = " / ".join(f"{b[c]['top1']:.2f}" for b in by_fold)
            kept = " / ".join(str(b[c].get("kept_high_precision", "-")) for b in by_fold)
            lat = [b[c]["latency_ratio"] for b in by_fold if b[c].get("latency_ratio")]
            lines.append(f"| {c} | {mean[c]:.2f} | {per} | {kl[c]:.5f} | {kept} | {f'{np.mean(lat):.2f}' if lat else '-'} |")
        lines += ["", "| target | against | its mean top-1 | default mean top-1 | difference (pt) | folds default ≥ it | "
                      "bootstrap 95 % CI over images (pt) |", "|---|---|---|---|---|---|---|"]
        for target in ("ort", "tensorrt"):
            default = f"onnxopt --target {target} (defaults)"
            if default not in shared:
                continue
            groups = (("best peer", [c for c in shared if _is_peer(c)]),
                      ("best fixed method", [c for c in shared if c in {f"onnxopt {target} {m}, no fallback" for m in FIXED}]))
            for against, cands in groups:
                if not cands:
                    continue
                best = max(cands, key=lambda c: mean[c])
                d = score(default) - score(best)
                boot = d[rng.integers(0, n_img, size=(n_boot, n_img))].mean(1) * 100
                won = sum(b[default]["top1"] >= b[best]["top1"] for b in by_fold)
                lines.append(f"| {target} | {against}: {best} | {mean[best]:.2f} | {mean[default]:.2f} | "
                             f"{mean[default] - mean[best]:+.2f} | {won} of {len(folds)} | "
                             f"[{np.percentile(boot, 2.5):+.2f}, {np.percentile(boot, 97.5):+.2f}] |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    global FOLD, CACHE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--config", default="")
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--out")
    ap.add_argument("--models", default="effnet,resnet20,resnet56,yolox,se,mnist_vit,mnist_mbv2,mnist_gru")
    ap.add_argument("--peers-root", default=str(Path(tempfile.gettempdir()) / "onnxopt_peers"),
                    help="folder holding one virtual environment per peer: nncf/, inc/, modelopt/")
    ap.add_argument("--limit-eval", type=int, default=0)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-fixed", action="store_true")
    ap.add_argument("--configs", default="", help="only these configurations (labels or config strings, ';'-separated)")
    ap.add_argument("--extra", default="", help="more onnxopt rows: qdq option strings, ';'-separated "
                    "(e.g. 'target=ort,calib_method=minmax' for an ablation)")
    ap.add_argument("--results", default=str(CACHE / "results.json"))
    ap.add_argument("--markdown", nargs="*", help="print the tables of these results files (merged: the rows of each model, "
                    "a later file's row replacing an earlier one of the same config) and exit")
    ap.add_argument("--paired", action="store_true", help="with --markdown: also each target's default against the best "
                    "fixed method and the best peer, image by image (McNemar, paired bootstrap), from the cached outputs")
    ap.add_argument("--fold", type=int, default=0, choices=range(5), help="calibrate on the images i with i %% 5 == FOLD "
                    "and evaluate on the rest (0: the split of the tables in docs/); outputs go to a cache folder of their own")
    ap.add_argument("--folds-summary", nargs="+", help="print the cross-validated tables of these results files, "
                    "one per --fold run, and exit")
    args = ap.parse_args(argv)
    if args.folds_summary:
        print(folds_summary(args.folds_summary))
        return 0
    if args.fold:
        FOLD, CACHE = args.fold, CACHE / f"fold{args.fold}"
    if args.worker:
        return worker(args)
    if args.markdown is not None:
        merged = {}
        for path in args.markdown:   # rows of the same model merge; a later file's row replaces one of the same config
            data = json.loads(Path(path).read_text())
            fold = data.get("fold", 0)
            if args.paired and fold != FOLD:   # the cached outputs are run again on this fold's evaluation images
                raise SystemExit(f"{path} was run with --fold {fold}: give --fold {fold} with --paired")
            cache = Path(path).resolve().parent / "onnxopt_bench_peers"   # results files live in ONNXOPT_BENCH_CACHE
            cache = str(cache / f"fold{fold}" if fold else cache)
            for name, rows in data.items():
                if name not in NOT_MODELS:
                    for r in rows:
                        r.setdefault("cache", cache)
                    by_config = {r["config"]: r for r in merged.get(name, [])}
                    by_config.update({r["config"]: r for r in rows})
                    merged[name] = list(by_config.values())
        merged["lomo"] = lomo(merged)
        print(markdown(merged))
        if args.paired:
            print("\n### default vs the best fixed method and the best peer, image by image\n\n" + paired_markdown(paired(merged)))
        return 0
    results = {}
    if Path(args.results).exists():
        results = json.loads(Path(args.results).read_text())
    results["fold"] = FOLD
    for name in args.models.split(","):
        run_model(name, args, results)
        results["lomo"] = lomo({k: v for k, v in results.items() if k not in NOT_MODELS})
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
