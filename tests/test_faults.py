"""Nothing lost, nothing silently wrong: truncated files, geometry, overwrites, leftovers of killed runs, reports
replaced as a whole, plugin-free exports and one-line refusals (exit 2) of the commands, on tiny files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_synth.dataset_conversion.cli import main as convert_main
from nnunet_synth.evaluation.cli import evaluate_entry
from nnunet_synth.files import nifti_truncation, process_tag, remove_stale
from nnunet_synth.trainers import nnUNetTrainerSynthBank

SHAPE = (12, 20, 24)  # z, y, x
SPACING = (2.0, 1.0, 1.5)  # x, y, z as SimpleITK takes it


def _ball(shape=SHAPE, centre=(6, 10, 9), radius=4.5) -> np.ndarray:
    grid = np.indices(shape) - np.array(centre)[:, None, None, None]
    return (grid ** 2).sum(0) <= radius ** 2


def _write(array: np.ndarray, path: Path, like: sitk.Image | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    if like is None:
        image.SetSpacing(SPACING)
        image.SetOrigin((-10.0, 5.0, 30.0))
    else:
        image.CopyInformation(like)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return image


def _truncate(path: Path, keep: float | int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if isinstance(keep, int) else data[:int(len(data) * keep)])


def _dead_pid() -> int:
    """The id of a process that has exited (a killed run's, for the leftovers it would leave)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder path no file can be written under (root ignores file modes: then a path in sysfs)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o500)
        yield folder / "out"
        folder.chmod(0o700)
        return
    path = Path("/sys/nnunet_synth_unwritable")
    try:
        path.mkdir()
    except PermissionError:
        yield path / "out"
        return
    path.rmdir()
    pytest.skip("no unwritable folder on this machine")


def _one_line_error(capsys, prog: str) -> str:
    """The command's error line: one line ``<prog>: error: ...`` on stderr, no traceback (progress bars that ran
    before it aside)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count(f"{prog}: error: ") == 1, err
    line = err.strip().splitlines()[-1].split("\r")[-1]
    assert line.startswith(f"{prog}: error: "), err
    return line


# --- 1. truncated files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_told_from_a_complete_one(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    _write(np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE), path)
    assert nifti_truncation(path) is None
    _truncate(path, len(path.read_bytes()) - 4)  # even the last voxel missing
    assert nifti_truncation(path) is not None
    _truncate(path, 200)
    assert nifti_truncation(path) is not None


def _generic_input(root: Path, cases=("a", "b")) -> None:
    for i, case in enumerate(cases):
        like = _write((np.random.default_rng(i).normal(size=SHAPE) * 100).astype(np.int16),
                      root / "images" / f"{case}.nii.gz")
        label = _ball().astype(np.uint8)
        label[_ball(radius=2)] = 2
        _write(label, root / "labels" / f"{case}.nii.gz", like)


@pytest.mark.parametrize("case,victim,keep", [("a", "images/a.nii.gz", 200), ("b", "labels/b.nii.gz", 0.6)])
def test_conversion_refuses_a_truncated_image_or_label(tmp_path, capsys, case, victim, keep):
    src = tmp_path / "src"
    _generic_input(src)
    _truncate(src / victim, keep)
    raw = tmp_path / "raw"
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["generic", "-i", str(src), "-d", "930", "--raw-dir", str(raw), "--quiet", "--labels",
                      "background=0", "organ=1", "tumor=2"])
    assert exit_info.value.code == 2
    line = _one_line_error(capsys, "nnUNetv2_synth_convert generic")
    assert f"{src / victim} is truncated" in line and f"case {case}:" in line, line
    assert sorted(p.name for p in raw.iterdir()) == []  # neither the dataset nor its temporary folder


def _evaluate(ref: Path, pred: Path, out: Path, *extra: str) -> dict:
    evaluate_entry(["-ref", str(ref), "-pred", str(pred), "-o", str(out), "-l", "1", "--bootstrap", "0", "--quiet",
                    *extra])
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def _dice(summary: dict) -> float:
    return summary["cases"][0]["runs"][summary["runs"][0]]["tumour"]["dice"]


@pytest.fixture
def reference(tmp_path) -> tuple[Path, sitk.Image]:
    """A reference folder with one off-centre lesion (a flip moves it)."""
    image = _write(_ball(centre=(5, 8, 7)).astype(np.uint8), tmp_path / "ref" / "case.nii.gz")
    return tmp_path / "ref", image


def test_evaluation_refuses_a_truncated_prediction(tmp_path, capsys, reference):
    ref, image = reference
    pred = tmp_path / "pred"
    _write(sitk.GetArrayFromImage(image), pred / "case.nii.gz", image)
    assert _dice(_evaluate(ref, pred, tmp_path / "out")) == 1.0
    _truncate(pred / "case.nii.gz", 0.6)
    with pytest.raises(SystemExit) as exit_info:
        _evaluate(ref, pred, tmp_path / "out2")
    assert exit_info.value.code == 2
    assert f"{pred / 'case.nii.gz'} is truncated" in _one_line_error(capsys, "nnUNetv2_synth_evaluate")


# --- 2. geometry in evaluation -----------------------------------------------------------------------------------

def test_evaluation_compares_geometry_and_resamples_on_request(tmp_path, capsys, reference):
    ref, image = reference
    flipped = sitk.DICOMOrient(image, "RPS")  # the same voxels in space, the x axis stored the other way
    assert not np.array_equal(sitk.GetArrayFromImage(flipped), sitk.GetArrayFromImage(image))
    shifted = sitk.Image(image)
    shifted.SetOrigin(tuple(np.add(image.GetOrigin(), (50.0, 0.0, 0.0))))
    turned = sitk.Image(image)  # the direction flipped only: the array is the reference's, its place is not
    turned.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    for name, prediction, what in (("flipped", flipped, "direction"), ("shifted", shifted, "origin"),
                                   ("turned", turned, "direction")):
        (tmp_path / name).mkdir()
        sitk.WriteImage(prediction, str(tmp_path / name / "case.nii.gz"), True)
        with pytest.raises(SystemExit):
            _evaluate(ref, tmp_path / name, tmp_path / f"out_{name}")
        line = _one_line_error(capsys, "nnUNetv2_synth_evaluate")
        assert f"differ in {what}" in line and "--resample-to-reference" in line, line
        assert line.count(", origin (") == 2 and line.count(", direction (") == 2, "both geometries are named"
    assert _dice(_evaluate(ref, tmp_path / "flipped", tmp_path / "resampled", "--resample-to-reference")) == 1.0
    shifted_summary = _evaluate(ref, tmp_path / "shifted", tmp_path / "resampled_shift", "--resample-to-reference")
    assert _dice(shifted_summary) == 0.0  # 50 mm away: resampled faithfully, not matched voxel by voxel
    assert shifted_summary["cases"][0]["runs"]["shifted"]["resampled_to_reference"]


# --- 9. reports replaced as a whole ------------------------------------------------------------------------------

def test_evaluation_report_is_replaced_as_a_whole(tmp_path, reference, monkeypatch):
    ref, image = reference
    pred = tmp_path / "pred"
    _write(sitk.GetArrayFromImage(image), pred / "case.nii.gz", image)
    out = tmp_path / "out"
    _evaluate(ref, pred, out)
    old_summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(old) == {"summary.json", "report.md", "dice_by_size.png"}
    (out / "notes.txt").write_text("the user's own file", encoding="utf-8")
    (out / f".report.pid{_dead_pid()}@{os.uname().nodename}").mkdir()  # a killed run's staging folder

    from nnunet_synth.evaluation import report

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing summary.json")

    with monkeypatch.context() as m:  # a second run over the same -o dies at its last file
        m.setattr(report.json, "dump", dies)
        with pytest.raises(KeyboardInterrupt):
            _evaluate(ref, pred, out, "--names", "second")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in old} == old, "the old report was touched"

    # a new report replaces every file of the old one (its figures by the old summary's list), nothing else
    (out / "dice_difference_x_vs_y.png").write_bytes(b"old figure")
    old_summary["report_files"]["figures"].append("dice_difference_x_vs_y.png")
    (out / "summary.json").write_text(json.dumps(old_summary), encoding="utf-8")
    summary = _evaluate(ref, pred, out, "--names", "third")
    assert summary["runs"] == ["third"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".report.")) == [
        "dice_by_size.png", "notes.txt", "report.md", "summary.json"]
    assert "third" in (out / "report.md").read_text(encoding="utf-8")
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".report.")]
    assert leftovers == [], leftovers  # the dead run's folder too; the died run's own was its process's (alive)


# --- 8. leftovers of killed runs ---------------------------------------------------------------------------------

def test_only_leftovers_of_dead_processes_on_this_host_are_removed(tmp_path):
    dead, alive = f".pid{_dead_pid()}@{os.uname().nodename}", process_tag()
    names = [f"a{dead}", f"b{alive}", f"c.pid{os.getpid()}@another-host", "d.no-owner"]
    for name in names:
        (tmp_path / name).mkdir()
    assert remove_stale(tmp_path) == [tmp_path / f"a{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names[1:]


def test_conversion_removes_what_a_killed_conversion_left(tmp_path):
    src = tmp_path / "src"
    _generic_input(src)
    raw = tmp_path / "raw"
    stale = raw / f".Dataset948_Generic.partial-0123abcd.pid{_dead_pid()}@{os.uname().nodename}"
    (stale / "imagesTr").mkdir(parents=True)
    running = raw / f".Dataset949_Generic.partial-4567abcd{process_tag()}"  # a conversion running now
    running.mkdir()
    assert convert_main(["generic", "-i", str(src), "-d", "948", "--raw-dir", str(raw), "--quiet", "--labels",
                         "background=0", "organ=1", "tumor=2"]) == 0
    assert sorted(p.name for p in raw.iterdir()) == sorted([running.name, "Dataset948_Generic"])


# --- 0, 3, 7. export -------------------------------------------------------------------------------------------------

def _checkpoint(path: Path, **extra) -> None:
    """An nnU-Net checkpoint's layout (what the exporter reads) with a real state dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"trainer_name": "nnUNetTrainerSynth20", "network_weights": torch.nn.Conv3d(1, 2, 3).state_dict(),
                "init_args": {"plans": {"configurations": {"3d_fullres": {"architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet"}}}},
                    "dataset_json": {"converted_by": "nnunet_synth.dataset_conversion (generic)"}},
                **extra}, path)


