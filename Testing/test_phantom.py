"""MedTranslateLib.phantom: determinism, plausibility (tissue HU / MR contrasts), tumors inside the
liver, masks aligned with the images, label regions where the contrast is, misregistration, files
written by the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from MedTranslateLib import cases, cli, io, phantom
from MedTranslateLib.phantom import LABELS, MASKS, MODALITIES, PhantomConfig

SHAPE = (32, 96, 96)  # small but large enough for eroded organ means
CFG = PhantomConfig(shape=SHAPE, tumor_count=(2, 3))
FILES = {f"{n}.nii.gz" for n in MODALITIES + MASKS}


@pytest.fixture(scope="module")
def case():
    return phantom.generate_case(3, CFG)


def _label(case, name, erode=1):
    m = case.masks["labels"].array == LABELS[name]
    if erode:
        m = ndimage.binary_erosion(m, iterations=erode)
    return m


def _mean(case, modality, mask):
    assert mask.any()
    return float(case.images[modality].array[mask].mean())


# --- determinism ------------------------------------------------------------------------------

def test_same_seed_gives_identical_case(case):
    again = phantom.generate_case(3, CFG)
    for name in MODALITIES:
        assert np.array_equal(case.images[name].array, again.images[name].array), name
    for name in MASKS:
        assert np.array_equal(case.masks[name].array, again.masks[name].array), name
    assert case.info == again.info
    assert case.seed == again.seed == 3


def test_identical_whatever_the_blas_thread_count():
    """Bit-identical output with 1 or 2 BLAS threads (threaded BLAS would sum in another
    order), checked in fresh processes."""
    code = ("import hashlib; from MedTranslateLib import phantom as p; "
            "c = p.generate_case(11, p.PhantomConfig(shape=(16, 48, 48), misregistration_mm=2.0)); "
            "h = hashlib.sha256(); [h.update(v.array.tobytes()) for v in "
            "list(c.images.values()) + list(c.masks.values())]; print(h.hexdigest())")
    digests = set()
    for threads in ("1", "2"):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads,
                   MKL_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True, timeout=300)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_different_seeds_give_different_anatomy(case):
    other = phantom.generate_case(4, CFG)
    assert not np.array_equal(case.masks["labels"].array, other.masks["labels"].array)
    assert not np.array_equal(case.images["ct"].array, other.images["ct"].array)


def test_dataset_case_seeds_are_derived_from_seed_and_index():
    seeds = [phantom.case_seed(0, i) for i in range(3)] + [phantom.case_seed(1, 0)]
    assert len(set(seeds)) == 4
    assert phantom.case_seed(0, 1) == phantom.case_seed(0, 1)
    assert phantom.case_seed(0, 1) == int(np.random.SeedSequence([0, 1]).generate_state(1)[0])


# --- geometry and masks -----------------------------------------------------------------------

def test_all_volumes_share_geometry_and_masks_are_valid(case):
    ref = case.images["ct"]
    assert ref.shape == SHAPE
    assert ref.spacing == (2.5, 2.5, 2.5)
    assert ref.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    centre = ref.index_to_physical(((SHAPE[2] - 1) / 2, (SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2))
    assert np.allclose(centre, (0.0, 0.0, phantom.CENTRE_Z_MM))
    for vol in list(case.images.values()) + list(case.masks.values()):
        assert vol.same_geometry(ref)
        assert vol.array.dtype == np.float32
    assert set(np.unique(case.masks["liver"].array)) <= {0.0, 1.0}
    assert set(np.unique(case.masks["tumor"].array)) <= {0.0, 1.0}
    assert set(np.unique(case.masks["labels"].array).astype(int)) <= set(LABELS.values())
    assert len(set(LABELS.values())) == len(LABELS) and LABELS["background"] == 0


def test_anatomy_sides_follow_lps(case):
    """Liver on the patient's right (negative x in LPS), spleen on the left, spine posterior to
    the aorta (larger y), liver above the kidneys' centre (larger z)."""
    ref = case.images["ct"]

    def centroid(mask):
        z, y, x = np.nonzero(mask)
        return ref.index_to_physical((x.mean(), y.mean(), z.mean()))

    liver = centroid(case.masks["liver"].array > 0)
    spleen = centroid(_label(case, "spleen", 0))
    aorta = centroid(_label(case, "aorta", 0))
    canal = centroid(_label(case, "spinal_canal", 0))
    kidneys = centroid(_label(case, "kidney_cortex", 0))
    assert liver[0] < -10 and spleen[0] > 10
    assert canal[1] > aorta[1] + 10
    assert liver[2] > kidneys[2]


