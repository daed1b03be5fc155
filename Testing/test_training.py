"""Training: smoke config end to end, exact resume after a kill, DDP on 2 CPU processes, errors.

Runs on freshly generated phantom cases (4 cases of 16 x 64 x 64). The slower checks use
32 x 32 slices and a 5-level U-Net.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from MedTranslateLib.methods.base import TrainingStage
from MedTranslateLib.methods.pix2pix import Pix2Pix

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "training" / "train.py"
EVALUATE = ROOT / "training" / "evaluate.py"
SMOKE = ROOT / "training" / "configs" / "smoke" / "pix2pix.yaml"
FAST = ["data.size=32", "model.generator.num_downs=5", "train.log_every=1", "train.progress_bar=false"]


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    from MedTranslateLib.phantom import PhantomConfig, write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, cases=4, seed=0, config=PhantomConfig(shape=(16, 64, 64)))
    return root


def run_script(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    # Lightning prints non-ASCII symbols: decode as UTF-8 whatever the machine's locale (CI may have none).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    env.pop("MEDTRANSLATE_DEBUG", None)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          encoding="utf-8", errors="replace", timeout=timeout, cwd=ROOT)


def script_main(path: Path):
    """``main`` of a script in training/ (run in this process: fast, and capsys sees its output)."""
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def logged(out_dir: Path, key: str, version: int | None = None) -> dict[int, float]:
    """{logged step: value} of one metric from the CSV log of run ``version`` (default: the
    latest run in that folder)."""
    logs = out_dir / "logs"
    if version is None:
        version = max(int(p.name.split("_")[1]) for p in logs.glob("version_*"))
    with open(logs / f"version_{version}" / "metrics.csv", newline="") as fh:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(fh) if r.get(key)}


def test_smoke_config_trains_a_bundle_that_evaluate_reads(phantom_root, tmp_path, capsys):
    from MedTranslateLib.bundle import load_bundle
    from MedTranslateLib.evaluation import REGIONS

    out = tmp_path / "run"
    # the script's main in this process (Lightning is imported once for the whole file)
    assert script_main(TRAIN)(["--config", str(SMOKE), f"data.root={phantom_root}", f"train.out_dir={out}",
                               "train.progress_bar=false"]) == 0
    assert f"bundle: {out / 'bundle'}" in capsys.readouterr().out

    bundle = load_bundle(out / "bundle")
    meta = bundle.meta
    assert meta.method == "pix2pix" and (meta.source.modality, meta.target.modality) == ("ct", "cta_arterial")
    assert meta.source.preset["kind"] == "ct_window" and meta.target.preset["level"] == 200.0
    assert (meta.slice.size, meta.slice.axis) == (64, 0)
    assert meta.training["steps"] == 40 and "train.py --config" in meta.training["command"]
    assert meta.training["data"]["cases"]["train"] and meta.training["data"]["cases"]["val"]
    assert set(meta.metrics["validation"]) == {"val/mae", "val/psnr", "val/ssim"}
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "config.yaml").is_file()
    assert list((out / "logs" / "version_0").glob("events.out.tfevents.*"))
    # it learns: L1 and validation MAE go down
    l1 = logged(out, "train/generator/g_l1")
    val = logged(out, "val/mae")
    assert len(l1) == 8 and len(val) == 2
    assert l1[max(l1)] < 0.7 * l1[min(l1)]
    assert val[max(val)] < val[min(val)]

    # evaluate.py on that bundle: the test split of the same cases (one case here)
    evaluate_main = script_main(EVALUATE)
    ev = tmp_path / "eval"
    assert evaluate_main(["--bundle", str(out / "bundle"), "--data", str(phantom_root), "--out", str(ev),
                          "--device", "cpu"]) == 0
    with open(ev / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    test_cases = {Path(c).name for c in meta.training["data"]["cases"]["test"]}
    assert {r["case"] for r in rows} == test_cases
    assert {r["method"] for r in rows} == {"model", "identity"}
    assert {"whole", "body", "liver"} <= {r["region"] for r in rows} <= set(REGIONS)
    assert all(math.isfinite(float(r["mae"])) for r in rows)
    assert sorted(p.name for p in (ev / "figures").glob("*.png")) == sorted(f"{c}.png" for c in test_cases)


def test_killed_run_resumes_exactly(phantom_root, tmp_path):
    """SIGKILL mid-run, --resume: the next logged losses and the final (EMA) weights equal those
    of the uninterrupted run."""
    from MedTranslateLib import training

    train_main = script_main(TRAIN)
    steps = 10
    common = ["--config", str(SMOKE), f"data.root={phantom_root}", *FAST, "train.checkpoint_every=2",
              "train.val_every=3", "train.ema_decay=0.8"]  # the bundle holds the EMA weights
    a = tmp_path / "a"
    assert train_main([*common, f"train.out_dir={a}", f"train.max_steps={steps}"]) == 0

    b = tmp_path / "b"
    ckpt = b / "checkpoints" / training.CHECKPOINT_NAME
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a run that would go on for long: killed as soon as its first checkpoint is in place
    proc = subprocess.Popen([sys.executable, str(TRAIN), *common, f"train.out_dir={b}", "train.max_steps=1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ckpt.exists(), "the run died before writing a checkpoint"
    done = torch.load(ckpt, map_location="cpu", weights_only=True)["medtranslate"]["step"]
    assert 2 <= done < steps

    assert train_main([*common, f"train.out_dir={b}", f"train.max_steps={steps}", "--resume"]) == 0
    for key in ("train/generator/loss", "train/discriminator/loss", "train/generator/g_l1"):
        full, resumed = logged(a, key), logged(b, key)
        assert sorted(resumed) == list(range(done, steps))  # logged step k = (k + 1)-th batch
        for k in resumed:
            assert resumed[k] == pytest.approx(full[k], rel=1e-6, abs=1e-7), (key, k)
    # final weights: equal up to float summation order (a wrong batch, RNG or optimiser state
    # after resuming would change them by orders of magnitude more)
    wa, wb = load_file(a / "bundle" / "model.safetensors"), load_file(b / "bundle" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)


def test_ddp_two_cpu_processes(phantom_root, tmp_path):
    from MedTranslateLib.bundle import load_bundle

    out = tmp_path / "ddp"
    proc = run_script(TRAIN, "--config", str(SMOKE), f"data.root={phantom_root}", f"train.out_dir={out}", *FAST,
                      "train.max_steps=2", "train.val_every=2", "train.accelerator=cpu", "train.devices=2",
                      "train.strategy=ddp", "optim.schedule=cosine",
                      # the plateau steps on the loss averaged over the ranks (a collective every step)
                      "optim.phases.discriminator.schedule=plateau", "optim.plateau.patience=0",
                      "optim.plateau.threshold=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in text and "Starting with 2 processes" in text
    assert proc.stdout.count("bundle:") == 1  # rank 0 only
    assert load_bundle(out / "bundle").meta.training["steps"] == 2
    assert sorted(logged(out, "train/generator/loss")) == [0, 1]
    assert len(logged(out, "val/mae")) == 1
    assert logged(out, "train/discriminator/lr") == {0: pytest.approx(1e-3), 1: pytest.approx(5e-4)}
    assert logged(out, "train/generator/lr") == {0: pytest.approx(1e-3), 1: pytest.approx(5e-4)}  # cos(pi/2)


# ---------------------------------------------------------------------------------------------
# errors: one line on stderr, exit code 2
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    (["model.generator.ngff=8"], "unknown key 'model.generator.ngff'"),
    (["train.max_stepz=8"], "unknown key 'train.max_stepz'"),
    (["train.max_steps=abc"], "'train.max_steps'"),
    (["method=nosuch"], "unknown method 'nosuch'"),
    (["optim.phases.critic.lr=1e-3"], "optim.phases.critic"),
    (["train.ema_decay=1.5"], "ema_decay"),
    (["optim.schedule=linear"], "'optim.schedule' in"),
    (["optim.schedule=plateau", "optim.warmup_steps=10"], "warmup_steps works with the constant and cosine"),
    (["optim.schedule=cosine", "optim.lr_min=1"], "optim.lr_min must be in [0, lr"),
    (["optim.phases.generator.lr_min=-1"], "optim.phases.generator.lr_min must be in [0, lr"),
    (["optim.plateau.factor=2"], "optim.plateau.factor must be in (0, 1)"),
    (["data.root=/nonexistent/cases"], "/nonexistent/cases: case root folder not found"),
])
def test_bad_config_is_one_line_exit_2(overrides, expected, tmp_path, capsys):
    main = script_main(TRAIN)
    rc = main(["--config", str(SMOKE), f"train.out_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error: "), err
    assert expected in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_config_and_resume_errors(phantom_root, tmp_path, capsys):
    main = script_main(TRAIN)
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err

    run = tmp_path / "run"
    assert main(["--config", str(SMOKE), f"data.root={phantom_root}", f"train.out_dir={run}", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint to resume from" in err

    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    assert main(["--config", str(SMOKE), f"data.root={phantom_root}", f"train.out_dir={run}"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["--config", str(SMOKE), f"data.root={phantom_root}", f"train.out_dir={run}", *FAST,
                 "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a readable training checkpoint" in err, err

    # a checkpoint of another model config
    torch.save({"medtranslate": {"rng": {}, "method": "pix2pix", "model": {"in_channels": 3}}},
               run / "checkpoints" / "last.ckpt")
    assert main(["--config", str(SMOKE), f"data.root={phantom_root}", f"train.out_dir={run}", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another model config" in err, err


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------
def test_step_sampler_is_a_function_of_seed_step_and_rank():
    from MedTranslateLib.training import StepSampler

    full = list(StepSampler(10, 4, 8, seed=3))
    assert len(full) == 32 and sorted(full[:20]) == sorted(list(range(10)) * 2)  # whole passes
    assert full != list(StepSampler(10, 4, 8, seed=4))
    assert list(StepSampler(10, 4, 8, seed=3, start=5)) == full[20:]
    assert list(StepSampler(10, 4, 8, seed=3, start=lambda: 6)) == full[24:]
    r0 = list(StepSampler(10, 2, 8, seed=3, rank=0, world=2))
    r1 = list(StepSampler(10, 2, 8, seed=3, rank=1, world=2))
    merged = [i for s in range(8) for i in r0[2 * s:2 * s + 2] + r1[2 * s:2 * s + 2]]
    assert merged == full  # two ranks of batch 2 see the single-process stream of batch 4


def test_checkpoint_io_is_atomic_and_weights_only(tmp_path):
    from MedTranslateLib.training import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "ck" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 4}, path)
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "step": 5}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert io.load_checkpoint(path)["step"] == 5

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        io.load_checkpoint(tmp_path / "evil.ckpt")


def test_rng_state_round_trip():
    import random

    from MedTranslateLib.training.state import _rng_state, _set_rng_state

    state = _rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    _set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_ema_tracks_the_weights():
    from MedTranslateLib.training import EMA

    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    assert not any(p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # warm-up: decay min(0.5, 1/10) = 0.1
    before = ema.module.weight.clone()
    ema.update(model)  # decay min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module.weight, d * before + (1 - d) * 1.0)
    assert int(ema.num_updates) == 2


def test_config_and_precision(tmp_path):
    from MedTranslateLib import training

    cfg = training.load_train_config(SMOKE, ["optim.phases.discriminator.lr=1e-4", "train.max_steps=3"])
    assert cfg.train.max_steps == 3 and cfg.model["generator"]["ngf"] == 8
    assert cfg.optim.for_phase("discriminator")["lr"] == 1e-4
    assert cfg.optim.for_phase("generator")["lr"] == cfg.optim.lr
    if not torch.cuda.is_available():
        assert training.lightning_precision(cfg.train) == "32-true"
    cfg.train.precision = "bf16-mixed"
    assert training.lightning_precision(cfg.train) == "bf16-mixed"


@pytest.mark.parametrize("config", sorted((ROOT / "training" / "configs").rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT / "training" / "configs")))
def test_every_shipped_config_is_valid(config):
    from MedTranslateLib import training

    cfg = training.load_train_config(config)  # unknown keys, types, method and model config checked
    assert cfg.train.max_steps >= 1 and cfg.data.root


def test_bf16_mixed_precision_steps_on_cpu(phantom_root, tmp_path):
    """The mixed-precision path of the loop (autocast + manual optimisation); bf16 runs on CPU."""
    from MedTranslateLib import training
    from MedTranslateLib.bundle import load_bundle

    cfg = training.load_train_config(SMOKE, [f"data.root={phantom_root}", f"train.out_dir={tmp_path}", *FAST,
                                             "train.max_steps=2", "train.val_every=2",
                                             "train.precision=bf16-mixed", "train.ema_decay=0.9"])
    bundle = load_bundle(training.fit(cfg))
    assert bundle.meta.training["precision"] == "bf16-mixed" and bundle.meta.training["ema"] is True
    assert all(torch.isfinite(t).all() for t in bundle.method.state_dict().values())
    assert math.isfinite(logged(tmp_path, "val/mae")[1])


# ---------------------------------------------------------------------------------------------
# LR schedules and training stages
# ---------------------------------------------------------------------------------------------
class StagedPix2Pix(Pix2Pix):
    """pix2pix trained in two stages: its discriminator alone, then its generator alone (the
    shape of rlbcd's pretrained-then-frozen fusion network)."""

    name = "staged_pix2pix"
    stages = [TrainingStage("discriminator", 0, ("discriminator",)), TrainingStage("generator", 5, ("generator",))]

    def training_stages(self) -> list[TrainingStage]:
        return list(self.stages)


STAGED = [*FAST, "method=staged_pix2pix", "train.max_steps=9", "train.val_every=0", "train.checkpoint_every=3",
          "optim.lr=1e-3", "optim.phases.generator.schedule=cosine", "optim.phases.generator.warmup_steps=2",
          "optim.phases.generator.lr_min=1e-4", "optim.phases.discriminator.schedule=plateau",
          # threshold 10: no loss ever counts as an improvement, so the LR falls on a fixed rhythm
          "optim.plateau.patience=1", "optim.plateau.cooldown=1", "optim.plateau.threshold=10"]


class _Stop(Exception):
    """Ends a run right after its checkpoint at a chosen step, as a kill would."""


@contextlib.contextmanager
def watched(stop_at: int | None = None):
    """Yields {step: parameters of the module at the start of that step}; with ``stop_at`` the
    run raises _Stop once the checkpoint of that step is written."""
    from MedTranslateLib.training.module import PeriodicCheckpoint

    before: dict[int, dict[str, torch.Tensor]] = {}
    save = PeriodicCheckpoint.on_train_batch_end

    def on_start(self, trainer, pl_module, batch, batch_idx):
        before[pl_module.step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_end(self, trainer, pl_module, outputs, batch, batch_idx):
        save(self, trainer, pl_module, outputs, batch, batch_idx)
        if pl_module.step == stop_at:
            raise _Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PeriodicCheckpoint, "on_train_batch_start", on_start)
        mp.setattr(PeriodicCheckpoint, "on_train_batch_end", on_end)
        yield before


@contextlib.contextmanager
def staged_method():
    from MedTranslateLib.methods import base

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(base._REGISTRY, StagedPix2Pix.name, StagedPix2Pix)
        yield


@pytest.fixture(scope="module")
def staged_runs(phantom_root, tmp_path_factory):
    """The staged pix2pix trained 9 steps straight through ("full"), and the same run stopped
    after its checkpoint at step 6 and resumed ("resumed"), with the stderr of each."""
    from MedTranslateLib import training

    tmp = tmp_path_factory.mktemp("staged")
    run = types.SimpleNamespace(full=tmp / "full", resumed=tmp / "resumed")
    with staged_method():
        def cfg(out):
            return training.load_train_config(SMOKE, [f"data.root={phantom_root}", *STAGED, f"train.out_dir={out}"])

        err = io.StringIO()
        with watched() as run.params, contextlib.redirect_stderr(err):
            training.fit(cfg(run.full))
        run.full_err = err.getvalue()
        with watched(stop_at=6), pytest.raises(_Stop), contextlib.redirect_stderr(io.StringIO()):
            training.fit(cfg(run.resumed))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            training.fit(cfg(run.resumed), resume=True)
        run.resumed_err = err.getvalue()
    return run


def test_cosine_schedule_with_warmup_follows_the_closed_form(staged_runs):
    """generator: 4 steps (stage 2), warm-up 2 (LinearLR), then cosine 1e-3 -> 1e-4 over 2 steps."""
    lr = logged(staged_runs.full, "train/generator/lr", version=0)
    assert sorted(lr) == list(range(9))  # logged at every step, also while the phase waits
    lr_max, lr_min, warmup, t_max = 1e-3, 1e-4, 2, 4 - 2
    for step in lr:
        k = max(0, step - 5)  # the generator's own steps (stage 2 starts at step 5)
        want = (lr_max * (k + 1) / warmup if k < warmup
                else lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * (k - warmup) / t_max)) / 2)
        assert lr[step] == pytest.approx(want, rel=1e-6), step


