"""Print the folder that ``nnUNet_extTrainer`` must point at.

Usage::

    export nnUNet_extTrainer=$(python -m nnunet_synth.ext_path)
"""

from pathlib import Path

EXT_TRAINER_DIR = Path(__file__).resolve().parent / "nnunet_ext"


def main() -> None:
    print(EXT_TRAINER_DIR)


if __name__ == "__main__":
    main()