def test_tumors_lie_inside_the_liver(case):
    liver = case.masks["liver"].array > 0
    tumor = case.masks["tumor"].array > 0
    labels = case.masks["labels"].array
    tumors = case.info["tumors"]
    assert 1 <= len(tumors) <= 3
    assert tumor.any()
    assert not (tumor & ~liver).any()
    # a margin of liver all around (tumors are placed away from the liver surface)
    assert not (ndimage.binary_dilation(tumor) & ~liver).any()
    assert np.array_equal(tumor, np.isin(labels, (LABELS["tumor_viable"], LABELS["tumor_necrotic"])))
    assert sum(t["voxels"] for t in tumors) == int(tumor.sum())
    for t in tumors:
        assert t["type"] in ("hypervascular", "rim_enhancing", "necrotic", "hypovascular")
        z, y, x = (int(round(v)) for v in t["centre_index_zyx"])
        assert liver[z, y, x]
    # the liver mask is LiTS-like: parenchyma, intrahepatic vessels and tumors, no IVC
    inside = np.unique(labels[liver]).astype(int)
    allowed = {LABELS[n] for n in ("liver", "tumor_viable", "tumor_necrotic", "portal_vessel",
                                   "hepatic_vessel", "aorta")}  # aorta: a hepatic artery voxel
    assert set(inside) <= allowed
    assert not (liver & (labels == LABELS["ivc"])).any()


def test_no_tumor_when_count_is_zero():
    c = phantom.generate_case(5, PhantomConfig(shape=(24, 64, 64), tumor_count=(0, 0)))
    assert not c.masks["tumor"].array.any()
    assert c.info["tumors"] == []


# --- plausibility: CT ---------------------------------------------------------------------------

def test_ct_tissue_values_per_phase(case):
    fat, liver, aorta = _label(case, "fat"), _label(case, "liver"), _label(case, "aorta")
    muscle, spleen = _label(case, "muscle"), _label(case, "spleen")
    air = _label(case, "background", 2)
    for phase in ("ct", "cta_arterial", "cta_portal"):
        assert _mean(case, phase, fat) < -70
        assert _mean(case, phase, air) < -950
        assert 30 < _mean(case, phase, muscle) < 80
    assert 40 < _mean(case, "ct", liver) < 70
    assert 55 < _mean(case, "cta_arterial", liver) < 95
    assert 90 < _mean(case, "cta_portal", liver) < 130
    assert _mean(case, "cta_portal", liver) > _mean(case, "ct", liver) + 30
    assert 20 < _mean(case, "ct", aorta) < 60
    assert _mean(case, "cta_arterial", aorta) > 250
    assert 120 < _mean(case, "cta_portal", aorta) < 220
    assert 30 < _mean(case, "ct", spleen) < 60
    assert _mean(case, "cta_portal", spleen) > 90
    bone = _label(case, "bone", 0)
    assert _mean(case, "ct", bone) > 250
    canal = _label(case, "spinal_canal")
    assert -10 < _mean(case, "ct", canal) < 60
    # corticomedullary phase: cortex enhances far more than medulla
    cortex, medulla = _label(case, "kidney_cortex", 0), _label(case, "kidney_medulla", 0)
    assert _mean(case, "cta_arterial", cortex) > _mean(case, "cta_arterial", medulla) + 30
    assert _mean(case, "cta_arterial", cortex) > _mean(case, "ct", cortex) + 80


