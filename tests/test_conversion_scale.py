"""Conversions at cohort size: ``-np`` worker processes, per-case resume of an interrupted conversion, and
``-num_parts`` / ``-part_id`` for box pseudo-labelling.

The cohorts are the tiny ones of test_conversion.py and test_bbox.py; the box-guided model's prediction is replaced
by a deterministic stand-in (the commands' own bookkeeping is what is tested, not nnU-Net's inference).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_synth.dataset_conversion import bbox, common, generic, msd
from nnunet_synth.dataset_conversion.bbox import bbox_pseudolabel_main, pseudolabel, resolve_model
from nnunet_synth.dataset_conversion.common import STAGING_SUFFIX, ConversionError

from .test_bbox import box_cohort, fake_model
from .test_conversion import build_generic, build_msd, organ_tumour, volume, write


def contents(folder: Path) -> dict[str, bytes]:
    """Every file of a dataset folder by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_dataset(a: Path, b: Path) -> None:
    """Same files, identical images and labels (bytes; arrays and geometry where gzip differs), same dataset.json
    apart from its name."""
    files_a, files_b = contents(a), contents(b)
    assert sorted(files_a) == sorted(files_b)
    for name in files_a:
        if name.endswith(".nii.gz") and files_a[name] != files_b[name]:
            img_a, img_b = sitk.ReadImage(str(a / name)), sitk.ReadImage(str(b / name))
            assert np.array_equal(sitk.GetArrayFromImage(img_a), sitk.GetArrayFromImage(img_b)), name
            assert (img_a.GetSpacing(), img_a.GetOrigin()) == (img_b.GetSpacing(), img_b.GetOrigin()), name
        elif name.endswith(".json"):
            ja, jb = json.loads(files_a[name]), json.loads(files_b[name])
            for j in (ja, jb):
                j.pop("name", None)
            assert ja == jb, name
        else:
            assert files_a[name] == files_b[name], name


def hidden(raw: Path) -> list[str]:
    return sorted(p.name for p in raw.iterdir() if p.name.startswith("."))


class CountingCases:
    """Stands in for common._convert_task: counts the input cases converted and crashes at call ``crash_at``."""

    def __init__(self, crash_at: int | None = None):
        self.names: list[str] = []
        self.crash_at = crash_at
        self.real = common._convert_task

    def __call__(self, task, spec, staging):
        self.names.append(task.name)
        if self.crash_at is not None and len(self.names) == self.crash_at:
            raise RuntimeError("simulated crash (killed node)")
        return self.real(task, spec, staging)


# ----------------------------------------------------------------------------------------------------------------
# -np
# ----------------------------------------------------------------------------------------------------------------


def test_two_worker_processes_write_what_one_process_writes(raw, tmp_path, monkeypatch):
    src = build_msd(tmp_path / "in", n=4)
    serial = msd.convert("msd_pancreas", src, 501, progress=False, num_processes=1)
    contexts = []
    real_get_context = common.multiprocessing.get_context
    monkeypatch.setattr(common.multiprocessing, "get_context",
                        lambda method=None: (contexts.append(method), real_get_context(method))[1])
    parallel = msd.convert("msd_pancreas", src, 502, name="MSDPancreasNp2", progress=False, num_processes=2)
    assert contexts == ["spawn"]  # the cases went through nnU-Net's kind of pool
    same_dataset(serial, parallel)
    assert hidden(raw) == []  # no staging folder, no lock file


def test_a_worker_error_names_the_case_and_leaves_nothing(raw, tmp_path):
    src = build_msd(tmp_path / "in", n=3)
    write(volume(organ_tumour(tumour_value=3)), src / "labelsTr" / "pancreas_002.nii.gz")  # found when loading
    with pytest.raises(ConversionError, match=r"case pancreas_002: unexpected label values \[3\]"):
        msd.convert("msd_pancreas", src, 501, progress=False, num_processes=2)
    assert sorted(p.name for p in raw.iterdir()) == []


def test_np_is_a_flag_of_every_conversion_command():
    from nnunet_synth.dataset_conversion.cli import build_parser

    assert build_parser().parse_args(["generic", "-i", "x", "-d", "1", "-np", "3"]).num_processes == 3
    assert bbox.build_bbox_dataset_parser().parse_args(["-i", "1", "-d", "2", "-np", "3"]).num_processes == 3
    args = bbox.build_bbox_pseudolabel_parser().parse_args(["-m", "m", "-i", "1", "--output-id", "2", "-np", "3",
                                                            "-num_parts", "4", "-part_id", "3"])
    assert (args.num_processes, args.num_parts, args.part_id) == (3, 4, 3)


