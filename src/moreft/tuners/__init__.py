"""moreft's methods as peft methods: tuner classes and their registration with peft."""

from .model import LoRAModel, MoRAModel, MoreftTuner, MoReModel
from .registration import TUNERS, register, registered

__all__ = ["TUNERS", "LoRAModel", "MoRAModel", "MoReModel", "MoreftTuner", "register", "registered"]
