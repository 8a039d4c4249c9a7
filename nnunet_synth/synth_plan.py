"""The synth plan as a typed, validated object (like nnU-Net's PlansManager over its JSON).

``nnUNetSynthPlans.json`` (beside ``nnUNetPlans.json``; ``nnUNetSynthPlans__<plans>.json`` for any other plans
identifier) holds dataset-level settings at the top and per-configuration statistics under ``configurations``.
:func:`load_synth_plan` merges the two for one configuration into a :class:`SynthPlan` and validates every key
against the dataset; every problem is one :class:`SynthPlanError` naming the file, the key, the bad value and
what is allowed. Build statistics with :mod:`nnunet_synth.planning`; build a plan for a lone volume (no nnU-Net
dataset) with :meth:`SynthPlan.for_volume`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_synth.generators.paths import DEFAULT_PLANS_IDENTIFIER
from nnunet_synth.generators.placement import PlacementRules

SYNTH_PLANS_FILE = "nnUNetSynthPlans.json"
# beside the raw dataset.json (written by ``nnUNetv2_synth_convert merge``): the healthy-control case identifiers
HEALTHY_CASES_FILE = "healthy_cases.json"
SIZE_PRESETS = ("labelfree", "quartile", "liver_mri", "slice_area")
DEFORMATIONS = ("elastic", "simplex", "template", "none")
# where lesions go: the organ label, the tissue around real tumours, or fibroglandular tissue inside the breast
PLACEMENT_REGIONS = ("organ", "tissue", "fgt")
DEFAULT_SEED = 12345


class SynthPlanError(ValueError):
    """A synth plan that is unreadable or does not fit its dataset; the message names file, key and value."""


def synth_plan_file(preprocessed: Path, plans_identifier: str = DEFAULT_PLANS_IDENTIFIER) -> Path:
    """The synth plan of ``plans_identifier``: ``nnUNetSynthPlans.json`` for nnU-Net's default plans."""
    if plans_identifier == DEFAULT_PLANS_IDENTIFIER:
        return Path(preprocessed) / SYNTH_PLANS_FILE
    return Path(preprocessed) / f"nnUNetSynthPlans__{plans_identifier}.json"


@dataclass(frozen=True)
class ShapeSettings:
    """How lesion masks are drawn (see :mod:`nnunet_synth.generators.sizes` and ``shapes``).

    Attributes:
        size_preset: labelfree, quartile, liver_mri or slice_area.
        size_class: a class of the preset, ``any`` (one lesion of a random class) or ``mixed``.
        deformation: elastic, simplex, template (real tumour masks of the training fold) or none.
    """

    size_preset: str = "labelfree"
    size_class: str = "any"
    deformation: str = "elastic"


@dataclass(frozen=True)
class ChannelPrior:
    """Intensity prior of one input channel in nnU-Net's normalised space.

    Attributes:
        name: channel name from dataset.json.
        normalization: nnU-Net's normalisation scheme of the channel.
        organ_mean: mean of the placement region.
        organ_std: standard deviation of the placement region.
        contrast_range: tumour-minus-surrounding mean change, drawn uniformly in this range.
        contrast_source: how the range was found (for the log).
        clip: values the synthetic lesion is clipped to (CT window), or None.
    """

    name: str
    normalization: str
    organ_mean: float
    organ_std: float
    contrast_range: tuple[float, float]
    contrast_source: str = ""
    clip: tuple[float, float] | None = None


@dataclass(frozen=True)
class TumourSizes:
    """The dataset's real tumours as clinically counted (see :func:`nnunet_synth.planning.count_tumours`).

    Attributes:
        count: number of real tumours.
        cases: number of cases they come from.
        equivalent_diameter_mm: min/q25/median/q75/max of their equivalent diameters.
        class_radius_mm: radius per quartile class (the ``quartile`` preset).
        rule: how tumours were counted (for the log).
    """

    count: int = 0
    cases: int = 0
    equivalent_diameter_mm: dict[str, float] | None = None
    class_radius_mm: dict[str, float] | None = None
    rule: str = ""


