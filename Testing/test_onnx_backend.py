"""onnx_backend: export, first-batch check, cache, fallback, and which calls go to ONNX Runtime.

The tests that export need onnxruntime and onnx (requirements-dev.txt installs them: CI runs them
all); the ones that check the absence of onnxruntime run everywhere.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

from MedTranslateLib import onnx_backend
from MedTranslateLib.bundle import load_bundle, save_bundle
from MedTranslateLib.methods import build_method
from MedTranslateLib.nn import Pix2PixUNet

META = {"source": {"modality": "ct", "preset": "ct_abdomen"},
        "target": {"modality": "cta_arterial", "preset": "ct_angio"}, "slice": {"size": 32, "axis": 0}}


@pytest.fixture
def ort():
    return pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A MEDTRANSLATE_HOME of the test's own: the export cache goes to home/onnx-cache."""
    monkeypatch.setenv("MEDTRANSLATE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tiny_pix2pix(seed: int = 0, **config):
    """Random pix2pix (ngf 4, 32x32 slices) whose batch norms have non-trivial running statistics."""
    torch.manual_seed(seed)
    method = build_method("pix2pix", {"generator": {"ngf": 4, "num_downs": 4}, **config})
    with torch.no_grad():
        for m in method.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                m.weight.normal_(0.0, 0.3)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return method.eval()


def slices(b: int, seed: int = 1, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 1, size, size, generator=g) * 2 - 1).contiguous(memory_format=torch.channels_last)


def count_runs(net: onnx_backend.OrtNetwork) -> list[int]:
    """Counts the ORT session's runs (a one-element list that grows with each call)."""
    runs, session = [0], net.session

    class Counting:
        def run(self, *args, **kwargs):
            runs[0] += 1
            return session.run(*args, **kwargs)

    net.session = Counting()
    return runs


def count_exports(monkeypatch) -> list[int]:
    calls, export = [0], torch.onnx.export

    def counted(*args, **kwargs):
        calls[0] += 1
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counted)
    return calls


# ---- the engine's entry point -------------------------------------------------------------------

