"""distill: DMD2 distillation of video diffusion models into few-step students."""

__version__ = "0.1.0"