def test_label_regions_are_where_the_arterial_phase_enhances(case):
    """The evaluation regions the phantom names (aorta, kidney) in ``regions.LABEL_REGIONS``
    order: their labels in the label map, and the arterial phase enhances there far more than in
    the liver (what a CT -> CTA model is to be judged on)."""
    from MedTranslateLib.regions import LABEL_REGIONS

    labels = case.masks["labels"].array
    masks = cases.label_region_masks(labels, case.info["regions"])
    assert list(masks) == list(LABEL_REGIONS)
    assert np.array_equal(masks["aorta"], labels == LABELS["aorta"])
    assert np.array_equal(masks["kidney"], np.isin(labels, (LABELS["kidney_cortex"], LABELS["kidney_medulla"])))
    assert not (masks["aorta"] & masks["kidney"]).any()

    def enhancement(mask):
        inner = ndimage.binary_erosion(mask)  # away from partial volume with the neighbours
        return _mean(case, "cta_arterial", inner) - _mean(case, "ct", inner)

    liver = enhancement(_label(case, "liver", 0))
    assert 5 < liver < 30
    assert enhancement(masks["aorta"]) > 250 and enhancement(masks["kidney"]) > liver + 60


def test_ct_noise_level():
    cfg = PhantomConfig(shape=(24, 64, 64), ct_noise_hu=12.0)
    c = phantom.generate_case(1, cfg)
    air = ndimage.binary_erosion(c.masks["labels"].array == 0, iterations=3)
    sd = float(c.images["ct"].array[air].std())
    assert 8.0 < sd < 16.0


def test_necrosis_does_not_enhance():
    """Necrotic cores stay ~20 HU in every phase while the rim enhances (no partial-volume
    blur here, so that small cores are not mixed with their rim)."""
    cfg = PhantomConfig(shape=SHAPE, tumor_count=(3, 3), tumor_types=("necrotic",),
                        partial_volume_sigma=0.0)
    c = phantom.generate_case(4, cfg)
    assert c.info["tumors"] and {t["type"] for t in c.info["tumors"]} == {"necrotic"}
    labels = c.masks["labels"].array
    necrotic, viable = labels == LABELS["tumor_necrotic"], labels == LABELS["tumor_viable"]
    assert necrotic.sum() > 20 and viable.any()
    ct, art, portal = (c.images[n].array for n in ("ct", "cta_arterial", "cta_portal"))
    for image in (ct, art, portal):
        assert 0 < image[necrotic].mean() < 40
    assert art[viable].mean() > art[necrotic].mean() + 40


# --- plausibility: MR ---------------------------------------------------------------------------

def test_mr_contrasts(case):
    for name in ("t1", "t1_post", "t2"):
        assert case.images[name].array.min() >= 0.0
    fat, liver, muscle = _label(case, "fat"), _label(case, "liver"), _label(case, "muscle")
    spleen, aorta = _label(case, "spleen"), _label(case, "aorta")
    air = _label(case, "background", 2)
    # T1: fat brightest, liver brighter than spleen and muscle
    assert _mean(case, "t1", fat) > _mean(case, "t1", liver) > _mean(case, "t1", spleen)
    assert _mean(case, "t1", liver) > _mean(case, "t1", muscle)
    # gadolinium: liver and blood brighter after contrast
    assert _mean(case, "t1_post", liver) > 1.15 * _mean(case, "t1", liver)
    assert _mean(case, "t1_post", aorta) > 2.0 * _mean(case, "t1", aorta)
    # T2: spleen brighter than liver, muscle dark, CSF bright, fast blood dark (flow void)
    csf = _label(case, "spinal_canal", 0)
    assert _mean(case, "t2", spleen) > 1.5 * _mean(case, "t2", liver)
    assert _mean(case, "t2", csf) > 2.0 * _mean(case, "t2", spleen)
    assert _mean(case, "t2", muscle) < _mean(case, "t2", liver)
    assert _mean(case, "t2", aorta) < _mean(case, "t2", spleen)
    # background: only the Rician noise floor
    for name in ("t1", "t1_post", "t2"):
        assert _mean(case, name, air) < 0.05 * _mean(case, "t1", fat)