def test_pix2pix_generator_runs_on_ort_with_the_eager_output(ort, tmp_path, home):
    bundle = load_bundle(save_bundle(tiny_pix2pix(), META, tmp_path / "p2p"))
    method = bundle.method.to(memory_format=torch.channels_last)  # as the engine has it
    with torch.inference_mode():
        expected = {b: method.translate(slices(b, seed=b)).image.clone() for b in (3, 1, 5)}
        state_keys = list(method.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when it works
        assert onnx_backend.maybe_accelerate(method, slices(3, seed=3), "cpu", bundle=bundle) == "onnxruntime"
    net = method.generator
    assert isinstance(net, onnx_backend.OrtNetwork) and isinstance(net.eager, Pix2PixUNet)
    runs = count_runs(net)
    with torch.inference_mode():
        for b, want in expected.items():  # the first batch, then other batch sizes and slices
            got = method.translate(slices(b, seed=b)).image
            assert got.shape == want.shape
            assert float((got - want).abs().max()) <= onnx_backend.TOLERANCE
            assert float(want.abs().max()) > 0.1  # not a vacuous comparison
    assert runs[0] == 3
    [cached] = (home / "onnx-cache").iterdir()
    assert cached.name.startswith("p2p.generator.") and cached.suffix == ".onnx"
    onnx_backend.restore(method)
    assert type(method.generator) is Pix2PixUNet and list(method.state_dict()) == state_keys


def test_gpu_and_a_missing_onnxruntime_stay_on_pytorch_silently(monkeypatch):
    method = tiny_pix2pix()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert onnx_backend.maybe_accelerate(method, slices(2), "cuda") == "pytorch"
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
        assert not onnx_backend.ort_available()
        assert onnx_backend.maybe_accelerate(method, slices(2), "cpu") == "pytorch"
    assert isinstance(method.generator, Pix2PixUNet)


def test_onnxruntime_without_the_exporter_stays_on_pytorch_and_onnx_is_not_imported_to_check(monkeypatch):
    monkeypatch.delitem(sys.modules, "onnx", raising=False)
    assert onnx_backend.ort_available()
    assert "onnx" not in sys.modules  # importing it costs 0.5 s; only an export needs it
    monkeypatch.setitem(sys.modules, "onnx", None)  # not installed
    assert not onnx_backend.ort_available()


def test_monte_carlo_dropout_keeps_the_generator():
    assert tiny_pix2pix(test_time_dropout=True).inference_networks() == {}
    assert list(tiny_pix2pix().inference_networks()) == ["generator"]


class Unexportable(nn.Module):
    """The generator, then erfinv: an operator the ONNX exporter does not have."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def check_input(self, x):
        self.generator.check_input(x)

    def forward(self, x):
        return torch.erfinv(0.5 * self.generator(x))


class FrozenByTrace(Unexportable):
    """Scales by a number read out of the input (its sum): tracing keeps the traced input's."""

    def forward(self, x):
        return self.generator(x) * float(x.abs().sum() / x[0].numel())


@pytest.mark.parametrize("network, reason", [(Unexportable, "erfinv"), (FrozenByTrace, "max |ORT - PyTorch|")])
def test_a_network_that_fails_stays_on_pytorch_with_one_warning_line(ort, network, reason):
    method = tiny_pix2pix()
    method.generator = network(method.generator).eval()
    x = slices(4)
    with torch.inference_mode():
        expected = method.translate(x).image.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert onnx_backend.maybe_accelerate(method, x, "cpu") == "pytorch"
    [w] = caught
    text = str(w.message)
    assert "\n" not in text and text.startswith("pix2pix: ONNX Runtime not used (generator: ") and reason in text
    assert type(method.generator) is network
    with torch.inference_mode():
        assert torch.equal(method.translate(x).image, expected)


# ---- the cache ----------------------------------------------------------------------------------

def test_export_is_cached_per_bundle_content(ort, tmp_path, home, monkeypatch):
    exports = count_exports(monkeypatch)
    path = save_bundle(tiny_pix2pix(seed=0), META, tmp_path / "model")
    bundle = load_bundle(path)
    example = [slices(2)]
    first = onnx_backend.export_cached(bundle, "generator", bundle.method.generator, example)
    assert first.parent == home / "onnx-cache" == onnx_backend.cache_dir() and exports[0] == 1
    stamp = first.stat().st_mtime_ns
    assert onnx_backend.export_cached(load_bundle(path), "generator", bundle.method.generator, example) == first
    assert exports[0] == 1 and first.stat().st_mtime_ns == stamp  # a hit: not exported again

    old_hash = onnx_backend.content_hash(bundle, bundle.method.generator)
    channels_last = bundle.method.generator.to(memory_format=torch.channels_last)  # as the engine has it
    assert onnx_backend.content_hash(bundle, channels_last) == old_hash
    save_bundle(tiny_pix2pix(seed=1), META, path)  # new weights, same model name
    changed = load_bundle(path)
    assert onnx_backend.content_hash(changed, changed.method.generator) != old_hash
    second = onnx_backend.export_cached(changed, "generator", changed.method.generator, example)
    assert second != first and exports[0] == 2
    assert sorted((home / "onnx-cache").iterdir()) == [second]  # the stale export is gone
    net = onnx_backend.OrtNetwork(second, changed.method.generator, example)
    with torch.inference_mode():
        x = slices(3, seed=7)
        assert float((net(x) - changed.method.generator(x)).abs().max()) <= onnx_backend.TOLERANCE
    assert not list((home / "onnx-cache").glob(".*"))  # no temporary file left


def test_a_cached_export_that_fails_the_check_is_exported_again(ort, tmp_path, monkeypatch):
    """A cache file that no longer computes the network (edited, or made by other library code of
    the same version) fails the first-batch check, and is replaced by a fresh export."""
    path = save_bundle(tiny_pix2pix(seed=0), META, tmp_path / "model")
    bundle = load_bundle(path)
    example = [slices(2)]
    cached = onnx_backend.export_cached(bundle, "generator", bundle.method.generator, example)
    wrong = onnx_backend.export_onnx(tiny_pix2pix(seed=5).generator, example)
    cached.write_bytes(wrong)
    exports = count_exports(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert onnx_backend.maybe_accelerate(bundle.method, slices(2, seed=9), "cpu", bundle=bundle) == "onnxruntime"
    assert exports[0] == 1 and cached.read_bytes() != wrong
    x = slices(3, seed=4)
    with torch.inference_mode():
        assert float((bundle.method.generator(x) - bundle.method.generator.eager(x)).abs().max()) <= 1e-4


# ---- which calls run on ONNX Runtime -------------------------------------------------------------

class TimeScaled(nn.Module):
    """A stand-in denoiser: conv(x) scaled by its timestep, (B, 2, H, W), (B,) -> (B, 1, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 1, 3, padding=1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, t):
        return torch.tanh(self.drop(self.conv(x)) * (1 + t.float()[:, None, None, None] / 4))


def test_only_covered_calls_run_on_ort(ort):
    module = TimeScaled().eval()
    example = [torch.rand(2, 2, 8, 8), torch.full((2,), 3)]
    net = onnx_backend.OrtNetwork(onnx_backend.export_onnx(module, example), module, example)
    runs = count_runs(net)
    x = torch.rand(5, 2, 8, 8) * 2 - 1
    same_t, mixed_t = torch.full((5,), 2), torch.tensor([0, 1, 2, 3, 2])

    def check(*args, on_ort: bool) -> None:
        before = runs[0]
        got = net(*args)
        assert runs[0] == before + on_ort
        want = module(*args)
        assert float((got.detach() - want.detach()).abs().max()) <= onnx_backend.TOLERANCE

    with torch.inference_mode():
        check(x, same_t, on_ort=True)                       # any batch size, one timestep
        check(x, mixed_t, on_ort=False)                     # the trace kept one timestep per batch
        check(torch.rand(5, 2, 16, 16), same_t, on_ort=False)  # another slice size
        with torch.autocast("cpu", dtype=torch.bfloat16):
            check(x, same_t, on_ort=False)                  # autocast
    check(x, same_t, on_ort=False)                          # autograd on
    assert net.conv is module.conv                          # attributes pass through
    module.drop.train()                                      # Monte-Carlo dropout: PyTorch
    with torch.inference_mode():
        before = runs[0]
        net(x, same_t)
        assert runs[0] == before


def test_a_denoiser_runs_on_ort_at_every_sampling_step(ort):
    """ResShift's U-Net, called once per step with that step's timestep for the whole batch: the
    translation (per-slice generators, as the engine passes them) matches eager PyTorch."""
    torch.manual_seed(0)
    method = build_method("resshift", {"unet": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                                "attention_levels": [1], "num_head_channels": 8,
                                                "norm_groups": 4}}).eval()
    nn.init.normal_(method.unet.out[-1].weight, std=0.05)  # zero-initialised: the output would not depend on it
    assert method.inference_networks() == {"unet": method.unet}
    x = slices(3, size=16)

    def translate():
        with torch.inference_mode():
            return method.translate(x, generator=[torch.Generator().manual_seed(i) for i in range(3)]).image

    expected = translate()
    assert onnx_backend.maybe_accelerate(method, x, "cpu") == "onnxruntime"
    runs = count_runs(method.unet)
    got = translate()
    assert runs[0] == method.scheduler.num_train_timesteps  # every step on ORT
    assert float((got - expected).abs().max()) <= onnx_backend.TOLERANCE
    assert float((expected - x).abs().max()) > 0.1



def test_engine_on_ort_same_seed_same_volume_whatever_the_batching(ort, tmp_path):
    """A resshift bundle through the engine's default CPU path (``backend="auto"``, ONNX Runtime
    for the denoiser): batch sizes 8, 1 and 3, a slice range and an out-of-memory back-off give the
    same volume for the same seed, as on PyTorch."""
    from test_engine import META, _simulate_oom_above, assert_same_volume_whatever_the_batching, ct_volume

    from MedTranslateLib import engine

    torch.manual_seed(0)
    method = build_method("resshift", {"unet": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                                "attention_levels": [1], "num_head_channels": 8,
                                                "norm_groups": 4}})
    nn.init.normal_(method.unet.out[-1].weight, std=0.05)
    meta = {**META, "slice": {"size": 32, "axis": 0},
            "source": {"modality": "ct", "preset": "ct_abdomen"}, "target": {"modality": "cta_arterial",
                                                                            "preset": "ct_angio"}}
    bundle = load_bundle(save_bundle(method, meta, tmp_path / "resshift"))
    vol = ct_volume(shape=(10, 40, 48))

    def run(batch_size, oom_above=None, seed=9, **kwargs):
        tr = engine.VolumeTranslator(bundle, device="cpu", batch_size=batch_size, backend="auto")
        if oom_above is not None:
            _simulate_oom_above(tr, oom_above)
        res = tr.translate(vol, seed=seed, **kwargs)
        assert res.info["backend"] == "onnxruntime"
        return res.synthetic.array, None, res.info

    assert_same_volume_whatever_the_batching(run, (3, 9), other_seed=10)
