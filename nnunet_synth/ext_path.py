"""Print the folder that ``nnUNet_extTrainer`` must point at.

Usage::

    export nnUNet_extTrainer=$(python -m nnunet_synth.ext_path)
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

EXT_TRAINER_DIR = Path(__file__).resolve().parent / "nnunet_ext"


@contextlib.contextmanager
def synth_trainers_discoverable() -> Iterator[None]:
    """Adds this package's trainer folder to ``nnUNet_extTrainer`` while nnU-Net looks a trainer class up.

    nnU-Net rebuilds a network through the trainer class named in its checkpoint, so models trained with
    ``nnUNetTrainerSynth*`` then load without the user exporting the variable; other folders the user listed
    are searched as before.
    """
    old = os.environ.get("nnUNet_extTrainer")
    paths = [p for p in (old or "").split(os.pathsep) if p]
    if str(EXT_TRAINER_DIR) not in paths:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([*paths, str(EXT_TRAINER_DIR)])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = old


def main() -> None:
    print(EXT_TRAINER_DIR)


if __name__ == "__main__":
    main()
