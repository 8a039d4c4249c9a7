"""Pictures that compare real and synthetic tumours: ``nnUNetv2_synth_preview`` (one row per real tumour and per
backend, one shared grey window per channel, zoomed to the lesion) and the example panel of the quality report."""

from __future__ import annotations

import sys

import matplotlib.image
import numpy as np
import pytest
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

from nnunet_synth import preview
from nnunet_synth.generators import TumourGenerator, get_backend
from nnunet_synth.preview import (
    DPI,
    MIN_CROP_VOXELS,
    NO_REAL_TUMOUR,
    ZOOM,
    TumourCrop,
    comparison_figure,
    crop_box,
    field_of_view_mm,
    figure_size,
    shared_window,
    write_previews,
)

FLAT_VALUE = -7.5  # what the test backend writes into its lesions (far outside the phantom's intensities)


class FlatGenerator(TumourGenerator):
    """A second backend for the tests: every lesion voxel of every channel set to :data:`FLAT_VALUE`."""

    name = "flat_test"

    def synthesize(self, image, lesion, spacing, rng) -> None:
        image[(slice(None), *lesion.bbox)][:, lesion.mask] = FLAT_VALUE


@pytest.fixture
def flat_backend(monkeypatch) -> str:
    """Registers :class:`FlatGenerator` for one test (the registry is restored afterwards)."""
    from nnunet_synth import generators

    monkeypatch.setitem(generators._BACKENDS, FlatGenerator.name, FlatGenerator)
    return FlatGenerator.name


@pytest.fixture
def rendered(monkeypatch) -> list[dict]:
    """Records the arguments and the layout of every comparison PNG written."""
    calls = []
    render = preview.render_comparison

    def spy(real, synthetic, spacing, channel_names, fov_mm, title, path):
        layout = render(real, synthetic, spacing, channel_names, fov_mm, title, path)
        calls.append({"real": real, "synthetic": synthetic, "layout": layout, "path": path})
        return layout

    monkeypatch.setattr(preview, "render_comparison", spy)
    return calls


def load_case(dataset: int, case: str) -> tuple[np.ndarray, np.ndarray]:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_synth.planning import preprocessed_dir

    folder = preprocessed_dir(dataset) / "nnUNetPlans_3d_fullres"
    data, seg, _, _ = infer_dataset_class(str(folder))(str(folder)).load_case(case)
    return np.asarray(data), np.asarray(seg)


def png_height(path) -> int:
    return matplotlib.image.imread(path).shape[0]


# --- units: window, field of view, figure -----------------------------------------------------------------------


def test_shared_window_pools_every_panel():
    rng = np.random.default_rng(0)
    dark, bright = rng.uniform(0, 1, (20, 20)), rng.uniform(10, 11, (20, 20))
    lo, hi = shared_window([dark, bright])
    assert lo < 1 and hi > 10, "one window spans both panels"
    assert shared_window([bright, dark]) == (lo, hi), "the order of the panels does not matter"
    # masks restrict the pooled pixels (the padding outside a case), NaN is ignored, a flat image still gets a range
    masked = shared_window([dark, bright], [np.ones_like(dark, bool), np.zeros_like(bright, bool)])
    assert masked[1] < 1.5, masked
    with_nan = np.where(np.eye(20, dtype=bool), np.nan, bright)
    assert np.isfinite(shared_window([with_nan])).all()
    flat = shared_window([np.full((4, 4), 2.0)])
    assert flat[0] < 2.0 < flat[1]


def test_field_of_view_zooms_to_the_largest_lesion_with_a_minimum():
    spacing = (3.0, 1.5, 1.5)
    assert field_of_view_mm([(1, 2, 2)], spacing) == MIN_CROP_VOXELS * 1.5, "small lesions: the minimum"
    assert field_of_view_mm([(2, 4, 4), (10, 30, 8)], spacing) == pytest.approx(ZOOM * 45.0), "largest extent in mm"
    coords = (np.array([5, 6]), np.array([10, 19]), np.array([30, 31]))
    box = crop_box(coords, 60.0, spacing)
    assert [hi - lo for lo, hi in box] == [20, 40, 40], "the same field of view in mm on every axis"
    for c, (lo, hi) in zip(coords, box):
        assert lo <= c.min() and c.max() < hi
        assert abs((lo + hi) - (c.min() + c.max() + 1)) <= 1, "centred on the lesion"


