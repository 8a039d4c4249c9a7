"""Pseudo-masks from boxes: box computation, the two commands' refusals, and the whole pipeline on phantoms.

The end-to-end test (``slow``) runs the liver-MRI paper's workflow with the real nnU-Net commands: a labelled phantom
becomes a dataset with a box channel, nnU-Net plans and trains on it (1 epoch x 2 iterations), and the trained model
turns the boxes of a box-only phantom cohort into pseudo-masks.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunet_synth.dataset_conversion.bbox import (
    Box,
    bbox_dataset_main,
    bbox_pseudolabel_main,
    component_boxes,
    make_bbox_dataset,
    parse_margin,
    pseudolabel,
    render_boxes,
    resolve_model,
)
from nnunet_synth.dataset_conversion.common import ConversionError
from nnunet_synth.phantom import write_phantom_dataset

from .conftest import NO_FINAL_VALIDATION, TINY, ext_trainer_dir, run

SHAPE = (12, 20, 20)  # z, y, x
SPACING = (0.9, 0.9, 2.0)  # x, y, z
LABELS = {"background": 0, "liver": 1, "tumor": 2}


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------



def image(array: np.ndarray, spacing=SPACING) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin((-5.0, 2.0, 7.0))
    return img


def liver_with_tumours(shape=SHAPE) -> np.ndarray:
    """Liver with two separate tumours (one of them L-shaped, so its box is larger than the tumour)."""
    lab = np.zeros(shape, np.uint8)
    lab[1:11, 2:18, 2:18] = 1
    lab[2:5, 3:6, 3:6] = 2
    lab[6:9, 10:16, 12:14] = 2
    lab[6:9, 14:16, 14:17] = 2
    return lab


def write_raw(raw: Path, dataset_id: int, name: str, cases: dict[str, tuple[list[np.ndarray], np.ndarray]],
              channels=("MRI",), labels=LABELS, extra: dict | None = None) -> Path:
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for cid, (images, label) in cases.items():
        for c, arr in enumerate(images):
            sitk.WriteImage(image(arr), str(folder / "imagesTr" / f"{cid}_{c:04d}.nii.gz"), True)
        sitk.WriteImage(image(label), str(folder / "labelsTr" / f"{cid}.nii.gz"), True)
    generate_dataset_json(str(folder), dict(enumerate(channels)), dict(labels), len(cases), ".nii.gz",
                          dataset_name=folder.name, **(extra or {}))
    return folder


def mri(seed: int, shape=SHAPE) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape, dtype=np.float32) * 100).astype(np.float32)


def atlas_like(raw: Path, dataset_id: int = 935, n: int = 2) -> Path:
    return write_raw(raw, dataset_id, "ATLASLike", {f"atlas_{i:03d}": ([mri(i)], liver_with_tumours())
                                                    for i in range(n)})


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def refused(main, argv: list[str]) -> int:
    """Exit status of a console entry that refuses (one line on stderr, status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def leftovers(raw: Path) -> list[str]:
    return sorted(p.name for p in raw.iterdir() if p.name.startswith("."))


class _SerialPool:
    """Stand-in for the spawn pool of nnU-Net's verify_dataset_integrity: the same checks, no interpreter start."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @staticmethod
    def starmap(func, iterable):
        return [func(*args) for args in iterable]


class _SerialContext:
    @staticmethod
    def get_context(method=None):
        return _SerialContext()

    Pool = _SerialPool


def verify(folder: Path, monkeypatch) -> None:
    """nnU-Net's own ``verify_dataset_integrity`` (its check functions, run serially in this process)."""
    import nnunetv2.experiment_planning.verify_dataset_integrity as vdi
    import nnunetv2.utilities.utils as nnunet_utils

    monkeypatch.setattr(vdi, "multiprocessing", _SerialContext)
    monkeypatch.setattr(nnunet_utils, "Pool", _SerialPool)
    vdi.verify_dataset_integrity(str(folder), num_processes=1)


def fake_model(results: Path, channels=("T1_CE_MRI", "noNorm"), labels=LABELS, box_channel: int | None = 1,
               folds=(0,)) -> Path:
    """A model folder with what resolve_model reads (no weights: the checks run before the model loads)."""
    folder = results / "Dataset936_ATLASBoxes" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    for f in folds:
        (folder / f"fold_{f}").mkdir(parents=True)
        (folder / f"fold_{f}" / "checkpoint_final.pth").write_bytes(b"")
    meta = {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": dict(labels),
            "numTraining": 2, "file_ending": ".nii.gz"}
    if box_channel is not None:
        meta["nnunet_synth"] = {"box_channel": box_channel, "tumour_label": 2}
    (folder / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    (folder / "plans.json").write_text("{}", encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------------------


def test_one_box_per_component_with_inclusive_corners():
    boxes = component_boxes(liver_with_tumours() == 2)
    assert boxes == [Box((2, 3, 3), (4, 5, 5)), Box((6, 10, 12), (8, 15, 16))]
    assert [b.voxels for b in boxes] == [27, 3 * 6 * 5]
    assert boxes[1].to_json() == {"box_zyx_min": [6, 10, 12], "box_zyx_max": [8, 15, 16]}
    rendered = render_boxes(boxes, SHAPE)
    assert rendered.dtype == np.uint8 and rendered.sum() == 27 + 90
    assert rendered[6:9, 10:16, 12:17].all() and not rendered[5].any()


def test_diagonal_contact_is_one_lesion_and_empty_mask_has_no_box():
    mask = np.zeros((4, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True
    assert component_boxes(mask) == [Box((1, 1, 1), (2, 2, 2))]
    assert component_boxes(np.zeros((4, 6, 6), bool)) == []


def test_margin_enlarges_and_clips_to_the_volume():
    mask = np.zeros((6, 10, 10), bool)
    mask[0:2, 4:6, 8:10] = True  # touches z = 0 and x = 9
    assert component_boxes(mask, 2) == [Box((0, 2, 6), (3, 7, 9))]
    assert component_boxes(mask, [0, 1, 3]) == [Box((0, 3, 5), (1, 6, 9))]
    assert parse_margin(1, 3) == (1, 1, 1) and parse_margin([1, 2, 3], 3) == (1, 2, 3)
    for bad in (-1, [1, 2]):
        with pytest.raises(ConversionError, match="box margin"):
            parse_margin(bad, 3)


def test_boxes_in_2d():
    mask = np.zeros((8, 8), bool)
    mask[1:3, 1:2] = mask[5:7, 4:8] = True
    assert component_boxes(mask, 1) == [Box((0, 0), (3, 2)), Box((4, 3), (7, 7))]


# ----------------------------------------------------------------------------------------------------------------
# nnUNetv2_synth_bbox_dataset
# ----------------------------------------------------------------------------------------------------------------


def test_bbox_dataset_appends_box_channel_and_keeps_labels(raw, monkeypatch):
    src = atlas_like(raw)
    assert bbox_dataset_main(["-i", "935", "-d", "936", "--margin-vox", "1", "--quiet"]) == 0
    out = raw / "Dataset936_ATLASLikeBoxes"
    verify(out, monkeypatch)
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["channel_names"] == {"0": "MRI", "1": "noNorm"} and meta["labels"] == LABELS
    info = meta["nnunet_synth"]
    assert info["box_channel"] == 1 and info["tumour_label"] == 2 and info["margin_vox"] == [1, 1, 1]
    assert info["source_dataset"] == src.name and info["organ"] == "liver"
    for cid in ("atlas_000", "atlas_001"):
        np.testing.assert_array_equal(read(out / "imagesTr" / f"{cid}_0000.nii.gz"),
                                      read(src / "imagesTr" / f"{cid}_0000.nii.gz"))
        np.testing.assert_array_equal(read(out / "labelsTr" / f"{cid}.nii.gz"), liver_with_tumours())
        box = sitk.ReadImage(str(out / "imagesTr" / f"{cid}_0001.nii.gz"))
        assert box.GetSpacing() == pytest.approx(SPACING) and box.GetOrigin() == pytest.approx((-5, 2, 7))
        expected = render_boxes(component_boxes(liver_with_tumours() == 2, 1), SHAPE)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(box), expected)
    source = json.loads((out / "bbox_source.json").read_text(encoding="utf-8"))
    assert source["source_dataset"] == src.name and "maxima inclusive" in source["box_convention"]
    assert source["cases"]["atlas_000"][1] == {"index": 1, "box_zyx_min": [5, 9, 11], "box_zyx_max": [9, 16, 17],
                                               "voxels": 5 * 8 * 7}


def test_bbox_dataset_organ_label_drops_other_labels(raw):
    lab = liver_with_tumours()
    lab[10, 0:2, 0:2] = 2  # lesion at the corner
    lab[0, 18:20, 18:20] = 3
    labels = {"background": 0, "liver": 1, "lesion": 2, "vessel": 3}
    write_raw(raw, 935, "Multi", {"c1": ([mri(1)], lab)}, labels=labels)
    out = make_bbox_dataset(935, 936, organ_label=1, progress=False)
    labels = json.loads((out / "dataset.json").read_text(encoding="utf-8"))["labels"]
    assert labels == {"background": 0, "liver": 1, "lesion": 2}
    got = read(out / "labelsTr" / "c1.nii.gz")
    assert not np.any(got == 3) and np.array_equal(got == 2, lab == 2)
    with pytest.raises(ConversionError, match="--organ-label 2 is not a foreground non-tumour label"):
        make_bbox_dataset(935, 937, organ_label=2, progress=False)


@pytest.mark.parametrize("problem, message", [
    ("missing_label", "case atlas_001 of Dataset935_ATLASLike: label missing: .*labelsTr/atlas_001.nii.gz"),
    ("missing_image", "case atlas_001 of Dataset935_ATLASLike: file missing: .*imagesTr/atlas_001_0000.nii.gz"),
    ("geometry", r"case atlas_001: label does not align with the image \(spacing differs\)"),
    ("label_value", r"case atlas_001: unexpected label values \[7\] .* in .*labelsTr/atlas_001.nii.gz"),
    ("extra_channel", "case atlas_001 of Dataset935_ATLASLike: 2 channel file.*atlas_001_0001.nii.gz"),
    ("no_tumour_name", "cannot tell the tumour label .* pass --tumour-label"),
])
def test_bbox_dataset_refuses_bad_input_and_leaves_nothing(raw, problem, message):
    src = atlas_like(raw)
    case_label = src / "labelsTr" / "atlas_001.nii.gz"
    if problem == "missing_label":
        case_label.unlink()
    elif problem == "missing_image":
        (src / "imagesTr" / "atlas_001_0000.nii.gz").unlink()
    elif problem == "geometry":
        sitk.WriteImage(image(liver_with_tumours(), spacing=(1.0, 0.9, 2.0)), str(case_label), True)
    elif problem == "label_value":
        lab = liver_with_tumours()
        lab[0, 0, 0] = 7
        sitk.WriteImage(image(lab), str(case_label), True)
    elif problem == "extra_channel":
        sitk.WriteImage(image(mri(9)), str(src / "imagesTr" / "atlas_001_0001.nii.gz"), True)
    elif problem == "no_tumour_name":
        meta = json.loads((src / "dataset.json").read_text(encoding="utf-8"))
        meta["labels"] = {"background": 0, "liver": 1, "blob": 2}
        (src / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ConversionError, match=message):
        make_bbox_dataset(935, 936, progress=False)
    assert sorted(p.name for p in raw.iterdir()) == [src.name]


def test_bbox_dataset_cli_refuses_existing_output_and_box_input(raw, capsys):
    atlas_like(raw)
    assert bbox_dataset_main(["-i", "935", "-d", "936", "--quiet"]) == 0
    capsys.readouterr()
    assert refused(bbox_dataset_main, ["-i", "935", "-d", "936", "--quiet"]) == 2
    assert "Dataset936_ATLASLikeBoxes already exists; pass --overwrite" in capsys.readouterr().err
    assert bbox_dataset_main(["-i", "935", "-d", "936", "--quiet", "--overwrite", "--margin-vox", "2"]) == 0
    out = raw / "Dataset936_ATLASLikeBoxes"
    assert json.loads((out / "bbox_source.json").read_text(encoding="utf-8"))["margin_vox"] == [2, 2, 2]
    assert refused(bbox_dataset_main, ["-i", "936", "-d", "937", "--quiet"]) == 2
    assert "already has a box channel" in capsys.readouterr().err
    assert refused(bbox_dataset_main, ["-i", "935", "-d", "935", "--quiet", "--name", "Other"]) == 2
    assert "dataset ID 935 is already used" in capsys.readouterr().err
    assert leftovers(raw) == []


# ----------------------------------------------------------------------------------------------------------------
# nnUNetv2_synth_bbox_pseudolabel: refusals (all before the model loads)
# ----------------------------------------------------------------------------------------------------------------


def box_cohort(raw: Path, n: int = 2, empty_case: bool = False, json_boxes: bool = False) -> Path:
    """LLD-MMRI-like input: the tumour label holds filled boxes, the liver label is empty."""
    cases = {}
    for i in range(n):
        lab = render_boxes(component_boxes(liver_with_tumours() == 2), SHAPE) * 2
        cases[f"mr{i}_arterial"] = ([mri(10 + i)], np.zeros_like(lab) if empty_case and i == n - 1 else lab)
    folder = write_raw(raw, 937, "LLDLike", cases, extra={"nnunet_synth": {"tumour_label_is_box": True}})
    if json_boxes:
        records = {c: {"lesions": [{"index": str(k), "selected": True, **b.to_json()}
                                   for k, b in enumerate(component_boxes(lab == 2))]} for c, (_, lab) in cases.items()}
        (folder / "lesion_boxes.json").write_text(json.dumps(records), encoding="utf-8")
    return folder


def test_resolve_model_reads_channels_labels_and_folds(raw):
    folder = fake_model(raw.parent / "nnUNet_results", folds=(0, 2))
    model = resolve_model(folder)
    assert model.folds == [0, 2] and model.image_channels == 1 and model.tumour == 2 and model.organ == 1
    assert resolve_model(folder, folds=["2"]).folds == [2]
    with pytest.raises(ConversionError, match="checkpoint missing: .*fold_1/checkpoint_final.pth"):
        resolve_model(folder, folds=[1])
    with pytest.raises(ConversionError, match="dataset.json missing .*not a trained nnU-Net model folder"):
        resolve_model(raw)


def test_resolve_model_refuses_a_model_without_box_channel(raw):
    folder = fake_model(raw.parent / "nnUNet_results", channels=("MRI",), box_channel=None)
    with pytest.raises(ConversionError, match="1 input channel"):
        resolve_model(folder)


def test_pseudolabel_refuses_channel_count_mismatch(raw):
    box_cohort(raw)
    model = resolve_model(fake_model(raw.parent / "nnUNet_results", channels=("T1", "T2", "noNorm"), box_channel=2))
    with pytest.raises(ConversionError, match=r"channel count mismatch: .* takes 3 input channels \(T1, T2, noNorm\) "
                                              r"= 2 image channel\(s\) \+ the box channel, but Dataset937_LLDLike "
                                              r"has 1 image channel\(s\) \(MRI\)"):
        pseudolabel(937, 938, model, device="cpu", progress=False)
    assert leftovers(raw) == []


def test_pseudolabel_refuses_cases_without_boxes(raw):
    box_cohort(raw, empty_case=True)
    model = resolve_model(fake_model(raw.parent / "nnUNet_results"))
    with pytest.raises(ConversionError, match="case mr1_arterial: no tumour box .*labelsTr/mr1_arterial.nii.gz"):
        pseudolabel(937, 938, model, device="cpu", progress=False)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset937_LLDLike"]


def test_pseudolabel_refuses_bad_json_boxes_and_bad_targets(raw, monkeypatch):
    folder = box_cohort(raw, json_boxes=True)
    model = resolve_model(fake_model(raw.parent / "nnUNet_results"))
    records = json.loads((folder / "lesion_boxes.json").read_text(encoding="utf-8"))
    records["mr1_arterial"]["lesions"][0]["box_zyx_max"] = [4, 5, 25]
    (folder / "lesion_boxes.json").write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(ConversionError, match=r"case mr1_arterial: lesion 0 box .* outside the volume \[12, 20, 20\]"):
        pseudolabel(937, 938, model, device="cpu", progress=False)
    del records["mr1_arterial"]
    (folder / "lesion_boxes.json").write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(ConversionError, match="case mr1_arterial: no entry in .*lesion_boxes.json"):
        pseudolabel(937, 938, model, device="cpu", progress=False)
    with pytest.raises(ConversionError, match="would replace the input dataset"):
        pseudolabel(937, 937, model, name="LLDLike", boxes="label", device="cpu", progress=False)
    with pytest.raises(ConversionError, match="dataset ID 936 is already used"):  # the model's dataset
        pseudolabel(937, 936, model, boxes="label", device="cpu", progress=False)
    (raw / "Dataset938_LLDLikePseudo").mkdir()
    with pytest.raises(ConversionError, match="Dataset938_LLDLikePseudo already exists; pass --overwrite"):
        pseudolabel(937, 938, model, boxes="label", device="cpu", progress=False)


def test_pseudolabel_cli_needs_exactly_one_model_form(raw, capsys):
    with pytest.raises(SystemExit) as exc:
        bbox_pseudolabel_main(["-i", "937", "--output-id", "938"])
    assert exc.value.code == 2 and "either as -m MODEL_FOLDER or as -d DATASET" in capsys.readouterr().err
    box_cohort(raw)
    assert refused(bbox_pseudolabel_main, ["-d", "999", "-i", "937", "--output-id", "938", "-device", "cpu",
                                                   "--quiet"]) == 2
    assert "model dataset '999'" in capsys.readouterr().err


def test_console_scripts_are_installed():
    for name in ("nnUNetv2_synth_bbox_dataset", "nnUNetv2_synth_bbox_pseudolabel"):
        result = subprocess.run([name, "--help"], capture_output=True, encoding="utf-8", errors="replace")
        assert result.returncode == 0 and "--overwrite" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# The whole workflow with real nnU-Net training
# ----------------------------------------------------------------------------------------------------------------


def _box_only_cohort(dataset_id: int) -> tuple[Path, dict[str, np.ndarray]]:
    """Phantoms whose labels are replaced by filled tumour boxes (organ empty), with lesion_boxes.json as well."""
    folder = write_phantom_dataset(dataset_id, num_train=2, num_test=0, modality="CT", seed=21, config=TINY)
    regions, records = {}, {}
    for path in sorted((folder / "labelsTr").glob("*.nii.gz")):
        lab = sitk.ReadImage(str(path))
        boxes = component_boxes(sitk.GetArrayFromImage(lab) == 2)
        assert boxes, "the phantom seed must give tumours"
        region = render_boxes(boxes, lab.GetSize()[::-1])
        out = sitk.GetImageFromArray(region * 2)
        out.CopyInformation(lab)
        sitk.WriteImage(out, str(path), True)
        cid = path.name.removesuffix(".nii.gz")
        regions[cid] = region.astype(bool)
        records[cid] = {"lesions": [{"index": str(i), "selected": True, **b.to_json()} for i, b in enumerate(boxes)]}
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    meta["nnunet_synth"] = {"tumour_label_is_box": True}
    (folder / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    (folder / "lesion_boxes.json").write_text(json.dumps(records), encoding="utf-8")
    return folder, regions


@pytest.mark.slow
def test_bbox_pipeline_end_to_end_on_phantoms(nnunet_dirs, monkeypatch):
    raw = Path(os.environ["nnUNet_raw"])
    source = write_phantom_dataset(930, num_train=5, num_test=0, modality="CT", seed=20, config=TINY)
    run(["nnUNetv2_synth_bbox_dataset", "-i", "930", "-d", "931", "--margin-vox", "1", "--quiet"])
    boxes_ds = raw / "Dataset931_PhantomCTBoxes"
    channels = json.loads((boxes_ds / "dataset.json").read_text(encoding="utf-8"))["channel_names"]
    assert channels == {"0": "CT", "1": "noNorm"}

    # nnU-Net 2.8.1 breaks planning under nnUNet_n_proc_DA=0; -npfp 2 keeps the fingerprint pool from spawning 8
    # interpreters on a 2-core machine.
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_n_proc_DA", "nnUNet_extTrainer")}
    run(["nnUNetv2_plan_and_preprocess", "-d", "931", "-c", "3d_fullres", "-np", "2", "-npfp", "2",
         "--verify_dataset_integrity"], env=env)
    plans_file = Path(os.environ["nnUNet_preprocessed"]) / boxes_ds.name / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    # the box channel stays binary: nnU-Net maps the channel name "noNorm" to NoNormalization
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization", "NoNormalization"]
    # nnUNet_def_n_proc=1: the final validation's export and metric pools otherwise spawn 8 interpreters each.
    run(["nnUNetv2_train", "931", "3d_fullres", "0", "-tr", "nnUNetTrainer_Debug", "-device", "cpu"],
        env=dict(env, nnUNet_extTrainer=ext_trainer_dir(), nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1",
                 **NO_FINAL_VALIDATION))
    model = Path(os.environ["nnUNet_results"]) / boxes_ds.name / "nnUNetTrainer_Debug__nnUNetPlans__3d_fullres"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()

    cohort, regions = _box_only_cohort(932)
    # No nnUNet_extTrainer: the command finds the plugin's own trainer classes itself.
    command = ["nnUNetv2_synth_bbox_pseudolabel", "-d", "931", "-tr", "nnUNetTrainer_Debug", "-c", "3d_fullres",
               "-f", "0", "-i", "932", "--output-id", "933", "--boxes", "label", "-device", "cpu", "--disable-tta",
               "--quiet"]
    result = run(command, env=env)
    out = raw / "Dataset933_PhantomCTPseudo"
    assert f"wrote {out}" in result.stdout
    verify(out, monkeypatch)
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["channel_names"] == {"0": "CT"} and meta["labels"] == {"background": 0, "organ": 1, "tumour": 2}
    assert meta["nnunet_synth"]["input_channel_names"] == ["CT"] and meta["nnunet_synth"]["pseudo_labels"]
    report = json.loads((out / "pseudolabel_report.json").read_text(encoding="utf-8"))
    assert sorted(report["cases"]) == sorted(regions) and report["box_source"] == "label"
    for cid, region in regions.items():
        src_img = sitk.ReadImage(str(cohort / "imagesTr" / f"{cid}_0000.nii.gz"))
        out_img = sitk.ReadImage(str(out / "imagesTr" / f"{cid}_0000.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out_img), sitk.GetArrayFromImage(src_img))
        assert out_img.GetSpacing() == src_img.GetSpacing() and out_img.GetOrigin() == src_img.GetOrigin()
        pseudo = read(out / "labelsTr" / f"{cid}.nii.gz")
        assert set(np.unique(pseudo)) <= {0, 1, 2}
        assert not np.any((pseudo == 2) & ~region), "a pseudo-mask left its box"
        stats = report["cases"][cid]
        assert stats["box_voxels"] == region.sum() and stats["tumour_voxels"] == (pseudo == 2).sum()
        assert 0 <= stats["fill_fraction"] <= 1 and "organ_voxels" in stats
    assert not list((out / "imagesTr").glob("*_0001.nii.gz")), "the box channel is not part of the output"

    again = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert again.returncode == 2
    assert f"{out} already exists; pass --overwrite to replace it" in again.stderr

    # The model folder form with the boxes of lesion_boxes.json, in-process.
    folder = pseudolabel(cohort, 934, resolve_model(model, folds=[0]), boxes="json", device="cpu", tta=False,
                         name="PhantomFromJson", progress=False)
    assert (folder / "lesion_boxes.json").is_file()
    for cid, region in regions.items():
        pseudo = read(folder / "labelsTr" / f"{cid}.nii.gz")
        assert not np.any((pseudo == 2) & ~region)
    assert leftovers(raw) == [] and source.is_dir()
