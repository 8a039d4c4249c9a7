"""Template bank of real tumours (breast SynBT paper; CarveMix / copy-paste): shapes and textures cut from the
dataset's own tumours.

All tumour components of the preprocessed cases are stored once per dataset, plans and configuration
(``nnUNetSynthTemplates_[<plans>_]<configuration>.npz`` beside the plans, see :mod:`.paths`) with the case each
came from: the mask (cropped to its bounding box) and the image over that box in units of the tumour's ring
(per channel ``(crop - ring median) / ring spread``, see :mod:`.appearance`; the ring is the organ's voxels around
the tumour, or unlabelled ones without an organ label), as float16. A trainer draws only from its training
fold's cases, so no validation case shapes or textures a synthetic tumour. A drawn :class:`Template` gets random
flips, 90-degree rotations in planes of equal spacing, and a zoom to the requested size, its texture exactly as
its mask (linear interpolation for the texture, nearest for the mask). Shape-only paths use ``.mask``; the
transplant backend paints ``.texture``.

Breast plans (placement region ``fgt``) scale the drawn size with the breast, as the SynBT paper sizes tumours by
tumour and breast dimensions: :func:`breast_scale` is this image's breast size over the training cases' median
(recorded at planning), and :func:`scale_requests` multiplies the requested semi-axes by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import label as connected_components
from scipy.ndimage import zoom
from tqdm import tqdm

from nnunet_synth.files import creation_lock, process_tag
from nnunet_synth.generators.appearance import (
    RING_MM,
    expand_box,
    ring,
    ring_statistics,
    ring_tissue,
    signed_distance,
)
from nnunet_synth.generators.paths import DEFAULT_PLANS_IDENTIFIER, template_file
from nnunet_synth.generators.regions import breast_size_mm
from nnunet_synth.generators.sizes import LesionRequest

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import SynthPlan

MIN_TEMPLATE_VOXELS = 8
TEMPLATE_ZOOM_JITTER = 0.1
# version of the stored textures; a template file without this key (or of another version) is rebuilt
TEXTURE_VERSION = 2
NO_ORGAN = -1  # the ring label stored for datasets without an organ label (ring: unlabelled voxels)
BREAST_SCALE_RANGE = (0.5, 2.0)  # the breast-size factor is clipped to this (a patch that shows little body)


@dataclass(frozen=True, eq=False)
class Template:
    """One real tumour component of the template bank.

    Attributes:
        mask: bool mask cropped to its bounding box.
        texture: (C, *mask.shape) image over the mask's box in units of the tumour's ring (float16 as stored,
            float32 once drawn), or None where not loaded (shape-only uses).
        case: the preprocessed case it was cut from.
    """

    mask: np.ndarray
    texture: np.ndarray | None = None
    case: str = ""


def mask_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a mask's True voxels (what :func:`crop_to_mask` crops to)."""
    idx = np.nonzero(mask)
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)


