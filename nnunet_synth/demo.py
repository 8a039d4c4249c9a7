"""The phantom demo: phantom -> nnU-Net plan/preprocess -> synth plan -> Synth training -> prediction on
held-out phantoms -> Dice -> preview PNGs, with nnU-Net's real commands, in a folder of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_synth.ext_path import EXT_TRAINER_DIR
from nnunet_synth.phantom import PhantomConfig, write_phantom_dataset

DEMO_DATASET_ID = 990
# small enough for a CPU training of a few minutes: nnU-Net plans its patch as the whole 24x48x48 image
DEMO_PHANTOM = PhantomConfig(shape=(24, 48, 48), spacing=(3.0, 1.5, 1.5), tumour_radii_mm=(7.0, 9.0, 12.0))


def demo_environment(root: Path) -> dict[str, str]:
    """Environment for nnU-Net commands run by the demo: its own nnU-Net folders and our trainers."""
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "nnUNet_raw"), nnUNet_preprocessed=str(root / "nnUNet_preprocessed"),
               nnUNet_results=str(root / "nnUNet_results"))
    ext = env.get("nnUNet_extTrainer")
    env["nnUNet_extTrainer"] = str(EXT_TRAINER_DIR) if not ext else f"{ext}{os.pathsep}{EXT_TRAINER_DIR}"
    return env


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (NaN when both are empty, as in nnU-Net's evaluation)."""
    denominator = a.sum() + b.sum()
    return float(2 * (a & b).sum() / denominator) if denominator else float("nan")