# ----------------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------------


def test_an_interrupted_conversion_resumes_with_the_missing_cases_only(raw, tmp_path, monkeypatch):
    src = build_msd(tmp_path / "in", n=5)
    reference = msd.convert("msd_pancreas", src, 501, progress=False)
    crashing = CountingCases(crash_at=4)
    monkeypatch.setattr(common, "_convert_task", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        msd.convert("msd_pancreas", src, 502, name="Resumed", progress=False)
    staging = raw / f".Dataset502_Resumed{STAGING_SUFFIX}"
    assert not (raw / "Dataset502_Resumed").exists() and staging.is_dir()  # no half dataset in nnUNet_raw
    assert len(list((staging / "cases").iterdir())) == 3
    counting = CountingCases()
    monkeypatch.setattr(common, "_convert_task", counting)
    resumed = msd.convert("msd_pancreas", src, 502, name="Resumed", progress=False)
    assert counting.names == ["pancreas_004", "pancreas_005"]  # 2 of 5 converted again, not 5
    same_dataset(reference, resumed)
    assert hidden(raw) == []


def test_a_resumed_conversion_drops_cases_excluded_since(raw, tmp_path, monkeypatch):
    src = build_msd(tmp_path / "in", n=4)
    monkeypatch.setattr(common, "_convert_task", CountingCases(crash_at=4))
    with pytest.raises(RuntimeError, match="simulated crash"):
        msd.convert("msd_pancreas", src, 501, progress=False)
    counting = CountingCases()
    monkeypatch.setattr(common, "_convert_task", counting)
    folder = msd.convert("msd_pancreas", src, 501, exclude=["pancreas_002"], progress=False)
    assert counting.names == ["pancreas_004"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [
        "pancreas_001.nii.gz", "pancreas_003.nii.gz", "pancreas_004.nii.gz"]
    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["numTraining"] == 3


def test_a_rerun_with_other_settings_is_refused_not_mixed(raw, tmp_path, monkeypatch):
    build_generic(tmp_path / "g", n=3)
    kwargs = dict(image_patterns=["scans/{case}_t1.nrrd"], label_pattern="masks/{case}.mha", binarize=True,
                  labels=["background=0", "breast=1"], progress=False)
    monkeypatch.setattr(common, "_convert_task", CountingCases(crash_at=3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        generic.convert(tmp_path / "g", 509, **kwargs)
    staging = raw / f".Dataset509_Generic{STAGING_SUFFIX}"
    before = contents(staging / "dataset")
    counting = CountingCases()
    monkeypatch.setattr(common, "_convert_task", counting)
    with pytest.raises(ConversionError, match=r"interrupted conversion of Dataset509_Generic with other settings "
                                              r"\(differing: .*spacing.*\).*--overwrite"):
        generic.convert(tmp_path / "g", 509, spacing=[2.0], **kwargs)
    assert counting.names == [] and contents(staging / "dataset") == before  # untouched
    folder = generic.convert(tmp_path / "g", 509, spacing=[2.0], overwrite=True, **kwargs)  # discards, restarts
    assert counting.names == ["pat0", "pat1", "pat2"]
    for case in ("pat0", "pat1", "pat2"):
        assert sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz")).GetSpacing() == (2.0, 2.0, 2.0)
    assert hidden(raw) == []


def test_a_refused_input_still_leaves_nothing_behind(raw, tmp_path, monkeypatch):
    """Resume is for crashes; a conversion refused for its input (here in the third case) removes its staging."""
    src = build_msd(tmp_path / "in", n=3)
    write(volume(organ_tumour(tumour_value=3)), src / "labelsTr" / "pancreas_003.nii.gz")
    with pytest.raises(ConversionError, match="pancreas_003"):
        msd.convert("msd_pancreas", src, 501, progress=False)
    assert sorted(p.name for p in raw.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# Box pseudo-labels: -num_parts / -part_id and resume
# ----------------------------------------------------------------------------------------------------------------


class FakePredictor:
    """Stands in for the box-guided nnU-Net: liver where the image is bright, tumour where the box channel is set
    and the image brighter still, one tumour voxel outside the boxes (removed by the restriction)."""

    def __init__(self, crash_at: int | None = None):
        self.cases: list[str] = []
        self.crash_at = crash_at

    def __call__(self, predictor, files, box_file, out_truncated):
        self.cases.append(Path(out_truncated).name)
        if self.crash_at is not None and len(self.cases) == self.crash_at:
            raise RuntimeError("simulated crash (CUDA out of memory)")
        ref = sitk.ReadImage(str(files[0]))
        img, box = sitk.GetArrayFromImage(ref), sitk.GetArrayFromImage(sitk.ReadImage(str(box_file)))
        plain = (img > 20).astype(np.uint8)
        plain[(box > 0) & (img > 40)] = 2
        plain[0, 0, 0] = 2
        restricted = np.where((plain == 2) & (box == 0), 1, plain).astype(np.uint8)
        out = []
        for suffix, arr in (("", plain), ("_restricted", restricted)):
            path = Path(f"{out_truncated}{suffix}.nii.gz")
            label = sitk.GetImageFromArray(arr)
            label.CopyInformation(ref)
            sitk.WriteImage(label, str(path), True)
            out.append(path)
        return tuple(out)


def test_pseudolabel_parts_together_write_what_one_run_writes(raw, monkeypatch, capsys):
    box_cohort(raw, n=5)
    model_folder = fake_model(raw.parent / "nnUNet_results")
    model = resolve_model(model_folder)
    fake = FakePredictor()
    monkeypatch.setattr(bbox._Predictor, "predict", lambda self, *a: fake(self, *a))
    whole = pseudolabel(937, 938, model, device="cpu", progress=False)
    assert len(fake.cases) == 5
    fake.cases.clear()
    argv = ["-m", str(model_folder), "-i", "937", "--output-id", "939", "--name", "Parts", "-device", "cpu",
            "--quiet", "-np", "1", "-num_parts", "2"]
    assert bbox_pseudolabel_main([*argv, "-part_id", "0"]) == 0
    # part 0: cases 0, 2, 4 in sorted order; the dataset waits for part 1
    assert fake.cases == ["mr0_arterial", "mr2_arterial", "mr4_arterial"]
    assert not (raw / "Dataset939_Parts").exists() and "wrote" not in capsys.readouterr().out
    fake.cases.clear()
    assert bbox_pseudolabel_main([*argv, "-part_id", "1"]) == 0
    assert fake.cases == ["mr1_arterial", "mr3_arterial"]
    parts = raw / "Dataset939_Parts"
    assert "wrote" in capsys.readouterr().out
    same_dataset(whole, parts)
    report = json.loads((parts / bbox.REPORT_FILE).read_text(encoding="utf-8"))
    assert sorted(report["cases"]) == [f"mr{i}_arterial" for i in range(5)]
    assert all(c["tumour_voxels_removed_outside_boxes"] == 1 for c in report["cases"].values())
    assert hidden(raw) == []


def test_pseudolabel_resumes_after_a_crash(raw, monkeypatch):
    box_cohort(raw, n=4)
    model = resolve_model(fake_model(raw.parent / "nnUNet_results"))
    fake = FakePredictor(crash_at=3)
    monkeypatch.setattr(bbox._Predictor, "predict", lambda self, *a: fake(self, *a))
    with pytest.raises(RuntimeError, match="simulated crash"):
        pseudolabel(937, 938, model, device="cpu", progress=False)
    fake.cases.clear()
    fake.crash_at = None
    folder = pseudolabel(937, 938, model, device="cpu", progress=False)
    assert fake.cases == ["mr2_arterial", "mr3_arterial"]  # the two finished cases are not predicted again
    report = json.loads((folder / bbox.REPORT_FILE).read_text(encoding="utf-8"))
    assert sorted(report["cases"]) == [f"mr{i}_arterial" for i in range(4)]  # records of the first run kept


def test_pseudolabel_part_id_out_of_range_is_refused(raw):
    box_cohort(raw, n=2)
    model = resolve_model(fake_model(raw.parent / "nnUNet_results"))
    with pytest.raises(ConversionError, match=r"-part_id must be in \[0, 2\), got 2"):
        pseudolabel(937, 938, model, device="cpu", progress=False, num_parts=2, part_id=2)
