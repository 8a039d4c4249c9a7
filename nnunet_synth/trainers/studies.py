"""Named trainers for the papers' experiments. Names are permanent: nnU-Net writes them into results folders.

Size study (pancreas paper, Peng et al.): synthetic tumours of one size class at a 20% ratio.
Boundary study (liver-MRI paper, Quinton et al.): elastic vs simplex deformed masks; template masks (SynBT).
Two-stage schedule (breast 2D paper, Luna et al.): synthetic mixing first, real data only at the end.
Label-noise study (pancreas paper, Table 3): real images, tumour labels deformed at four levels.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_synth.label_noise import LABEL_NOISE_MM, NoisyTumourLabelTransform
from nnunet_synth.planning import load_synth_plan
from nnunet_synth.synth_plan import SynthPlan
from nnunet_synth.trainers.ratios import nnUNetTrainerSynth20
from nnunet_synth.trainers.schedules import apply_schedule_override


class nnUNetTrainerSynth20Tiny(nnUNetTrainerSynth20):
    synth_shapes = {"size_class": "tiny"}


class nnUNetTrainerSynth20Small(nnUNetTrainerSynth20):
    synth_shapes = {"size_class": "small"}


class nnUNetTrainerSynth20Medium(nnUNetTrainerSynth20):
    synth_shapes = {"size_class": "medium"}


class nnUNetTrainerSynth20Large(nnUNetTrainerSynth20):
    synth_shapes = {"size_class": "large"}


class nnUNetTrainerSynth20Mixed(nnUNetTrainerSynth20):
    synth_shapes = {"size_class": "mixed"}


class nnUNetTrainerSynth20Elastic(nnUNetTrainerSynth20):
    synth_shapes = {"deformation": "elastic"}


class nnUNetTrainerSynth20Simplex(nnUNetTrainerSynth20):
    synth_shapes = {"deformation": "simplex"}


class nnUNetTrainerSynth20Template(nnUNetTrainerSynth20):
    """Masks drawn from the training fold's real tumours (flipped, rotated, zoomed to the size class)."""

    synth_shapes = {"deformation": "template"}


class nnUNetTrainerSynth20RealFinetune(nnUNetTrainerSynth20):
    """Synthetic mixing for the first 80% of epochs, then real data only (the breast 2D paper's schedule)."""

    real_finetune_fraction = 0.2

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        first_real = round((1 - self.real_finetune_fraction) * self.num_epochs)
        probability = self.synth_transform.probability
        if self.current_epoch >= first_real and float(probability[0]) > 0:
            # shared memory: the loader's workers see it at their next sample (prefetched batches excepted)
            probability.fill_(0.0)
            self.print_to_log_file(f"real-only fine-tuning from epoch {self.current_epoch}: no more synthetic tumours")


class nnUNetTrainerNoisyLabels(nnUNetTrainer):
    """Real images with their tumour labels elastically deformed by ``label_noise_mm`` (mean displacement)."""

    label_noise_mm: float = LABEL_NOISE_MM["Moderate"]

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule_override(self)
        self.synth_plan: SynthPlan | None = None

    def initialize(self) -> None:
        if not self.was_initialized:
            # the validated plan (SynthPlanError before training starts): its labels, spacing and seed
            self.synth_plan = load_synth_plan(self.plans_manager.dataset_name, self.configuration_name,
                                              self.plans_manager.plans_name)
            self.print_to_log_file(f"label noise: tumour label {self.synth_plan.tumour_label} deformed by a mean "
                                   f"boundary displacement of {self.label_noise_mm} mm")
        super().initialize()

    def get_training_transforms(self, patch_size, *args, **kwargs):
        transforms = super().get_training_transforms(patch_size, *args, **kwargs)
        plan = self.synth_plan
        transforms.transforms.insert(0, NoisyTumourLabelTransform(
            plan.tumour_label, plan.organ_label or 0, self.label_noise_mm, tuple(plan.spacing),
            int(plan.seed) + 1000 * (self.fold if isinstance(self.fold, int) else 0),
            self.label_manager.ignore_label))
        return transforms


class nnUNetTrainerNoisyLabelsLow(nnUNetTrainerNoisyLabels):
    label_noise_mm = LABEL_NOISE_MM["Low"]


class nnUNetTrainerNoisyLabelsModerate(nnUNetTrainerNoisyLabels):
    label_noise_mm = LABEL_NOISE_MM["Moderate"]


class nnUNetTrainerNoisyLabelsHigh(nnUNetTrainerNoisyLabels):
    label_noise_mm = LABEL_NOISE_MM["High"]


class nnUNetTrainerNoisyLabelsExtreme(nnUNetTrainerNoisyLabels):
    label_noise_mm = LABEL_NOISE_MM["Extreme"]
