"""Calibration engine: statistics, range methods against brute force, streaming, workers, cache, TensorRT table."""
from __future__ import annotations

import dataclasses
import gc
import json
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import make_model
from onnxopt.data import open_data
from onnxopt.errors import DataError, OnnxoptError, OptionError
from onnxopt.quant import calibrate as C
from onnxopt.quant import histogram as H
from onnxopt.quant.calibrate import CalibConfig, calibrate, weight_ranges
from onnxopt.quant.trt_table import read_trt_calibration_table, write_trt_calibration_table

D = 256
TENSORS = ["x", "a", "b", "out"]


def small_model() -> onnx.ModelProto:
    """x -> a = 2x -> b = relu(a) -> out = b + x (ranges of a, b are exactly known from x)."""
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Add", ["b", "x"], ["out"]),
    ]
    return make_model(nodes, [("x", ["N", D])], [("out", ["N", D])], [("two", np.array(2.0, np.float32))])


def sample_data(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    x[n // 3, 5] = 9.5          # a few outliers, one of them in a later batch
    x[-1, 7] = -12.25
    return x


def npy_source(tmp_path, x, name="calib.npy", **kw):
    p = tmp_path / name
    np.save(p, x)
    return open_data(str(p), small_model(), **kw)


def quiet(method="minmax", **kw) -> CalibConfig:
    return CalibConfig(method=method, progress=False, **kw)


# -- histogram mechanics -------------------------------------------------------------------

def test_growing_histogram_equals_one_shot():
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal(5000).astype(np.float32) * s for s in (1e-3, 1.0, 0.1, 37.0, 2.0, 300.0)]
    parts.insert(2, np.array([4.0, -4.0, 0.0, -0.0], np.float32))      # |x| == R exactly at that point
    parts.append(np.array([512.0, -512.0], np.float32))                # ... and at the end
    streamed = H.SignedHistogram(512)
    for p in parts:
        streamed.add(p)
    one_shot = H.SignedHistogram(512)
    one_shot.add(np.concatenate(parts))
    assert streamed.exp == one_shot.exp
    np.testing.assert_array_equal(streamed.counts, one_shot.counts)
    # and it is the histogram numpy computes on the final edges
    allx = np.concatenate(parts)
    ref_pos, _ = np.histogram(allx[allx >= 0], bins=512, range=(0, streamed.range))
    ref_abs, _ = np.histogram(np.abs(allx), bins=512, range=(0, streamed.range))
    np.testing.assert_array_equal(streamed.positive(), ref_pos)
    np.testing.assert_array_equal(streamed.folded(), ref_abs)
    assert streamed.counts.sum() == allx.size
    # non-negative batches (ReLU outputs) take the sign-free path
    relu = H.SignedHistogram(512)
    for p in parts:
        relu.add(np.maximum(p, 0))
    ref_relu, _ = np.histogram(np.maximum(allx, 0), bins=512, range=(0, relu.range))
    np.testing.assert_array_equal(relu.positive(), ref_relu)
    assert relu.negative().sum() == 0


def test_histogram_merge_is_exact_and_handles_zeros():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(3000) * 0.01, rng.standard_normal(3000) * 50
    ha, hb, hall = H.SignedHistogram(256), H.SignedHistogram(256), H.SignedHistogram(256)
    ha.add(np.zeros(10, np.float32))          # zeros before any range exists
    ha.add(a.astype(np.float32))
    hb.add(b.astype(np.float32))
    hall.add(np.zeros(10, np.float32))
    hall.add(np.concatenate([a, b]).astype(np.float32))
    ha.merge(hb)
    np.testing.assert_array_equal(ha.counts, hall.counts)
    empty = H.SignedHistogram(256)
    empty.merge(hall)
    np.testing.assert_array_equal(empty.counts, hall.counts)


def test_kl_divergences_match_a_naive_loop():
    rng = np.random.default_rng(3)
    b = np.histogram(np.abs(rng.standard_normal(20000)), bins=400)[0].astype(float)
    b[350], b[399] = 0, 3                     # an empty bin and a far outlier

    def naive(b, nq):
        out, total = [], b.sum()
        for i in range(nq, b.size + 1):
            p = b[:i].copy()
            p[-1] += b[i:].sum()
            group = (np.arange(i) * nq) // i
            q = np.zeros(i)
            for g in range(nq):
                members = group == g
                nonzero = members & (p > 0)
                if nonzero.sum():
                    q[nonzero] = b[:i][members].sum() / nonzero.sum()
            q /= b[:i].sum()
            zero = (p > 0) & (q <= 0)
            q[zero] = H.KL_EPS
            q /= 1 + H.KL_EPS * zero.sum()
            P = p / total
            m = P > 0
            out.append(np.sum(P[m] * np.log(P[m] / q[m])))
        return np.array(out)

    for nq in (128, 16):
        np.testing.assert_allclose(H.kl_divergences(b, nq), naive(b, nq), rtol=1e-9, atol=1e-12)
    # the strided + refined search finds the exhaustive minimum on realistic histograms
    for data in (np.abs(rng.standard_normal(200_000)), np.maximum(rng.laplace(size=200_000), 0)):
        data[:5] = 40.0
        h = np.histogram(data, bins=4096, range=(0, 64))[0].astype(float)
        kl = H.kl_divergences(np.concatenate([[h[1]], h[1:]])[: np.flatnonzero(h)[-1] + 1], 128)
        exhaustive = (128 + np.flatnonzero(kl <= kl.min() + 1e-15)[-1]) * (64 / 4096)
        assert H.entropy_threshold(h, 64 / 4096, 128) == pytest.approx(exhaustive)


# -- methods against references ---------------------------------------------------------------

def test_minmax_is_exact(tmp_path):
    x = sample_data(40)
    src = npy_source(tmp_path, x, batch_size=3)
    sym = calibrate(small_model(), TENSORS, src, quiet())
    a, b, out = 2 * x, np.maximum(2 * x, 0), np.maximum(2 * x, 0) + x
    for name, v in (("x", x), ("a", a), ("b", b), ("out", out)):
        amax = float(np.abs(v).max())
        assert sym[name] == (-amax, amax)
    asym = calibrate(small_model(), TENSORS, src, quiet(), symmetric=False)
    assert asym["a"] == (float(a.min()), float(a.max()))
    assert asym["b"] == (0.0, float(b.max()))          # zero always inside an asymmetric range
    uns = calibrate(small_model(), ["b"], src, quiet(), unsigned=True)
    assert uns["b"] == (0.0, float(b.max()))


def test_percentile_matches_numpy_within_a_bin(tmp_path):
    x = sample_data(60)
    src = npy_source(tmp_path, x, batch_size=4)
    for p in (99.99, 99.0):
        r = calibrate(small_model(), ["a", "out"], src, quiet("percentile", percentile=p, num_bins=1024))
        for name, v in (("a", 2 * x), ("out", np.maximum(2 * x, 0) + x)):
            amax = float(np.abs(v).max())
            width = 2.0 ** np.ceil(np.log2(amax)) / 2048   # 2 * num_bins bins over the power-of-two range
            # the sample where the empirical cdf reaches p lies in the bin we interpolate in
            assert abs(r[name][1] - np.percentile(np.abs(v), p, method="inverted_cdf")) <= width
            if p == 99.0:                               # dense region: numpy's interpolation agrees too
                assert abs(r[name][1] - np.percentile(np.abs(v), p)) <= width
            assert r[name][0] == -r[name][1]
    r = calibrate(small_model(), ["a"], src, quiet("percentile", percentile=99.9), symmetric=False)
    a = 2 * x
    width = 2.0 ** np.ceil(np.log2(np.abs(a).max())) / 4096
    assert abs(r["a"][0] - np.percentile(a, 0.05, method="inverted_cdf")) <= width
    assert abs(r["a"][1] - np.percentile(a, 99.95, method="inverted_cdf")) <= width


def _mse(v, lo, hi, bits, symmetric):
    return float(((v - C._fake_quant(v[None, :], np.array([lo]), np.array([hi]), bits, symmetric)[0]) ** 2).mean())


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_clip_is_near_brute_force(tmp_path, bits):
    x = sample_data(50)
    src = npy_source(tmp_path, x, batch_size=5)
    r = calibrate(small_model(), ["a"], src, quiet("mse"), bits=bits)
    a = (2 * x).reshape(-1).astype(np.float64)
    amax = np.abs(a).max()
    grid = np.linspace(amax / 400, amax, 400)
    brute = min(_mse(a, -c, c, bits, True) for c in grid)
    ours = _mse(a, r["a"][0], r["a"][1], bits, True)
    assert ours <= brute * 1.02
    if bits == 4:
        assert r["a"][1] < 0.6 * amax                 # with 15 levels per side the outliers are clipped
    # asymmetric: no worse than the min/max range, and close to a brute-force 2-D search
    ra = calibrate(small_model(), ["out"], src, quiet("mse"), bits=bits, symmetric=False)
    o = (np.maximum(2 * x, 0) + x).reshape(-1).astype(np.float64)
    ours = _mse(o, ra["out"][0], ra["out"][1], bits, False)
    assert ours <= _mse(o, min(o.min(), 0), o.max(), bits, False)
    brute2 = min(_mse(o, lo, hi, bits, False) for lo in np.linspace(o.min(), 0, 25) for hi in np.linspace(o.max() / 25, o.max(), 25))
    assert ours <= brute2 * 1.05


def test_entropy_clips_outliers_and_uses_unsigned_levels():
    rng = np.random.default_rng(4)
    g = rng.standard_normal(400_000).astype(np.float32)
    g[:20] = 50.0                              # rare outliers far out
    st = C.TensorStats(hist=H.SignedHistogram(4096))
    for chunk in np.array_split(g, 7):
        st.update(chunk)
    lo, hi = C.compute_range(st, "entropy")
    assert lo == -hi
    assert 2.5 < hi < 12.0                     # gaussian body kept, outliers clipped
    # half-normal (ReLU-like): unsigned uses 256 levels over [0, hi]; both keep the body, drop the outliers
    relu = np.maximum(g, 0)
    su = C.TensorStats(hist=H.SignedHistogram(4096))
    su.update(relu)
    _, hi_u = C.compute_range(su, "entropy", unsigned=True)
    _, hi_s = C.compute_range(su, "entropy", symmetric=True)
    assert 2.5 < hi_s < 12.0 and 2.5 < hi_u < 12.0
    assert C.compute_range(su, "entropy", unsigned=True)[0] == 0.0
    # asymmetric on one-signed data spends all levels on that side, like unsigned
    assert C.compute_range(su, "entropy", symmetric=False) == (0.0, hi_u)
    with pytest.raises(OptionError):
        C.compute_range(su, "kl")
    # fewer bits: still the body, not the outliers
    _, hi4 = C.compute_range(st, "entropy", bits=4)
    assert 1.0 < hi4 < 12.0


def test_entropy_on_saturated_and_degenerate_data():
    # ReLU6-like: most mass piled up at the top; the empty low candidates must not break the search
    st = C.TensorStats(hist=H.SignedHistogram(4096))
    st.update(np.full(10000, 6.0, np.float32))
    st.update(np.linspace(5.9, 6.0, 1000, dtype=np.float32))
    lo, hi = C.compute_range(st, "entropy")
    assert 5.85 < hi <= 6.0 and lo == -hi       # KL cannot see clipping when all mass folds into one bin
    # a handful of distinct values, and all zeros
    few = C.TensorStats(hist=H.SignedHistogram(4096))
    few.update(np.array([0.0, 1.0, 1.0, 2.0], np.float32))
    assert 0 < C.compute_range(few, "entropy")[1] <= 2.0
    zeros = C.TensorStats(hist=H.SignedHistogram(4096))
    zeros.update(np.zeros(100, np.float32))
    for method in ("entropy", "percentile", "mse", "minmax"):
        assert C.compute_range(zeros, method) == (0.0, 0.0)


def test_entropy_is_not_drawn_to_a_repeated_value():
    # a constant image region (MNIST's background, letterbox padding) gives each channel one value
    # repeated at most positions, in every layer it reaches: ReLU-like data with 8 such spikes
    rng = np.random.default_rng(5)
    body = np.abs(rng.standard_normal(300_000)).astype(np.float32) * 1.5
    spikes = np.repeat(rng.uniform(0.1, 0.6, 8).astype(np.float32), 60_000)
    st = C.TensorStats(hist=H.SignedHistogram(4096))
    for chunk in np.array_split(rng.permutation(np.concatenate([body, spikes])), 5):
        st.update(chunk)
    _, hi = C.compute_range(st, "entropy", unsigned=True)
    # the body's own threshold, as if the spikes were not there; uncapped, the search took the
    # finest grouping (256 bins, about 0.5 here) and clipped most of the body
    ref = C.TensorStats(hist=H.SignedHistogram(4096))
    ref.update(body)
    _, hi_body = C.compute_range(ref, "entropy", unsigned=True)
    assert float(np.mean(body > hi)) < 0.002
    assert hi == pytest.approx(hi_body, rel=0.15)
    # smooth and sparse histograms are left exactly as they are (their counting noise is no spike)
    smooth = np.histogram(body, bins=4096, range=(0, 16))[0].astype(float)
    np.testing.assert_array_equal(H.despike(smooth), smooth)
    tail = np.zeros(4096)
    tail[[100, 900, 2000]] = 1
    np.testing.assert_array_equal(H.despike(tail), tail)


def test_entropy_keeps_data_away_from_zero():
    # a squeeze-excite gate after HardSigmoid: few values, all in [0.23, 0.72]; a threshold below
    # them all folds the mass into one bin, where KL is 0, and clipped every gate at 0.23
    gate = np.random.default_rng(6).uniform(0.23, 0.72, 12_800).astype(np.float32)
    st = C.TensorStats(hist=H.SignedHistogram(4096))
    st.update(gate)
    for kw in ({"unsigned": True}, {"symmetric": True}, {"symmetric": False}):
        hi = C.compute_range(st, "entropy", **kw)[1]
        assert float(np.mean(gate > hi)) < 0.01, kw


# -- streaming properties -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_batch_size_does_not_change_ranges(tmp_path, method):
    x = sample_data(30)
    r1 = calibrate(small_model(), TENSORS, npy_source(tmp_path, x, batch_size=1), quiet(method))
    r7 = calibrate(small_model(), TENSORS, npy_source(tmp_path, x, batch_size=7), quiet(method))
    assert r1 == r7


def test_large_batches_run_in_slices(tmp_path):
    x = sample_data(24)
    whole = C.collect_statistics(small_model(), TENSORS, npy_source(tmp_path, x, batch_size=24), quiet("entropy"))
    seen = []
    real_run = C._Collector._run

    def spy(self, feed, n):
        seen.append(n)
        return real_run(self, feed, n)

    C._Collector._run = spy
    try:
        # 3 outputs x 256 floats = 3 KB per sample; a 7 KB budget runs 2 samples at a time
        sliced = C.collect_statistics(small_model(), TENSORS, npy_source(tmp_path, x, batch_size=24),
                                      dataclasses.replace(quiet("entropy"), max_batch_mb=0))
        assert seen == [24]
        seen.clear()
        col = C._Collector(C._augmented(small_model(), ["a", "b", "out"]), TENSORS, ["x"], 2 * 2048, 0, "basic", 7 * 1024)
        col.update({"x": x})
        assert seen == [1] + [2] * 11 + [1]
    finally:
        C._Collector._run = real_run
    for t in TENSORS:
        np.testing.assert_array_equal(col.stats[t].hist.counts, whole[t].hist.counts)
        np.testing.assert_array_equal(sliced[t].hist.counts, whole[t].hist.counts)
        assert (col.stats[t].min, col.stats[t].max) == (whole[t].min, whole[t].max)


def test_two_workers_equal_one(tmp_path):
    x = sample_data(24)
    src = npy_source(tmp_path, x, batch_size=2)
    st1 = C.collect_statistics(small_model(), TENSORS, src, quiet("entropy"))
    st2 = C.collect_statistics(small_model(), TENSORS, src, quiet("entropy", workers=2))
    for t in TENSORS:
        assert (st1[t].min, st1[t].max, st1[t].count) == (st2[t].min, st2[t].max, st2[t].count)
        np.testing.assert_array_equal(st1[t].hist.counts, st2[t].hist.counts)
        for method in ("entropy", "percentile", "mse", "minmax"):
            for sym in (True, False):
                assert C.compute_range(st1[t], method, symmetric=sym) == C.compute_range(st2[t], method, symmetric=sym)


def test_worker_errors_reach_the_caller():
    def bad():
        yield {"x": np.ones((1, D), np.float32)}
        yield {"x": np.ones((1, 3), np.float32)}     # wrong shape: onnxruntime fails in the worker
    with pytest.raises(DataError, match="onnxruntime failed"):
        calibrate(small_model(), TENSORS, bad, quiet(workers=2))


def test_progress_bar_reports_samples_per_second(tmp_path, capsys):
    src = npy_source(tmp_path, sample_data(12), batch_size=3)
    calibrate(small_model(), ["a"], src, CalibConfig(progress=True))
    err = capsys.readouterr().err
    assert "calibrating 1 tensors (minmax)" in err and "sample/s" in err


def test_memory_does_not_grow_with_samples():
    model = small_model()

    def data(n):
        def gen():
            rng = np.random.default_rng(0)
            for _ in range(n):
                yield {"x": rng.standard_normal((4, D)).astype(np.float32) * rng.uniform(0.5, 3)}
        return gen

    peaks = {}
    for n in (64, 256):
        gc.collect()
        tracemalloc.start()
        calibrate(model, TENSORS, data(n), quiet("entropy"))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[256] <= peaks[64] * 1.10 + 64 * 1024, peaks


# -- errors -------------------------------------------------------------------------------------

def test_nan_in_data_is_refused_by_the_data_layer(tmp_path):
    x = sample_data(6)
    x[3, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        calibrate(small_model(), ["a"], npy_source(tmp_path, x), quiet())


def test_inf_activation_is_refused():
    nodes = [helper.make_node("Log", ["x"], ["l"]), helper.make_node("Relu", ["l"], ["y"])]
    model = make_model(nodes, [("x", [1, 4])], [("y", [1, 4])])
    with pytest.raises(DataError, match="tensor 'l' holds NaN or Inf"):
        calibrate(model, ["l"], lambda: iter([{"x": np.array([[0.0, 1, 2, 3]], np.float32)}]), quiet())


def test_bad_options_and_tensors(tmp_path):
    src = npy_source(tmp_path, sample_data(4))
    with pytest.raises(OptionError, match="unknown calibration method"):
        calibrate(small_model(), ["a"], src, quiet("kl"))
    with pytest.raises(OptionError, match="power of two"):
        calibrate(small_model(), ["a"], src, quiet("entropy", num_bins=1000))
    with pytest.raises(OptionError, match="bits"):
        calibrate(small_model(), ["a"], src, quiet(), bits=1)
    with pytest.raises(OnnxoptError, match="initializers"):
        calibrate(small_model(), ["two"], src, quiet())
    with pytest.raises(OnnxoptError, match="nope"):
        calibrate(small_model(), ["nope"], src, quiet())
    with pytest.raises(OptionError, match="symmetric"):
        calibrate(small_model(), ["a", "b"], src, quiet(), symmetric={"a": True})
    with pytest.raises(DataError, match="no batches|no samples"):
        calibrate(small_model(), ["a"], lambda: iter([]), quiet())


# -- cache -------------------------------------------------------------------------------------

def test_cache_hit_miss_and_stale(tmp_path, monkeypatch):
    x = sample_data(20)
    src = npy_source(tmp_path, x, batch_size=2)
    cache = tmp_path / "ranges.json"
    first = calibrate(small_model(), TENSORS, src, quiet("entropy", cache=str(cache)))
    doc = json.loads(cache.read_text())
    assert doc["model"] and set(doc["tensors"]) == set(TENSORS)

    def boom(*a, **k):
        raise AssertionError("statistics recomputed although the cache matches")

    monkeypatch.setattr(C, "collect_statistics", boom)
    assert calibrate(small_model(), TENSORS, src, quiet("entropy", cache=str(cache))) == first
    assert calibrate(small_model(), ["a"], src, quiet("entropy", cache=str(cache))) == {"a": first["a"]}   # subset reuses
    # a different method, bits, symmetry, model or data is refused with the difference named
    with pytest.raises(OnnxoptError, match=r"(?s)stale: .*method: 'entropy' -> 'percentile'.*hint: delete"):
        calibrate(small_model(), TENSORS, src, quiet("percentile", cache=str(cache)))
    with pytest.raises(OnnxoptError, match="bits: 8 -> 6"):
        calibrate(small_model(), TENSORS, src, quiet("entropy", cache=str(cache)), bits=6)
    with pytest.raises(OnnxoptError, match="symmetric/unsigned changed"):
        calibrate(small_model(), TENSORS, src, quiet("entropy", cache=str(cache)), unsigned={t: t == "b" for t in TENSORS})
    other = small_model()
    other.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.array(3.0, np.float32), "two"))
    with pytest.raises(OnnxoptError, match="model fingerprint"):
        calibrate(other, TENSORS, src, quiet("entropy", cache=str(cache)))
    with pytest.raises(OnnxoptError, match="data every"):
        calibrate(small_model(), TENSORS, npy_source(tmp_path, x, every=2), quiet("entropy", cache=str(cache)))
    import os
    os.utime(tmp_path / "calib.npy", ns=(1, 1))
    with pytest.raises(OnnxoptError, match="data files"):
        calibrate(small_model(), TENSORS, src, quiet("entropy", cache=str(cache)))
    # a new path is a miss: statistics are computed and the file written
    monkeypatch.undo()
    fresh = tmp_path / "other.json"
    calibrate(small_model(), ["a"], src, quiet(cache=str(fresh)))
    assert fresh.exists() and not list(tmp_path.glob(".*.tmp"))


