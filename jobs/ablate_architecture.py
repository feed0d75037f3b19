"""Job: the architecture ablation (space `architecture`): random draws of the cnn family's
knobs (depth, width, filters, dense layers, activation, kernels, dropout, BatchNorm), ASHA
dropping the weak early.

    python jobs/ablate_architecture.py [--data cifar10] [--samples 32] [--gpus-per-trial 0.25]
    python jobs/ablate_architecture.py --smoke   # two draws of two values per knob, one epoch

Results: STORAGE/sweeps/NAME; report.md has one plot per knob.
"""

import jobkit

if __name__ == "__main__":
    jobkit.main(lambda: jobkit.sweep_body(
        "architecture", "The architecture ablation of cifar-ray on the Ray cluster.",
        smoke_samples=2))