def make_crop(label: str, shape: tuple[int, ...], offset: float, channels: int = 2) -> TumourCrop:
    rng = np.random.default_rng(len(label))
    image = rng.normal(offset, 1.0, (channels, *shape)).astype(np.float32)
    image[1] += 100  # channel 1 on another scale: its own window
    lesion = np.zeros(shape, bool)
    lesion[tuple(slice(n // 3, n // 2) for n in shape)] = True
    return TumourCrop(label, "case", [[0, n] for n in shape], image, lesion, np.zeros(shape, bool),
                      np.ones(shape, bool))


@pytest.mark.parametrize("shape, planes", [((12, 24, 24), ["axial", "coronal", "sagittal"]), ((24, 24), ["slice"])],
                         ids=["3d", "2d"])
def test_every_panel_of_a_channel_has_the_same_window(shape, planes):
    real, synthetic = make_crop("real", shape, 0.0), [make_crop("a", shape, 5.0), make_crop("bb", shape, -5.0)]
    fig, layout = comparison_figure(real, synthetic, (2.0, 1.0, 1.0)[-len(shape):], ["T1", "T2"], 40.0, "t")
    assert layout.rows == ["real", "a", "bb"]
    assert layout.columns == [f"{ch}: {p}" for ch in ("T1", "T2") for p in planes]
    axes = np.array(fig.axes).reshape(3, len(layout.columns))
    for col in range(len(layout.columns)):
        window = layout.windows[col // len(planes)]
        assert all(ax.images[0].get_clim() == window for ax in axes[:, col]), "one window per channel"
    assert layout.windows[0][0] < -4 and layout.windows[0][1] > 4, "pooled over the real and both synthetic rows"
    assert layout.windows[1][0] > 90, "channel 1 has its own window"
    fig_without, layout_without = comparison_figure(None, synthetic, (2.0, 1.0, 1.0)[-len(shape):], ["T1", "T2"],
                                                    40.0, "t")
    assert any(t.get_text() == NO_REAL_TUMOUR for t in fig_without.axes[0].texts)
    assert not fig_without.axes[0].images and layout_without.rows == ["real", "a", "bb"]


# --- the command on a preprocessed phantom -----------------------------------------------------------------------


def test_preview_shows_a_real_tumour_and_one_row_per_backend(phantom_ct, flat_backend, rendered, tmp_path):
    from nnunet_synth.planning import load_synth_plan

    tumour_label = load_synth_plan(phantom_ct, "3d_fullres").tumour_label
    paths = write_previews(phantom_ct, "3d_fullres", 2, tmp_path / "png", backends=["analytic", flat_backend])
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    for call in rendered:
        layout, real, synthetic = call["layout"], call["real"], call["synthetic"]
        assert layout.rows == ["real", "analytic", flat_backend]
        assert layout.columns == ["axial", "coronal", "sagittal"]
        expected = DPI * figure_size(len(layout.rows), len(layout.columns))[1]
        assert abs(png_height(call["path"]) - expected) <= 1, "three rows of panels"
        # the real row is a real tumour component of the case it names
        _, seg = load_case(phantom_ct, real.case)
        labels = np.asarray(crop_and_pad_nd(seg[0], real.box, -1))
        assert real.lesion.sum() >= preview.MIN_REAL_VOXELS and (labels[real.lesion] == tumour_label).all()
        # each synthetic row holds its backend's lesion, in a crop of the same size (mm and voxels) as the real one
        analytic, flat = synthetic
        assert analytic.lesion.any() and flat.lesion.any()
        assert (flat.image[:, flat.lesion] == FLAT_VALUE).all()
        assert not (analytic.image[:, analytic.lesion] == FLAT_VALUE).any()
        assert (analytic.lesion == flat.lesion).all(), "every backend fills the same lesion of the same patch"
        assert real.image.shape == analytic.image.shape == flat.image.shape
        assert min(real.image.shape[2:]) >= MIN_CROP_VOXELS
        lesion_mm = max((hi - lo) * s for c in synthetic for (lo, hi), s in
                        zip([(int(x.min()), int(x.max()) + 1) for x in np.nonzero(c.lesion)], (3.0, 1.5, 1.5)))
        assert layout.fov_mm >= ZOOM * lesion_mm - 1e-6, "zoomed out to 2.5x the lesion"


def test_preview_of_a_dataset_without_real_tumours_says_so(phantom_healthy, rendered, tmp_path):
    paths = write_previews(phantom_healthy, "3d_fullres", 1, tmp_path / "png")
    assert len(paths) == 1 and paths[0].is_file()
    assert rendered[0]["real"] is None and rendered[0]["layout"].rows == ["real", "analytic"]
    assert rendered[0]["synthetic"][0].lesion.any()


def test_transplant_backend_gets_template_deformation(phantom_ct, rendered, tmp_path):
    try:
        get_backend("transplant")
    except KeyError:
        pytest.skip("no 'transplant' backend in this checkout (another change adds it)")
    from nnunet_synth.planning import load_synth_plan

    plan = load_synth_plan(phantom_ct, "3d_fullres")
    masks = [np.ones((3, 3, 3), bool)]
    built = preview.build_transforms(plan, ["transplant", "analytic"], (16, 32, 32), 0, lambda p: masks)
    assert built["transplant"][0].shapes.deformation == "template" and built["transplant"][1].templates is masks
    assert built["analytic"][0].shapes.deformation == plan.shapes.deformation
    write_previews(phantom_ct, "3d_fullres", 1, tmp_path / "png", backends=["transplant"])
    assert rendered[0]["layout"].rows == ["real", "transplant"] and rendered[0]["synthetic"][0].lesion.any()


@pytest.mark.parametrize("backend, reason", [("no_such_backend", "unknown generator backend"),
                                             ("ddpm", "does not exist")])
def test_backend_that_cannot_be_built_is_one_line_naming_it(phantom_ct, tmp_path, monkeypatch, capsys, backend,
                                                            reason):
    from nnunet_synth.cli import preview_entry

    out = tmp_path / "png"
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))  # no generator trained by another test
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_synth_preview", "-d", str(phantom_ct), "-n", "1", "-o", str(out),
                                      "-g", "analytic", backend])
    with pytest.raises(SystemExit) as exit_info:
        preview_entry()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("nnUNetv2_synth_preview: error: ") and f"'{backend}'" in lines[0] \
        and reason in lines[0], lines[0]
    assert not out.exists()


