"""Feature vectors of tumour patches from a trained nnU-Net's encoder (the liver-MRI paper's latent space).

The model is loaded the way nnU-Net predicts (``nnUNetPredictor.initialize_from_trained_model_folder``), so any
trained model folder works. A patch of the model's patch size centred on a tumour goes through
``network.encoder``; the deepest stage's output is average-pooled two ways:

* ``global``: over the whole feature map (the patch's latent representation, as in the paper);
* ``lesion``: over the feature-map positions whose receptive-field cell holds a tumour voxel (the tumour mask
  max-pooled to the feature map's grid), so context shared by real and synthetic patches weighs less.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_synth.ext_path import synth_trainers_discoverable

POOLINGS = ("global", "lesion")


class EncoderError(ValueError):
    """A model folder that cannot serve as feature extractor for this dataset; the message says why."""


class EncoderEmbedder:
    """A trained nnU-Net's encoder as a feature extractor for tumour patches.

    Args:
        model_folder: the training output folder (``nnUNet_results/DatasetNNN/Trainer__Plans__Config``).
        fold: the fold whose checkpoint is loaded (int or ``"all"``).
        checkpoint_name: checkpoint file in ``fold_X``.
        device: torch device; default CUDA when available, else CPU.

    Raises:
        EncoderError: for a missing folder, fold or checkpoint, a trainer nnU-Net cannot find, or a network
            without an ``encoder``.
    """

    def __init__(self, model_folder: str | os.PathLike, fold: int | str, checkpoint_name: str = "checkpoint_final.pth",
                 device: torch.device | str | None = None):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        folder = Path(model_folder)
        fold = fold if fold == "all" else int(fold)
        for required in (folder / "plans.json", folder / "dataset.json", folder / f"fold_{fold}" / checkpoint_name):
            if not required.is_file():
                raise EncoderError(f"{required} not found: -m must be a trained nnU-Net model folder (the one holding "
                                   f"plans.json and fold_X/) with {checkpoint_name} for fold {fold}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        predictor = nnUNetPredictor(device=self.device, perform_everything_on_device=self.device.type == "cuda",
                                    verbose=False, allow_tqdm=False)
        try:
            with synth_trainers_discoverable():
                predictor.initialize_from_trained_model_folder(str(folder), use_folds=(fold,),
                                                               checkpoint_name=checkpoint_name)
        except RuntimeError as e:  # nnU-Net's "Could not find requested nnunet trainer ..." among others
            raise EncoderError(f"cannot load the model in {folder} (fold {fold}): {e}") from e
        network = predictor.network
        if not hasattr(network, "encoder"):
            raise EncoderError(f"the network of {folder} ({type(network).__name__}) has no .encoder to take features "
                               f"from")
        self.folder = folder
        self.fold = fold
        self.network = network.to(self.device).eval()
        self.patch_size = tuple(int(p) for p in predictor.configuration_manager.patch_size)
        self.data_identifier = predictor.configuration_manager.data_identifier
        self.dataset_name = predictor.plans_manager.dataset_name
        self.trainer_name = predictor.trainer_name
        self.num_input_channels = len(predictor.dataset_json["channel_names"])

    @torch.inference_mode()
    def embed(self, image: np.ndarray, lesion: np.ndarray) -> dict[str, np.ndarray]:
        """Pooled deepest-stage features of one patch.

        Args:
            image: (C, *patch_size) normalised patch.
            lesion: (*patch_size) bool tumour mask.

        Returns:
            One float32 vector per pooling of :data:`POOLINGS`.
        """
        if tuple(image.shape[1:]) != self.patch_size or lesion.shape != image.shape[1:]:
            raise ValueError(f"patch {image.shape} / mask {lesion.shape} do not match the model's patch size "
                             f"{self.patch_size}")
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(self.device)
        out = self.network.encoder(x)
        deepest = out[-1] if isinstance(out, (list, tuple)) else out
        spatial = tuple(range(2, deepest.ndim))
        pool = F.adaptive_max_pool3d if deepest.ndim == 5 else F.adaptive_max_pool2d
        mask = torch.from_numpy(lesion.astype(np.float32))[None, None].to(self.device)
        weights = pool(mask, deepest.shape[2:])
        lesion_pooled = (deepest * weights).sum(spatial) / weights.sum(spatial).clamp_min(1.0)
        return {"global": deepest.mean(spatial)[0].float().cpu().numpy(),
                "lesion": lesion_pooled[0].float().cpu().numpy()}