def test_export_looks_for_imports_a_plain_nnunet_would_fail_not_for_strings(tmp_path):
    from nnunet_synth.export import plugin_references, rewrite_checkpoint
    from nnunet_synth.synth_plan import ShapeSettings

    plain = tmp_path / "converted.pth"
    _checkpoint(plain)  # dataset.json of a converted dataset names the converter: data, not an import
    assert plugin_references(plain) == []
    rewrite_checkpoint(plain, tmp_path / "out.pth")
    assert torch.load(tmp_path / "out.pth", weights_only=False)["trainer_name"] == "nnUNetTrainer"
    pickled = tmp_path / "pickled.pth"
    _checkpoint(pickled, extra_state=ShapeSettings())
    assert plugin_references(pickled) == ["nnunet_synth.synth_plan.ShapeSettings"]
    with pytest.raises(ValueError, match=r"pickled\.pth references nnunet_synth\.synth_plan\.ShapeSettings"):
        rewrite_checkpoint(pickled, tmp_path / "out2.pth")
    network = tmp_path / "network.pth"
    _checkpoint(network)
    checkpoint = torch.load(network, weights_only=False)
    checkpoint["init_args"]["plans"]["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = \
        "nnunet_synth.networks.SynthUNet"
    torch.save(checkpoint, network)
    assert plugin_references(network) == ["nnunet_synth.networks.SynthUNet (network class of configuration "
                                          "3d_fullres)"]


@pytest.fixture
def trained(tmp_path, monkeypatch) -> Path:
    """nnUNet_results with fold 0 of a finished training of Dataset950 (and a fold 1 without checkpoint)."""
    results = tmp_path / "results"
    model = results / "Dataset950_Trained" / "nnUNetTrainerSynth20__nnUNetPlans__3d_fullres"
    _checkpoint(model / "fold_0" / "checkpoint_final.pth")
    (model / "fold_1").mkdir()
    monkeypatch.setenv("nnUNet_results", str(results))
    return model


def _export(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from nnunet_synth.cli import export_entry

    monkeypatch.setattr(sys, "argv", ["nnUNetv2_synth_export", "-d", "950", "-tr", "nnUNetTrainerSynth20", *args])
    try:
        export_entry()
    except SystemExit as exit_info:
        return exit_info.code, _one_line_error(capsys, "nnUNetv2_synth_export")
    return 0, capsys.readouterr().out


def test_export_refuses_to_overwrite_and_reports_in_one_line(trained, tmp_path, monkeypatch, capsys, unwritable):
    archive = tmp_path / "important.zip"
    archive.write_bytes(b"an unrelated file")
    code, line = _export(monkeypatch, capsys, "-o", str(archive))
    assert code == 2 and f"{archive} exists; pass --overwrite" in line
    assert archive.read_bytes() == b"an unrelated file"
    assert _export(monkeypatch, capsys, "-o", str(archive), "--overwrite")[0] == 0
    assert archive.read_bytes()[:2] == b"PK"
    tree = tmp_path / "tree"
    assert _export(monkeypatch, capsys, "-o", str(tree))[0] == 0
    code, line = _export(monkeypatch, capsys, "-o", str(tree))  # the model is in that tree already
    assert code == 2 and "exists; pass --overwrite" in line
    assert _export(monkeypatch, capsys, "-o", str(tree), "--overwrite")[0] == 0
    code, line = _export(monkeypatch, capsys, "-o", str(tmp_path / "x"), "-f", "1")
    assert code == 2 and "has no checkpoint_final.pth for ['fold_1']" in line
    (trained / "fold_0" / "checkpoint_best.pth").write_bytes(b"garbage")
    code, line = _export(monkeypatch, capsys, "-o", str(tmp_path / "y"))
    assert code == 2 and "cannot read checkpoint" in line and "checkpoint_best.pth" in line
    (trained / "fold_0" / "checkpoint_best.pth").unlink()
    code, line = _export(monkeypatch, capsys, "-o", str(unwritable))
    assert code == 2 and str(unwritable.parent) in line
    code, line = _export(monkeypatch, capsys, "-o", str(tmp_path / "z"), "-c", "2d")
    assert code == 2 and "no trained model in" in line
    monkeypatch.delenv("nnUNet_results")
    code, line = _export(monkeypatch, capsys, "-o", str(tmp_path / "z"))
    assert code == 2 and "nnUNet_results" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


# --- 6. the phantom command and other datasets ---------------------------------------------------------------------

def test_phantom_overwrites_only_itself_and_uses_the_umask(tmp_path, monkeypatch, capsys):
    from nnunet_synth.cli import phantom_entry

    for name in ("raw", "preprocessed", "results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    other = tmp_path / "raw" / "Dataset910_Generic"
    other.mkdir()
    (other / "dataset.json").write_text("{}", encoding="utf-8")
    (tmp_path / "results" / "Dataset911_Trained").mkdir()

    def phantom(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["nnUNetv2_synth_phantom", "--num-train", "1", "--num-test", "0", *args])
        try:
            phantom_entry()
        except SystemExit as exit_info:
            return exit_info.code, _one_line_error(capsys, "nnUNetv2_synth_phantom")
        return 0, ""

    for dataset_id, clash in (("910", other), ("911", tmp_path / "results" / "Dataset911_Trained")):
        code, line = phantom("-d", dataset_id, "--overwrite")
        assert code == 2 and f"dataset ID {dataset_id} is already used by {clash}" in line
    assert (other / "dataset.json").read_text(encoding="utf-8") == "{}"
    old = os.umask(0o027)
    try:
        assert phantom("-d", "912")[0] == 0
        assert phantom("-d", "912")[0] == 2
        assert phantom("-d", "912", "--overwrite")[0] == 0
    finally:
        os.umask(old)
    folder = tmp_path / "raw" / "Dataset912_PhantomCT"
    assert oct(folder.stat().st_mode & 0o777) == oct(0o750) and oct((folder / "imagesTr").stat().st_mode & 0o777) \
        == oct(0o750)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset910_Generic", "Dataset912_PhantomCT"]


# --- 7. the commands on unknown datasets and configurations, unset variables, unwritable outputs -------------------

@pytest.mark.parametrize("command,args,unset,message", [
    ("plan", ["-d", "{dataset}", "-c", "2d"], None, "nnUNetPlans_2d does not exist"),
    ("plan", ["-d", "999"], None, "Could not find a dataset with the ID 999"),
    ("plan", ["-d", "{dataset}"], "nnUNet_preprocessed", "nnUNet_preprocessed is not defined"),
    ("generate", ["-d", "{dataset}", "-g", "analytic", "-n", "1", "-c", "2d"], None, "nnUNetPlans_2d does not exist"),
    ("masks", ["-d", "{dataset}", "-n", "1", "-o", "{unwritable}"], None, "{unwritable_parent}"),
    ("evaluate", ["-ref", "{labels}", "-pred", "{labels}", "-l", "2", "-o", "{unwritable}"], None,
     "{unwritable_parent}"),
])
def test_command_errors_are_one_line_with_exit_status_2(phantom_ct, monkeypatch, capsys, unwritable, command, args,
                                                        unset, message):
    from nnunet_synth.bank import main as generate_main
    from nnunet_synth.cli import masks_entry, plan_entry

    entries = {"plan": (plan_entry, "nnUNetv2_synth_plan"), "generate": (generate_main, "nnUNetv2_synth_generate"),
               "masks": (masks_entry, "nnUNetv2_synth_masks"), "evaluate": (evaluate_entry, "nnUNetv2_synth_evaluate")}
    labels = next(Path(os.environ["nnUNet_raw"]).glob(f"Dataset{phantom_ct}_*")) / "labelsTs"
    values = {"dataset": str(phantom_ct), "unwritable": str(unwritable), "unwritable_parent": str(unwritable.parent),
              "labels": str(labels)}
    if unset:
        monkeypatch.delenv(unset)
    entry, prog = entries[command]
    with pytest.raises(SystemExit) as exit_info:
        entry([a.format(**values) for a in args])
    assert exit_info.value.code == 2
    assert message.format(**values) in _one_line_error(capsys, prog)


# --- 4, 8. banks: killed, incomplete, mixed; leftovers of killed generations ---------------------------------------

BANK_FOLD = 4  # a fold no other test makes an analytic bank of


class _AnalyticBankTrainer(nnUNetTrainerSynthBank):
    """A bank trainer on the analytic bank (cheap to make; the checks are the same for every backend)."""

    synth_backend = "analytic"


def _bank_trainer(dataset: int, monkeypatch):
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_synth.planning import preprocessed_dir

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    base = preprocessed_dir(dataset)
    plans = load_json(base / "nnUNetPlans.json")
    plans["continue_training"] = False
    trainer = _AnalyticBankTrainer(plans, "3d_fullres", BANK_FOLD, load_json(base / "dataset.json"),
                                   torch.device("cpu"))
    trainer.initialize()
    return trainer


@pytest.fixture
def bank_fold(phantom_ct):
    """The analytic bank folder of phantom_ct, without cases or manifest of BANK_FOLD before and after the test;
    the synth plan as it was afterwards."""
    from nnunet_synth.bank import MANIFEST_DIR
    from nnunet_synth.generators.paths import bank_dir
    from nnunet_synth.planning import load_synth_plan, preprocessed_dir

    load_synth_plan(phantom_ct, "3d_fullres")
    plan_file = preprocessed_dir(phantom_ct) / "nnUNetSynthPlans.json"
    saved = plan_file.read_text(encoding="utf-8")
    folder = bank_dir(phantom_ct, "analytic", "3d_fullres")

    def clean() -> None:
        for path in folder.glob(f"*__synth_f{BANK_FOLD}_*"):
            path.unlink()
        (folder / MANIFEST_DIR / f"fold_{BANK_FOLD}.json").unlink(missing_ok=True)

    clean()
    yield folder
    clean()
    plan_file.write_text(saved, encoding="utf-8")


def _edit_plan(dataset: int, change) -> None:
    from nnunet_synth.planning import preprocessed_dir

    path = preprocessed_dir(dataset) / "nnUNetSynthPlans.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    change(raw)
    path.write_text(json.dumps(raw), encoding="utf-8")


def test_a_killed_bank_is_refused_unless_the_plan_allows_a_partial_one(phantom_ct, bank_fold, monkeypatch):
    from nnunet_synth.bank import BankError, bank_identifiers

    generation = subprocess.Popen(["nnUNetv2_synth_generate", "-d", str(phantom_ct), "-g", "analytic", "-n", "1000",
                                   "-f", str(BANK_FOLD)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):  # killed once a few cases are written (start-up takes seconds)
            if len(bank_identifiers(bank_fold, BANK_FOLD)) >= 3 or generation.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        generation.kill()
        generation.wait()
    found = len(bank_identifiers(bank_fold, BANK_FOLD))
    assert 3 <= found < 1000
    trainer = _bank_trainer(phantom_ct, monkeypatch)
    with pytest.raises(BankError, match=rf"holds {found} of the 1000 cases requested for fold {BANK_FOLD} .*parts "
                                        rf"not finished: 0/1.*"
                                        rf"complete it with: nnUNetv2_synth_generate -d Dataset901_PhantomCT -g "
                                        rf"analytic -c 3d_fullres -f {BANK_FOLD} -n 1000 --seed \d+"):
        trainer.get_tr_and_val_datasets()
    _edit_plan(phantom_ct, lambda raw: raw.update(allow_partial_bank=True))
    trainer = _bank_trainer(phantom_ct, monkeypatch)
    trainer.get_tr_and_val_datasets()
    log = Path(trainer.log_file).read_text(encoding="utf-8")
    assert f"holds {found} of the 1000 cases" in log and "allow_partial_bank is set" in log


def test_parts_complete_a_bank_and_leftovers_of_dead_generations_go(phantom_ct, bank_fold, monkeypatch):
    from nnunet_synth.bank import TMP_DIR, BankError, generate_bank

    dead = bank_fold / TMP_DIR / f"case__synth_f{BANK_FOLD}_00007.pid{_dead_pid()}@{os.uname().nodename}"
    alive = bank_fold / TMP_DIR / f"case__synth_f{BANK_FOLD}_00008{process_tag()}"  # another part, writing now
    dead.mkdir(parents=True)
    alive.mkdir()
    assert len(generate_bank(phantom_ct, "analytic", 3, fold=BANK_FOLD, num_parts=2, part=1, progress=False)) == 1
    assert not dead.exists() and alive.exists()
    alive.rmdir()
    with pytest.raises(BankError, match=rf"holds 1 of the 3 cases requested for fold {BANK_FOLD}"):
        _bank_trainer(phantom_ct, monkeypatch).get_tr_and_val_datasets()
    assert len(generate_bank(phantom_ct, "analytic", 3, fold=BANK_FOLD, num_parts=2, part=0, progress=False)) == 2
    manifest = json.loads((bank_fold / "manifest" / f"fold_{BANK_FOLD}.json").read_text(encoding="utf-8"))
    assert set(manifest["parts"]) == {"0/2", "1/2"} and all(p["finished"] and p["num_cases"] == 3 for p in
                                                           manifest["parts"].values())
    assert manifest["parts"]["0/2"]["settings_digest"] == manifest["parts"]["1/2"]["settings_digest"]
    assert manifest["settings"]["channels"] and manifest["settings"]["shapes"]
    train_loader, _ = _bank_trainer(phantom_ct, monkeypatch).get_dataloaders()  # nnU-Net's loaders on the bank
    assert len(next(train_loader)["keys"]) > 0


def test_a_bank_is_extended_and_trained_on_only_with_its_settings(phantom_ct, bank_fold, monkeypatch):
    from nnunet_synth.bank import BankError, generate_bank

    assert len(generate_bank(phantom_ct, "analytic", 2, fold=BANK_FOLD, progress=False)) == 2

    def stronger_contrast(raw: dict) -> None:
        raw["configurations"]["3d_fullres"]["intensity"]["channels"][0]["contrast_range"] = [-3.0, -2.5]

    _edit_plan(phantom_ct, stronger_contrast)
    with pytest.raises(BankError, match="generated with other settings .synth-plan settings channels."):
        generate_bank(phantom_ct, "analytic", 3, fold=BANK_FOLD, progress=False)
    with pytest.raises(BankError, match=r"generated with other synth-plan settings channels than the synth plan has "
                                        r"now; delete the bank folder and make it again with: nnUNetv2_synth_generate"):
        _bank_trainer(phantom_ct, monkeypatch).get_tr_and_val_datasets()


# --- 5. one creator of the synth plan and the template bank --------------------------------------------------------

RACE_PLANS = "RacePlans"


def _race_builder(dataset: int, barrier, builds, results) -> None:
    """One process of several that start a Template training at once on a fresh plans identifier: each needs the
    synth plan and the template bank; ``builds`` counts how many processes created either."""
    try:
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        import nnunet_synth.generators.templates as templates
        import nnunet_synth.planning as planning
        from nnunet_synth.generators.splits import split_cases

        def counted(function, index):
            def wrapper(*args, **kwargs):
                with builds.get_lock():
                    builds[index] += 1
                return function(*args, **kwargs)
            return wrapper

        planning.plan_synth = counted(planning.plan_synth, 0)
        templates.build_template_bank = counted(templates.build_template_bank, 1)
        base = planning.preprocessed_dir(dataset)
        configuration = PlansManager(load_json(base / f"{RACE_PLANS}.json")).get_configuration("3d_fullres")
        train_cases, _, _ = split_cases(dataset, "3d_fullres", 0, RACE_PLANS)
        barrier.wait(timeout=120)
        plan = planning.load_synth_plan(dataset, "3d_fullres", RACE_PLANS)
        found, cases = templates.fold_templates(base, configuration, plan.replace(shapes={"deformation": "template"}),
                                                train_cases)
        results.put((plan.to_dict()["tumour_sizes"], len(found), cases))
    except BaseException as error:  # reported to the test, which names it
        results.put(f"{type(error).__name__}: {error}")


def test_builders_started_together_create_plan_and_template_bank_once(phantom_ct):
    import multiprocessing

    from nnunet_synth.generators.paths import template_file
    from nnunet_synth.planning import preprocessed_dir
    from nnunet_synth.synth_plan import synth_plan_file

    base = preprocessed_dir(phantom_ct)
    plans = json.loads((base / "nnUNetPlans.json").read_text(encoding="utf-8"))
    plans["plans_name"] = RACE_PLANS  # the same preprocessed cases under a plans identifier without plan or bank
    created = [base / f"{RACE_PLANS}.json", synth_plan_file(base, RACE_PLANS), template_file(base, "3d_fullres",
                                                                                            RACE_PLANS)]
    created += [p.with_name(f".{p.name}.lock") for p in created[1:]]
    created[0].write_text(json.dumps(plans), encoding="utf-8")
    try:
        context = multiprocessing.get_context("fork")  # as nnU-Net's folds and DDP ranks: separate processes
        n = 3
        barrier, builds, results = context.Barrier(n), context.Array("i", 2), context.Queue()
        workers = [context.Process(target=_race_builder, args=(phantom_ct, barrier, builds, results)) for _ in range(n)]
        for worker in workers:
            worker.start()
        outcomes = [results.get(timeout=300) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
        assert not [o for o in outcomes if isinstance(o, str)], outcomes
        assert list(builds) == [1, 1], "the synth plan and the template bank are each made by one process"
        assert all(o == outcomes[0] for o in outcomes) and outcomes[0][1] > 0
        assert not [p.name for p in base.iterdir() if ".tmp" in p.name], "a temporary file was left"
    finally:
        for path in created:
            path.unlink(missing_ok=True)
