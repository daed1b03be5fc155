#!/usr/bin/env python
"""Does rlbcd's latent consistency score predict quality? The claim of papers/001 Fig. 4, measured.

    OMP_NUM_THREADS=1 python training/rlbcd_confidence.py --run runs/rlbcd_cpu24 --samples 8 --steps 10 --every 2

On the run's held-out test split (the run's ``config.yaml`` gives data and split; its ``bundle/``
the model), every ``--every``-th usable slice is translated with N = ``--samples`` samples, each
slice's noise from its own generator (seed, case, slice). For every sample k of slice s: LCS_k
(eq. 11, as the bundle's ``sample_confidence`` = exp(-MSE/MSE_ref), a monotone map of LCS) and
its true error against the real target inside the body: MAE in the target's units and SSIM
(2-D, ``skimage.metrics.structural_similarity`` on the window, data range 2).

It prints (and writes to ``--out``/lcs_check.json + lcs_check.png):
- within a slice: Spearman rank correlation over the N samples between LCS and -MAE and between
  LCS and SSIM (Fig. 4's claim: the best-scored sample is the best sample), mean over slices with
  a bootstrap 95 % interval over slices;
- across slices: Spearman between a slice's confidence (of the sample ``select: lcs`` returns)
  and that sample's MAE (what a clinician reads off the per-slice confidence);
- best-of-N by LCS against one random sample, the samples' mean, and the oracle best: MAE and
  SSIM, paired per slice (mean ± sd of the differences, the share of slices where best-of-N wins)
  and per case.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two 1-D arrays (average ranks for ties); NaN when either is constant."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def bootstrap_mean(values: np.ndarray, rng: np.random.Generator, n: int = 2000) -> tuple[float, float, float]:
    """Mean and 95 % percentile bootstrap interval of the mean (NaNs dropped)."""
    v = values[np.isfinite(values)]
    means = v[rng.integers(0, len(v), (n, len(v)))].mean(1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rlbcd_confidence.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="training run folder (config.yaml + bundle/)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bundle's)")
    p.add_argument("--every", type=int, default=1, help="use every k-th usable slice")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, default=None, help="default: RUN/lcs_check")
    args = p.parse_args(argv)

    import torch
    from skimage.metrics import structural_similarity

    from MedTranslateLib.bundle import load_bundle
    from MedTranslateLib.intensity import preset_from_config
    from MedTranslateLib.training.config import load_train_config
    from MedTranslateLib.training.data import build_datasets, case_splits

    cfg = load_train_config(args.run / "config.yaml")
    method = load_bundle(args.run / "bundle").method
    if not getattr(method, "fusion", None):
        raise SystemExit(f"{args.run}: this bundle has no latent consistency network H_E")
    data = build_datasets(cfg.data, True, case_splits(cfg.data, True), names=(args.split,))[args.split]
    lo, hi = preset_from_config(cfg.data.target_preset).physical_range
    scale = (hi - lo) / 2.0  # [-1, 1] -> target units
    picks = list(range(0, len(data), args.every))
    n = args.samples
    rows = []  # per slice: case, index, lcs (N,), mae (N,), ssim (N,), mae/ssim of the mean
    for start in range(0, len(picks), args.batch):
        items = [data[i] for i in picks[start:start + args.batch]]
        src = torch.stack([it["source"] for it in items])
        gens = [torch.Generator().manual_seed(zlib.crc32(f"{args.seed}/{it['case']}/{it['index']}".encode()))
                for it in items]
        with torch.no_grad():
            out = method.translate(src, steps=args.steps, num_samples=n, generator=gens)
        samples = (out.samples if out.samples is not None else out.image[None]).float().numpy()[:, :, 0]
        conf = out.sample_confidence.float().numpy()  # (N, B)
        for b, it in enumerate(items):
            tgt, body = it["target"][0].numpy(), it["body"][0].numpy() > 0
            if not body.any():
                continue

            def err(img: np.ndarray, tgt=tgt, body=body) -> tuple[float, float]:
                _, smap = structural_similarity(tgt, img, data_range=2.0, full=True)
                return float(np.abs(img - tgt)[body].mean() * scale), float(smap[body].mean())

            e = np.array([err(samples[k, b]) for k in range(n)])
            rows.append({"case": it["case"], "index": int(it["index"]), "lcs": conf[:, b].tolist(),
                         "mae": e[:, 0].tolist(), "ssim": e[:, 1].tolist(),
                         "mean": list(err(samples[:, b].mean(0)))})
        print(f"{min(start + args.batch, len(picks))}/{len(picks)} slices", file=sys.stderr, flush=True)

    rng = np.random.default_rng(args.seed)
    lcs = np.array([r["lcs"] for r in rows])
    mae = np.array([r["mae"] for r in rows])
    ssim = np.array([r["ssim"] for r in rows])
    mean_err = np.array([r["mean"] for r in rows])
    s = np.arange(len(rows))
    best = lcs.argmax(1)
    rand = rng.integers(0, n, len(rows))
    rho_mae = np.array([spearman(lcs[i], -mae[i]) for i in s])
    rho_ssim = np.array([spearman(lcs[i], ssim[i]) for i in s])
    res = {"run": str(args.run), "samples": n, "steps": args.steps, "slices": len(rows), "every": args.every,
           "units": preset_from_config(cfg.data.target_preset).UNITS,
           "within_slice": {"spearman_lcs_neg_mae": bootstrap_mean(rho_mae, rng),
                            "spearman_lcs_ssim": bootstrap_mean(rho_ssim, rng),
                            "share_best_is_oracle_mae": float((best == mae.argmin(1)).mean()),
                            "chance_best_is_oracle": 1.0 / n},
           "across_slices": {"spearman_conf_neg_mae": spearman(lcs[s, best], -mae[s, best]),
                             "spearman_conf_ssim": spearman(lcs[s, best], ssim[s, best])}}

    def paired(a: np.ndarray, b: np.ndarray) -> dict:
        d = a - b
        return {"mean": float(d.mean()), "sd": float(d.std(ddof=1)), "share_lower": float((d < 0).mean()),
                "share_higher": float((d > 0).mean())}

    res["best_of_n"] = {
        "mae": {"best": float(mae[s, best].mean()), "random": float(mae[s, rand].mean()),
                "mean_image": float(mean_err[:, 0].mean()), "oracle": float(mae.min(1).mean()),
                "best_minus_random": paired(mae[s, best], mae[s, rand])},
        "ssim": {"best": float(ssim[s, best].mean()), "random": float(ssim[s, rand].mean()),
                 "mean_image": float(mean_err[:, 1].mean()), "oracle": float(ssim.max(1).mean()),
                 "best_minus_random": paired(ssim[s, best], ssim[s, rand])}}
    cases = sorted({r["case"] for r in rows})
    res["per_case"] = {c: {"slices": int(sum(r["case"] == c for r in rows)),
                           "mae_best_minus_random": float(np.mean([mae[i, best[i]] - mae[i, rand[i]]
                                                                   for i in s if rows[i]["case"] == c])),
                           "spearman_lcs_neg_mae": float(np.nanmean([rho_mae[i] for i in s if rows[i]["case"] == c]))}
                       for c in cases}
    out = args.out or args.run / "lcs_check"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lcs_check.json").write_text(json.dumps({**res, "rows": rows}, indent=1))
    _figure(out / "lcs_check.png", lcs, mae, rho_mae, best, res)
    _print(res)
    return 0


def _print(res: dict) -> None:
    w, a, b = res["within_slice"], res["across_slices"], res["best_of_n"]
    u = res["units"]
    print(f"\n{res['run']}: {res['slices']} test slices, N = {res['samples']} samples, {res['steps']} steps\n")
    print("| measure | value (95 % bootstrap interval over slices) |\n|---|---|")
    for key, label in (("spearman_lcs_neg_mae", "within slice: Spearman(LCS, -MAE)"),
                       ("spearman_lcs_ssim", "within slice: Spearman(LCS, SSIM)")):
        m, lo, hi = w[key]
        print(f"| {label} | {m:+.3f} ({lo:+.3f} .. {hi:+.3f}) |")
    print(f"| LCS picks the lowest-MAE sample | {w['share_best_is_oracle_mae']:.1%} of slices "
          f"(chance {w['chance_best_is_oracle']:.1%}) |")
    print(f"| across slices: Spearman(confidence, -MAE) | {a['spearman_conf_neg_mae']:+.3f} |")
    print(f"| across slices: Spearman(confidence, SSIM) | {a['spearman_conf_ssim']:+.3f} |")
    print("\n| per slice | best of N (LCS) | one random sample | mean of N | oracle best |\n|---|---:|---:|---:|---:|")
    print(f"| MAE ({u}) | {b['mae']['best']:.3f} | {b['mae']['random']:.3f} | {b['mae']['mean_image']:.3f} | "
          f"{b['mae']['oracle']:.3f} |")
    print(f"| SSIM | {b['ssim']['best']:.4f} | {b['ssim']['random']:.4f} | {b['ssim']['mean_image']:.4f} | "
          f"{b['ssim']['oracle']:.4f} |")
    d = b["mae"]["best_minus_random"]
    print(f"\nbest-of-N - random, MAE per slice: {d['mean']:+.3f} ± {d['sd']:.3f} {u}; "
          f"lower on {d['share_lower']:.1%}, higher on {d['share_higher']:.1%} of slices")
    print("\n| case | slices | MAE best - random | within-slice Spearman(LCS, -MAE) |\n|---|---:|---:|---:|")
    for c, v in res["per_case"].items():
        print(f"| {c} | {v['slices']} | {v['mae_best_minus_random']:+.3f} | {v['spearman_lcs_neg_mae']:+.3f} |")


def _figure(path: Path, lcs: np.ndarray, mae: np.ndarray, rho: np.ndarray, best: np.ndarray, res: dict) -> None:
    """Like Fig. 4: per slice, each sample's LCS against its MAE (both centred on the slice's mean,
    so slices share one axis), and the distribution of the within-slice rank correlations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    dl = np.log(lcs) - np.log(lcs).mean(1, keepdims=True)  # log(conf) = -MSE/MSE_ref: LCS up to a scale
    dm = mae - mae.mean(1, keepdims=True)
    ax1.scatter(dl.ravel(), dm.ravel(), s=4, alpha=0.3, label="sample")
    s = np.arange(len(best))
    ax1.scatter(dl[s, best], dm[s, best], s=6, color="C3", alpha=0.6, label="best by LCS")
    ax1.set_xlabel("LCS - slice mean (log confidence)")
    ax1.set_ylabel(f"MAE - slice mean ({res['units']})")
    ax1.legend()
    ax2.hist(rho[np.isfinite(rho)], bins=np.linspace(-1, 1, 21))
    ax2.axvline(0, color="k", lw=0.8)
    ax2.set_xlabel("within-slice Spearman(LCS, -MAE)")
    ax2.set_ylabel("slices")
    fig.suptitle(f"rlbcd LCS vs true error: {res['slices']} test slices, N = {res['samples']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