@dataclass(frozen=True)
class TissueRegion:
    """Placement region of a dataset without organ label: a smooth, closed tissue region inside the body.

    Attributes:
        channel: image channel the region is found on.
        range: intensity range of the tissue around real tumours (on the smoothed image).
        smoothing_mm: Gaussian smoothing of the channel before thresholding (mm).
        source: how the range was found (for the log).
    """

    channel: int = 0
    range: tuple[float, float] = (-np.inf, np.inf)
    smoothing_mm: float = 2.0
    source: str = ""


@dataclass(frozen=True)
class FGTRegion:
    """Placement region of breast plans: fibroglandular tissue (FGT) inside the breast, found without a trained model
    (see :mod:`nnunet_synth.generators.regions`); thresholds in nnU-Net's normalised units of ``channel``.

    Attributes:
        channel: the (pre-contrast) channel body and FGT are found on.
        body_threshold: voxels above it are body, below it air.
        range: ``[low, high]`` of the FGT class on the smoothed channel; null: unbounded on that side (the body
            threshold below).
        smoothing_mm: Gaussian smoothing of the channel before the range applies (also the closing and opening).
        skin_margin_mm: FGT closer than this to the body's surface is left out.
        breast_size_mm: median over the training cases of the breast size (equivalent diameter of the body, whole
            case); null: template sizes are not scaled on whole cases.
        breast_size_patch_mm: the same in a patch-size window centred on the body; null: not scaled on patches.
        source: how it was found (for the log).
    """

    channel: int = 0
    body_threshold: float = 0.0
    range: tuple[float | None, float | None] = (None, None)
    smoothing_mm: float = 2.0
    skin_margin_mm: float = 5.0
    breast_size_mm: float | None = None
    breast_size_patch_mm: float | None = None
    source: str = ""


@dataclass(frozen=True)
class TumourAppearance:
    """How one real tumour looks against the tissue around it (see :func:`~nnunet_synth.generators.appearance.
    measure_tumour`); intensities in units of its ring.

    Attributes:
        case: the preprocessed case it was measured in.
        quantiles: per channel, its intensities at the texture's ``levels``.
        texture_sigma_mm: spatial scale of its texture (Gaussian-filtered noise of this standard deviation).
        nugget: share of the texture's variance that is white (voxel-scale) noise.
        edge_sigma_mm: width of its edge (normal-CDF transition across the label border).
        edge_offset_mm: centre of the edge relative to the label border (positive: inside).
    """

    case: str
    quantiles: tuple[tuple[float, ...], ...]
    texture_sigma_mm: float
    nugget: float
    edge_sigma_mm: float
    edge_offset_mm: float


@dataclass(frozen=True)
class TumourTexture:
    """The appearance of the dataset's real tumours, measured by ``nnUNetv2_synth_plan``; the analytic backend
    draws one tumour's values per synthetic lesion.

    Attributes:
        levels: quantile levels of every tumour's ``quantiles``.
        tumours: one record per measured real tumour.
        source: how they were measured (for the log).
    """

    levels: tuple[float, ...]
    tumours: tuple[TumourAppearance, ...]
    source: str = ""

    def median(self, key: str) -> float:
        """Median over the tumours of a scalar field (e.g. ``edge_sigma_mm``)."""
        return float(np.median([getattr(t, key) for t in self.tumours]))

    def median_quantiles(self, channel: int) -> tuple[float, ...]:
        """Per level, the median over the tumours of one channel's quantile."""
        return tuple(float(v) for v in np.median([t.quantiles[channel] for t in self.tumours], axis=0))

    @classmethod
    def from_dict(cls, values: dict, check: _Checker) -> TumourTexture:
        check.that(isinstance(values, dict) and isinstance(values.get("tumours"), list) and bool(values["tumours"])
                   and isinstance(values.get("levels"), list), "texture", values,
                   "an object with 'levels' and a non-empty list of 'tumours' (rebuild with nnUNetv2_synth_plan)")
        try:
            tumours = tuple(TumourAppearance(**{**t, "quantiles": tuple(tuple(q) for q in t["quantiles"])})
                            for t in values["tumours"])
        except (TypeError, KeyError) as e:
            raise SynthPlanError(f"{check.source}: key 'texture.tumours' is malformed ({e}); rebuild it with "
                                 f"nnUNetv2_synth_plan --overwrite") from e
        return cls(levels=tuple(values["levels"]), tumours=tumours, source=values.get("source", ""))


