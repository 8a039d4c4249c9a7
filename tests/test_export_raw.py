"""``--export-raw``: bank cases written as raw cases in the raw units of their source case.

Unit tests of the normalised-to-raw map for every nnU-Net normalisation scheme, an in-process round trip through
nnU-Net's own preprocessor with transposing, cropping, resampling and integer pixel types, and the bank of the
CT and MRI phantoms (planned and preprocessed by nnU-Net in subprocesses) exported and compared with the raw
source files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_erosion, maximum_filter

from nnunet_synth.bank import export_raw, generate_bank, normalised_to_raw_affine, raw_lesion_region
from nnunet_synth.generators.paths import bank_dir
from nnunet_synth.planning import preprocessed_dir

TUMOUR = 2
FOLD = 3  # a fold no other test makes an analytic bank of
CT_PROPS = {"mean": 45.0, "std": 38.0, "percentile_00_5": -80.0, "percentile_99_5": 180.0, "min": -1000.0,
            "max": 1500.0, "median": 45.0}


def _normalise(scheme: str, raw: np.ndarray, seg: np.ndarray | None = None, use_mask: bool = False,
               props: dict | None = None) -> np.ndarray:
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes

    normaliser = getattr(schemes, scheme)(use_mask_for_norm=use_mask, intensityproperties=props or {})
    return normaliser.run(raw.copy(), seg)


def _affine_case(scheme: str, rng: np.random.Generator):
    """(raw, seg, use_mask, expected (scale, offset)) of one scheme, on a 3D array."""
    shape = (6, 20, 22)
    seg = np.zeros(shape, dtype=np.int8)
    if scheme == "CTNormalization":  # soft tissue plus air and bone far beyond the clipping bounds
        raw = rng.normal(50, 40, shape).astype(np.int16)
        raw[:, :4] = -1000
        raw[:, -2:] = 1500
        return raw, seg, False, (CT_PROPS["std"], CT_PROPS["mean"])
    if scheme == "CTNormalization_constant":  # nothing to fit: the plans' statistics
        return np.full(shape, 60, dtype=np.int16), seg, False, (CT_PROPS["std"], CT_PROPS["mean"])
    if scheme == "ZScoreNormalization":
        raw = rng.normal(300, 50, shape).astype(np.float32)
        return raw, seg, False, (float(raw.std(dtype=np.float64)), float(raw.mean(dtype=np.float64)))
    if scheme == "ZScoreNormalization_mask":  # nnU-Net leaves the outside (seg -1) alone
        raw = rng.normal(300, 50, shape).astype(np.float32)
        raw[:, :, :5] = 0
        seg[:, :, :5] = -1
        inside = raw[seg >= 0].astype(np.float64)
        return raw, seg, True, (float(inside.std()), float(inside.mean()))
    if scheme == "NoNormalization":
        return rng.normal(-3, 7, shape).astype(np.float32), seg, False, (1.0, 0.0)
    if scheme == "RescaleTo01Normalization":
        raw = rng.integers(200, 4000, shape).astype(np.uint16)
        return raw, seg, False, (float(raw.max()) - float(raw.min()), float(raw.min()))
    assert scheme == "RGBTo01Normalization"
    return rng.integers(0, 256, shape).astype(np.uint8), seg, False, (255.0, 0.0)


@pytest.mark.parametrize("scheme", ["CTNormalization", "CTNormalization_constant", "ZScoreNormalization",
                                    "ZScoreNormalization_mask", "NoNormalization", "RescaleTo01Normalization",
                                    "RGBTo01Normalization"])
def test_affine_of_every_scheme_is_recovered(scheme):
    raw, seg, use_mask, (scale, offset) = _affine_case(scheme, np.random.default_rng(0))
    name = scheme.split("_")[0]
    normalised = _normalise(name, raw, seg, use_mask, CT_PROPS)
    fitted = normalised_to_raw_affine(raw, normalised, name, CT_PROPS, seg >= 0 if use_mask else None)
    assert fitted == pytest.approx((scale, offset), rel=1e-5, abs=1e-3 * scale)
    if scheme != "CTNormalization_constant":  # the map inverts nnU-Net's normalisation where it is affine
        inside = (seg >= 0) & ((raw >= -80) & (raw <= 180) if name == "CTNormalization" else True)
        back = fitted[0] * normalised.astype(np.float64) + fitted[1]
        np.testing.assert_allclose(back[inside], raw[inside], atol=1e-4 * scale)


def test_a_map_that_is_not_affine_warns():
    raw = np.linspace(1, 10, 200).reshape(2, 10, 10)
    with pytest.warns(UserWarning, match="not .*affinely"):
        normalised_to_raw_affine(raw, raw ** 2, "MyNormalization")


def test_lesion_region_is_a_box_of_two_mm_and_one_grid_voxel():
    mask = np.zeros((9, 15, 15), dtype=bool)
    mask[4, 7, 7] = True
    region = raw_lesion_region(mask, (3.0, 1.5, 1.5))  # 2 mm: 1 slice, 2 pixels in-plane
    assert region.sum() == 3 * 5 * 5 and region[3:6, 5:10, 5:10].all()
    coarse = raw_lesion_region(mask, (3.0, 1.5, 1.5), grid_spacing=(3.0, 4.0, 1.5))  # one 4 mm voxel: 3 pixels
    assert coarse.sum() == 3 * 7 * 5
    flat = raw_lesion_region(mask[4:5], (999.0, 1.5, 1.5))  # a 2D case: its dummy axis is left alone
    assert flat.shape == (1, 15, 15) and flat.sum() == 25
    assert not raw_lesion_region(np.zeros_like(mask), (1.0, 1.0, 1.0)).any()


# --- a round trip through nnU-Net's preprocessor: transposed, cropped, resampled, integer raw --------------------

ROUND_TRIP = {  # scheme: (raw pixel type, use_mask_for_norm, change in normalised units)
    "CTNormalization": (np.int16, False, -1.0),
    "ZScoreNormalization": (np.float32, True, 1.5),
    "NoNormalization": (np.float32, False, 40.0),
    "RescaleTo01Normalization": (np.uint16, False, 0.2),
    "RGBTo01Normalization": (np.uint8, False, 0.25),
}


def _raw_case(scheme: str, folder: Path, rng: np.random.Generator) -> tuple[dict, np.ndarray, np.ndarray]:
    """A raw case with an organ and a frame of zeros (so nnU-Net crops), in the pixel type of the scheme."""
    dtype = ROUND_TRIP[scheme][0]
    shape = (24, 40, 44)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    organ = zz ** 2 / 0.6 + yy ** 2 / 0.6 + xx ** 2 / 0.6 <= 1
    seg = organ.astype(np.uint8)
    levels = {"CTNormalization": (-1000, 40, 90, 12), "ZScoreNormalization": (0, 300, 520, 25),
              "NoNormalization": (0, 30, 60, 5), "RescaleTo01Normalization": (0, 1500, 2600, 90),
              "RGBTo01Normalization": (0, 90, 150, 10)}[scheme]
    air, body, tissue, noise = levels
    image = np.full(shape, body, dtype=np.float64) + noise * rng.standard_normal(shape)
    image[organ] += tissue - body
    image[:, :3] = air  # air (CT: clipped), then a frame of zeros nnU-Net crops away
    image[:, -2:] += 20 if scheme == "CTNormalization" else 0
    image[:, :, :4] = 0
    image[:2] = 0
    image[:, -6:, -6:] = 0  # not cropped, but outside nnU-Net's nonzero mask
    seg[image == 0] = 0
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        image = np.clip(np.rint(image), info.min, info.max)
    image = image.astype(dtype)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for array, path in ((image, folder / "imagesTr" / "case_0000.nii.gz"), (seg, folder / "labelsTr" / "case.nii.gz")):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing((1.2, 1.0, 2.5))  # x, y, z
        itk.SetOrigin((10.0, -20.0, 5.0))
        itk.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(itk, str(path), True)
    dataset_json = {"channel_names": {"0": scheme}, "labels": {"background": 0, "organ": 1, "tumour": TUMOUR},
                    "numTraining": 1, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    return dataset_json, image, seg


@pytest.mark.parametrize("scheme", list(ROUND_TRIP))
def test_round_trip_through_nnunet_preprocessing(phantom_ct, scheme, tmp_path):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dtype, use_mask, step = ROUND_TRIP[scheme]
    plans = json.loads((preprocessed_dir(phantom_ct) / "nnUNetPlans.json").read_text(encoding="utf-8"))
    plans["transpose_forward"], plans["transpose_backward"] = [0, 2, 1], [0, 2, 1]
    plans["foreground_intensity_properties_per_channel"] = {"0": CT_PROPS}
    conf = plans["configurations"]["3d_fullres"]
    conf.update(spacing=[3.0, 1.5, 1.7], normalization_schemes=[scheme], use_mask_for_norm=[use_mask])
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration("3d_fullres")
    raw_folder = tmp_path / "Dataset999_RoundTrip"
    dataset_json, image, labels = _raw_case(scheme, raw_folder, np.random.default_rng(1))
    data, seg, properties = DefaultPreprocessor(verbose=False).run_case(
        [str(raw_folder / "imagesTr" / "case_0000.nii.gz")], str(raw_folder / "labelsTr" / "case.nii.gz"),
        plans_manager, configuration, dataset_json)
    assert properties["bbox_used_for_cropping"][0] != [0, image.shape[0]], "the case is cropped"
    assert data.shape[1:] != tuple(properties["shape_after_cropping_and_before_resampling"]), "and resampled"
    # a ball of the organ gets a constant change
    centre = np.argwhere(seg[0] == 1).mean(0)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in seg.shape[1:]], indexing="ij"), -1)
    synthetic = (np.linalg.norm((grid - centre) * configuration.spacing, axis=-1) <= 11.0) & (seg[0] == 1)
    new_data = data.copy()
    new_data[0][synthetic] += step
    properties["synth"] = {"source": "case"}
    out = tmp_path / "export"
    written = export_raw(new_data, data, synthetic, properties, plans_manager, configuration, dataset_json, out,
                         "case__synth_f0_00000", TUMOUR, raw_folder=raw_folder)
    assert len(written) == 3 and all(p.is_file() for p in written) and not (out / ".tmp").exists()

    source_itk = sitk.ReadImage(str(raw_folder / "imagesTr" / "case_0000.nii.gz"))
    written_itk = [sitk.ReadImage(str(out / folder / f"case__synth_f0_00000{suffix}.nii.gz")) for folder, suffix in
                   (("imagesTr", "_0000"), ("synthetic_masksTr", ""), ("labelsTr", ""))]
    exported, mask, new_labels = (sitk.GetArrayFromImage(itk) for itk in written_itk)
    mask = mask > 0
    assert exported.dtype == image.dtype == dtype, "the raw pixel type is kept"
    for itk in written_itk:
        assert itk.GetSpacing() == source_itk.GetSpacing() and itk.GetOrigin() == source_itk.GetOrigin()
        assert itk.GetDirection() == source_itk.GetDirection()
    # the synthetic mask, transposed back: the ball's size in the raw grid (mm^3 agree within resampling)
    assert abs(mask.sum() * 2.5 * 1.0 * 1.2 / (synthetic.sum() * 3.0 * 1.5 * 1.7) - 1) < 0.25
    near = maximum_filter(mask.astype(np.uint8), size=(5, 9, 9)) > 0  # 4.5 mm (2 mm + a 1.7 mm voxel + rounding)
    np.testing.assert_array_equal(exported[~near], image[~near])
    np.testing.assert_array_equal(new_labels[~mask], labels[~mask])
    assert (new_labels[mask] == TUMOUR).all() and (labels[mask] == 1).mean() > 0.95, "the ball in the raw organ"
    # in the ball's core the raw change is the normalised change in raw units
    scale = {"CTNormalization": CT_PROPS["std"], "NoNormalization": 1.0, "RGBTo01Normalization": 255.0}.get(scheme)
    crop = tuple(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"])
    cropped = image.transpose(plans_manager.transpose_forward)[crop].astype(np.float64)
    if scheme == "ZScoreNormalization":  # over nnU-Net's nonzero mask of the cropped image
        scale = cropped[cropped != 0].std()
    elif scheme == "RescaleTo01Normalization":
        scale = cropped.max() - cropped.min()
    core = binary_erosion(mask, np.ones((3, 5, 5)))  # >= 2 mm inside: the resampled edge left out
    assert core.sum() > 20
    change = exported[core].astype(np.float64) - image[core]
    assert change.mean() == pytest.approx(step * scale, rel=0.05)


# --- the phantoms' banks exported --------------------------------------------------------------------------------

def _clean_fold(dataset: int) -> None:
    """Removes this file's fold from the session's analytic bank, so every case is generated (and exported) here."""
    folder = bank_dir(dataset, "analytic", "3d_fullres")
    for path in folder.glob(f"*__synth_f{FOLD}_*"):
        path.unlink()
    (folder / "manifest" / f"fold_{FOLD}.json").unlink(missing_ok=True)


@pytest.mark.parametrize("phantom", ["phantom_ct", "phantom_mri"])
def test_bank_export_is_the_raw_source_with_the_lesion_in_raw_units(phantom, request, tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_synth.generators import get_backend
    from nnunet_synth.planning import load_synth_plan

    dataset = request.getfixturevalue(phantom)
    _clean_fold(dataset)
    out = tmp_path / "export"
    written = generate_bank(dataset, "analytic", 2, fold=FOLD, export_raw_dir=out, progress=False)
    assert len(written) == 2 and not (out / ".tmp").exists()

    base = preprocessed_dir(dataset)
    raw_folder = next(Path(os.environ["nnUNet_raw"]).glob(f"Dataset{dataset}_*"))
    plans_manager = PlansManager(json.loads((base / "nnUNetPlans.json").read_text(encoding="utf-8")))
    conf = plans_manager.get_configuration("3d_fullres")
    plan = load_synth_plan(dataset, "3d_fullres")
    halo = float(getattr(get_backend("analytic")(plan), "halo_mm", 0.0))  # lesion edges beyond the label
    real_folder, bank_folder = base / conf.data_identifier, bank_dir(dataset, "analytic", "3d_fullres")
    real, bank = infer_dataset_class(str(real_folder))(str(real_folder)), infer_dataset_class(str(bank_folder))(
        str(bank_folder))
    for identifier in written:
        source = identifier.split("__synth")[0]
        read = lambda path: sitk.ReadImage(str(path))  # noqa: E731
        raw_label_itk = read(raw_folder / "labelsTr" / f"{source}.nii.gz")
        raw_label = sitk.GetArrayFromImage(raw_label_itk)
        mask_itk = read(out / "synthetic_masksTr" / f"{identifier}.nii.gz")
        mask = sitk.GetArrayFromImage(mask_itk) > 0
        label_itk = read(out / "labelsTr" / f"{identifier}.nii.gz")
        label = sitk.GetArrayFromImage(label_itk)
        assert mask.any() and (label[mask] == TUMOUR).all() and (raw_label[~mask] == label[~mask]).all()
        spacing = mask_itk.GetSpacing()[::-1]
        reach = [2 * math.ceil((halo + 2.0) / s) + 3 for s in spacing]  # halo + 2 mm + a voxel, per side
        near = maximum_filter(mask.astype(np.uint8), size=reach) > 0
        new_data, _, _, props = bank.load_case(identifier)
        source_data = np.asarray(real.load_case(source)[0])
        delta = np.asarray(new_data) - source_data
        assert props["synth"]["source"] == source
        # the phantom's preprocessed grid is its raw grid: the change can be compared voxel by voxel
        assert delta.shape[1:] == raw_label.shape and plans_manager.transpose_forward == [0, 1, 2]
        for c, scheme in enumerate(conf.normalization_schemes):
            raw_itk = read(raw_folder / "imagesTr" / f"{source}_{c:04d}.nii.gz")
            image_itk = read(out / "imagesTr" / f"{identifier}_{c:04d}.nii.gz")
            for itk in (image_itk, label_itk, mask_itk):
                assert itk.GetSpacing() == raw_itk.GetSpacing() and itk.GetOrigin() == raw_itk.GetOrigin()
                assert itk.GetDirection() == raw_itk.GetDirection() and itk.GetSize() == raw_itk.GetSize()
            raw, image = sitk.GetArrayFromImage(raw_itk), sitk.GetArrayFromImage(image_itk)
            assert image.dtype == raw.dtype
            np.testing.assert_array_equal(image[~near], raw[~near])  # bit for bit away from the lesion
            if scheme == "CTNormalization":
                scale = plans_manager.foreground_intensity_properties_per_channel[str(c)]["std"]
            else:
                assert scheme == "ZScoreNormalization" and not conf.use_mask_for_norm[c]
                scale = float(raw.astype(np.float32).std())
            # the lesion is the bank case's change in raw units: nnU-Net's normalisation undone
            np.testing.assert_allclose(image, raw.astype(np.float64) + scale * delta[c], atol=1e-3 * scale)
            inside, outside = float(image[mask].mean()), float(raw[mask].mean())
            assert abs(inside - outside) > 5.0, f"{identifier} channel {c}: no lesion ({inside} vs {outside})"
            span = float(raw.max() - raw.min())  # a dark lesion may be darker than anything in the case
            assert raw.min() - span / 2 <= inside <= raw.max() + span / 2, f"{inside} is not in raw units"


def test_missing_raw_source_file_is_named_and_leaves_no_bank_case(phantom_mri, tmp_path, monkeypatch):
    raw_folder = next(Path(os.environ["nnUNet_raw"]).glob(f"Dataset{phantom_mri}_*"))
    copy = tmp_path / "raw" / raw_folder.name
    shutil.copytree(raw_folder, copy)
    missing = sorted((copy / "imagesTr").glob("*_0001.nii.gz"))
    for path in missing:
        path.unlink()
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    _clean_fold(phantom_mri)
    out = tmp_path / "export"
    with pytest.raises(FileNotFoundError, match=r"raw image files of the source case phantom_\d+ of bank case "
                                                r"phantom_\d+__synth_f3_00000 not found.*expected 2"):
        generate_bank(phantom_mri, "analytic", 1, fold=FOLD, export_raw_dir=out, progress=False)
    assert not list(bank_dir(phantom_mri, "analytic", "3d_fullres").glob(f"*__synth_f{FOLD}_*")), \
        "a failed export writes no bank case"
    assert not list(out.rglob("*.nii.gz"))
