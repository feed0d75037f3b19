"""Models: layer specs as data (spec.py), the registry (registry.py), the named models (zoo.py).

    from cifar_ray.models import create_model, list_models, model_info
    net = create_model("seed-vgg", num_classes=10, activation="leaky_relu")
    net = create_model("my-net.yaml")
"""

from cifar_ray.models.registry import (create_model, default_recipe, get_spec, list_models,
                                       model_info, register)
from cifar_ray.models.spec import build_module, dump_spec, load_spec, parse_spec, summarize

__all__ = ["build_module", "create_model", "default_recipe", "dump_spec", "get_spec", "list_models",
           "load_spec", "model_info", "parse_spec", "register", "summarize"]
