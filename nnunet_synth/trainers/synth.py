"""``nnUNetTrainerSynth``: nnU-Net's trainer with synthetic tumours injected into its training loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_synth.generators.templates import fold_templates
from nnunet_synth.injection import (
    INSERTED,
    NOTHING_FITTED,
    OUTCOME_KEY,
    OutcomeDataLoader,
    SynthTumourTransform,
    new_counters,
)
from nnunet_synth.planning import format_plan, load_synth_plan, write_json_atomic
from nnunet_synth.synth_plan import SYNTH_PLANS_FILE, SynthPlan, SynthPlanError, synth_plan_file
from nnunet_synth.trainers.loaders import build_dataloaders
from nnunet_synth.trainers.schedules import apply_schedule_override


class nnUNetTrainerSynth(nnUNetTrainer):
    """nnU-Net training where each training sample carries a synthetic tumour with probability
    ``synth_probability``, made by the generator backend ``synth_backend`` (default: analytic).

    Validation data, transforms and metrics are nnU-Net's own: only the training transforms change.
    """

    synth_probability: float = 0.2
    synth_backend: str = "analytic"
    # overrides of the plan's "shapes" (size_class, deformation, size_preset) that a named variant fixes
    synth_shapes: dict = {}
    # backend_params of the plan that a named variant fixes (e.g. the analytic backend's paper texture)
    synth_backend_params: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule_override(self)
        self.synth_plan: SynthPlan | None = None
        self.synth_counters = new_counters()  # every sample the loader workers made, prefetched ones included
        self._synth_consumed = {"seen": 0, "synthetic": 0, "skipped": 0}  # samples the training steps used
        self.synth_transform: SynthTumourTransform | None = None
        self.synth_template_cases: list[str] = []

    def initialize(self) -> None:
        if not self.was_initialized:
            # before the network, the loaders and the first epoch: an invalid plan stops here (SynthPlanError)
            self.synth_plan = self.load_synth_plan()
        super().initialize()

    def load_synth_plan(self) -> SynthPlan:
        """The dataset's synth plan for this configuration (created with defaults if absent) with this trainer's
        backend, shapes and per-fold seed, validated against the dataset, logged and copied into the output
        folder so the training records what it used.

        Raises:
            SynthPlanError: a plan, or this trainer's overrides of it, that does not fit the dataset.
        """
        plans_name = self.plans_manager.plans_name
        plan = load_synth_plan(self.plans_manager.dataset_name, self.configuration_name, plans_name, fold=self.fold)
        if plan.statistics_fold is not None and plan.statistics_fold != self.fold:
            raise SynthPlanError(f"the synth plan of {self.plans_manager.dataset_name} measured the hidden tumours of "
                                 f"fold {plan.statistics_fold}'s training cases, which may hold fold {self.fold}'s "
                                 f"validation cases; run nnUNetv2_synth_plan -d {self.plans_manager.dataset_name} "
                                 f"-c {self.configuration_name} -p {plans_name} -f {self.fold} first")
        if plan.backend != self.synth_backend:
            self.print_to_log_file(f"synth plan names backend {plan.backend!r}; {self.__class__.__name__} "
                                   f"uses {self.synth_backend!r}")
        fold_seed = int(plan.seed) + 1000 * (self.fold if isinstance(self.fold, int) else 0)
        plan = plan.replace(backend=self.synth_backend, shapes=dict(self.synth_shapes), seed=fold_seed,
                            backend_params={**plan.backend_params, **self.synth_backend_params})
        source = (f"{synth_plan_file(self.preprocessed_dataset_folder_base, plans_name)} with the settings of "
                  f"{self.__class__.__name__} (backend {self.synth_backend!r}, shapes {self.synth_shapes})")
        plan = plan.validated(source, self.dataset_json)
        if self.local_rank == 0:
            write_json_atomic(plan.to_dict(), Path(self.output_folder) / SYNTH_PLANS_FILE)
        self.print_to_log_file(f"synthetic tumours: probability {self.synth_probability} per training sample, "
                               f"backend {self.synth_backend}\n" + format_plan(plan))
        return plan

    def get_training_transforms(self, patch_size, *args, **kwargs) -> ComposeTransforms:
        # nnU-Net declares this a staticmethod; overriding it as a method gives the transform our plan.
        transforms = super().get_training_transforms(patch_size, *args, **kwargs)
        assert isinstance(transforms, ComposeTransforms), type(transforms)
        self.synth_transform = SynthTumourTransform(self.synth_plan, self.synth_probability, patch_size,
                                                    self.synth_plan.seed, self.synth_counters,
                                                    self.training_fold_templates())
        transforms.transforms.insert(0, self.synth_transform)
        return transforms

    def training_fold_templates(self) -> list | None:
        """Real tumour masks of the training fold's cases, where the plan asks for template shapes."""
        if self.synth_plan.shapes.deformation != "template":
            return None
        train_cases, _ = self.do_split()
        templates, self.synth_template_cases = fold_templates(Path(self.preprocessed_dataset_folder_base),
                                                              self.configuration_manager, self.synth_plan,
                                                              train_cases)
        self.print_to_log_file(f"template bank: {len(templates)} real tumour masks from "
                               f"{len(self.synth_template_cases)} training-fold cases")
        return templates

    def get_dataloaders(self):
        # nnU-Net's loaders, the training loader's batches carrying what the synth transform did to each sample
        loaders = build_dataloaders(self, OutcomeDataLoader)
        synth = self.synth_transform
        if synth is not None and synth.healthy:
            healthy_p, other_p = synth.case_probabilities()
            self.print_to_log_file(f"healthy controls first: {len(synth.healthy)} training cases "
                                   f"({synth.healthy_share:.0%} of drawn samples) get a synthetic tumour with "
                                   f"probability {healthy_p:.2f}, the others with {other_p:.2f} (overall "
                                   f"{float(synth.probability[0]):.0%})")
        return loaders

    def train_step(self, batch: dict) -> dict:
        outcomes = batch.get(OUTCOME_KEY)
        if outcomes is not None:
            counts = torch.bincount(torch.as_tensor(outcomes).flatten(), minlength=3)
            self._synth_consumed["seen"] += int(counts.sum())
            self._synth_consumed["synthetic"] += int(counts[INSERTED])
            self._synth_consumed["skipped"] += int(counts[NOTHING_FITTED])
        return super().train_step(batch)

    def on_epoch_end(self) -> None:
        # the samples this epoch's training steps consumed (not those the workers prefetched at start or resume)
        delta, self._synth_consumed = self._synth_consumed, {"seen": 0, "synthetic": 0, "skipped": 0}
        rate = delta["synthetic"] / max(1, delta["seen"])
        self.print_to_log_file(f"synthetic tumours this epoch: {delta['synthetic']}/{delta['seen']} samples "
                               f"({rate:.1%}; target {self.synth_probability:.0%}), {delta['skipped']} skipped "
                               f"(no lesion fitted the placement region)")
        if self.local_rank == 0:
            self._append_synth_stats(dict(epoch=self.current_epoch, rate=rate, **delta))
        super().on_epoch_end()

    def _append_synth_stats(self, entry: dict) -> None:
        # one entry per epoch; a resumed training overwrites the epochs it repeats
        path = Path(self.output_folder) / "synth_stats.json"
        stats = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        stats = [s for s in stats if s["epoch"] < entry["epoch"]] + [entry]
        write_json_atomic(stats, path)