def test_cache_of_a_callable_hashes_its_content(tmp_path):
    x = sample_data(8)
    cache = str(tmp_path / "c.json")

    def feeds(n=8, scale=1.0):
        return lambda: ({"x": x[i:i + 1] * scale} for i in range(n))

    first = calibrate(small_model(), ["a"], feeds(), quiet(cache=cache))
    doc = json.loads(open(cache).read())
    assert doc["data"]["samples"] == 8
    assert calibrate(small_model(), ["a"], feeds(), quiet(cache=cache)) == first
    with pytest.raises(OnnxoptError, match="content_sha256"):
        calibrate(small_model(), ["a"], feeds(scale=2.0), quiet(cache=cache))
    with pytest.raises(OnnxoptError, match="data samples: 8 -> 6"):      # fewer samples, same first batches
        calibrate(small_model(), ["a"], feeds(n=6), quiet(cache=cache))


# -- TensorRT table --------------------------------------------------------------------------------

def test_trt_table_round_trip_and_format(tmp_path):
    p = tmp_path / "calib.table"
    amax = {"input": 127.0, "conv/out:0": 2.5, "tiny": 1e-6, "zero": 0.0}
    write_trt_calibration_table(amax, p)
    lines = p.read_text().splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    assert lines[1] == "input: 3f800000"              # scale 127/127 = 1.0
    back = read_trt_calibration_table(p)
    for k, v in amax.items():
        assert back[k] == pytest.approx(v, rel=1e-6, abs=1e-12)
    # TensorRT omits leading zeros of the 32-bit value
    p.write_text("TRT-8502-EntropyCalibration2\nsmall: 3c010a14\nz: 0\n")
    r = read_trt_calibration_table(p)
    assert r["small"] == pytest.approx(np.float32(np.frombuffer(bytes.fromhex("3c010a14")[::-1], np.float32)[0]) * 127)
    assert r["z"] == 0.0
    p.write_text("not a table\n")
    with pytest.raises(DataError, match="not a TensorRT calibration table"):
        read_trt_calibration_table(p)


