"""Job: the seed's one-change-at-a-time journey (space `seed-journey`: the steps of the
student's Keras notebook this project grew from, as named variants) as one ASHA sweep, each
variant beside the accuracy the notes report.

    python jobs/seed_journey.py [--data cifar10] [--gpus-per-trial 0.25] [--seeds 3]
    python jobs/seed_journey.py --smoke          # two variants, one epoch, tiny data, CPU

Results: STORAGE/sweeps/NAME (trials.csv, report.md, best.yaml); `cifar-ray report` on a
copy rewrites the report.
"""

import jobkit

if __name__ == "__main__":
    jobkit.main(lambda: jobkit.sweep_body(
        "seed-journey", "The seed-journey sweep of cifar-ray on the Ray cluster.",
        smoke_variants=["s01-five-layers", "s10-many-filters"]))
