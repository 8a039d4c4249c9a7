"""Realism benchmark: AUC of a classifier telling each backend's synthetic tumours from a dataset's real ones.

Per seed the preprocessed cases are split in halves; the real tumours of half A are compared with the real
tumours of half B (the floor: two real samples at this size) and with synthetic tumours inserted into half B by
each contender, whose texture and donors come from half B only. Features are scale-free (ring units), the
classifier a random forest with folds grouped by case (see nnunet_synth.evaluation.realism_benchmark).

    python benchmarks/realism.py -d 950                       # the IBSI sarcoma CT cohort, preprocessed
    python benchmarks/realism.py -d 921 --seeds 0 1 2 --contenders analytic transplant

Targets (issue 12, sarcoma CT): analytic <= 0.75, transplant <= 0.70, floor near 0.6.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nnunet_synth.evaluation.realism_benchmark import CONTENDERS, format_table, load_cases, run_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True, help="preprocessed dataset name or ID (synth plan made)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--max-cases", type=int, default=None, help="a random subset of the cases")
    parser.add_argument("--repeats", type=int, default=2, help="cross-validation repeats per seed")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    plan, cases = load_cases(args.dataset, args.configuration, args.plans, args.max_cases)
    results = run_benchmark(plan, cases, args.contenders, args.seeds, args.repeats)
    print(format_table(results, f"realism AUC on {plan.dataset_name} ({args.configuration}, {len(cases)} cases, "
                                f"seeds {args.seeds}); 0.5 = indistinguishable, 'real' = the real-vs-real floor"))
    if args.json:
        args.json.write_text(json.dumps({k: {"auc": v["auc"], "n": v["n"], "top_features": dict(v["top_features"])}
                                         for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