def test_plateau_schedule_follows_the_closed_form(staged_runs):
    """discriminator: ReduceLROnPlateau, factor 0.5, patience 1, cooldown 1, no step an
    improvement: after s steps the LR has been halved (s + cooldown) // (patience + 1 + cooldown) times."""
    lr = logged(staged_runs.full, "train/discriminator/lr", version=0)
    assert sorted(lr) == list(range(9))
    for step in lr:
        k = min(step, 5)  # the discriminator trains in stage 1 (steps 0-4) only
        assert lr[step] == pytest.approx(1e-3 * 0.5 ** ((k + 1) // 3), rel=1e-6), step
    assert lr[4] == lr[2] != lr[1]  # without the cooldown step 4 would be halved twice


def test_stages_train_only_their_phases(staged_runs):
    """Stage 1 (steps 0-4) trains the discriminator only, stage 2 (5-8) the generator only; the
    parameters of the other phase stay bit for bit."""
    params = staged_runs.params
    weights = torch.load(staged_runs.full / "checkpoints" / "last.ckpt", map_location="cpu",
                         weights_only=True)["state_dict"]
    final = {k: weights[k] for k in params[0]}  # the parameters (batch-norm statistics are buffers)
    assert sorted(params) == list(range(9))

    def part(weights, prefix):
        return {k: v for k, v in weights.items() if k.startswith(prefix)}

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    g, d = "method.generator.", "parts.discriminator."
    assert part(params[0], g) and part(params[0], d)
    assert all(same(part(params[s], g), part(params[0], g)) for s in range(1, 6))  # frozen in stage 1
    assert not same(part(params[5], d), part(params[0], d))
    assert same(part(final, d), part(params[5], d))  # frozen in stage 2
    assert not same(part(final, g), part(params[5], g))

    g_loss = logged(staged_runs.full, "train/generator/loss", version=0)
    d_loss = logged(staged_runs.full, "train/discriminator/loss", version=0)
    assert sorted(g_loss) == [5, 6, 7, 8] and all(math.isfinite(g_loss[s]) for s in g_loss)
    assert all(math.isfinite(d_loss[s]) for s in range(5)) and all(math.isnan(d_loss[s]) for s in range(5, 9))
    stage = logged(staged_runs.full, "train/stage", version=0)
    assert [stage[s] for s in range(9)] == [1] * 5 + [2] * 4
    assert "staged_pix2pix: step 0: stage 1/2 'discriminator'" in staged_runs.full_err
    assert "staged_pix2pix: step 5: stage 2/2 'generator' — training phases: generator" in staged_runs.full_err
    assert torch.load(staged_runs.full / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)["medtranslate"]["step"] == 9


def test_stopped_staged_run_resumes_bit_for_bit(staged_runs):
    """Stopped after step 6 (mid stage 2, mid warm-up / cosine), resumed: the LR, losses and stage
    of every later step and the final weights, optimiser and scheduler states equal the
    uninterrupted run's bit for bit."""
    full, resumed = staged_runs.full, staged_runs.resumed
    assert "step 6: stage 2/2 'generator'" in staged_runs.resumed_err  # the stage is announced again
    for key in ("train/generator/lr", "train/discriminator/lr", "train/generator/loss", "train/stage"):
        after = logged(resumed, key, version=1)
        assert sorted(after) == [6, 7, 8]
        assert after == {k: v for k, v in logged(full, key, version=0).items() if k >= 6}, key
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for r in (full, resumed))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert len(a["lr_schedulers"]) == 2 and a["lr_schedulers"] == b["lr_schedulers"]
    assert a["lr_schedulers"][0]["last_epoch"] == 5  # the plateau state of stage 1 came through
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert opt_a["param_groups"] == opt_b["param_groups"]
        assert all(torch.equal(opt_a["state"][i][n], opt_b["state"][i][n])
                   for i in opt_a["state"] for n in opt_a["state"][i])


def test_resume_refuses_other_lr_schedules(staged_runs, phantom_root):
    from MedTranslateLib import training

    with staged_method():
        def resume(*overrides):
            cfg = training.load_train_config(SMOKE, [f"data.root={phantom_root}", *STAGED,
                                                     f"train.out_dir={staged_runs.full}", *overrides])
            with pytest.raises(ValueError) as err:
                training.fit(cfg, resume=True)
            return str(err.value)

        cosine = "{'schedule': 'cosine', 'warmup_steps': 2, 'lr_min': 0.0001, 'max_steps': 9}"
        assert (f"phase 'generator' trained with the LR schedule {cosine}, the config gives "
                "{'schedule': 'constant', 'warmup_steps': 2}") in resume("optim.phases.generator.schedule=constant")
        assert "'max_steps': 12}; resume with the optim and train.max_steps" in resume("train.max_steps=12")
        assert "'patience': 1" in resume("optim.plateau.patience=2")  # the discriminator's plateau
        assert "'lr_min': 0.0002" in resume("optim.phases.generator.lr_min=2e-4")


def test_stage_plan_counts_steps_of_the_phases_that_run():
    from MedTranslateLib.training import load_train_config
    from MedTranslateLib.training.module import StagePlan

    cfg = load_train_config(SMOKE)
    m = StagedPix2Pix(cfg.model)
    assert StagePlan(Pix2Pix(cfg.model)).optimizer_steps(5) == 10  # no stages: every phase every step
    m.stages = [TrainingStage("d", 0, ("discriminator",)), TrainingStage("both", 2, ("generator", "discriminator")),
                TrainingStage("g", 5, ("generator",))]
    plan = StagePlan(m)
    assert [plan.optimizer_steps(s) for s in range(9)] == [0, 1, 2, 4, 6, 8, 9, 10, 11]
    assert all(plan.steps_done(plan.optimizer_steps(s)) == s for s in range(12))
    assert plan.steps_done(3) == 2  # one phase of step 2 done
    assert plan.phases_at(3) == ["discriminator", "generator"]  # always in optimization_phases() order
    assert (plan.phase_steps("discriminator", 8), plan.phase_steps("generator", 8), plan.phase_steps("generator", 1)) \
        == (5, 6, 0)
    assert [plan.stage_at(s) for s in (0, 1, 2, 4, 5, 10**6)] == [0, 0, 1, 1, 2, 2]
    for stages, message in [
        ([TrainingStage("a", 1, ("generator",))], "start at step 0"),
        ([TrainingStage("a", 0, ("generator",)), TrainingStage("b", 0, ("generator",))], "increasing steps"),
        ([TrainingStage("a", 0, ("critic",))], "stage 'a' must name distinct phases"),
        ([TrainingStage("a", 0, ())], "stage 'a' must name distinct phases"),
    ]:
        m.stages = stages
        with pytest.raises(ValueError, match=message):
            StagePlan(m)


def test_constant_schedule_is_plain_adam(phantom_root, tmp_path):
    """The default (constant) builds no scheduler and logs lr at every step; a cosine schedule
    from lr to lr (the same LRs through the whole scheduler machinery) trains the same weights
    bit for bit, so schedules change nothing but the LR."""
    from MedTranslateLib import training

    common = [f"data.root={phantom_root}", *FAST, "train.max_steps=3", "train.val_every=0"]
    const = training.load_train_config(SMOKE, [*common, f"train.out_dir={tmp_path / 'constant'}"])
    assert const.optim.schedule == "constant"
    training.fit(const)
    training.fit(training.load_train_config(SMOKE, [*common, f"train.out_dir={tmp_path / 'cosine'}",
                                                    "optim.schedule=cosine", f"optim.lr_min={const.optim.lr}"]))
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for r in ("constant", "cosine"))
    assert a["lr_schedulers"] == [] and len(b["lr_schedulers"]) == 2
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    for phase in ("generator", "discriminator"):
        lr = logged(tmp_path / "constant", f"train/{phase}/lr")
        assert sorted(lr) == [0, 1, 2] and all(v == pytest.approx(const.optim.lr, rel=1e-6) for v in lr.values())

    cfg = training.load_train_config(SMOKE, [*common, f"train.out_dir={tmp_path / 'long'}", "optim.schedule=cosine",
                                             "optim.warmup_steps=3"])
    with pytest.raises(ValueError, match="trains 3 steps, not more than its warmup_steps"):
        training.fit(cfg)
