"""Job: the augmentation ablation (space `augmentation`): one augmentation at a time on a
fixed cnn, rotation with black, reflected and cropped corners among them.

    python jobs/ablate_augmentation.py [--data cifar10] [--seeds 3] [--gpus-per-trial 0.25]
    python jobs/ablate_augmentation.py --smoke   # no augmentation vs rotate-crop, one epoch

Augmentation effects are often smaller than seed noise: --seeds 3 lets the report tell.
Results: STORAGE/sweeps/NAME.
"""

import jobkit

if __name__ == "__main__":
    jobkit.main(lambda: jobkit.sweep_body(
        "augmentation", "The augmentation ablation of cifar-ray on the Ray cluster.",
        smoke_variants=["none", "rotate-crop"]))