# --- the quality report's example panel --------------------------------------------------------------------------


def lesion_crop(kind: str, radius: int, size: int, value: float):
    from nnunet_synth.evaluation.quality import LesionCrop

    yy, xx = np.mgrid[:size, :size] - size // 2
    lesion = yy ** 2 + xx ** 2 <= radius ** 2
    image = np.where(lesion, value, 0.0)[None].astype(np.float32)
    return LesionCrop(kind, f"{kind}{radius}", (0, 0, 0), int(lesion.sum()), 2.0 * radius, image, lesion,
                      [{}])


def test_examples_pair_sizes_at_one_scale_and_one_window(monkeypatch, tmp_path):
    from nnunet_synth.evaluation import quality_report

    figures = []
    monkeypatch.setattr(quality_report.plt, "close", figures.append)
    real = [lesion_crop("real", r, 2 * r + 10, -1.0) for r in (6, 2, 4)]
    synthetic = [lesion_crop("synthetic", r, 2 * r + 10, 3.0) for r in (3, 7, 5)]
    quality_report.plot_examples(real, synthetic, ["CT"], (3.0, 1.0, 1.0), 3, 0, tmp_path / "examples.png", "t")
    assert (tmp_path / "examples.png").is_file()
    axes = np.array(figures[0].axes).reshape(2, 3)
    for row, kind in zip(axes, ("real", "synthetic")):
        sizes = [int(ax.get_title().split(", ")[1].split(" ")[0]) for ax in row]
        assert sizes == sorted(sizes), "columns pair tumours of similar size"
        assert all(ax.get_title().startswith(kind) for ax in row)
    shapes = {ax.images[0].get_array().shape for ax in axes.ravel()}
    assert shapes == {(24, 24)}, "one field of view (the largest crop) for every tumour"
    assert len({ax.images[0].get_clim() for ax in axes.ravel()}) == 1, "one grey window"
    smallest = np.ma.getdata(axes[0, 0].images[0].get_array())
    assert np.isnan(smallest).any() and not np.isnan(smallest[12, 12]), "small crops padded, centred on the tumour"
