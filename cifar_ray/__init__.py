"""cifar-ray: CIFAR-10 CNN training on Ray Train and ablations on Ray Tune."""

__version__ = "0.1.0"
