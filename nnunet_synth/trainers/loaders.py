"""nnU-Net's data loaders as the trainers of this package build them.

:func:`build_dataloaders` is ``nnUNetTrainer.get_dataloaders`` of nnU-Net 2.8.1 with two openings: the training
loader's class (the Synth trainers' :class:`~nnunet_synth.injection.OutcomeDataLoader`) and its
``sampling_probabilities`` (the bank trainers'); nnU-Net hard-codes ``nnUNetDataLoader`` and None there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class


def build_dataloaders(trainer, loader_class: type[nnUNetDataLoader] = nnUNetDataLoader,
                      sampling_probabilities: np.ndarray | Callable[[], np.ndarray | None] | None = None):
    """The (training, validation) augmenters of ``trainer``, as ``nnUNetTrainer.get_dataloaders`` makes them.

    Args:
        trainer: an initialised nnU-Net trainer.
        loader_class: the training loader's class (validation keeps nnU-Net's).
        sampling_probabilities: per training identifier, or a callable returning them once the trainer's datasets
            are made (``get_tr_and_val_datasets`` may compute them); None: uniform, as nnU-Net.
    """
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    if trainer.dataset_class is None:
        trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    patch_size = trainer.configuration_manager.patch_size
    deep_supervision_scales = trainer._get_deep_supervision_scales()  # noqa: SLF001 - nnU-Net's own helper
    rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    lm = trainer.label_manager
    tr_transforms = trainer.get_training_transforms(
        patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
        use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=trainer.is_cascaded,
        foreground_labels=lm.foreground_labels, regions=lm.foreground_regions if lm.has_regions else None,
        ignore_label=lm.ignore_label)
    val_transforms = trainer.get_validation_transforms(
        deep_supervision_scales, is_cascaded=trainer.is_cascaded, foreground_labels=lm.foreground_labels,
        regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    if callable(sampling_probabilities):
        sampling_probabilities = sampling_probabilities()
    dl_tr = loader_class(dataset_tr, trainer.batch_size, initial_patch_size, patch_size, lm,
                         oversample_foreground_percent=trainer.oversample_foreground_percent,
                         sampling_probabilities=sampling_probabilities, pad_sides=None, transforms=tr_transforms,
                         probabilistic_oversampling=trainer.probabilistic_oversampling)
    dl_val = nnUNetDataLoader(dataset_val, trainer.batch_size, patch_size, patch_size, lm,
                              oversample_foreground_percent=trainer.oversample_foreground_percent,
                              sampling_probabilities=None, pad_sides=None, transforms=val_transforms,
                              probabilistic_oversampling=trainer.probabilistic_oversampling)
    allowed_num_processes = get_allowed_n_proc_DA()
    if allowed_num_processes == 0:
        mt_gen_train = SingleThreadedAugmenter(dl_tr, None)
        mt_gen_val = SingleThreadedAugmenter(dl_val, None)
    else:
        pin = trainer.device.type == "cuda"
        mt_gen_train = NonDetMultiThreadedAugmenter(data_loader=dl_tr, transform=None,
                                                    num_processes=allowed_num_processes,
                                                    num_cached=max(6, allowed_num_processes // 2), seeds=None,
                                                    pin_memory=pin, wait_time=0.002)
        mt_gen_val = NonDetMultiThreadedAugmenter(data_loader=dl_val, transform=None,
                                                  num_processes=max(1, allowed_num_processes // 2),
                                                  num_cached=max(3, allowed_num_processes // 4), seeds=None,
                                                  pin_memory=pin, wait_time=0.002)
    _ = next(mt_gen_train)
    _ = next(mt_gen_val)
    return mt_gen_train, mt_gen_val
