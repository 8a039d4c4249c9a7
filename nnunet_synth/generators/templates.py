"""Template bank of real tumour masks (breast SynBT paper): shapes cut from the dataset's own tumours.

All tumour components of the preprocessed cases are stored once per dataset, plans and configuration
(``nnUNetSynthTemplates_[<plans>_]<configuration>.npz`` beside the plans, see :mod:`.paths`) with the case each
came from; a trainer
draws only from its training fold's cases, so no validation case shapes a synthetic tumour. Drawn masks get
random flips, 90-degree rotations in planes of equal spacing, and a zoom to the requested size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.ndimage import label as connected_components
from scipy.ndimage import zoom
from tqdm import tqdm

from nnunet_synth.generators.paths import DEFAULT_PLANS_IDENTIFIER, template_file
from nnunet_synth.generators.shapes import crop_to_mask

MIN_TEMPLATE_VOXELS = 8
TEMPLATE_ZOOM_JITTER = 0.1


def build_template_bank(preprocessed: Path, configuration: str, data_identifier: str, tumour_label: int,
                        plans_identifier: str = DEFAULT_PLANS_IDENTIFIER) -> Path:
    """Crops every tumour component of every preprocessed case; written atomically (per-process temp name)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = preprocessed / data_identifier
    ds = infer_dataset_class(str(folder))(str(folder))
    masks, cases = [], []
    for identifier in tqdm(sorted(ds.identifiers), desc="template bank", unit="case"):
        _, seg, _, _ = ds.load_case(identifier)
        components, n = connected_components(np.asarray(seg[0]) == tumour_label)
        for i in range(1, n + 1):
            component = components == i
            if component.sum() >= MIN_TEMPLATE_VOXELS:
                masks.append(np.packbits(crop_to_mask(component)))
                cases.append((identifier, crop_to_mask(component).shape))
    path = template_file(preprocessed, configuration, plans_identifier)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, case_ids=np.array([c for c, _ in cases], dtype=str),
                        shapes=np.array([s for _, s in cases], dtype=np.int64).reshape(len(cases), -1),
                        **{f"mask_{i:05d}": m for i, m in enumerate(masks)})
    tmp.replace(path)
    return path


def load_templates(path: Path, cases: set[str]) -> tuple[list[np.ndarray], list[str]]:
    """The stored masks whose source case is in ``cases`` (the training fold), and those source cases."""
    masks, used = [], set()
    with np.load(path) as z:
        for i, (case, shape) in enumerate(zip(z["case_ids"], z["shapes"])):
            if str(case) in cases:
                masks.append(np.unpackbits(z[f"mask_{i:05d}"])[:int(np.prod(shape))].reshape(shape).astype(bool))
                used.add(str(case))
    return masks, sorted(used)


def template_cases(path: Path) -> list[str]:
    with np.load(path) as z:
        return [str(c) for c in z["case_ids"]]


def draw_template(templates: list[np.ndarray], radii_mm: np.ndarray, spacing: tuple[float, ...],
                  rng: np.random.Generator) -> np.ndarray:
    """A random template, flipped, rotated and zoomed to the volume of an ellipsoid with ``radii_mm``."""
    if not templates:
        raise ValueError("the template bank holds no tumour of the training fold; use deformation "
                         "'elastic' or 'simplex' for this dataset")
    mask = templates[rng.integers(len(templates))]
    for axis in range(mask.ndim):
        if rng.uniform() < 0.5:
            mask = np.flip(mask, axis)
    sp = np.asarray(spacing, dtype=float)
    same = [(i, j) for i in range(mask.ndim) for j in range(i + 1, mask.ndim) if np.isclose(sp[i], sp[j], rtol=0.05)]
    if same:  # 90-degree turns only where they keep the physical shape
        mask = np.rot90(mask, int(rng.integers(4)), axes=same[rng.integers(len(same))])
    target = float(np.prod(radii_mm)) * (4 / 3 * np.pi if mask.ndim == 3 else np.pi)
    volume = mask.sum() * float(np.prod(sp))
    factor = (target / volume) ** (1 / mask.ndim) * rng.uniform(1 - TEMPLATE_ZOOM_JITTER, 1 + TEMPLATE_ZOOM_JITTER,
                                                                  mask.ndim)
    zoomed = zoom(np.ascontiguousarray(mask).astype(np.uint8), factor, order=0, grid_mode=True,
                  mode="grid-constant") > 0
    if not zoomed.any():
        zoomed = np.ones((1,) * mask.ndim, bool)
    return crop_to_mask(zoomed)


def fold_templates(preprocessed: Path, configuration_manager, plan, train_cases: list[str]
                   ) -> tuple[list[np.ndarray], list[str]]:
    """The real tumour masks of a fold's training cases (building the dataset's template bank when absent).

    Args:
        preprocessed: ``nnUNet_preprocessed/DatasetNNN``.
        configuration_manager: nnU-Net's configuration manager (its data identifier names the cases' folder).
        plan: the synth plan (configuration, plans identifier, tumour label).
        train_cases: the fold's training cases; no other case shapes a template.

    Raises:
        ValueError: when the training cases hold no real tumour, naming what to use instead.
    """
    path = template_file(preprocessed, plan.configuration, plan.plans_identifier)
    if not path.is_file():
        build_template_bank(preprocessed, plan.configuration, configuration_manager.data_identifier,
                            plan.tumour_label, plan.plans_identifier)
    templates, cases = load_templates(path, set(train_cases))
    if not templates:
        raise ValueError(f"deformation 'template': the training fold of {Path(preprocessed).name} has no real "
                         f"tumour to use as a template; use deformation 'elastic' or 'simplex' (e.g. "
                         f"nnUNetTrainerSynth20Elastic)")
    return templates, cases