def score_predictions(labels_dir: Path, predictions_dir: Path, labels: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per-case Dice of each foreground label."""
    scores = {}
    for ref in sorted(labels_dir.glob("*.nii.gz")):
        pred_file = predictions_dir / ref.name
        if not pred_file.is_file():
            raise FileNotFoundError(f"prediction {pred_file} is missing for reference {ref}")
        r = sitk.GetArrayFromImage(sitk.ReadImage(str(ref)))
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_file)))
        scores[ref.name.removesuffix(".nii.gz")] = {name: dice(r == v, p == v) for name, v in labels.items() if v}
    return scores


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


class EpochProgress:
    """Turns nnU-Net's ``Epoch N`` log lines into ``epoch N+1/M, <elapsed> elapsed, about <remaining> left``.

    M comes from the trainer's logged schedule (:func:`nnunet_synth.trainers.schedules.set_schedule`); the
    remaining time is the mean epoch time so far times the epochs still to run (the final validation after the
    last epoch is not included).
    """

    EPOCH = re.compile(r": Epoch (\d+)\s*$")

    def __init__(self, start: float | None = None):
        from nnunet_synth.trainers.schedules import SCHEDULE_LOG

        self.schedule = re.compile(re.escape(SCHEDULE_LOG.split("{}")[0]) + r"(\d+) epochs")
        self.start = time.time() if start is None else start
        self.total: int | None = None
        self.first: tuple[int, float] | None = None  # (epoch, time) of the first epoch seen

    def __call__(self, line: str, now: float | None = None) -> str | None:
        """The progress line for a log line that starts an epoch, else None."""
        if match := self.schedule.search(line):
            self.total = int(match[1])
        match = self.EPOCH.search(line)
        if match is None:
            return None
        now, epoch = time.time() if now is None else now, int(match[1])
        if self.first is None:
            self.first = (epoch, now)
        text = f"epoch {epoch + 1}/{self.total if self.total else '?'}, {_duration(now - self.start)} elapsed"
        done = epoch - self.first[0]
        if self.total and done > 0:
            text += f", about {_duration((now - self.first[1]) / done * (self.total - epoch))} left"
        return text


def _run(step: str, command: list[str], env: dict[str, str], log: Path,
         progress: Callable[[str], str | None] | None = None) -> None:
    print(f"\n=== {step}\n$ {' '.join(command)}  (full output: {log})", flush=True)
    start = time.time()
    with open(log, "w", encoding="utf-8") as f:
        # nnU-Net's progress bars are UTF-8 whatever the locale says
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   encoding="utf-8", errors="replace")
        for line in process.stdout:
            f.write(line)
            shown = progress(line) if progress is not None else None
            if shown is not None:
                print("   " + shown, flush=True)
            # show nnU-Net's own progress (epochs, Dice, case counts), not its configuration dumps
            elif any(key in line for key in ("Epoch ", "train_loss", "Pseudo dice", "synthetic tumours",
                                             "Mean Valid", "Preprocessing", "Predicting", "Error", "error")) \
                    and len(line) < 300:
                print("   " + line.rstrip(), flush=True)
        if process.wait():
            raise RuntimeError(f"{step} failed (exit code {process.returncode}); see {log}")
    print(f"    done in {time.time() - start:.0f} s", flush=True)


def run_demo(output_dir: str | os.PathLike = "nnunet_synth_demo", trainer: str = "nnUNetTrainerSynth20_Demo",
             num_train: int = 10, num_test: int = 3, modality: str = "CT", num_previews: int = 4) -> dict:
    """Runs the whole demo; returns the per-case Dice scores.

    Args:
        output_dir: folder for the demo's nnU-Net folders, predictions and previews.
        trainer: the Synth trainer to train with.
        num_train: phantom training cases.
        num_test: held-out phantom cases to predict and score.
        modality: 'CT' or 'MRI' phantom.
        num_previews: preview PNGs to write.
    """
    if num_train < 5 or num_test < 1:
        raise ValueError(f"the demo needs at least 5 training cases (nnU-Net's 5-fold split) and 1 test case, "
                         f"got {num_train} and {num_test}")
    root = Path(output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = demo_environment(root)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    start = time.time()
    if hasattr(sys.stdout, "reconfigure"):  # echoed progress lines must not fail on an ASCII-only terminal
        sys.stdout.reconfigure(errors="replace")
    print(f"nnunet_synth demo in {root}", flush=True)

    print("\n=== 1/6 phantom dataset", flush=True)
    raw = write_phantom_dataset(DEMO_DATASET_ID, num_train, num_test, modality, raw_dir=env["nnUNet_raw"],
                                overwrite=True, config=DEMO_PHANTOM)
    did = str(DEMO_DATASET_ID)
    _run("2/6 nnU-Net planning and preprocessing",
         ["nnUNetv2_plan_and_preprocess", "-d", did, "-c", "3d_fullres", "-np", "2", "-npfp", "2",
          "--verify_dataset_integrity"],
         env, logs / "plan_and_preprocess.log")
    _run("3/6 synth plan", ["nnUNetv2_synth_plan", "-d", did, "-c", "3d_fullres"], env, logs / "synth_plan.log")
    print((logs / "synth_plan.log").read_text(encoding="utf-8"), flush=True)
    # one loader worker (the second core trains); one worker for the final validation's export
    train_env = dict(env, nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1")
    _run(f"4/6 training {trainer}", ["nnUNetv2_train", did, "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
         train_env, logs / "train.log", EpochProgress())
    predictions = root / "predictions"
    _run("5/6 prediction on held-out phantoms",
         ["nnUNetv2_predict", "-d", did, "-c", "3d_fullres", "-f", "0", "-tr", trainer, "-i", str(raw / "imagesTs"),
          "-o", str(predictions), "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
         env, logs / "predict.log")
    labels = {"organ": 1, "tumour": 2}
    scores = score_predictions(raw / "labelsTs", predictions, labels)
    print("\nDice on held-out phantoms:")
    for case, s in scores.items():
        print(f"   {case}: " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()))
    means = {k: float(np.nanmean([s[k] for s in scores.values()])) for k in labels}
    print("   mean: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))

    print("\n=== 6/6 preview PNGs", flush=True)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    from nnunet_synth.preview import write_previews

    previews = write_previews(DEMO_DATASET_ID, "3d_fullres", num_previews, root / "previews")
    results = Path(env["nnUNet_results"]) / raw.name / f"{trainer}__nnUNetPlans__3d_fullres"
    print(f"\nFinished in {time.time() - start:.0f} s. Where everything went:\n"
          f"   raw phantom dataset:     {raw}\n"
          f"   preprocessed + plans:    {Path(env['nnUNet_preprocessed']) / raw.name} (nnUNetSynthPlans.json)\n"
          f"   trained model and logs:  {results}\n"
          f"   predictions:             {predictions}\n"
          f"   preview PNGs:            {previews[0].parent if previews else '-'}\n"
          f"   command logs:            {logs}", flush=True)
    return {"scores": scores, "mean": means, "previews": [str(p) for p in previews]}


if __name__ == "__main__":
    sys.exit(run_demo())
