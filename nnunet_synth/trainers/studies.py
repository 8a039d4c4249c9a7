"""Named trainers for the papers' experiments. Names are permanent: nnU-Net writes them into results folders.

Size study (pancreas paper, Peng et al.): synthetic tumours of one size class at a 20% ratio; analytic texture
(``nnUNetTrainerSynth20Tiny``) or the paper's latent diffusion (``nnUNetTrainerSynth20TinyLDM``, mixing the bank of
``nnUNetv2_synth_generate -g ldm --size-class tiny``).
Boundary study (liver-MRI paper, Quinton et al.): elastic vs simplex deformed masks, analytic or with the paper's
DDPM (``nnUNetTrainerSynth20SimplexDDPM``: the bank of ``-g ddpm --deformation simplex``); template masks (SynBT).
Two-stage schedule (breast 2D paper, Luna et al.): synthetic mixing first, real data only at the end.
Label-noise study (pancreas paper, Table 3): real images, each case's tumour label deformed once at one of four
levels (``...Jitter``: redrawn every iteration).
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_synth.label_noise import LABEL_NOISE_MM, NoisyLabelDataset, NoisyTumourLabelTransform
from nnunet_synth.planning import load_synth_plan
from nnunet_synth.synth_plan import SynthPlan
from nnunet_synth.trainers.bank import nnUNetTrainerSynth20DDPM
from nnunet_synth.trainers.ldm import nnUNetTrainerSynth20LDM
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


# The same studies with the papers' generators: each mixes the bank made with its shape settings, in its own
# folder (nnUNetv2_synth_generate -g ldm --size-class tiny -> nnUNetSynthBank_ldm_<configuration>_tiny), at 20%.
class nnUNetTrainerSynth20TinyLDM(nnUNetTrainerSynth20LDM):
    synth_shapes = {"size_class": "tiny"}


class nnUNetTrainerSynth20SmallLDM(nnUNetTrainerSynth20LDM):
    synth_shapes = {"size_class": "small"}


class nnUNetTrainerSynth20MediumLDM(nnUNetTrainerSynth20LDM):
    synth_shapes = {"size_class": "medium"}


class nnUNetTrainerSynth20LargeLDM(nnUNetTrainerSynth20LDM):
    synth_shapes = {"size_class": "large"}


class nnUNetTrainerSynth20MixedLDM(nnUNetTrainerSynth20LDM):
    synth_shapes = {"size_class": "mixed"}


class nnUNetTrainerSynth20TemplateLDM(nnUNetTrainerSynth20LDM):
    """The LDM bank of template masks (SynBT's real-tumour masks): ``-g ldm --deformation template``."""

    synth_shapes = {"deformation": "template"}


class nnUNetTrainerSynth20ElasticDDPM(nnUNetTrainerSynth20DDPM):
    synth_shapes = {"deformation": "elastic"}


class nnUNetTrainerSynth20SimplexDDPM(nnUNetTrainerSynth20DDPM):
    synth_shapes = {"deformation": "simplex"}


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
    """Real images with their tumour labels elastically deformed by ``label_noise_mm`` (mean displacement).

    Each training case's label is corrupted once (seeded by the plan's seed, the case and the level) and kept for the
    whole training, as the paper degrades its training labels (:class:`~nnunet_synth.label_noise.NoisyLabelDataset`);
    the ``...Jitter`` variants redraw the deformation of every sample every iteration instead. Validation labels stay
    real.
    """

    label_noise_mm: float = LABEL_NOISE_MM["Moderate"]
    # False: one corrupted label per case (the paper); True: a new deformation per sample and iteration (jitter)
    label_noise_per_iteration: bool = False

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
            how = ("redrawn for every sample every iteration" if self.label_noise_per_iteration else
                   "drawn once per training case (seeded by case and level)")
            self.print_to_log_file(f"label noise: tumour label {self.synth_plan.tumour_label} deformed by a mean "
                                   f"boundary displacement of {self.label_noise_mm} mm, {how}")
        super().initialize()

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if not self.label_noise_per_iteration:
            plan = self.synth_plan
            # the plan's seed without the fold: a case carries the same corrupted label in every fold's training
            dataset_tr = NoisyLabelDataset(dataset_tr, plan.tumour_label, plan.organ_label or 0, self.label_noise_mm,
                                           tuple(plan.spacing), int(plan.seed), self.label_manager.ignore_label)
        return dataset_tr, dataset_val

    def get_training_transforms(self, patch_size, *args, **kwargs):
        transforms = super().get_training_transforms(patch_size, *args, **kwargs)
        if self.label_noise_per_iteration:
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


class nnUNetTrainerNoisyLabelsLowJitter(nnUNetTrainerNoisyLabelsLow):
    label_noise_per_iteration = True


class nnUNetTrainerNoisyLabelsModerateJitter(nnUNetTrainerNoisyLabelsModerate):
    label_noise_per_iteration = True


class nnUNetTrainerNoisyLabelsHighJitter(nnUNetTrainerNoisyLabelsHigh):
    label_noise_per_iteration = True


class nnUNetTrainerNoisyLabelsExtremeJitter(nnUNetTrainerNoisyLabelsExtreme):
    label_noise_per_iteration = True