def test_calibrate_writes_the_trt_table(tmp_path):
    x = sample_data(10)
    table = tmp_path / "t.cache"
    r = calibrate(small_model(), TENSORS, npy_source(tmp_path, x), quiet(trt_table=str(table)))
    lines = table.read_text().splitlines()
    assert lines[0] == "TRT-8601-MinMaxCalibration"
    back = read_trt_calibration_table(table)
    for t in TENSORS:
        assert back[t] == pytest.approx(r[t][1], rel=1e-6)
    with pytest.raises(OptionError, match="int8"):
        calibrate(small_model(), TENSORS, npy_source(tmp_path, x), quiet(trt_table=str(table)), bits=4)


# -- weights -----------------------------------------------------------------------------------------

def test_weight_ranges_per_channel():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 64, 3, 3)).astype(np.float32)
    w[2, 0, 0, 0] = 15.0
    lo, hi = weight_ranges(w, axis=0)
    np.testing.assert_allclose(hi, np.abs(w).reshape(8, -1).max(1), rtol=1e-7)
    np.testing.assert_array_equal(lo, -hi)
    lo1, hi1 = weight_ranges(w, axis=1, symmetric=False)
    np.testing.assert_allclose(lo1, np.minimum(np.moveaxis(w, 1, 0).reshape(64, -1).min(1), 0), rtol=1e-7)
    lo_t, hi_t = weight_ranges(w, axis=None)
    assert hi_t.shape == () and float(hi_t) == pytest.approx(15.0)
    # mse: never worse than minmax per channel, clips the outlier channel hard at 4 bits
    flat = w.reshape(8, -1).astype(np.float64)
    _, hm = weight_ranges(w, axis=0, method="mse", bits=4)
    err_mse = ((flat - C._fake_quant(flat, -hm, hm, 4, True)) ** 2).sum(1)
    err_mm = ((flat - C._fake_quant(flat, -hi, hi, 4, True)) ** 2).sum(1)
    assert (err_mse <= err_mm + 1e-12).all() and hm[2] <= 0.55 * hi[2]
    with pytest.raises(OptionError):
        weight_ranges(w, axis=4)


# -- real model ----------------------------------------------------------------------------------------

@pytest.mark.shared
def test_efficientnet_entropy_on_a_few_images(shared):
    model = onnx.load(str(shared("models", "efficientnet_lite0.onnx")))
    src = open_data(str(shared("data", "imagenet")), model, image=dict(size=256, crop=224, mean=[127] * 3, std=[128] * 3), max_samples=6)
    inits = {i.name for i in model.graph.initializer}
    tensors = list(dict.fromkeys(n.input[0] for n in model.graph.node if n.op_type == "Conv"))
    tensors += [i for n in model.graph.node if n.op_type == "Add" for i in n.input if i not in inits]
    stats = C.collect_statistics(model, tensors, src, quiet("entropy"))
    ent = {t: C.compute_range(stats[t], "entropy") for t in tensors}
    mm = {t: C.compute_range(stats[t], "minmax") for t in tensors}
    for t in tensors:
        lo, hi = ent[t]
        assert np.isfinite(hi) and lo == -hi and 0 < hi <= mm[t][1] + 1e-6
    assert sum(ent[t][1] < 0.999 * mm[t][1] for t in tensors) >= len(tensors) // 4   # entropy does clip
