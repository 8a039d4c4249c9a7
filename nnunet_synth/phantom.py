"""The embedded default dataset: procedural abdomen-like phantoms with a body, an organ and tumours.

CT-like phantoms carry one channel in Hounsfield units (hypodense tumours); MRI-like ones two channels
(T1-like: tumour darker than the organ; T2-like: tumour brighter) in arbitrary units with a bias field.
``healthy=True`` makes organ-only cases that still declare the tumour label, the label-free setting.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from nnunet_synth.dataset_conversion.common import check_dataset_id_free, move_into_place, partial_folder
from nnunet_synth.generators.placement import PlacementRules, central_window, place_lesion
from nnunet_synth.generators.shapes import ellipsoid

LABELS = {"background": 0, "organ": 1, "tumour": 2}
# mean intensity per tissue and channel: background (air), body wall, organ, tumour
TISSUES = {
    "CT": {"channels": ["CT"], "air": [-1000.0], "body": [40.0], "organ": [90.0], "tumour": [20.0],
           "noise": [12.0]},
    "MRI": {"channels": ["T1", "T2"], "air": [0.0, 0.0], "body": [300.0, 180.0], "organ": [520.0, 240.0],
            "tumour": [330.0, 470.0], "noise": [25.0, 20.0]},
}


@dataclass(frozen=True)
class PhantomConfig:
    """Geometry of the phantom cases.

    Attributes:
        shape: voxels (z, y, x).
        spacing: mm (z, y, x).
        tumour_radii_mm: radii the tumours are drawn from (several sizes).
        tumours_per_case: inclusive range of tumours per case.
        tumour_texture_mm: scale of a smooth texture the tumours carry on top of the tissue noise (Gaussian-
            filtered noise of this standard deviation in mm); 0: none (homogeneous tumours).
        tumour_texture_sd: its standard deviation, in units of the tissue noise of each channel.
    """

    shape: tuple[int, int, int] = (32, 56, 56)
    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5)
    tumour_radii_mm: tuple[float, ...] = (4.0, 6.0, 9.0, 12.0)
    tumours_per_case: tuple[int, int] = (1, 3)
    tumour_texture_mm: float = 0.0
    tumour_texture_sd: float = 2.0


def make_case(rng: np.random.Generator, modality: str = "CT", healthy: bool = False,
              config: PhantomConfig = PhantomConfig()) -> tuple[np.ndarray, np.ndarray]:
    """One phantom case.

    Returns:
        image (C, z, y, x) float32 and segmentation (z, y, x) uint8 with labels of :data:`LABELS`.
    """
    tissue = TISSUES[modality]
    shape, sp = config.shape, np.asarray(config.spacing)
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, sp)], indexing="ij")
    half_fov = (np.array(shape) - 1) / 2 * sp
    body = (yy / (0.92 * half_fov[1])) ** 2 + (xx / (0.85 * half_fov[2])) ** 2 <= 1
    seg = np.zeros(shape, dtype=np.uint8)
    organ_radii = half_fov * rng.uniform([0.75, 0.40, 0.35], [0.95, 0.55, 0.5])
    organ = ellipsoid(organ_radii, config.spacing, rng, displacement_mm=0.12 * organ_radii.min(),
                      smoothing_mm=0.4 * organ_radii.min())
    start = (np.array(shape) - organ.shape) // 2 + rng.integers(-2, 3, size=3) * [0, 2, 2]
    _paste(seg, organ, start, LABELS["organ"])
    seg[~body] = 0
    if not healthy:
        n = rng.integers(config.tumours_per_case[0], config.tumours_per_case[1] + 1)
        for _ in range(n):
            radius = rng.choice(config.tumour_radii_mm)
            mask = ellipsoid(rng.uniform(0.8, 1.2, 3) * radius, config.spacing, rng, 0.15 * radius, 0.5 * radius)
            lesion = place_lesion(mask, seg == LABELS["organ"], seg == LABELS["organ"], seg == LABELS["tumour"],
                                  config.spacing, rng, PlacementRules(margin_mm=radius / 2, gap_mm=3.0),
                                  central_window(shape, None))
            if lesion is not None:
                seg[lesion.bbox][lesion.mask] = LABELS["tumour"]
    image = np.empty((len(tissue["channels"]), *shape), dtype=np.float32)
    bias = 1 + 0.15 * np.sin(yy / half_fov[1] * 1.3 + rng.uniform(0, 6)) if modality == "MRI" else 1
    for c in range(image.shape[0]):
        ch = np.full(shape, tissue["air"][c], dtype=np.float32)
        ch[body] = tissue["body"][c]
        ch[seg == LABELS["organ"]] = tissue["organ"][c]
        ch[seg == LABELS["tumour"]] = tissue["tumour"][c]
        if config.tumour_texture_mm > 0:  # a smooth texture inside the tumours, of known scale and strength
            smooth = gaussian_filter(rng.standard_normal(shape), config.tumour_texture_mm / sp)
            ch += (config.tumour_texture_sd * tissue["noise"][c] / smooth.std() * smooth
                   * (seg == LABELS["tumour"])).astype(np.float32)
        ch = gaussian_filter(ch, 0.7 / sp * sp.min())  # partial-volume edges
        texture = gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.0) * 2
        noise = rng.standard_normal(shape).astype(np.float32)
        image[c] = (ch + tissue["noise"][c] * (texture + noise)) * bias
    return image, seg


def _paste(target: np.ndarray, mask: np.ndarray, start: np.ndarray, value: int) -> None:
    src, dst = [], []
    for s, m, n in zip(start, mask.shape, target.shape):
        lo, hi = max(s, 0), min(s + m, n)
        dst.append(slice(lo, hi))
        src.append(slice(lo - s, hi - s))
    target[tuple(dst)][mask[tuple(src)]] = value


def _write(array: np.ndarray, spacing: tuple[float, ...], path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(image, str(path), useCompression=True)


def write_phantom_dataset(dataset_id: int, num_train: int = 8, num_test: int = 2, modality: str = "CT",
                          healthy: bool = False, seed: int = 0, config: PhantomConfig = PhantomConfig(),
                          raw_dir: str | os.PathLike | None = None, overwrite: bool = False,
                          hide_tumours_mm: float | None = None) -> Path:
    """Writes a phantom dataset in nnU-Net's raw format.

    Training cases go to imagesTr/labelsTr; held-out cases (always with tumours, for evaluation) to
    imagesTs/labelsTs. Everything is written to a temporary folder and moved into place when complete.

    Args:
        dataset_id: nnU-Net dataset ID (1-999).
        num_train: training cases.
        num_test: held-out test cases.
        modality: 'CT' (one channel, HU) or 'MRI' (two channels).
        healthy: training cases without tumours (the tumour label is still declared).
        seed: random seed; the same seed gives the same dataset.
        config: phantom geometry.
        raw_dir: nnUNet_raw folder (default: the environment variable).
        overwrite: replace an existing dataset folder.
        hide_tumours_mm: hide the training cases' tumours, dilated by this margin in mm, behind nnU-Net's ignore
            label, keeping the true labels in ``labelsTr_tumours/`` (see
            :mod:`nnunet_synth.dataset_conversion.hidden_tumours`); the test cases keep theirs.

    Returns:
        The dataset folder.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from nnunetv2.paths import nnUNet_raw

    if modality not in TISSUES:
        raise ValueError(f"phantom modality must be one of {sorted(TISSUES)}, got {modality!r}")
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset IDs are 1-999, got {dataset_id}")
    raw = Path(raw_dir if raw_dir is not None else nnUNet_raw.require())
    name = f"Dataset{dataset_id:03d}_Phantom{modality}{'Healthy' if healthy else ''}" \
           f"{'Hidden' if hide_tumours_mm is not None else ''}"
    # overwrite replaces this phantom only: another dataset with the ID (raw, preprocessed or results) is refused
    check_dataset_id_free(dataset_id, name, raw)
    final = raw / name
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True (--overwrite) to replace it")
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = TISSUES[modality]["channels"]
    tmp = partial_folder(raw, name)  # made with the user's umask, as the folders in it
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        cases = [("Tr", f"phantom_{i:03d}", healthy) for i in range(num_train)]
        cases += [("Ts", f"phantom_{num_train + i:03d}", False) for i in range(num_test)]
        for split, case, is_healthy in tqdm(cases, desc=f"phantom {name}", unit="case"):
            image, seg = make_case(rng, modality, is_healthy, config)
            for c in range(len(channels)):
                _write(image[c], config.spacing, tmp / f"images{split}" / f"{case}_{c:04d}.nii.gz")
            _write(seg, config.spacing, tmp / f"labels{split}" / f"{case}.nii.gz")
        generate_dataset_json(str(tmp), {str(i): c for i, c in enumerate(channels)}, LABELS, num_train,
                              ".nii.gz", dataset_name=name,
                              description=f"nnunet_synth procedural {modality} phantom"
                                          f"{' (healthy training cases)' if healthy else ''}, seed {seed}")
        if hide_tumours_mm is not None:
            from nnunet_synth.dataset_conversion.hidden_tumours import hide_tumours_in_folder

            hide_tumours_in_folder(tmp, hide_tumours_mm, LABELS["tumour"])
        move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
