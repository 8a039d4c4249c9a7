"""PNGs that show real and synthetic tumours side by side, so a user sees at a glance whether the synthetic ones
look real.

Each PNG has one row per tumour: a real tumour of the dataset (a connected component of the tumour label in a
preprocessed case, outlined in blue), then the synthetic tumour each backend inserts into the same patch of a case
(outlined in red). Columns are the planes through the lesion (axial, coronal, sagittal; one slice for 2D
configurations), per channel. Every crop has the same field of view in mm, zoomed to the lesions, and every channel
one grey window shared by all its panels (nnU-Net's normalised units). The synthetic rows outline the placement
region the pipeline drew the lesion's site from (the organ label, the tissue region, or a breast plan's
fibroglandular tissue) in yellow.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy.ndimage import find_objects  # noqa: E402
from scipy.ndimage import label as connected_components  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nnunet_synth.generators.lesions import placement_region  # noqa: E402
from nnunet_synth.injection import SynthTumourTransform  # noqa: E402
from nnunet_synth.planning import load_synth_plan, preprocessed_dir  # noqa: E402
from nnunet_synth.synth_plan import SynthPlan, SynthPlanError  # noqa: E402

PLANES = ("axial", "coronal", "sagittal")
ZOOM = 2.5  # field of view: this many times the largest lesion extent in the PNG ...
MIN_CROP_VOXELS = 32  # ... and at least this many voxels of the finest spacing
MIN_REAL_VOXELS = 8  # smaller real tumour components are not shown
PANEL_INCHES, TITLE_INCHES, DPI = 2.0, 0.7, 110
REAL_COLOUR, SYNTHETIC_COLOUR = "deepskyblue", "red"
REGION_COLOUR = "yellow"  # outline of the placement region on the synthetic rows
NO_REAL_TUMOUR = "no real tumour in this dataset"
REGION_NAMES = {"organ": "organ label", "tissue": "tissue region", "fgt": "fibroglandular tissue"}
GREY = plt.get_cmap("gray").with_extremes(bad="black")  # black: outside the case


class GeneratorUnavailable(SynthPlanError):
    """A backend given with ``-g`` that cannot be built (unknown name, missing or mismatched model)."""


@dataclass(frozen=True)
class RealTumour:
    """A connected component of the tumour label of a preprocessed case.

    Attributes:
        case: identifier of the case.
        coords: voxel coordinates of the component (on slice ``slice_index`` for a 2d configuration).
        slice_index: for a 2d configuration the slice of the component's largest cross-section, else None.
    """

    case: str
    coords: tuple[np.ndarray, ...]
    slice_index: int | None

    @property
    def num_voxels(self) -> int:
        return int(len(self.coords[0]))


@dataclass(frozen=True)
class TumourCrop:
    """One row of a comparison PNG: a box of a case around one tumour.

    Attributes:
        label: the row's name (``"real"`` or the backend).
        case: identifier of the case.
        box: ``[[start, stop), ...]`` of the crop in voxels of the case (of its slice for a 2d configuration).
        image: (C, *box) float32 in nnU-Net's normalised units (NaN where the box leaves the case).
        lesion: (*box) bool mask of the tumour the row shows.
        real: (*box) bool mask of the other real tumour voxels.
        inside: (*box) bool, voxels of the case's image region (segmentation not -1, not outside the case).
        region: (*box) bool, the placement region of the case (see
            :func:`~nnunet_synth.generators.lesions.placement_region`), or None where not shown.
    """

    label: str
    case: str
    box: list[list[int]]
    image: np.ndarray
    lesion: np.ndarray
    real: np.ndarray
    inside: np.ndarray
    region: np.ndarray | None = None


@dataclass(frozen=True)
class Layout:
    """What a comparison figure shows: row and column names, the grey window per channel, the field of view."""

    rows: list[str]
    columns: list[str]
    windows: list[tuple[float, float]]
    fov_mm: float


def real_tumours(ds, identifiers: Sequence[str], tumour_label: int, two_d: bool, rng: np.random.Generator,
                 wanted: int) -> list[RealTumour]:
    """Tumour components of at least :data:`MIN_REAL_VOXELS` voxels from cases in random order, until ``wanted``
    are found or every case is read (cases whose nnU-Net class locations lack the label are skipped unread)."""
    found: list[RealTumour] = []
    for case in rng.permutation(sorted(identifiers)):
        if len(found) >= wanted:
            break
        _, seg, _, properties = ds.load_case(str(case))
        locations = properties.get("class_locations") if isinstance(properties, dict) else None
        if isinstance(locations, dict) and tumour_label in locations and len(locations[tumour_label]) == 0:
            continue
        components, _ = connected_components(np.asarray(seg[0]) == tumour_label)
        for index, box in enumerate(find_objects(components), start=1):
            coords = tuple(x + s.start for x, s in zip(np.nonzero(components[box] == index), box))
            z = None
            if two_d:  # the slice of the largest cross-section
                z = int(np.bincount(coords[0]).argmax())
                coords = tuple(x[coords[0] == z] for x in coords[1:])
            if len(coords[0]) >= MIN_REAL_VOXELS:
                found.append(RealTumour(str(case), coords, z))
    return found


def closest_in_size(pool: Sequence[RealTumour], num_voxels: float, used: set[int]) -> int:
    """Index of the tumour of ``pool`` closest in (log) size to ``num_voxels``, preferring ones not ``used``."""
    free = [i for i in range(len(pool)) if i not in used] or list(range(len(pool)))
    return min(free, key=lambda i: abs(math.log(pool[i].num_voxels) - math.log(max(num_voxels, 1.0))))


def field_of_view_mm(extents: Iterable[Sequence[int]], spacing: Sequence[float]) -> float:
    """Edge of the cube (mm) every crop of a PNG shows: :data:`ZOOM` times the largest lesion extent, at least
    :data:`MIN_CROP_VOXELS` voxels of the finest spacing."""
    largest = max((e * s for extent in extents for e, s in zip(extent, spacing)), default=0.0)
    return max(ZOOM * largest, MIN_CROP_VOXELS * min(spacing))


def _bounds(coords: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    return [(int(c.min()), int(c.max()) + 1) for c in coords]


def crop_box(coords: Sequence[np.ndarray], fov_mm: float, spacing: Sequence[float]) -> list[list[int]]:
    """Box ``[[start, stop), ...]`` of ``fov_mm`` per axis (at least the lesion) centred on the lesion's box."""
    box = []
    for (lo, hi), s in zip(_bounds(coords), spacing):
        n = max(int(math.ceil(fov_mm / s)), hi - lo)
        box.append([(lo + hi - n) // 2, (lo + hi - n) // 2 + n])
    return box


def cut_crop(label: str, case: str, volume: np.ndarray, seg0: np.ndarray, tumour_label: int,
             coords: Sequence[np.ndarray], box: list[list[int]], patch: SyntheticPatch | None = None,
             region: np.ndarray | None = None) -> TumourCrop:
    """A box of a case (volume (C, *spatial), segmentation (*spatial)) around the lesion at ``coords``; with
    ``patch``, its image after synthesis is pasted over the case first; ``region`` (*spatial), the case's placement
    region, is cropped alike."""
    image = np.array(crop_and_pad_nd(volume, box, 0), dtype=np.float32)
    labels = np.asarray(crop_and_pad_nd(seg0, box, -2))  # -2: outside the case, -1: outside the image region
    if patch is not None:
        inner = [(max(b0, p0), min(b1, p1)) for (b0, b1), (p0, p1) in zip(box, patch.bbox)]
        if all(lo < hi for lo, hi in inner):
            image[(slice(None), *(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inner, box)))] = \
                patch.new_image.numpy()[(slice(None), *(slice(lo - p0, hi - p0) for (lo, hi), (p0, _)
                                                        in zip(inner, patch.bbox)))]
    lesion = np.zeros(labels.shape, dtype=bool)
    lesion[tuple(c - b0 for c, (b0, _) in zip(coords, box))] = True
    image[:, labels == -2] = np.nan
    return TumourCrop(label, case, box, image, lesion, (labels == tumour_label) & ~lesion, labels >= 0,
                      None if region is None else np.asarray(crop_and_pad_nd(region, box, False), dtype=bool))


def shared_window(images: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None,
                  percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """One grey window for several panels: percentiles of their pooled pixels (those inside ``masks``, all where
    the masks hold none; NaN ignored), widened to a non-empty range."""
    pixels = np.concatenate([np.ravel(im) for im in images])
    if masks is not None and any(m.any() for m in masks):
        pixels = np.concatenate([im[m] for im, m in zip(images, masks)])
    lo, hi = (float(v) for v in np.nanpercentile(pixels, percentiles))
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _planes(array: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through ``centre`` of a (z, y, x) array (the array itself for 2D)."""
    if array.ndim == 2:
        return [array]
    z, y, x = centre
    return [array[z], array[:, y], array[:, :, x]]


def _aspects(spacing: Sequence[float]) -> list[float]:
    if len(spacing) == 2:
        return [spacing[0] / spacing[1]]
    sz, sy, sx = spacing
    return [sy / sx, sz / sx, sz / sy]


def _centre(lesion: np.ndarray) -> list[int]:
    """Per axis, the slice with the largest lesion cross-section."""
    return [int(np.argmax(lesion.sum(axis=tuple(b for b in range(lesion.ndim) if b != a))))
            for a in range(lesion.ndim)]


def figure_size(num_rows: int, num_columns: int) -> tuple[float, float]:
    """Size in inches of a comparison figure (:data:`PANEL_INCHES` per panel and a title band)."""
    return max(PANEL_INCHES * num_columns + 0.4, 4.0), PANEL_INCHES * num_rows + TITLE_INCHES


def comparison_figure(real: TumourCrop | None, synthetic: Sequence[TumourCrop], spacing: Sequence[float],
                      channel_names: Sequence[str], fov_mm: float, title: str) -> tuple[Figure, Layout]:
    """Rows: the real tumour (or :data:`NO_REAL_TUMOUR`) and each synthetic one; columns: per channel the planes
    through the lesion's largest cross-sections; one grey window per channel over all panels.

    Args:
        real: the real tumour's crop, or None where the dataset has none.
        synthetic: one crop per backend (same box shape as ``real``).
        spacing: voxel spacing of the crops' axes (for the aspect ratios).
        channel_names: names of the image channels.
        fov_mm: the crops' field of view (for the layout).
        title: figure title.
    """
    crops = [real, *synthetic]
    shown = [(c, _centre(c.lesion)) for c in crops if c is not None]
    plane_names = ["slice"] if synthetic[0].lesion.ndim == 2 else list(PLANES)
    windows = [shared_window([p for c, centre in shown for p in _planes(c.image[ch], centre)],
                             [p for c, centre in shown for p in _planes(c.inside, centre)])
               for ch in range(len(channel_names))]
    columns = [f"{name}: {plane}" if len(channel_names) > 1 else plane
               for name in channel_names for plane in plane_names]
    layout = Layout(["real", *(c.label for c in synthetic)], columns, windows, fov_mm)
    fig, axes = plt.subplots(len(crops), len(columns), figsize=figure_size(len(crops), len(columns)), squeeze=False)
    for ax, name in zip(axes[0], columns):
        ax.set_title(name, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if real is None:
        for ax in axes[0]:
            ax.set_frame_on(False)
        axes[0, 0].text(0.02, 0.5, NO_REAL_TUMOUR, transform=axes[0, 0].transAxes, fontsize=9, va="center")
    for r, crop in enumerate(crops):
        if crop is None:
            continue
        centre = _centre(crop.lesion)
        colour = REAL_COLOUR if r == 0 else SYNTHETIC_COLOUR
        regions = _planes(crop.region, centre) if crop.region is not None else [None] * len(plane_names)
        views = zip(_planes(crop.lesion, centre), _planes(crop.real, centre), _aspects(spacing), regions)
        for p, (lesion, other, aspect, region) in enumerate(views):
            for ch, (lo, hi) in enumerate(windows):
                ax = axes[r, ch * len(plane_names) + p]
                ax.imshow(_planes(crop.image[ch], centre)[p], cmap=GREY, vmin=lo, vmax=hi, aspect=aspect,
                          interpolation="nearest")
                if region is not None and region.any() and not region.all():
                    ax.contour(region, levels=[0.5], colors=REGION_COLOUR, linewidths=0.5, linestyles="dashed")
                if other.any():
                    ax.contour(other, levels=[0.5], colors=REAL_COLOUR, linewidths=0.5)
                if lesion.any():
                    ax.contour(lesion, levels=[0.5], colors=colour, linewidths=1.0)
        axes[r, 0].set_ylabel(f"{layout.rows[r]}\n{crop.case}\n{int(crop.lesion.sum())} vox", fontsize=8)
    fig.suptitle(textwrap.fill(title, max(40, int(14 * fig.get_figwidth()))), fontsize=8)
    fig.tight_layout()
    return fig, layout


def render_comparison(real: TumourCrop | None, synthetic: Sequence[TumourCrop], spacing: Sequence[float],
                      channel_names: Sequence[str], fov_mm: float, title: str, path: Path) -> Layout:
    """Writes :func:`comparison_figure` as a PNG and returns its layout."""
    fig, layout = comparison_figure(real, synthetic, spacing, channel_names, fov_mm, title)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return layout


@dataclass(frozen=True)
class SyntheticPatch:
    """One patch of a preprocessed case with a synthetic tumour inserted (see :func:`draw_synthetic_patch`).

    Attributes:
        bbox: the patch's box ``[[start, stop), ...]`` over the spatial axes of ``slice_index``'s volume, in voxel
            coordinates of the case (it may reach outside the case; those voxels are padding).
        slice_index: for a 2d configuration the index (first axis) of the case slice the patch was cut from,
            else None.
        image: (C, *patch) float32 patch before synthesis.
        labels: (1, *patch) int16 segmentation before synthesis (-1 outside the case).
        new_image: (C, *patch) patch after synthesis.
        new_labels: (1, *patch) segmentation after synthesis.
        lesion: (*patch) bool mask of the synthetic tumour.
    """

    bbox: list[list[int]]
    slice_index: int | None
    image: torch.Tensor
    labels: torch.Tensor
    new_image: torch.Tensor
    new_labels: torch.Tensor
    lesion: np.ndarray


def draw_synthetic_patch(data: np.ndarray, seg: np.ndarray, plan: SynthPlan, transform: SynthTumourTransform,
                         patch: tuple[int, ...], rng: np.random.Generator) -> SyntheticPatch | None:
    """Cuts a patch around a random placement voxel (organ, or tissue region without organ label) of a
    preprocessed case and inserts the synthetic tumours of one sample.

    Args:
        data: (C, *spatial) preprocessed image of the case.
        seg: (1, *spatial) preprocessed segmentation of the case.
        plan: the synth plan.
        transform: the transform whose ``insert`` places and synthesises the lesion.
        patch: patch size; two axes for a 2d configuration (a slice of the 3D case).
        rng: random generator (centre, placement and texture).

    Returns:
        The patch before and after synthesis, or None when the case has no placement voxel or nothing fits.
    """
    # the pipeline's own placement region: the organ label, or the tissue region where there is none
    region = np.argwhere(placement_region(np.asarray(data), np.asarray(seg[0]), plan))
    if len(region) == 0:
        return None
    centre = region[rng.integers(len(region))]
    bbox = [[int(c) - p // 2, int(c) - p // 2 + p] for c, p in zip(centre[-len(patch):], patch)]
    slice_index = None
    if len(patch) == 2:  # 2d configuration: one slice of the 3D case
        slice_index = int(centre[0])
        data, seg = data[:, slice_index], seg[:, slice_index]
    image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0).astype(np.float32))
    labels = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1).astype(np.int16))
    new_image, new_labels = transform.insert(image, labels, rng)
    if new_image is None:
        return None
    lesion = (new_labels[0] == plan.tumour_label).numpy() & (labels[0] != plan.tumour_label).numpy()
    return SyntheticPatch(bbox, slice_index, image, labels, new_image, new_labels, lesion)


def build_transforms(plan: SynthPlan, backends: Sequence[str], patch: tuple[int, ...], seed: int,
                     templates: Callable[[SynthPlan], list[np.ndarray]]
                     ) -> dict[str, tuple[SynthPlan, SynthTumourTransform]]:
    """Per backend, the synth plan with that backend and the transform that inserts its tumours, built as the
    trainers build them (``transplant`` with template deformation; templates wherever the deformation is
    ``template``).

    Args:
        plan: the dataset's synth plan.
        backends: backend names (duplicates are dropped).
        patch: the configuration's patch size.
        seed: transform seed.
        templates: called with a plan, returns the training fold's template masks (called only when needed).

    Raises:
        GeneratorUnavailable: for a backend that cannot be built, naming it.
    """
    from nnunet_synth.cli import error_line, is_user_error
    from nnunet_synth.generators import get_backend

    names = list(dict.fromkeys(backends))
    for name in names:  # every name first, before a model is loaded
        try:
            get_backend(name)
        except (KeyError, NotImplementedError) as e:
            raise GeneratorUnavailable(f"-g {name}: {error_line(e)}") from e
    built = {}
    for name in names:
        p = plan.with_backend(name)
        try:
            masks = templates(p) if p.shapes.deformation == "template" else None
            built[name] = p, SynthTumourTransform(p, 1.0, patch, seed, templates=masks)
        except Exception as e:
            if not is_user_error(e, also=(ValueError, KeyError, NotImplementedError, ImportError)):
                raise
            raise GeneratorUnavailable(f"-g {name}: generator backend {name!r} cannot be built: {error_line(e)}"
                                       ) from e
    return built


def _on_slice(data: np.ndarray, seg: np.ndarray, slice_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Image and segmentation channel 0 of a case, or of its slice ``slice_index`` (2d configuration)."""
    return (data, seg[0]) if slice_index is None else (data[:, slice_index], seg[0, slice_index])


def _draw_all(ds, identifiers: Sequence[str], transforms: dict, patch: tuple[int, ...], rng: np.random.Generator,
              tries: int = 20) -> tuple[str, np.ndarray, np.ndarray, list[SyntheticPatch]] | None:
    """A random case and, per backend, its synthetic tumour in the same patch (every backend starts from the same
    random state, so they share the patch centre); None when nothing fits in ``tries`` patches."""
    for _ in range(tries):
        case = identifiers[rng.integers(len(identifiers))]
        data, seg, _, _ = ds.load_case(case)
        data, seg = np.asarray(data), np.asarray(seg)
        state = int(rng.integers(2**63))
        drawn = [draw_synthetic_patch(data, seg, p, t, patch, np.random.default_rng(state))
                 for p, t in transforms.values()]
        if all(d is not None for d in drawn):
            return case, data, seg, drawn
    return None


def write_previews(dataset: str | int, configuration: str = "3d_fullres", num: int = 8,
                   output_dir: str | Path = "synth_preview", plans_identifier: str = "nnUNetPlans",
                   seed: int = 0, backends: Sequence[str] | None = None) -> list[Path]:
    """Writes ``num`` PNGs comparing a real tumour of the dataset with the synthetic tumours of ``backends``.

    Each synthetic tumour is inserted into a patch of the configuration's patch size around a random placement
    voxel of a preprocessed case; the real tumour shown next to them is the unused one closest in size.

    Args:
        dataset: dataset name or ID.
        configuration: nnU-Net configuration.
        num: number of PNGs.
        output_dir: folder for the PNGs.
        plans_identifier: nnU-Net plans identifier.
        seed: random seed (cases, patch centres, lesions).
        backends: generator backends, one row each (default: the synth plan's backend).

    Returns:
        Paths of the written PNGs.

    Raises:
        GeneratorUnavailable: for a backend that cannot be built.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plan = load_synth_plan(dataset, configuration, plans_identifier)
    base = preprocessed_dir(dataset)
    conf = PlansManager(load_json(base / f"{plans_identifier}.json")).get_configuration(configuration)

    def templates(p: SynthPlan) -> list[np.ndarray]:  # real tumour masks of fold 0's training cases, as its trainer
        from nnunet_synth.generators.splits import split_cases
        from nnunet_synth.generators.templates import fold_templates

        return fold_templates(base, conf, p, split_cases(dataset, configuration, 0, plans_identifier)[0])[0]

    patch = tuple(conf.patch_size)
    transforms = build_transforms(plan, backends or [plan.backend], patch, seed, templates)
    folder = base / conf.data_identifier
    ds = infer_dataset_class(str(folder))(str(folder))
    identifiers = sorted(ds.identifiers)
    spacing = tuple(float(s) for s in plan.spacing[-len(patch):])
    channels = [ch.name for ch in plan.channels]
    rng = np.random.default_rng(seed)
    pool = real_tumours(ds, identifiers, plan.tumour_label, len(patch) == 2, rng, max(2 * num, 16))
    used: set[int] = set()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in tqdm(range(num), desc="synth previews", unit="png"):
        found = _draw_all(ds, identifiers, transforms, patch, rng)
        if found is None:
            where = (f"organ label {plan.organ_label}" if plan.organ_label is not None
                     else f"tissue region {plan.tissue}")
            raise RuntimeError(f"no synthetic tumour could be placed in 20 patches of {base.name}: is the {where} "
                               f"of nnUNetSynthPlans.json right? (nnUNetv2_synth_plan --organ-label N)")
        case, data, seg, drawn = found
        lesions = [tuple(x + lo for x, (lo, _) in zip(np.nonzero(d.lesion), d.bbox)) for d in drawn]
        real = None
        if pool:
            index = closest_in_size(pool, float(np.median([len(c[0]) for c in lesions])), used)
            used.add(index)
            real = pool[index]
        extents = [[hi - lo for lo, hi in _bounds(c)] for c in ([real.coords] if real else []) + lesions]
        fov = field_of_view_mm(extents, spacing)
        synthetic = [cut_crop(name, case, *_on_slice(data, seg, d.slice_index), plan.tumour_label, coords,
                              crop_box(coords, fov, spacing), d, placement_region(*_on_slice(data, seg, d.slice_index),
                                                                                  p))
                     for (name, (p, _)), d, coords in zip(transforms.items(), drawn, lesions)]
        real_crop = None
        if real is not None:
            rdata, rseg = (data, seg) if real.case == case else (np.asarray(a) for a in ds.load_case(real.case)[:2])
            real_crop = cut_crop("real", real.case, *_on_slice(rdata, rseg, real.slice_index), plan.tumour_label,
                                 real.coords, crop_box(real.coords, fov, spacing))
        path = out / f"preview_{i:02d}_{case}.png"
        render_comparison(real_crop, synthetic, spacing, channels, fov,
                          f"{base.name} ({configuration}): real tumour (blue) vs synthetic (red) of "
                          f"{', '.join(transforms)}, placed in the {REGION_NAMES[plan.region_kind]} (yellow, "
                          f"dashed); {fov:.0f} mm field of view, one grey window per channel",
                          path)
        written.append(path)
    return written
