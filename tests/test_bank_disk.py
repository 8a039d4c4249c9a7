"""A bank's disk use is printed at the end of ``nnUNetv2_synth_generate`` and matches the files on disk."""

from __future__ import annotations

import re

import pytest

FOLD = 2  # a fold no other test makes an analytic bank of


@pytest.mark.slow
def test_generate_prints_the_banks_disk_use(phantom_ct, capsys):
    from nnunet_synth.bank import bank_identifiers, main
    from nnunet_synth.generators.paths import bank_dir
    from nnunet_synth.generators.splits import split_cases

    main(["-d", str(phantom_ct), "-g", "analytic", "-n", "2", "-f", str(FOLD)])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith(f"bank fold {FOLD}:")]
    assert len(line) == 1, "one disk-use line"
    found = re.match(r"bank fold \d+: (\d+) case\(s\), ([\d.]+) MiB on disk, ([\d.]+) MiB per case", line[0])
    assert found, line[0]
    cases, total, per_case = int(found[1]), float(found[2]), float(found[3])

    folder = bank_dir(phantom_ct, "analytic", "3d_fullres")
    identifiers = bank_identifiers(folder, FOLD)
    assert cases == len(identifiers) == 2
    on_disk = sum(f.stat().st_size for f in folder.iterdir()
                  if f.is_file() and f.name.split(".", 1)[0].removesuffix("_seg") in identifiers)
    assert total == pytest.approx(on_disk / 2 ** 20, abs=0.06)
    assert per_case == pytest.approx(on_disk / cases / 2 ** 20, abs=0.006)
    # a bank case is a whole copy of a source case: about the size of a preprocessed training case
    _, _, real = split_cases(phantom_ct, "3d_fullres", FOLD)
    source = identifiers[0].split("__synth_")[0]
    real_size = sum(f.stat().st_size for f in real.iterdir() if f.name.split(".", 1)[0].removesuffix("_seg") == source)
    assert 0.5 * real_size < on_disk / cases < 2 * real_size