@dataclass(frozen=True)
class SynthPlan:
    """Everything the lesion pipeline needs for one dataset configuration.

    Attributes:
        dataset_name: nnU-Net dataset name (DatasetNNN_Name), or a free name for :meth:`for_volume`.
        configuration: nnU-Net configuration the statistics belong to.
        spacing: voxel spacing (mm) of the configuration.
        tumour_label: label value written for synthetic tumours.
        organ_label: placement region label, or None (then ``tissue`` describes the region).
        channels: intensity prior per input channel.
        plans_identifier: nnU-Net plans identifier the plan belongs to.
        labels: dataset.json labels.
        backend: generator backend name.
        backend_params: backend-specific parameters.
        shapes: size preset, size class, deformation.
        placement: placement rules (margin, gap, share inside).
        seed: base seed of the trainers' generators.
        tumour_sizes: statistics of the real tumours.
        tissue: placement region without organ label.
        texture: appearance of the real tumours (None without real tumours: the label-free paper's texture).
        allow_partial_bank: bank trainers accept a bank that holds fewer cases than were requested (a generation
            that was stopped); without it they refuse one.
        bank_cases: bank trainers mix exactly this many synthetic cases (the fold's first by bank index, so a
            larger count holds a smaller one's) into the real training cases and draw all cases alike, instead of
            giving the bank the share N/100 (the liver-MRI paper's synthetic-count study); 0 trains on real cases
            only; None: the trainer's share.
        statistics_fold: the fold whose training cases' kept tumour masks the statistics come from (datasets with
            hidden tumours); None: all cases.
        healthy_cases: identifiers of the healthy-control cases (the raw dataset's ``healthy_cases.json``, read by
            ``nnUNetv2_synth_plan``): the preferred insertion targets of the on-the-fly trainers.
        placement_region: where lesions go: ``organ`` (the organ label), ``tissue`` (the tissue around real tumours),
            ``fgt`` (fibroglandular tissue inside the breast, the default of MAMA-MIA and Duke plans; with
            deformation ``template`` also scales templates with the breast size); None: organ where there is an
            organ label, else tissue.
        fgt: the FGT region's thresholds learned at planning (plans without organ label).
    """

    dataset_name: str
    configuration: str
    spacing: tuple[float, ...]
    tumour_label: int
    organ_label: int | None
    channels: tuple[ChannelPrior, ...]
    plans_identifier: str = DEFAULT_PLANS_IDENTIFIER
    labels: dict[str, Any] = field(default_factory=dict)
    backend: str = "analytic"
    backend_params: dict[str, Any] = field(default_factory=dict)
    shapes: ShapeSettings = ShapeSettings()
    placement: PlacementRules = PlacementRules()
    seed: int = DEFAULT_SEED
    tumour_sizes: TumourSizes = TumourSizes()
    tissue: TissueRegion | None = None
    texture: TumourTexture | None = None
    allow_partial_bank: bool = False
    bank_cases: int | None = None
    statistics_fold: int | str | None = None
    healthy_cases: tuple[str, ...] = ()
    placement_region: str | None = None
    fgt: FGTRegion | None = None

    @property
    def region_kind(self) -> str:
        """The placement region in use: ``placement_region``, or organ / tissue by the organ label."""
        if self.placement_region is not None:
            return self.placement_region
        return "organ" if self.organ_label is not None else "tissue"

    @property
    def ignore_label(self) -> int | None:
        value = self.labels.get("ignore")
        return int(value) if isinstance(value, int) else None

    def replace(self, **changes) -> SynthPlan:
        """A copy with ``changes``; ``shapes`` and ``placement`` may be given as dicts of the fields to change."""
        for key in ("shapes", "placement"):
            if isinstance(changes.get(key), dict):
                changes[key] = dataclasses.replace(getattr(self, key), **changes[key])
        return dataclasses.replace(self, **changes)

    @property
    def tissue_channel(self) -> int:
        """The channel tissue is told apart on: the tissue region's, or channel 0 with an organ label."""
        return self.tissue.channel if self.tissue is not None else 0

    @property
    def clip_floor(self) -> float | None:
        """The CT window's floor of the tissue channel, None for other normalisations: its voxels (clipped air or
        fat) stay out of tumours' rings."""
        clip = self.channels[self.tissue_channel].clip
        return None if clip is None else float(clip[0])

    def with_backend(self, backend: str) -> SynthPlan:
        """A copy with ``backend`` and the shape settings it needs (its ``required_shapes``: the transplant backend
        paints the real tumours template masks are cut from)."""
        from nnunet_synth.generators import get_backend

        return self.replace(backend=backend, shapes=dict(get_backend(backend).required_shapes))

    def to_dict(self) -> dict:
        """The flat JSON form (as copied into a training's output folder)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, flat: dict, source: str = "synth plan") -> SynthPlan:
        """Builds and validates a plan from its flat JSON form; errors name ``source`` and the key."""
        check = _Checker(source)
        known = {f.name for f in dataclasses.fields(cls)} | {"intensity", "intensity_band"}
        for key in flat:
            check.that(key in known, key, flat[key], f"a known key ({', '.join(sorted(known))})")
        for key in ("dataset_name", "configuration", "spacing", "tumour_label", "organ_label"):
            check.that(key in flat, key, "(missing)", "a value (rebuild with nnUNetv2_synth_plan --overwrite)")
        channels = flat.get("channels", flat.get("intensity", {}).get("channels") if isinstance(
            flat.get("intensity"), dict) else None)
        check.that(isinstance(channels, list) and channels, "intensity.channels", channels, "a list of channel priors")
        try:
            priors = tuple(ChannelPrior(**{**c, "contrast_range": tuple(c["contrast_range"]),
                                           "clip": None if c.get("clip") is None else tuple(c["clip"])})
                           for c in channels)
        except (TypeError, KeyError) as e:
            raise SynthPlanError(f"{source}: key 'intensity.channels' = {channels!r} is malformed ({e}); "
                                 f"rebuild it with nnUNetv2_synth_plan --overwrite") from e
        shapes = _sub(check, ShapeSettings, flat.get("shapes", {}), "shapes")
        placement = _sub(check, PlacementRules, flat.get("placement", {}), "placement")
        sizes = _sub(check, TumourSizes, flat.get("tumour_sizes", {}), "tumour_sizes")
        tissue = flat.get("tissue")
        if tissue is None and flat.get("intensity_band"):  # plans written before the tissue region
            band = flat["intensity_band"]
            tissue = {"channel": band["channel"], "range": band["range"], "source": band.get("source", "")}
        tissue = None if tissue is None else _sub(check, TissueRegion, {**tissue, "range": tuple(tissue["range"])},
                                                  "tissue")
        fgt = flat.get("fgt")
        if fgt is not None:
            check.that(isinstance(fgt, dict) and isinstance(fgt.get("range", []), list) and len(
                fgt.get("range", [None, None])) == 2, "fgt.range", fgt.get("range") if isinstance(fgt, dict) else fgt,
                "[low, high] (numbers or null) in an object 'fgt'")
            fgt = _sub(check, FGTRegion, {**fgt, "range": tuple(fgt.get("range", (None, None)))}, "fgt")
        healthy = flat.get("healthy_cases", [])
        check.that(isinstance(healthy, list) and all(isinstance(c, str) for c in healthy), "healthy_cases", healthy,
                   "a list of case identifiers")
        plan = cls(dataset_name=str(flat["dataset_name"]), configuration=str(flat["configuration"]),
                   spacing=tuple(flat["spacing"]) if isinstance(flat["spacing"], (list, tuple)) else flat["spacing"],
                   tumour_label=flat["tumour_label"], organ_label=flat["organ_label"], channels=priors,
                   plans_identifier=flat.get("plans_identifier", DEFAULT_PLANS_IDENTIFIER),
                   labels=flat.get("labels", {}), backend=flat.get("backend", "analytic"),
                   backend_params=flat.get("backend_params", {}), shapes=shapes, placement=placement,
                   seed=flat.get("seed", DEFAULT_SEED), tumour_sizes=sizes, tissue=tissue,
                   texture=None if flat.get("texture") is None else TumourTexture.from_dict(flat["texture"], check),
                   allow_partial_bank=flat.get("allow_partial_bank", False), bank_cases=flat.get("bank_cases"),
                   statistics_fold=flat.get("statistics_fold"), healthy_cases=tuple(healthy),
                   placement_region=flat.get("placement_region"), fgt=fgt)
        return plan.validated(source)

    def validated(self, source: str = "synth plan", dataset_json: dict | None = None) -> SynthPlan:
        """Checks ranges and names (and, given ``dataset_json``, labels and channels); returns ``self``.

        Raises:
            SynthPlanError: naming ``source``, the key, the bad value and what is allowed.
        """
        from nnunet_synth.generators import available_backends
        from nnunet_synth.generators.sizes import class_names

        check = _Checker(source)
        check.that(isinstance(self.spacing, tuple) and len(self.spacing) in (2, 3)
                   and all(_number(s) and s > 0 for s in self.spacing), "spacing", self.spacing,
                   "2 or 3 positive numbers")
        check.that(_integer(self.tumour_label) and self.tumour_label > 0, "tumour_label", self.tumour_label,
                   "a positive integer label")
        check.that(self.organ_label is None or (_integer(self.organ_label) and self.organ_label > 0), "organ_label",
                   self.organ_label, "a positive integer label or null")
        check.that(self.organ_label != self.tumour_label, "organ_label", self.organ_label,
                   f"a label other than the tumour label {self.tumour_label}")
        check.that(self.organ_label is not None or self.tissue is not None, "tissue", None,
                   "a tissue region where organ_label is null (rebuild with nnUNetv2_synth_plan --overwrite)")
        check.that(self.backend in available_backends(), "backend", self.backend,
                   f"one of {', '.join(available_backends())}")
        check.that(isinstance(self.backend_params, dict), "backend_params", self.backend_params, "an object")
        check.that(_integer(self.seed), "seed", self.seed, "an integer")
        check.that(self.statistics_fold is None or self.statistics_fold == "all" or (
            _integer(self.statistics_fold) and self.statistics_fold >= 0), "statistics_fold", self.statistics_fold,
            "a fold number, 'all' or null")
        check.that(isinstance(self.allow_partial_bank, bool), "allow_partial_bank", self.allow_partial_bank,
                   "true or false")
        check.that(self.bank_cases is None or (_integer(self.bank_cases) and self.bank_cases >= 0), "bank_cases",
                   self.bank_cases, "a number of bank cases >= 0, or null (the trainer's share N/100)")
        check.that(isinstance(self.healthy_cases, tuple) and all(isinstance(c, str) and c for c in self.healthy_cases)
                   and len(set(self.healthy_cases)) == len(self.healthy_cases), "healthy_cases",
                   list(self.healthy_cases), "distinct case identifiers")
        shapes = self.shapes
        check.that(shapes.size_preset in SIZE_PRESETS, "shapes.size_preset", shapes.size_preset,
                   f"one of {', '.join(SIZE_PRESETS)}")
        classes = (*class_names(shapes.size_preset), "any", "mixed")
        check.that(shapes.size_class in classes, "shapes.size_class", shapes.size_class,
                   f"one of {', '.join(classes)} for size_preset {shapes.size_preset!r}")
        check.that(shapes.deformation in DEFORMATIONS, "shapes.deformation", shapes.deformation,
                   f"one of {', '.join(DEFORMATIONS)}")
        check.that(shapes.size_preset != "slice_area" or len(self.spacing) == 2, "shapes.size_preset",
                   shapes.size_preset, "a 3D preset for the 3D configuration "
                   f"{self.configuration!r} ('slice_area' bins per-slice pixel areas of 2d configurations)")
        check.that(self.backend != "transplant" or shapes.deformation == "template", "shapes.deformation",
                   shapes.deformation, "'template' for backend 'transplant' (it paints the real tumour each template "
                   "mask was cut from; the nnUNetTrainerSynthNTransplant trainers set it)")
        check.that(shapes.deformation != "template" or len(self.spacing) == 3, "shapes.deformation",
                   shapes.deformation, f"elastic, simplex or none for the 2d configuration {self.configuration!r} "
                   f"(template masks are the real tumours' 3D components)")
        check.that(shapes.size_preset != "quartile" or bool(self.tumour_sizes.class_radius_mm),
                   "shapes.size_preset", shapes.size_preset, "labelfree or liver_mri: 'quartile' needs real "
                   "tumours, and this plan counted none")
        rules = self.placement
        check.that(_number(rules.margin_mm) and rules.margin_mm >= 0, "placement.margin_mm", rules.margin_mm,
                   "a number >= 0 (mm)")
        check.that(_number(rules.gap_mm) and rules.gap_mm >= 0, "placement.gap_mm", rules.gap_mm,
                   "a number >= 0 (mm)")
        check.that(_number(rules.min_inside) and 0 < rules.min_inside <= 1, "placement.min_inside",
                   rules.min_inside, "a share in (0, 1]")
        for i, c in enumerate(self.channels):
            lo_hi = c.contrast_range
            check.that(len(lo_hi) == 2 and all(_number(v) for v in lo_hi) and lo_hi[0] <= lo_hi[1],
                       f"intensity.channels[{i}].contrast_range", list(lo_hi), "[low, high] with low <= high")
        if self.tissue is not None:
            lo, hi = self.tissue.range
            check.that(_number(lo) and _number(hi) and lo < hi, "tissue.range", list(self.tissue.range),
                       "[low, high] with low < high")
            check.that(_integer(self.tissue.channel) and 0 <= self.tissue.channel < len(self.channels),
                       "tissue.channel", self.tissue.channel, f"a channel index below {len(self.channels)}")
        self._check_region(check)
        if self.texture is not None:
            levels = self.texture.levels
            check.that(len(levels) >= 2 and all(_number(v) and 0 <= v <= 1 for v in levels)
                       and list(levels) == sorted(levels), "texture.levels", list(levels),
                       "increasing quantile levels in [0, 1]")
            for i, t in enumerate(self.texture.tumours):
                check.that(len(t.quantiles) == len(self.channels) and all(
                    len(q) == len(levels) and all(_number(v) for v in q) and list(q) == sorted(q)
                    for q in t.quantiles), f"texture.tumours[{i}].quantiles", [list(q) for q in t.quantiles],
                    f"{len(self.channels)} increasing lists of {len(levels)} numbers (one per channel)")
                for key in ("texture_sigma_mm", "edge_sigma_mm"):
                    check.that(_number(getattr(t, key)) and getattr(t, key) > 0, f"texture.tumours[{i}].{key}",
                               getattr(t, key), "a positive number (mm)")
                check.that(_number(t.nugget) and 0 <= t.nugget <= 1, f"texture.tumours[{i}].nugget", t.nugget,
                           "a share in [0, 1]")
                check.that(_number(t.edge_offset_mm), f"texture.tumours[{i}].edge_offset_mm", t.edge_offset_mm,
                           "a number (mm)")
        if dataset_json is not None:
            self._check_dataset(check, dataset_json)
        return self

    def _check_region(self, check: _Checker) -> None:
        region = self.placement_region
        allowed = "null or 'organ'" if self.organ_label is not None else "null, 'tissue' or 'fgt'"
        check.that(region is None or (region in PLACEMENT_REGIONS and (region == "organ") == (
            self.organ_label is not None)), "placement_region", region,
            f"{allowed} (one of {', '.join(PLACEMENT_REGIONS)}; 'organ' where organ_label is set)")
        check.that(region != "fgt" or self.fgt is not None, "fgt", None, "the FGT region's thresholds where "
                   "placement_region is 'fgt' (rebuild with nnUNetv2_synth_plan --overwrite)")
        spec = self.fgt
        if spec is None:
            return
        check.that(_integer(spec.channel) and 0 <= spec.channel < len(self.channels), "fgt.channel", spec.channel,
                   f"a channel index below {len(self.channels)}")
        check.that(_number(spec.body_threshold), "fgt.body_threshold", spec.body_threshold, "a number")
        lo, hi = spec.range
        check.that(all(v is None or _number(v) for v in (lo, hi)) and (lo is None or hi is None or lo < hi)
                   and (lo is None or lo >= spec.body_threshold), "fgt.range", list(spec.range),
                   "[low, high] with low < high (null: unbounded), low not below fgt.body_threshold")
        check.that(_number(spec.smoothing_mm) and spec.smoothing_mm > 0, "fgt.smoothing_mm", spec.smoothing_mm,
                   "a positive number (mm)")
        check.that(_number(spec.skin_margin_mm) and spec.skin_margin_mm >= 0, "fgt.skin_margin_mm",
                   spec.skin_margin_mm, "a number >= 0 (mm)")
        for key in ("breast_size_mm", "breast_size_patch_mm"):
            value = getattr(spec, key)
            check.that(value is None or (_number(value) and value > 0), f"fgt.{key}", value,
                       "a positive number (mm) or null")

    def _check_dataset(self, check: _Checker, dataset_json: dict) -> None:
        labels = dataset_json["labels"]
        listing = ", ".join(f"{v}={k!r}" for k, v in labels.items())
        values = {v for k, v in labels.items() if isinstance(v, int) and v != 0 and k != "ignore"}
        check.that(self.tumour_label in values, "tumour_label", self.tumour_label,
                   f"a foreground label of dataset.json ({listing})")
        check.that(self.organ_label is None or self.organ_label in values, "organ_label", self.organ_label,
                   f"null or a foreground label of dataset.json ({listing})")
        n = len(dataset_json["channel_names"])
        check.that(len(self.channels) == n, "intensity.channels", f"{len(self.channels)} channels",
                   f"{n} channels as in dataset.json (rebuild with nnUNetv2_synth_plan --overwrite)")

    @classmethod
    def for_volume(cls, image: np.ndarray, seg: np.ndarray, spacing: tuple[float, ...], tumour_label: int = 1,
                   organ_label: int | None = None, name: str = "volume", **settings) -> SynthPlan:
        """A plan for one volume that has no nnU-Net dataset, measured on the volume itself.

        Args:
            image: (C, *spatial) float image (any intensity units).
            seg: (*spatial) or (1, *spatial) integer labels (0 background).
            spacing: voxel spacing in mm.
            tumour_label: label value of tumours (real ones are measured, synthetic ones get it).
            organ_label: label of the placement region; None places in tissue like that around the volume's real
                tumours (which it then must have).
            name: a name for messages.
            **settings: other :class:`SynthPlan` fields (``backend``, ``shapes``, ``placement``, ``seed``; dicts
                accepted for ``shapes`` and ``placement``).
        """
        from nnunet_synth.planning import case_statistics, summarise_statistics

        image = np.asarray(image, dtype=np.float32)
        seg = np.asarray(seg)
        seg = seg[0] if seg.ndim == image.ndim else seg
        spacing = tuple(float(s) for s in spacing)
        stats = case_statistics(image, seg, spacing, organ_label, tumour_label)
        if stats is None:
            raise SynthPlanError(f"{name}: no placement region: " + (f"organ label {organ_label} is absent" if
                                 organ_label is not None else f"no real tumour (label {tumour_label}) to measure the "
                                 f"tissue around; pass organ_label"))
        labels = {"background": 0, "tumour": tumour_label, **({"organ": organ_label} if organ_label else {})}
        summary = summarise_statistics([stats], [f"c{i}" for i in range(image.shape[0])],
                                       ["ZScoreNormalization"] * image.shape[0], None, organ_label)
        plan = cls(dataset_name=name, configuration=f"{len(spacing)}d", spacing=spacing, tumour_label=tumour_label,
                   organ_label=organ_label, labels=labels, **summary)
        if plan.tumour_sizes.count >= 4 and "shapes" not in settings:
            plan = plan.replace(shapes={"size_preset": "quartile"})
        return plan.replace(**settings).validated(name)


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def that(self, ok: bool, key: str, value, allowed: str) -> None:
        if not ok:
            raise SynthPlanError(f"{self.source}: key '{key}' = {value!r} is not allowed; expected {allowed}")


def _number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _sub(check: _Checker, cls, values, key: str):
    """A nested settings dataclass from its JSON object, naming unknown keys."""
    check.that(isinstance(values, dict), key, values, "an object")
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        check.that(k in names, f"{key}.{k}", values[k], f"a key of {key} ({', '.join(sorted(names))})")
    return cls(**values)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def read_synth_plans_file(path: Path) -> dict:
    """The raw JSON of a synth plans file; an unreadable or non-object file is a :class:`SynthPlanError`."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SynthPlanError(f"{path}: not valid JSON ({e}); rebuild it with nnUNetv2_synth_plan --overwrite") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("configurations"), dict):
        raise SynthPlanError(f"{path}: not a synth plan (a JSON object with 'configurations' expected); rebuild it "
                             f"with nnUNetv2_synth_plan --overwrite")
    return raw


def flat_plan(raw: dict, configuration: str) -> dict:
    """Dataset-level settings merged with one configuration's statistics (the flat JSON form)."""
    flat = {k: v for k, v in raw.items() if k != "configurations"}
    flat.update(configuration=configuration, **raw["configurations"][configuration])
    return flat