def test_field_strength_changes_mr_only():
    cfg15 = PhantomConfig(shape=(24, 64, 64))
    cfg30 = PhantomConfig(shape=(24, 64, 64), field_strength_t=3.0)
    a, b = phantom.generate_case(2, cfg15), phantom.generate_case(2, cfg30)
    assert np.array_equal(a.images["ct"].array, b.images["ct"].array)
    assert not np.array_equal(a.images["t1"].array, b.images["t1"].array)


# --- alignment and misregistration -------------------------------------------------------------

def _shifted_means(image, mask):
    out = {}
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                out[(dz, dy, dx)] = float(image[np.roll(mask, (dz, dy, dx), axis=(0, 1, 2))].mean())
    return out


@pytest.mark.parametrize("modality,label", [("cta_arterial", "aorta"), ("t1_post", "aorta"),
                                            ("ct", "bone"), ("t2", "spinal_canal")])
def test_masks_are_aligned_with_every_image(case, modality, label):
    mask = _label(case, label, 0)
    image = case.images[modality].array
    outside = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask)
    assert image[mask].mean() > image[outside].mean() + 0.2 * abs(image[mask].mean())
    means = _shifted_means(image, mask)
    assert max(means, key=means.get) == (0, 0, 0)


def test_tumor_mask_matches_the_lesions(case):
    tumor = case.masks["tumor"].array > 0
    liver_only = _label(case, "liver")
    t2 = case.images["t2"].array
    assert t2[ndimage.binary_erosion(tumor) | (tumor & ~ndimage.binary_erosion(tumor))].mean() > (
        1.3 * t2[liver_only].mean())


def test_misregistration_moves_targets_only():
    base = PhantomConfig(shape=(32, 96, 96), ct_noise_hu=0.0, mr_noise=0.0, mr_bias=0.0)
    moved_cfg = PhantomConfig(shape=(32, 96, 96), ct_noise_hu=0.0, mr_noise=0.0, mr_bias=0.0,
                              misregistration_mm=4.0)
    a = phantom.generate_case(7, base)
    b = phantom.generate_case(7, moved_cfg)
    assert a.info["misregistration"] == {}
    assert set(b.info["misregistration"]) == set(phantom.TARGET_MODALITIES)
    for name in phantom.SOURCE_MODALITIES:
        assert np.array_equal(a.images[name].array, b.images[name].array)
    for name in MASKS:
        assert np.array_equal(a.masks[name].array, b.masks[name].array)
    for name in phantom.TARGET_MODALITIES:
        t = b.info["misregistration"][name]
        assert 2.0 - 1e-6 <= np.linalg.norm(t["translation_mm"]) <= 4.0 + 1e-6
        assert max(abs(v) for v in t["rotation_deg"]) <= 2.0
        diff = np.abs(a.images[name].array - b.images[name].array)
        assert diff.mean() > 0.01 * np.abs(a.images[name].array).mean()

    # documented convention: target(p) = anatomy(R (p - c) + c + t); a feature at anatomy
    # point q shows up at p = R^-1 (q - c - t) + c
    ref = a.images["ct"]
    spacing = np.asarray(ref.spacing)
    centre = (np.asarray(SHAPE[::-1]) - 1) / 2.0 * spacing

    def bright_centroid(img):
        """Centroid (mm, x y z) of the largest bright object that does not touch a face of the
        volume (a kidney cortex in the arterial phase): a compact, fully visible feature."""
        lab, n = ndimage.label(img > 150)
        best, size = None, 0
        for i, sl in enumerate(ndimage.find_objects(lab), start=1):
            if any(s.start == 0 or s.stop == dim for s, dim in zip(sl, img.shape, strict=True)):
                continue
            count = int((lab[sl] == i).sum())
            if count > size:
                best, size = i, count
        assert size > 50
        z, y, x = np.nonzero(lab == best)
        return np.array([x.mean(), y.mean(), z.mean()]) * spacing

    q = bright_centroid(a.images["cta_arterial"].array)
    p = bright_centroid(b.images["cta_arterial"].array)
    t = b.info["misregistration"]["cta_arterial"]
    from MedTranslateLib.phantom._geometry import rotation

    r = rotation(*t["rotation_deg"])
    expected = r.T @ (q - centre - np.asarray(t["translation_mm"])) + centre
    assert np.linalg.norm(p - expected) < 1.0
    assert np.linalg.norm(p - q) > 1.0