def crop_template(mask: np.ndarray, texture: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A mask and its texture cropped to the mask's bounding box."""
    box = mask_box(mask)
    return mask[box], None if texture is None else texture[(slice(None), *box)]


def _as_template(template: Template | np.ndarray) -> Template:
    return template if isinstance(template, Template) else Template(mask=np.asarray(template, dtype=bool))


def ring_units(data: np.ndarray, seg: np.ndarray, component: np.ndarray, bbox: tuple[slice, ...],
               spacing: tuple[float, ...], tissue: np.ndarray, tumour_label: int) -> np.ndarray:
    """The image over a tumour component's box in units of its ring, per channel (float32).

    The ring (see :func:`~nnunet_synth.generators.appearance.ring`) holds the ``tissue`` voxels (see
    :func:`~nnunet_synth.generators.appearance.ring_tissue`) between ``RING_MM`` of the component; where it is too
    small (a tumour at the organ's edge), any voxel inside the image that is not tumour, and failing that the
    case's non-tumour voxels, give the centre and spread.
    """
    box, inner = expand_box(bbox, RING_MM[1], spacing, component.shape)
    distance = signed_distance(component[box], spacing)
    seg_box = seg[box]
    candidates = (ring(distance, tissue[box]), ring(distance, (seg_box >= 0) & (seg_box != tumour_label)))
    texture = np.empty((data.shape[0], *(s.stop - s.start for s in bbox)), dtype=np.float32)
    for c in range(data.shape[0]):
        channel = np.asarray(data[c][box], dtype=np.float64)
        for voxels in candidates:
            centre, spread = ring_statistics(channel, voxels)
            if not np.isnan(centre):
                break
        else:
            rest = np.asarray(data[c], dtype=np.float64)[(seg >= 0) & (seg != tumour_label)]
            centre = float(np.median(rest)) if rest.size else 0.0
            spread = max(float(rest.std()), 1e-6) if rest.size else 1.0
        texture[c] = (channel[inner] - centre) / spread
    return texture


def case_templates(data: np.ndarray, seg: np.ndarray, tumour_label: int, spacing: Sequence[float],
                   organ_label: int | None = None, case: str = "", clip_floor: float | None = None
                   ) -> list[Template]:
    """Every tumour component of one case (of at least ``MIN_TEMPLATE_VOXELS``) with its texture in ring units.

    Args:
        data: (C, *spatial) image.
        seg: (*spatial) labels.
        tumour_label: label of the real tumours.
        spacing: voxel spacing (mm).
        organ_label: the ring is the organ's voxels around a tumour; None: the unlabelled ones (``seg == 0``).
        case: the case's identifier, recorded in each template.
        clip_floor: the CT window's floor of channel 0 (see :func:`~.appearance.ring_tissue`).
    """
    spacing = tuple(float(s) for s in spacing)
    tissue = ring_tissue(np.asarray(data[0]), seg, organ_label, clip_floor)
    components, n = connected_components(seg == tumour_label)
    templates = []
    for k in range(1, n + 1):
        component = components == k
        if component.sum() < MIN_TEMPLATE_VOXELS:
            continue
        box = mask_box(component)
        templates.append(Template(mask=component[box], case=case,
                                  texture=ring_units(data, seg, component, box, spacing, tissue, tumour_label)))
    return templates


def build_template_bank(preprocessed: Path, configuration: str, data_identifier: str, tumour_label: int,
                        plans_identifier: str = DEFAULT_PLANS_IDENTIFIER, *, spacing: Sequence[float] | None = None,
                        organ_label: int | None = None, clip_floor: float | None = None) -> Path:
    """Crops every tumour component of every preprocessed case, with its texture in ring units; written
    atomically (per-process temp name).

    Args:
        preprocessed: ``nnUNet_preprocessed/DatasetNNN``.
        configuration: nnU-Net configuration (names the file).
        data_identifier: the configuration's folder of preprocessed cases.
        tumour_label: label of the real tumours.
        plans_identifier: nnU-Net plans identifier (names the file).
        spacing: the configuration's voxel spacing (default: read from the plans).
        organ_label: the ring is the organ's voxels around a tumour; None: the unlabelled ones (``seg == 0``).
        clip_floor: the CT window's floor of channel 0 (see :func:`~.appearance.ring_tissue`).
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_synth.dataset_conversion.hidden_tumours import HiddenTumourLabels

    if spacing is None:
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans = PlansManager(load_json(str(Path(preprocessed) / f"{plans_identifier}.json")))
        spacing = plans.get_configuration(configuration).spacing
    spacing = tuple(float(s) for s in spacing)
    ring_label = NO_ORGAN if organ_label is None else int(organ_label)
    folder = Path(preprocessed) / data_identifier
    ds = infer_dataset_class(str(folder))(str(folder))
    # a dataset with hidden tumours: the kept masks (load_templates keeps the training fold's)
    hidden = HiddenTumourLabels.of(Path(preprocessed), plans_identifier, configuration)
    arrays, cases = {}, []
    for identifier in tqdm(sorted(ds.identifiers), desc="template bank", unit="case"):
        data, seg, _, _ = ds.load_case(identifier)
        seg = seg if hidden is None else hidden.segmentation(identifier, seg)
        for template in case_templates(np.asarray(data), np.asarray(seg[0]), tumour_label, spacing, organ_label,
                                       identifier, clip_floor):
            i = len(cases)
            arrays[f"mask_{i:05d}"] = np.packbits(template.mask)
            arrays[f"texture_{i:05d}"] = template.texture.astype(np.float16)
            cases.append((identifier, template.mask.shape))
    path = template_file(preprocessed, configuration, plans_identifier)
    tmp = path.with_name(f".{path.name}{process_tag()}.tmp.npz")  # per process: builders never share a name
    np.savez_compressed(tmp, case_ids=np.array([c for c, _ in cases], dtype=str),
                        shapes=np.array([s for _, s in cases], dtype=np.int64).reshape(len(cases), len(spacing)),
                        texture_version=np.array(TEXTURE_VERSION), ring_label=np.array(ring_label), **arrays)
    tmp.replace(path)
    return path


def has_textures(path: Path, organ_label: int | None = None) -> bool:
    """Whether a template file stores textures of this version, measured against the ring of ``organ_label``."""
    with np.load(path) as z:
        return "texture_version" in z.files and int(z["texture_version"]) == TEXTURE_VERSION and \
            int(z["ring_label"]) == (NO_ORGAN if organ_label is None else int(organ_label))


def load_templates(path: Path, cases: set[str], textures: bool = True) -> tuple[list[Template], list[str]]:
    """The stored templates whose source case is in ``cases`` (the training fold), and those source cases.

    ``textures=False`` loads the masks only (shape-only uses: the texture stays None).
    """
    templates, used = [], set()
    with np.load(path) as z:
        stored = textures and "texture_version" in z.files
        for i, (case, shape) in enumerate(zip(z["case_ids"], z["shapes"])):
            if str(case) in cases:
                shape = tuple(int(v) for v in shape)
                mask = np.unpackbits(z[f"mask_{i:05d}"])[:int(np.prod(shape))].reshape(shape).astype(bool)
                texture = z[f"texture_{i:05d}"] if stored else None
                templates.append(Template(mask=mask, texture=texture, case=str(case)))
                used.add(str(case))
    return templates, sorted(used)


def template_cases(path: Path) -> list[str]:
    with np.load(path) as z:
        return [str(c) for c in z["case_ids"]]


def draw_template(templates: Sequence[Template | np.ndarray], radii_mm: np.ndarray, spacing: tuple[float, ...],
                  rng: np.random.Generator) -> Template:
    """A random template, flipped, rotated and zoomed to the volume of an ellipsoid with ``radii_mm``.

    Its texture (where it has one) goes through the same flips, turns and zoom (nearest neighbour, as the
    mask, so its value distribution and voxel-scale noise survive) and comes back as float32 of the mask's
    shape. Bare masks are accepted as templates without texture.
    """
    if not len(templates):
        raise ValueError("the template bank holds no tumour of the training fold; use deformation "
                         "'elastic' or 'simplex' for this dataset")
    template = _as_template(templates[rng.integers(len(templates))])
    mask, texture = template.mask, template.texture
    for axis in range(mask.ndim):
        if rng.uniform() < 0.5:
            mask = np.flip(mask, axis)
            texture = None if texture is None else np.flip(texture, axis + 1)
    sp = np.asarray(spacing, dtype=float)
    same = [(i, j) for i in range(mask.ndim) for j in range(i + 1, mask.ndim) if np.isclose(sp[i], sp[j], rtol=0.05)]
    if same:  # 90-degree turns only where they keep the physical shape
        turns, (i, j) = int(rng.integers(4)), same[rng.integers(len(same))]
        mask = np.rot90(mask, turns, axes=(i, j))
        texture = None if texture is None else np.rot90(texture, turns, axes=(i + 1, j + 1))
    target = float(np.prod(radii_mm)) * (4 / 3 * np.pi if mask.ndim == 3 else np.pi)
    volume = mask.sum() * float(np.prod(sp))
    factor = (target / volume) ** (1 / mask.ndim) * rng.uniform(1 - TEMPLATE_ZOOM_JITTER, 1 + TEMPLATE_ZOOM_JITTER,
                                                                  mask.ndim)
    zoomed = zoom(np.ascontiguousarray(mask).astype(np.uint8), factor, order=0, grid_mode=True,
                  mode="grid-constant") > 0
    if texture is not None:
        # the same output grid as the mask's (scipy sizes it by round(shape * factor) for both)
        # nearest neighbour as the mask: interpolation would average the voxel-scale noise away (a smaller, smoother
        # and fainter texture) and mix the tissue outside the tumour into its border voxels
        texture = zoom(np.ascontiguousarray(texture, dtype=np.float32), (1.0, *factor), order=0, grid_mode=True,
                       mode="nearest")
    if not zoomed.any():  # zoomed below one voxel: the template's central voxel
        centre = tuple(n // 2 for n in zoomed.shape)
        zoomed = np.zeros(zoomed.shape, bool)
        if zoomed.size:
            zoomed[centre] = True
        else:
            zoomed = np.ones((1,) * mask.ndim, bool)
            texture = None if texture is None else np.asarray(template.texture, dtype=np.float32)[
                (slice(None), *(slice(n // 2, n // 2 + 1) for n in template.mask.shape))]
    mask, texture = crop_template(zoomed, texture)
    return Template(mask=mask, texture=texture, case=template.case)


def breast_scale(image: np.ndarray, plan: SynthPlan, spacing: tuple[float, ...],
                 window: tuple[slice, ...] | None = None) -> float:
    """The factor template sizes are multiplied by: this image's breast size over the training cases' median.

    It applies to breast plans (placement region ``fgt``) with deformation ``template`` whose FGT region records the
    median (1.0 otherwise). The breast size is the equivalent diameter of the body
    (:func:`~nnunet_synth.generators.regions.breast_size_mm`): of the whole image against the median of whole cases,
    or, with ``window`` (a patch's central window), of the body in the window against the median in patch-size
    windows centred on the body. Clipped to :data:`BREAST_SCALE_RANGE`.

    Args:
        image: (C, *spatial) image, normalised as at planning.
        plan: the synth plan.
        spacing: voxel spacing (mm) of the spatial axes.
        window: the central window of a patch, or None for a whole case.
    """
    spec = plan.fgt
    if plan.shapes.deformation != "template" or plan.region_kind != "fgt" or spec is None:
        return 1.0
    median = spec.breast_size_mm if window is None else spec.breast_size_patch_mm
    if not median or len(spacing) != 3:
        return 1.0
    size = breast_size_mm(np.asarray(image[spec.channel]), spec.body_threshold, spacing, window)
    return float(np.clip(size / median, *BREAST_SCALE_RANGE))


def scale_requests(requests: list[LesionRequest], scale: float) -> list[LesionRequest]:
    """The requests with their semi-axes multiplied by ``scale`` (see :func:`breast_scale`)."""
    if scale == 1.0:
        return requests
    return [LesionRequest(r.size_class, np.asarray(r.radii_mm) * scale) for r in requests]


def fold_templates(preprocessed: Path, configuration_manager, plan, train_cases: list[str],
                   textures: bool | None = None) -> tuple[list[Template], list[str]]:
    """The real tumours of a fold's training cases (building the dataset's template bank when absent, or when it
    was stored without textures).

    Args:
        preprocessed: ``nnUNet_preprocessed/DatasetNNN``.
        configuration_manager: nnU-Net's configuration manager (its data identifier names the cases' folder,
            its spacing measures the rings).
        plan: the synth plan (configuration, plans identifier, tumour and organ labels, backend).
        train_cases: the fold's training cases; no other case shapes or textures a template.
        textures: load the textures (default: where the plan's backend paints them, ``transplant``); without
            them the templates carry masks only.

    Raises:
        ValueError: when the training cases hold no real tumour, naming what to use instead.
    """
    textures = plan.backend == "transplant" if textures is None else textures
    path = template_file(preprocessed, plan.configuration, plan.plans_identifier)
    with creation_lock(path):  # one builder: the folds and DDP ranks starting together load what it wrote
        if not path.is_file() or not has_textures(path, plan.organ_label):
            build_template_bank(preprocessed, plan.configuration, configuration_manager.data_identifier,
                                plan.tumour_label, plan.plans_identifier, spacing=configuration_manager.spacing,
                                organ_label=plan.organ_label, clip_floor=plan.clip_floor)
    templates, cases = load_templates(path, set(train_cases), textures)
    if not templates:
        if plan.backend == "transplant":
            raise ValueError(f"backend 'transplant' pastes real tumours of the training fold, and the training fold "
                             f"of {Path(preprocessed).name} has none; train with synthesised tumours instead, e.g. "
                             f"nnUNetTrainerSynth20 (analytic backend)")
        raise ValueError(f"deformation 'template': the training fold of {Path(preprocessed).name} has no real "
                         f"tumour to use as a template; use deformation 'elastic' or 'simplex' (e.g. "
                         f"nnUNetTrainerSynth20Elastic)")
    return templates, cases