# --- writing and the CLI ------------------------------------------------------------------------

def test_cli_writes_cases_with_geometry(tmp_path, capsys):
    out = tmp_path / "phantom"
    rc = cli.main(["phantom", "--out", str(out), "--cases", "2", "--seed", "3",
                   "--shape", "24", "64", "64"])
    assert rc == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in folders] == ["case_000", "case_001"]
    printed = capsys.readouterr().out.split()
    assert printed == [str(p) for p in folders]
    arrays = []
    for folder in folders:
        names = {p.name for p in folder.iterdir()}
        assert FILES <= names and names - FILES == {"phantom.json", cases.REGION_TABLE}
        vols = {n: io.read_volume(folder / n) for n in sorted(FILES)}
        ref = vols["ct.nii.gz"]
        assert ref.shape == (24, 64, 64)
        assert np.allclose(ref.spacing, (2.5, 2.5, 2.5))
        assert np.allclose(ref.origin, (-78.75, -78.75, phantom.CENTRE_Z_MM - 28.75))
        for v in vols.values():
            assert v.same_geometry(ref)
        info = json.loads((folder / "phantom.json").read_text())
        assert info["labels"] == LABELS and info["config"]["shape"] == [24, 64, 64]
        assert cases.read_region_table(folder) == {"aorta": (LABELS["aorta"],),
                                                   "kidney": (LABELS["kidney_cortex"], LABELS["kidney_medulla"])}
        arrays.append(vols["labels.nii.gz"].array)
    assert not np.array_equal(arrays[0], arrays[1])
    # the written case is exactly the in-memory case generated from the derived seed
    cfg = PhantomConfig.from_cli(shape=[24, 64, 64])
    again = phantom.generate_case(phantom.case_seed(3, 1), cfg)
    for name in ("cta_portal", "t2"):
        assert np.array_equal(io.read_volume(folders[1] / f"{name}.nii.gz").array, again.images[name].array)
    assert np.array_equal(arrays[1], again.masks["labels"].array)


@pytest.mark.parametrize("kwargs,match", [
    ({"shape": (8, 64, 64)}, "shape"),
    ({"shape": (24, 64)}, "shape"),
    ({"shape": (24.5, 64, 64)}, "shape"),
    ({"spacing": (2.5, 0.0, 2.5)}, "spacing"),
    ({"spacing": (2.5, float("nan"), 2.5)}, "spacing"),
    ({"misregistration_mm": -1.0}, "misregistration"),
])
def test_bad_config_is_a_one_line_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        PhantomConfig.from_cli(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="cases"):
        phantom.write_phantom_dataset(tmp_path, cases=0)
    with pytest.raises(ValueError, match="seed"):
        phantom.generate_case(-1)
    with pytest.raises(ValueError, match="field_strength"):
        PhantomConfig(field_strength_t=7.0)
    with pytest.raises(ValueError, match="tumor_types"):
        PhantomConfig(tumor_types=("benign",))
    rc = cli.main(["phantom", "--out", str(tmp_path / "x"), "--shape", "8", "64", "64"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("medtranslate: error: phantom shape") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_defaults():
    cfg = PhantomConfig.from_cli()
    assert cfg == PhantomConfig()
    assert cfg.shape == (64, 128, 128) and cfg.spacing == (2.5, 2.5, 2.5)
    assert cfg.misregistration_mm == 0.0 and cfg.field_strength_t == 1.5
